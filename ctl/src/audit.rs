//! `nhictl audit`: verifying the hash-chained audit log and following it.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use nhi_core::audit_log::{self, Verified};

fn io_err(dir: &Path) -> impl Fn(std::io::Error) -> String + '_ {
    move |e| format!("audit log {}: {e}", dir.display())
}

/// What `nhictl audit verify` reports.
pub struct Report {
    /// Tampering or damage (for stderr).
    pub problems: Vec<String>,
    /// Counted losses: not tampering, the chain says what it lacks (for stdout).
    pub losses: Vec<String>,
    /// The summary line when the log is intact, else the failure naming how many problems.
    pub outcome: Result<String, String>,
}

/// Verifies the log in `dir`.
pub fn verify(dir: &Path) -> Result<Report, String> {
    let v = audit_log::verify(dir).map_err(io_err(dir))?;
    Ok(Report {
        problems: v.problems.iter().map(|p| p.to_string()).collect(),
        losses: v.losses.iter().map(|l| format!("loss: {l}")).collect(),
        outcome: summary(dir, &v),
    })
}

fn summary(dir: &Path, v: &Verified) -> Result<String, String> {
    if !v.ok() {
        return Err(format!(
            "audit log {} FAILED verification: {} problem(s)",
            dir.display(),
            v.problems.len()
        ));
    }
    let after_head = if v.unanchored > 0 {
        format!(", {} written after the head", v.unanchored)
    } else {
        String::new()
    };
    let losses = if v.losses.is_empty() {
        String::new()
    } else {
        format!(
            "; intact, with {} events lost and counted in {} dropped record(s)",
            v.lost,
            v.losses.len()
        )
    };
    Ok(format!(
        "audit log {} verified: {} records (seq {}..={}) in {} file(s){after_head}{losses}",
        dir.display(),
        v.records,
        v.first_seq,
        v.last_seq,
        v.files,
    ))
}

/// Writes the last `lines` records (of `identity` only, if given) to `out`; with `follow`,
/// keeps writing new ones as they are appended, until writing fails.
pub fn tail(
    dir: &Path,
    lines: usize,
    identity: Option<&str>,
    follow: bool,
    out: &mut impl Write,
) -> Result<(), String> {
    let (first, mut follower) =
        audit_log::tail_and_follow(dir, lines, identity).map_err(io_err(dir))?;
    let mut emit = |ls: Vec<String>| -> Result<(), String> {
        for l in ls {
            writeln!(out, "{l}").map_err(|e| e.to_string())?;
        }
        out.flush().map_err(|e| e.to_string())
    };
    emit(first)?;
    if follow {
        loop {
            std::thread::sleep(Duration::from_millis(200));
            emit(follower.poll().map_err(io_err(dir))?)?;
        }
    }
    Ok(())
}
