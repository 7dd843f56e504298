//! Where the cgroup hierarchies are mounted, read from `/proc/self/mountinfo` text: `nhid`
//! places companions with it (`agent/src/cgroup.rs`), the test harness cleans up with it.

use std::path::PathBuf;

/// The cgroup mounts, from `/proc/self/mountinfo`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Mounts {
    pub v2: Option<PathBuf>,
    pub memory_v1: Option<PathBuf>,
    pub pids_v1: Option<PathBuf>,
}

/// Reads the cgroup mounts out of mountinfo text. Only mounts of a hierarchy's root count
/// (a bind mount of a sub-cgroup would shift every path).
pub fn parse_mountinfo(text: &str) -> Mounts {
    let mut m = Mounts::default();
    for line in text.lines() {
        let Some((pre, post)) = line.split_once(" - ") else {
            continue;
        };
        let pre: Vec<&str> = pre.split(' ').collect();
        let post: Vec<&str> = post.split(' ').collect();
        if pre.len() < 5 || post.len() < 3 || pre[3] != "/" {
            continue;
        }
        let point = PathBuf::from(unescape_mountinfo(pre[4]));
        match post[0] {
            "cgroup2" if m.v2.is_none() => m.v2 = Some(point),
            "cgroup" => {
                let opts: Vec<&str> = post[2].split(',').collect();
                if opts.contains(&"memory") && m.memory_v1.is_none() {
                    m.memory_v1 = Some(point.clone());
                }
                if opts.contains(&"pids") && m.pids_v1.is_none() {
                    m.pids_v1 = Some(point);
                }
            }
            _ => {}
        }
    }
    m
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The cgroup mounts of this process's mount namespace.
pub fn own_mounts() -> std::io::Result<Mounts> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime shared:14 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/pids rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,pids
37 30 0:33 / /sys/fs/cgroup/cpu,cpuacct rw shared:16 - cgroup cgroup rw,cpu,cpuacct
";
    const UNIFIED: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
";

    #[test]
    fn finds_hierarchies_in_mountinfo() {
        assert_eq!(
            parse_mountinfo(HYBRID),
            Mounts {
                v2: Some("/sys/fs/cgroup/unified".into()),
                memory_v1: Some("/sys/fs/cgroup/memory".into()),
                pids_v1: Some("/sys/fs/cgroup/pids".into()),
            }
        );
        assert_eq!(
            parse_mountinfo(UNIFIED),
            Mounts {
                v2: Some("/sys/fs/cgroup".into()),
                ..Default::default()
            }
        );
        // A bind mount of a sub-cgroup (root field not "/") is not a hierarchy's root.
        let sub = "40 30 0:27 /kubepods /mnt/cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(sub), Mounts::default());
        let spaced = "40 30 0:27 / /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(spaced).v2, Some("/mnt/my cg".into()));
    }
}
