//! Starting a companion: in the workload's network namespace and nothing else of it, as an
//! unprivileged uid with no capabilities and `no_new_privs`, holding one end of a socketpair as
//! its only channel back to `nhid`.
//!
//! The child is forked from `nhid` (host pid, mount, user, cgroup namespaces), then, before exec:
//! `setns(CLONE_NEWNET)` into the workload's namespace, join its own cgroup (`crate::cgroup`:
//! every socket it will create belongs to it), `setsid`, drop every capability from the
//! bounding set, drop supplementary groups, switch gid and uid (which clears the remaining
//! capability sets), set `no_new_privs`. The companion re-checks all of it at startup.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nhi_core::config::Enforcement;
use tokio::process::{Child, Command};

/// Refuses a companion binary that a companion uid could read. The kernel starts a process
/// non-dumpable when it execs a file its uid cannot read (`would_dump()` in fs/exec.c), so such
/// a companion can be neither ptraced nor read through `/proc` by any unprivileged process
/// from its first instruction, long before it could set that itself. A readable binary would
/// reopen that window, so it is refused, never silently used. Checked at `nhid` start and
/// before every spawn (a later `chmod` or `install -m 755` over it is caught too).
pub fn check_binary(path: &Path) -> Result<(), String> {
    let fix = format!(
        "install it root-owned and exec-only: chown root:root {p} && chmod 0711 {p} (the packages install it so)",
        p = path.display()
    );
    let m = std::fs::metadata(path).map_err(|e| {
        format!(
            "companion binary {} (companion.binary): {e}",
            path.display()
        )
    })?;
    if !m.is_file() {
        return Err(format!(
            "companion binary {} (companion.binary) is not a regular file",
            path.display()
        ));
    }
    let mode = m.mode() & 0o7777;
    let problem = if m.uid() != 0 {
        Some(format!("is owned by uid {}, not root", m.uid()))
    } else if mode & 0o022 != 0 {
        Some(format!("is writable by group or others (mode {mode:04o})"))
    } else if mode & 0o004 != 0 || (mode & 0o040 != 0 && m.gid() != 0) {
        Some(format!(
            "is readable by companion uids (mode {mode:04o}): the kernel would start companions dumpable, ptrace-able by their own uid until they protect themselves"
        ))
    } else if mode & 0o001 == 0 {
        Some(format!(
            "is not executable by companion uids (mode {mode:04o})"
        ))
    } else if has_acl(path) {
        Some("carries a POSIX ACL, which may let companion uids read it (setfacl -b it)".into())
    } else {
        None
    };
    match problem {
        Some(p) => Err(format!(
            "companion binary {} (companion.binary) {p}; {fix}",
            path.display()
        )),
        None => Ok(()),
    }
}

/// Whether `path` has an access ACL (beyond its mode bits).
fn has_acl(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return true;
    };
    // SAFETY: both strings are NUL-terminated; a NULL buffer of size 0 only asks for the size.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            c"system.posix_acl_access".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    n > 0
}

/// With `fs.suid_dumpable = 1` the kernel makes even an unreadable binary's process dumpable
/// (and a process that changed its uid): companions would be ptrace-able by their own uid.
pub fn check_suid_dumpable() -> Result<(), String> {
    match std::fs::read_to_string("/proc/sys/fs/suid_dumpable") {
        Ok(v) if v.trim() == "1" => Err(
            "fs.suid_dumpable is 1 (debug): the kernel would let each companion's own uid ptrace it; set it to 0 or 2 (sysctl -w fs.suid_dumpable=0)".into(),
        ),
        _ => Ok(()),
    }
}

pub struct Spawned {
    pub child: Child,
    /// nhid's end of the channel.
    pub channel: tokio::net::UnixStream,
    /// nhid's end of the fd channel (`SOCK_SEQPACKET`): listening sockets handed to the
    /// companion while it runs (a pod's app containers each get a Workload API socket).
    pub fds: OwnedFd,
    /// The uid (and gid) it runs as.
    pub uid: u32,
}

/// How a companion is started.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    pub binary: &'a Path,
    /// HTTP API address; `None` turns the HTTP API off.
    pub listen: Option<&'a str>,
    /// SPIFFE Workload API TCP address (`companion.workload_api_listen`).
    pub workload_api_listen: Option<&'a str>,
    pub max_cached_audiences: usize,
    /// Its own uid (and gid), from `companion.uid_range`.
    pub uid: u32,
    pub seccomp: Enforcement,
    pub landlock: Enforcement,
    /// `cgroup.procs` files of the companion's cgroup (one per hierarchy), which the child
    /// writes `0` to before exec.
    pub cgroup_procs: &'a [RawFd],
    /// The re-adoption socket (bound, not listening; see `crate::adopt`); inherited.
    pub adopt_fd: Option<RawFd>,
    /// How long the companion serves without nhid, waiting to be re-adopted.
    pub orphan_timeout: Duration,
}

/// Forks and execs the companion inside the network namespace behind `netns_fd`.
pub fn spawn_companion(launch: &Launch<'_>, netns_fd: &impl AsRawFd) -> io::Result<Spawned> {
    check_binary(launch.binary).map_err(io::Error::other)?;
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let theirs: OwnedFd = theirs.into();
    let theirs_fd = theirs.as_raw_fd();
    let (fds_ours, fds_theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::SeqPacket,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let fds_theirs_fd = fds_theirs.as_raw_fd();
    let ns_fd = netns_fd.as_raw_fd();
    let mut cmd = Command::new(launch.binary);
    match launch.listen {
        Some(l) => cmd.arg("--listen").arg(l),
        None => cmd.arg("--no-http-api"),
    };
    cmd.arg("--channel-fd")
        .arg(theirs_fd.to_string())
        .arg("--fd-channel-fd")
        .arg(fds_theirs_fd.to_string())
        .arg("--max-cached-audiences")
        .arg(launch.max_cached_audiences.to_string())
        .arg("--seccomp")
        .arg(launch.seccomp.name())
        .arg("--landlock")
        .arg(launch.landlock.name());
    if let Some(addr) = launch.workload_api_listen {
        cmd.arg("--workload-api-listen").arg(addr);
    }
    let adopt_fd = launch.adopt_fd.unwrap_or(-1);
    if adopt_fd >= 0 {
        cmd.arg("--adopt-fd")
            .arg(adopt_fd.to_string())
            .arg("--orphan-timeout-secs")
            .arg(launch.orphan_timeout.as_secs().max(1).to_string());
    }
    cmd.env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        // Never killed behind nhid's back: a companion outlives an nhid restart (see
        // `crate::adopt`); nhid stops it explicitly when its workload goes.
        .kill_on_drop(false);
    let (uid, gid) = (launch.uid, launch.uid);
    // Without a re-adoption socket the channel's fd stands in (a duplicate changes nothing).
    let keep = [
        theirs_fd,
        fds_theirs_fd,
        if adopt_fd >= 0 { adopt_fd } else { theirs_fd },
    ];
    let cgroup_procs: Vec<RawFd> = launch.cgroup_procs.to_vec();
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (setns, write, close_range, fcntl, setsid, prctl, setgroups, setresgid, setresuid), which
    // are async-signal-safe; it allocates nothing and takes no locks (the arrays it loops over
    // are copied in before the fork).
    unsafe {
        cmd.pre_exec(move || {
            fn check(r: libc::c_long) -> io::Result<()> {
                if r < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            }
            check(libc::setns(ns_fd, libc::CLONE_NEWNET) as _)?;
            // Into the companion's own cgroup, while still root: "0" moves the writer.
            for fd in &cgroup_procs {
                if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
                    return Err(io::Error::last_os_error());
                }
            }
            // Keep only stdio and the channel fds across exec: nhid's own fds are CLOEXEC, but
            // whatever nhid itself inherited (from systemd, a shell, a test harness) may not be.
            // Marked close-on-exec rather than closed, so std's own pipe that reports a failed
            // exec back to nhid keeps working.
            cloexec_fds_except(keep);
            for fd in keep {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                check(flags as _)?;
                check(libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) as _)?;
            }
            // Own session: signals to nhid's process group (e.g. on restart) don't reach it.
            check(libc::setsid() as _)?;
            for cap in 0..=63 {
                // EINVAL past the kernel's last capability is expected.
                if libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) != 0
                    && io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
                {
                    return Err(io::Error::last_os_error());
                }
            }
            check(libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            ) as _)?;
            check(libc::setgroups(0, std::ptr::null()) as _)?;
            check(libc::setresgid(gid, gid, gid) as _)?;
            // Changing the uid makes the kernel mark this process non-dumpable (fs.suid_dumpable
            // is 0 or 2, checked at nhid start); the exec of a binary this uid cannot read keeps
            // it so: no moment from here on at which the companion's uid could ptrace it.
            check(libc::setresuid(uid, uid, uid) as _)?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as _)?;
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    drop(fds_theirs);
    ours.set_nonblocking(true)?;
    Ok(Spawned {
        child,
        channel: tokio::net::UnixStream::from_std(ours)?,
        fds: fds_ours,
        uid,
    })
}

/// Hands the companion a listening socket (`add`, with `key` naming it) or takes one back
/// (`remove`) over its fd channel. Never blocks: the channel's buffer holds far more of these
/// small messages than a companion has containers.
pub fn send_listener(channel: &OwnedFd, key: &str, listener: Option<RawFd>) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let msg = match listener {
        Some(_) => serde_json::json!({ "add": key }),
        None => serde_json::json!({ "remove": key }),
    };
    let payload = serde_json::to_vec(&msg).expect("json");
    let iov = [std::io::IoSlice::new(&payload)];
    let fds = listener.map(|l| [l]);
    let cmsgs: Vec<ControlMessage<'_>> = fds
        .as_ref()
        .map(|f| vec![ControlMessage::ScmRights(f)])
        .unwrap_or_default();
    sendmsg::<()>(
        channel.as_raw_fd(),
        &iov,
        &cmsgs,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map(|_| ())
    .map_err(io::Error::from)
}

/// Marks every fd from 3 up except those in `keep` close-on-exec. Async-signal-safe:
/// `close_range(2)` with `CLOSE_RANGE_CLOEXEC` where the kernel has it (5.11+), else `fcntl`
/// over the fd table.
fn cloexec_fds_except(mut keep: [libc::c_int; 3]) {
    keep.sort_unstable();
    // SAFETY: only changes fd flags in the forked child before exec; closes nothing.
    unsafe {
        let mut ok = true;
        let mut from: libc::c_uint = 3;
        for k in keep {
            let k = k as libc::c_uint;
            if k > from {
                ok &= libc::syscall(
                    libc::SYS_close_range,
                    from,
                    k - 1,
                    libc::CLOSE_RANGE_CLOEXEC,
                ) == 0;
            }
            from = from.max(k + 1);
        }
        ok &= libc::syscall(
            libc::SYS_close_range,
            from,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0;
        if !ok {
            let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(1024, 1 << 20) as libc::c_int;
            for fd in 3..max {
                if !keep.contains(&fd) {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    if flags >= 0 {
                        libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn only_an_exec_only_root_owned_binary_is_accepted() {
        let d = tempfile::tempdir().unwrap();
        let bin = d.path().join("nhi-companion");
        std::fs::write(&bin, b"\x7fELF").unwrap();
        let chmod =
            |mode| std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(mode)).unwrap();
        if !nix::unistd::geteuid().is_root() {
            // Not root: the owner check names the problem.
            chmod(0o711);
            assert!(check_binary(&bin).unwrap_err().contains("not root"));
            return;
        }
        chmod(0o711);
        check_binary(&bin).unwrap();
        chmod(0o751);
        check_binary(&bin).unwrap(); // group root may read
        for (mode, why) in [
            (0o755, "readable by companion uids"),
            (0o715, "readable by companion uids"),
            (0o731, "writable"),
            (0o700, "not executable"),
        ] {
            chmod(mode);
            let e = check_binary(&bin).unwrap_err();
            assert!(e.contains(why) && e.contains("chmod 0711"), "{mode:o}: {e}");
        }
        chmod(0o711);
        std::os::unix::fs::chown(&bin, Some(0), Some(12345)).unwrap();
        chmod(0o751);
        assert!(check_binary(&bin).unwrap_err().contains("readable"));
        std::os::unix::fs::chown(&bin, Some(1), Some(0)).unwrap();
        chmod(0o711);
        assert!(check_binary(&bin).unwrap_err().contains("owned by uid 1"));
        assert!(check_binary(&d.path().join("missing")).is_err());
        assert!(check_binary(d.path()).unwrap_err().contains("regular file"));
    }
}
