//! Network namespaces and processes, read from /proc on the host side.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;

/// An open handle on a network namespace (keeps it alive while held) and its inode.
pub struct NetNs {
    pub file: File,
    pub inode: u64,
}

impl NetNs {
    /// The network namespace process `pid` is in.
    pub fn of_pid(pid: i32) -> io::Result<Self> {
        Self::open(&format!("/proc/{pid}/ns/net"))
    }

    /// The namespace this process runs in (for `nhid`: the host's).
    pub fn own() -> io::Result<Self> {
        Self::open("/proc/self/ns/net")
    }

    /// Another handle on the same namespace.
    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(NetNs {
            file: self.file.try_clone()?,
            inode: self.inode,
        })
    }

    fn open(path: &str) -> io::Result<Self> {
        let file = File::open(path)?;
        let inode = file.metadata()?.ino();
        Ok(NetNs { file, inode })
    }
}

/// Removes every file of `dir` named `<netns inode>.<anything>` whose inode is not in `keep`,
/// and every file not named so (per-namespace sockets, tokens and records after a restart).
pub fn remove_files_except(dir: &std::path::Path, keep: &std::collections::HashSet<u64>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let inode = name
            .to_str()
            .and_then(|n| n.split('.').next())
            .and_then(|n| n.parse::<u64>().ok());
        if inode.is_none_or(|i| !keep.contains(&i)) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// A process identity that survives pid reuse: pid plus its start time in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcRef {
    pub pid: i32,
    pub start_time: u64,
}

impl ProcRef {
    pub fn of(pid: i32) -> io::Result<Self> {
        Ok(ProcRef {
            pid,
            start_time: start_time(pid)?,
        })
    }

    /// Whether the very same process still exists (not a later one with a reused pid).
    pub fn alive(&self) -> bool {
        start_time(self.pid).is_ok_and(|t| t == self.start_time) && !is_zombie(self.pid)
    }
}

fn stat_fields(pid: i32) -> io::Result<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces and parens: split after the last ')'.
    let rest = s
        .rfind(')')
        .map(|i| &s[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc/pid/stat"))?;
    Ok(rest.split_whitespace().map(str::to_string).collect())
}

/// Field 22 of /proc/<pid>/stat (index 19 after the command name).
pub fn start_time(pid: i32) -> io::Result<u64> {
    stat_fields(pid)?
        .get(19)
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "no start time in /proc/pid/stat",
            )
        })
}

fn is_zombie(pid: i32) -> bool {
    stat_fields(pid).is_ok_and(|f| f.first().is_some_and(|s| s == "Z" || s == "X"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_in_own_netns() {
        let me = ProcRef::of(std::process::id() as i32).unwrap();
        assert!(me.alive());
        let stale = ProcRef {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !stale.alive(),
            "a different start time means a different process"
        );
        assert_eq!(
            NetNs::own().unwrap().inode,
            NetNs::of_pid(std::process::id() as i32).unwrap().inode
        );
    }
}
