//! The companion's log lines. They go to stderr, a pipe `nhid` reads and relays tagged with
//! the workload's identity. That pipe ends with the `nhid` that started the companion: when a
//! write fails (the companion outlived it), lines go over the channel to whichever `nhid`
//! re-adopts it instead (`log` notifications, a bounded queue: a line that does not fit is
//! dropped). A log line never fails, blocks or panics the caller (`eprintln!` would panic on a
//! broken stderr).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use tokio::sync::mpsc;

/// Longest line kept (nhid cuts longer ones too).
pub const MAX_LINE: usize = 4096;
/// Lines waiting for the channel while stderr is gone.
const QUEUE: usize = 64;

static STDERR_GONE: AtomicBool = AtomicBool::new(false);
static TO_NHID: OnceLock<mpsc::Sender<String>> = OnceLock::new();

/// Writes one line (see the module docs).
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut msg = args.to_string();
    if msg.len() > MAX_LINE {
        let mut end = MAX_LINE;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        msg.truncate(end);
    }
    if !STDERR_GONE.load(Ordering::Relaxed) {
        let mut err = std::io::stderr().lock();
        if writeln!(err, "{msg}").is_ok() {
            return;
        }
        STDERR_GONE.store(true, Ordering::Relaxed);
    }
    if let Some(tx) = TO_NHID.get() {
        let _ = tx.try_send(msg);
    }
}

/// The lines for the channel to send while stderr is gone (taken once, by the channel).
pub(crate) fn channel_queue() -> Option<mpsc::Receiver<String>> {
    let (tx, rx) = mpsc::channel(QUEUE);
    TO_NHID.set(tx).ok().map(|()| rx)
}

/// `log!("...", args)`: one log line, never failing (see [`crate::log`]).
#[macro_export]
macro_rules! log {
    ($($t:tt)*) => {
        $crate::log::line(format_args!($($t)*))
    };
}
