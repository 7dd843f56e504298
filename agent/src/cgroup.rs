//! One cgroup per companion: `<parent>/c-<netns inode>` (`[companion.cgroup]`, default
//! `/nhi/c-…`), joined by the forked child before it execs, so the companion and every socket it
//! ever creates belong to it. It serves two ends:
//!
//! - **Bounds.** `memory.max` and `pids.max` (cgroup v2), or on a v1 "hybrid" host, where the
//!   controllers are bound to v1 hierarchies, `memory.limit_in_bytes` and `pids.max` in the v1
//!   memory and pids hierarchies at the same path. Whatever a workload makes its companion
//!   allocate stops at these bounds (the companion is then OOM-killed and restarted by `nhid`
//!   with backoff, which costs only that workload its own companion).
//! - **The edge policy's exemption.** The companion's sockets are recognised by their cgroup v2
//!   membership (nftables `socket cgroupv2`, by cgroup id): unlike a uid, which any root
//!   process of the container can `setuid` to, a cgroup is only entered by writing its
//!   `cgroup.procs`, which a container cannot reach (its `/sys/fs/cgroup` is read-only or
//!   absent, and mounting needs `CAP_SYS_ADMIN`). The cgroup v2 hierarchy always exists, even
//!   when every controller is bound to v1, so membership works on hybrid hosts too.
//!
//! **Why not the pod's cgroup.** The exemption must single out the companion: in the pod's (or
//! container's) cgroup it would exempt the workload too. A leaf of our own under the pod's
//! cgroup would fight the runtime, which owns that subtree (it removes it at pod stop, and v2
//! forbids processes next to child cgroups with controllers), and would show the companion in
//! the container's own cgroup files. So the companion is charged to a bounded cgroup of its own:
//! the pod cannot make it grow past `memory_max`/`pids_max`, and the node's total is bounded by
//! the number of companions times those.
//!
//! **Why a top-level parent, not nhid's own unit.** Under systemd, putting companions below
//! `nhid.service` needs `Delegate=yes` and controllers enabled in the unit's cgroup, which v2
//! then forbids systemd from placing a restarted `nhid` into (no internal processes; systemd 252
//! has no `DelegateSubgroup=`), while companions still live there. A parent of its own at the top
//! of each hierarchy (like the kubelet's cgroupfs driver does with `/kubepods`) avoids that: on
//! v2 its ancestors are only the root, which may hold processes. The unit must not set
//! `ProtectControlGroups=` (it would make `/sys/fs/cgroup` read-only for nhid).
//!
//! The cgroup lives as long as the companion's attachment (restarts of a crashed companion reuse
//! it, so the nftables rule that names its id stays true) and is removed when the companion
//! stops. Empty leftovers of a crashed `nhid` are removed at start.

use std::fs;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nhi_core::cgroupfs::{parse_mountinfo, Mounts};
use nhi_core::config::CompanionCgroupConfig;

/// Where a bound is enforced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hierarchy {
    /// The cgroup v2 hierarchy.
    V2,
    /// A cgroup v1 hierarchy mounted here (the controller is bound to v1).
    V1(PathBuf),
}

/// Where `controller` is enforced: on v2 if the v2 root offers it, else on its v1 hierarchy.
pub fn place(
    controller: &str,
    v2_controllers: &str,
    v1: Option<&Path>,
) -> Result<Hierarchy, String> {
    if v2_controllers.split_whitespace().any(|c| c == controller) {
        return Ok(Hierarchy::V2);
    }
    v1.map(|p| Hierarchy::V1(p.to_path_buf())).ok_or_else(|| {
        format!(
            "no cgroup {controller} controller: neither the cgroup v2 root offers it nor is a cgroup v1 {controller} hierarchy mounted; companions need it to be bounded"
        )
    })
}

/// The cgroups whose `cgroup.subtree_control` must enable a v2 controller for `parent`'s
/// children to have it: the root, every ancestor, `parent` itself.
pub fn subtree_chain(parent: &str) -> Vec<String> {
    let mut chain = vec!["/".to_string()];
    let mut acc = String::new();
    for seg in parent.split('/').filter(|s| !s.is_empty()) {
        acc.push('/');
        acc.push_str(seg);
        chain.push(acc.clone());
    }
    chain
}

/// The leaf of the companion serving network namespace `netns_inode`.
pub fn leaf_name(netns_inode: u64) -> String {
    format!("c-{netns_inode}")
}

/// A companion cgroup's v2 path for nftables: relative to the hierarchy's root, and its level
/// (depth: `/nhi/c-1` is level 2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exempt {
    pub path: String,
    pub level: usize,
}

impl Exempt {
    pub fn of(cgroup_path: &str) -> Exempt {
        let path = cgroup_path.trim_matches('/').to_string();
        Exempt {
            level: path.split('/').filter(|s| !s.is_empty()).count(),
            path,
        }
    }
}

fn join(mount: &Path, cgroup: &str) -> PathBuf {
    mount.join(cgroup.trim_start_matches('/'))
}

/// The node's companion cgroups.
#[derive(Debug)]
pub struct Cgroups {
    v2: PathBuf,
    memory: Hierarchy,
    pids: Hierarchy,
    parent: String,
    memory_max: u64,
    pids_max: u64,
}

impl Cgroups {
    /// Finds the hierarchies, makes `parent` in each (enabling the v2 controllers on the way)
    /// and removes empty companion cgroups a previous `nhid` left. Fails with what is missing.
    pub fn setup(cfg: &CompanionCgroupConfig) -> Result<Cgroups, String> {
        let info = fs::read_to_string("/proc/self/mountinfo")
            .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
        Self::setup_with(cfg, parse_mountinfo(&info))
    }

    fn setup_with(cfg: &CompanionCgroupConfig, mounts: Mounts) -> Result<Cgroups, String> {
        let v2 = mounts.v2.ok_or(
            "no cgroup2 file system is mounted; companions are recognised by their cgroup v2 membership (on a cgroup v1 host mount it, e.g. mount -t cgroup2 none /sys/fs/cgroup/unified)",
        )?;
        let controllers = fs::read_to_string(v2.join("cgroup.controllers"))
            .map_err(|e| format!("{}: {e}", v2.join("cgroup.controllers").display()))?;
        let memory = place("memory", &controllers, mounts.memory_v1.as_deref())?;
        let pids = place("pids", &controllers, mounts.pids_v1.as_deref())?;
        let c = Cgroups {
            v2,
            memory,
            pids,
            parent: cfg.parent.clone(),
            memory_max: cfg.memory_max,
            pids_max: cfg.pids_max,
        };
        c.make_parent()?;
        c.remove_stale();
        Ok(c)
    }

    /// Where the cgroup v2 hierarchy is mounted.
    pub fn v2_mount(&self) -> &Path {
        &self.v2
    }

    /// Each hierarchy's mount point, v2 first, without repeats.
    fn mounts(&self) -> Vec<PathBuf> {
        let mut v = vec![self.v2.clone()];
        for h in [&self.memory, &self.pids] {
            if let Hierarchy::V1(p) = h {
                if !v.contains(p) {
                    v.push(p.clone());
                }
            }
        }
        v
    }

    fn make_parent(&self) -> Result<(), String> {
        let mut v2_enable = Vec::new();
        for (name, h) in [("memory", &self.memory), ("pids", &self.pids)] {
            if *h == Hierarchy::V2 {
                v2_enable.push(format!("+{name}"));
            }
        }
        for m in self.mounts() {
            let dir = join(&m, &self.parent);
            fs::create_dir_all(&dir)
                .map_err(|e| format!("making companion cgroup parent {}: {e}", dir.display()))?;
        }
        if !v2_enable.is_empty() {
            let want = v2_enable.join(" ");
            for cg in subtree_chain(&self.parent) {
                let f = join(&self.v2, &cg).join("cgroup.subtree_control");
                let have = fs::read_to_string(&f).unwrap_or_default();
                let missing: Vec<&str> = v2_enable
                    .iter()
                    .map(String::as_str)
                    .filter(|c| !have.split_whitespace().any(|h| h == &c[1..]))
                    .collect();
                if missing.is_empty() {
                    continue;
                }
                fs::write(&f, missing.join(" ")).map_err(|e| {
                    let hint = if e.raw_os_error() == Some(libc::EBUSY) {
                        format!(": cgroup {cg} holds processes of its own, and cgroup v2 only gives controllers to the children of cgroups without (choose a companion.cgroup.parent whose ancestors hold no processes)")
                    } else {
                        String::new()
                    };
                    format!("enabling {want} in {}: {e}{hint}", f.display())
                })?;
            }
        }
        Ok(())
    }

    fn remove_stale(&self) {
        for m in self.mounts() {
            let dir = join(&m, &self.parent);
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name();
                let name = name.to_string_lossy();
                if name
                    .strip_prefix("c-")
                    .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
                {
                    // Fails (EBUSY) for a cgroup that still holds a process: left alone.
                    if fs::remove_dir(e.path()).is_ok() {
                        tracing::info!(cgroup = %e.path().display(), "removed a companion cgroup a previous nhid left");
                    }
                }
            }
        }
    }

    /// The cgroup path (absolute, hierarchy-relative) of the companion of `netns_inode`.
    pub fn path_for(&self, netns_inode: u64) -> String {
        format!(
            "{}/{}",
            self.parent.trim_end_matches('/'),
            leaf_name(netns_inode)
        )
    }

    /// What the nftables exemption of that companion names.
    pub fn exempt_for(&self, netns_inode: u64) -> Exempt {
        Exempt::of(&self.path_for(netns_inode))
    }

    /// Makes (or reuses) the cgroup of the companion of `netns_inode`, with its bounds.
    pub fn companion(&self, netns_inode: u64) -> Result<CompanionCgroup, String> {
        let path = self.path_for(netns_inode);
        let mut dirs = Vec::new();
        for m in self.mounts() {
            let dir = join(&m, &path);
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(format!("making companion cgroup {}: {e}", dir.display())),
            }
            dirs.push(dir);
        }
        let cg = CompanionCgroup { path, dirs };
        let bounds = [
            (
                &self.memory,
                "memory.max",
                "memory.limit_in_bytes",
                self.memory_max,
            ),
            (&self.pids, "pids.max", "pids.max", self.pids_max),
        ];
        for (h, v2_file, v1_file, value) in bounds {
            let file = match h {
                Hierarchy::V2 => join(&self.v2, &cg.path).join(v2_file),
                Hierarchy::V1(m) => join(m, &cg.path).join(v1_file),
            };
            if let Err(e) = fs::write(&file, value.to_string()) {
                cg.remove_now();
                return Err(format!(
                    "bounding companion cgroup: writing {value} to {}: {e}",
                    file.display()
                ));
            }
        }
        Ok(cg)
    }
}

/// The cgroup of one companion, in every hierarchy used.
#[derive(Debug)]
pub struct CompanionCgroup {
    path: String,
    dirs: Vec<PathBuf>,
}

impl CompanionCgroup {
    /// Absolute cgroup path, e.g. `/nhi/c-4026532181`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Its `cgroup.procs` files, opened for the forked child to write `0` to (joining it)
    /// before exec: one per hierarchy, close-on-exec.
    pub fn procs_files(&self) -> io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(libc::O_CLOEXEC)
                    .open(d.join("cgroup.procs"))
                    .map(OwnedFd::from)
                    .map_err(|e| {
                        io::Error::new(
                            e.kind(),
                            format!("{}: {e}", d.join("cgroup.procs").display()),
                        )
                    })
            })
            .collect()
    }

    fn remove_now(&self) -> bool {
        let mut all = true;
        for d in &self.dirs {
            match fs::remove_dir(d) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(_) => all = false,
            }
        }
        all
    }

    /// Removes the cgroup once its processes are gone (they were reaped just before; a cgroup
    /// can lag a moment behind). Logged if it cannot be removed.
    pub async fn remove(&self) {
        for _ in 0..50 {
            if self.remove_now() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!(cgroup = %self.path, "companion cgroup still busy; left for the next nhid start to remove");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_go_to_v2_when_it_offers_the_controller_else_to_v1() {
        // A hybrid host: cgroup2 without controllers, memory and pids on v1.
        let m = Mounts {
            v2: Some("/sys/fs/cgroup/unified".into()),
            memory_v1: Some("/sys/fs/cgroup/memory".into()),
            pids_v1: Some("/sys/fs/cgroup/pids".into()),
        };
        // Hybrid: the v2 root offers no memory/pids; they are on v1.
        assert_eq!(
            place("memory", "hugetlb", m.memory_v1.as_deref()),
            Ok(Hierarchy::V1("/sys/fs/cgroup/memory".into()))
        );
        assert_eq!(
            place("pids", "cpuset cpu io memory pids", m.pids_v1.as_deref()),
            Ok(Hierarchy::V2)
        );
        let e = place("memory", "cpu io", None).unwrap_err();
        assert!(e.contains("no cgroup memory controller"), "{e}");
    }

    #[test]
    fn paths_levels_and_subtree_chain() {
        assert_eq!(subtree_chain("/nhi"), ["/", "/nhi"]);
        assert_eq!(subtree_chain("/a/b/"), ["/", "/a", "/a/b"]);
        assert_eq!(leaf_name(4026532181), "c-4026532181");
        assert_eq!(
            Exempt::of("/nhi/c-4026532181"),
            Exempt {
                path: "nhi/c-4026532181".into(),
                level: 2
            }
        );
        assert_eq!(Exempt::of("/a/b/c-1").level, 3);
    }

    #[test]
    fn setup_without_cgroup2_says_what_to_mount() {
        let e =
            Cgroups::setup_with(&CompanionCgroupConfig::default(), Mounts::default()).unwrap_err();
        assert!(e.contains("mount -t cgroup2"), "{e}");
    }

    /// A fake hierarchy in a temp dir: `setup` makes the parent, enables controllers along the
    /// chain, writes the bounds into the leaf and removes empty leftovers.
    #[test]
    fn setup_and_companion_in_a_fake_v2_tree() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().to_path_buf();
        fs::write(root.join("cgroup.controllers"), "cpu io memory pids\n").unwrap();
        fs::write(root.join("cgroup.subtree_control"), "cpu\n").unwrap();
        // A stale empty companion cgroup and a foreign dir.
        fs::create_dir_all(root.join("nhi/c-7")).unwrap();
        fs::create_dir_all(root.join("nhi/keep-me")).unwrap();
        let cfg = CompanionCgroupConfig {
            parent: "/nhi".into(),
            memory_max: 64 << 20,
            pids_max: 32,
        };
        let mounts = Mounts {
            v2: Some(root.clone()),
            ..Default::default()
        };
        // The fake parent's subtree_control is a plain file made on the way.
        fs::write(root.join("nhi/cgroup.subtree_control"), "").unwrap();
        let c = Cgroups::setup_with(&cfg, mounts).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("cgroup.subtree_control")).unwrap(),
            "+memory +pids"
        );
        assert!(!root.join("nhi/c-7").exists(), "stale leaf removed");
        assert!(
            root.join("nhi/keep-me").exists(),
            "only c-<digits> are ours"
        );
        let cg = c.companion(42).unwrap();
        assert_eq!(cg.path(), "/nhi/c-42");
        assert_eq!(
            fs::read_to_string(root.join("nhi/c-42/memory.max")).unwrap(),
            (64u64 << 20).to_string()
        );
        assert_eq!(
            fs::read_to_string(root.join("nhi/c-42/pids.max")).unwrap(),
            "32"
        );
        assert_eq!(c.exempt_for(42), Exempt::of("/nhi/c-42"));
    }
}
