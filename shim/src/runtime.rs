//! Finding the real OCI runtime, and handing over to it with `exec` so its stdout, exit code
//! and signals are the caller's, untouched.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

/// The file identity of this executable, to never resolve `runc` back to ourselves (the shim
/// puts a `runc` link to nhi-runc first on `PATH`).
fn own_identity() -> Option<(u64, u64)> {
    std::fs::metadata("/proc/self/exe")
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

fn is_self(p: &Path, me: Option<(u64, u64)>) -> bool {
    match (std::fs::metadata(p), me) {
        (Ok(m), Some(me)) => (m.dev(), m.ino()) == me,
        _ => false,
    }
}

fn executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.mode() & 0o111 != 0)
}

/// Resolves `name` (a path, or a name on `PATH`), skipping anything that is this executable.
pub fn resolve(name: &str, path_var: Option<OsString>) -> Result<PathBuf, String> {
    let me = own_identity();
    if name.contains('/') {
        let p = PathBuf::from(name);
        if is_self(&p, me) {
            return Err(format!(
                "runtime {name} is nhi-runc itself; point runtime.runtime at the real runtime"
            ));
        }
        return if executable(&p) {
            Ok(p)
        } else {
            Err(format!("runtime {name} is not an executable file"))
        };
    }
    let paths = path_var
        .unwrap_or_else(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&paths)
        .map(|d| d.join(name))
        .find(|p| executable(p) && !is_self(p, me))
        .ok_or_else(|| format!("runtime {name:?} not found on PATH (other than nhi-runc itself)"))
}

/// Replaces this process with `program`, passing `argv0` and `args` unchanged (plus `env`
/// overrides). Returns only on failure.
pub fn exec(
    program: &Path,
    argv0: &str,
    args: &[String],
    env: &[(&str, &std::ffi::OsStr)],
) -> std::io::Error {
    let mut cmd = std::process::Command::new(program);
    cmd.arg0(argv0).args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.exec()
}

/// runc's log line format, for errors nhi-runc reports in the caller's `--log` file.
pub fn log_line(json: bool, msg: &str) -> String {
    let time = rfc3339_now();
    if json {
        let mut s = serde_json::json!({"level": "error", "msg": msg, "time": time}).to_string();
        s.push('\n');
        s
    } else {
        format!("time={time:?} level=error msg={msg:?}\n")
    }
}

fn rfc3339_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil-from-days (H. Hinnant), proleptic Gregorian, UTC.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_on_path_and_by_path() {
        let sh = resolve("sh", None).unwrap();
        assert!(sh.ends_with("sh"));
        assert!(resolve("/definitely/not/here", None).is_err());
        assert!(resolve("no-such-runtime-nhi", None).is_err());
        let me = std::fs::read_link("/proc/self/exe").unwrap();
        assert!(
            resolve(me.to_str().unwrap(), None).is_err(),
            "never ourselves"
        );
        let dir = me.parent().unwrap().as_os_str().to_owned();
        let name = me.file_name().unwrap().to_str().unwrap();
        assert!(
            resolve(name, Some(dir)).is_err(),
            "ourselves on PATH is skipped"
        );
    }

    #[test]
    fn log_lines() {
        let j = log_line(true, "boom \"x\"");
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["level"], "error");
        assert_eq!(v["msg"], "boom \"x\"");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
        assert!(log_line(false, "m").contains("level=error msg=\"m\""));
        assert_eq!(rfc3339_now().len(), 20);
    }
}
