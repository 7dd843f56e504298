//! One uid per companion, from `companion.uid_range` (a block reserved for nhi like a
//! subordinate-id block). A companion holds its uid (also used as its gid) for its whole life,
//! restarts included; a uid goes back to the pool only once no process of it is left, so a
//! new companion never shares a uid with anything an older one left behind. Companions of
//! different workloads therefore can neither signal, ptrace nor read one another: the kernel's
//! own uid checks separate them.
//!
//! Allocation is in memory and O(1) (container starts never scan `/proc`): never-used ids first,
//! then released ones in release order. Released ids wait in `draining` until a scan of `/proc`
//! (nhid's periodic collection, only while something drains) shows no process with that uid as
//! real, effective, saved or filesystem id.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::sync::Mutex;

use nhi_core::config::UidRange;

#[derive(Debug, Default)]
struct State {
    /// Offset (from `range.first`) of the next id never handed out.
    next: u64,
    in_use: HashSet<u32>,
    /// Released (or found busy at start): reused once no process has the id any more.
    draining: BTreeSet<u32>,
    /// Released and seen without processes: reusable, oldest first.
    free: VecDeque<u32>,
}

pub struct UidAllocator {
    range: UidRange,
    state: Mutex<State>,
}

impl UidAllocator {
    /// A pool over `range`; ids that some process already uses (`busy`, from [`live_uids`]) are
    /// held back until they are free of processes.
    pub fn new(range: UidRange, busy: &HashSet<u32>) -> Self {
        let draining = busy
            .iter()
            .copied()
            .filter(|u| range.contains(*u))
            .collect();
        UidAllocator {
            range,
            state: Mutex::new(State {
                draining,
                ..State::default()
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn range(&self) -> UidRange {
        self.range
    }

    /// A uid no companion holds and no process uses.
    pub fn allocate(&self) -> Result<u32, String> {
        let mut s = self.state();
        while s.next < self.range.len() {
            let uid = self.range.first + s.next as u32;
            s.next += 1;
            if !s.in_use.contains(&uid) && !s.draining.contains(&uid) {
                s.in_use.insert(uid);
                return Ok(uid);
            }
        }
        if let Some(uid) = s.free.pop_front() {
            s.in_use.insert(uid);
            return Ok(uid);
        }
        Err(format!(
            "companion.uid_range {} is exhausted: {} companions hold a uid and {} uids wait for their last process to exit; widen the range",
            self.range,
            s.in_use.len(),
            s.draining.len()
        ))
    }

    /// Takes `uid` back for a companion restored after an `nhid` restart, if it is in the
    /// range, held by no other companion and used by no process; `false` otherwise (then the
    /// companion gets a fresh uid).
    pub fn claim(&self, uid: u32) -> bool {
        if !self.range.contains(uid) {
            return false;
        }
        let mut s = self.state();
        if s.in_use.contains(&uid) || s.draining.contains(&uid) {
            return false;
        }
        s.free.retain(|u| *u != uid);
        s.in_use.insert(uid);
        true
    }

    /// Takes `uid` for a running companion re-adopted after an `nhid` restart: its own process
    /// holds it (so it was counted as draining at start). `false` if it is outside the range or
    /// another companion holds it.
    pub fn adopt(&self, uid: u32) -> bool {
        if !self.range.contains(uid) {
            return false;
        }
        let mut s = self.state();
        if s.in_use.contains(&uid) {
            return false;
        }
        s.draining.remove(&uid);
        s.free.retain(|u| *u != uid);
        s.in_use.insert(uid);
        true
    }

    /// The companion holding `uid` is gone; the uid is reusable once no process has it.
    pub fn release(&self, uid: u32) {
        let mut s = self.state();
        if s.in_use.remove(&uid) {
            s.draining.insert(uid);
        }
    }

    /// Whether released uids wait for a scan.
    pub fn draining(&self) -> bool {
        !self.state().draining.is_empty()
    }

    /// Moves every draining uid that no process uses (`live`, from [`live_uids`]) to the
    /// reusable pool.
    pub fn reap(&self, live: &HashSet<u32>) {
        let mut s = self.state();
        let done: Vec<u32> = s
            .draining
            .iter()
            .copied()
            .filter(|u| !live.contains(u))
            .collect();
        for u in done {
            s.draining.remove(&u);
            s.free.push_back(u);
        }
    }

    /// How many companions hold a uid.
    pub fn in_use(&self) -> usize {
        self.state().in_use.len()
    }
}

/// The real uid of process `pid` (`/proc/<pid>/status`: a non-dumpable process's `/proc`
/// entries belong to root, so their owner says nothing).
pub fn real_uid(pid: i32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Every id of `range` that some live process uses as real, effective, saved or filesystem
/// uid or gid (`/proc/<pid>/status`; zombies hold no credentials worth counting but are
/// counted too: they go once reaped).
pub fn live_uids(range: UidRange) -> HashSet<u32> {
    let mut out = HashSet::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue; // gone meanwhile
        };
        for line in status.lines() {
            let ids = line
                .strip_prefix("Uid:")
                .or_else(|| line.strip_prefix("Gid:"));
            if let Some(ids) = ids {
                out.extend(
                    ids.split_whitespace()
                        .filter_map(|v| v.parse::<u32>().ok())
                        .filter(|u| range.contains(*u)),
                );
            }
        }
    }
    out
}

/// Whether some process uses `uid` (see [`live_uids`]).
pub fn has_processes(uid: u32) -> bool {
    !live_uids(UidRange {
        first: uid,
        last: uid,
    })
    .is_empty()
}

/// Refuses a range that overlaps ids the system gives to someone else: a user or group in
/// `/etc/passwd` / `/etc/group`, or another user's subordinate ids in `/etc/subuid` /
/// `/etc/subgid` (rootless containers run as those). `owner` may hold subordinate ids there
/// (the packages reserve the default range for `nhi-companion`).
pub fn check_reserved(range: UidRange, owner: &str) -> Result<(), String> {
    for (file, what) in [("/etc/passwd", "user"), ("/etc/group", "group")] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        if let Some((name, id)) = overlapping_accounts(&text, range) {
            return Err(format!(
                "companion.uid_range {range} contains {id}, the id of {what} {name:?} in {file}; pick a range no account uses"
            ));
        }
    }
    for file in ["/etc/subuid", "/etc/subgid"] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        if let Some((name, first, count)) = overlapping_subordinate(&text, range, owner) {
            return Err(format!(
                "companion.uid_range {range} overlaps the subordinate ids {first}-{} of {name:?} in {file} (its containers run as those); pick another range",
                u64::from(first) + count - 1
            ));
        }
    }
    Ok(())
}

/// The first `name:x:id:...` line whose id lies in `range`.
fn overlapping_accounts(text: &str, range: UidRange) -> Option<(String, u32)> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let id: u32 = f.nth(1)?.parse().ok()?;
        range.contains(id).then(|| (name.to_string(), id))
    })
}

/// The first `name:first:count` line of someone other than `owner` overlapping `range`.
fn overlapping_subordinate(text: &str, range: UidRange, owner: &str) -> Option<(String, u32, u64)> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        let first: u32 = f.next()?.trim().parse().ok()?;
        let count: u64 = f.next()?.trim().parse().ok()?;
        let last = u64::from(first) + count.checked_sub(1)?;
        let overlaps = u64::from(first) <= u64::from(range.last) && last >= u64::from(range.first);
        (overlaps && name != owner).then(|| (name.to_string(), first, count))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(first: u32, last: u32) -> UidRange {
        UidRange { first, last }
    }

    #[test]
    fn allocates_each_uid_once_and_reuses_only_after_its_processes_are_gone() {
        let busy: HashSet<u32> = [101, 7].into();
        let a = UidAllocator::new(range(100, 103), &busy);
        assert_eq!(a.allocate().unwrap(), 100);
        assert_eq!(a.allocate().unwrap(), 102, "101 has a process");
        assert_eq!(a.allocate().unwrap(), 103);
        let e = a.allocate().unwrap_err();
        assert!(e.contains("100-103") && e.contains("exhausted"), "{e}");
        a.release(102);
        a.release(102); // twice is harmless
        assert!(
            a.allocate().is_err(),
            "released but not yet seen without processes"
        );
        assert!(a.draining());
        a.reap(&[101, 102].into());
        assert!(a.allocate().is_err(), "101 and 102 still have a process");
        a.reap(&HashSet::new());
        assert!(!a.draining());
        // 101 and 102 are free now; released order first (101 was busy at start).
        let got: BTreeSet<u32> = [a.allocate().unwrap(), a.allocate().unwrap()].into();
        assert_eq!(got, [101, 102].into());
        assert_eq!(a.in_use(), 4);
    }

    #[test]
    fn restored_companions_claim_their_uid_only_when_it_is_clean() {
        let a = UidAllocator::new(range(100, 109), &[105].into());
        assert!(a.claim(103));
        assert!(!a.claim(103), "already held");
        assert!(!a.claim(105), "a process still has it");
        assert!(!a.claim(99), "outside the range");
        let got: Vec<u32> = (0..8).map(|_| a.allocate().unwrap()).collect();
        assert!(!got.contains(&103) && !got.contains(&105), "{got:?}");
        assert!(a.allocate().is_err());
    }

    #[test]
    fn finds_processes_by_uid() {
        let me = nix::unistd::getuid().as_raw();
        assert!(live_uids(range(me, me)).contains(&me));
        assert!(has_processes(me));
    }

    #[test]
    fn ranges_overlapping_accounts_or_other_subordinate_ids_are_named() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nbob:x:1000:1000::/home/bob:/bin/sh\n";
        assert_eq!(
            overlapping_accounts(passwd, range(900, 1100)),
            Some(("bob".into(), 1000))
        );
        assert_eq!(overlapping_accounts(passwd, range(2000, 3000)), None);
        let sub = "bob:100000:65536\nnhi-companion:1879048192:65536\n";
        assert_eq!(
            overlapping_subordinate(sub, range(165535, 170000), "nhi-companion"),
            Some(("bob".into(), 100000, 65536))
        );
        assert_eq!(
            overlapping_subordinate(sub, range(165536, 170000), "nhi-companion"),
            None
        );
        assert_eq!(
            overlapping_subordinate(sub, range(1879048192, 1879113727), "nhi-companion"),
            None,
            "the owner's own reservation"
        );
    }
}
