//! The open-file limit of nhi's long-running processes. `nhid` holds a few descriptors per
//! companion (its channel, fd channel, pidfd, stderr pipe, each container's Workload API
//! socket) and a companion one per connection it serves; the usual soft limit of 1024 would cap
//! a node at a few hundred workloads, so both raise their soft limit to the hard one at start
//! (what Go programs do by default). Raising the soft limit up to the hard one needs no
//! privilege; the hard limit is the operator's (`LimitNOFILE=` in nhid's unit).

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; the soft limit in force afterwards (0 if
/// it cannot be read).
pub fn raise_to_hard() -> u64 {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return 0;
    }
    if rl.rlim_cur < rl.rlim_max {
        let new = libc::rlimit {
            rlim_cur: rl.rlim_max,
            rlim_max: rl.rlim_max,
        };
        // SAFETY: setrlimit reads the struct we own; raising the soft limit up to the hard one
        // needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } == 0 {
            return rl.rlim_max;
        }
    }
    rl.rlim_cur
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_ends_at_the_hard_one() {
        let got = super::raise_to_hard();
        let mut rl = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes into the struct we own.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) }, 0);
        assert_eq!((got, rl.rlim_cur), (rl.rlim_max, rl.rlim_max));
    }
}
