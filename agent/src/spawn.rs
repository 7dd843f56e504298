//! Starting a companion: in the workload's network namespace and nothing else of it, as an
//! unprivileged uid with no capabilities and `no_new_privs`, holding one end of a socketpair as
//! its only channel back to `nhid`.
//!
//! The child is forked from `nhid` (host pid, mount, user, cgroup namespaces), then, before exec:
//! `setns(CLONE_NEWNET)` into the workload's namespace, `setsid`, drop every capability from the
//! bounding set, drop supplementary groups, switch gid and uid (which clears the remaining
//! capability sets), set `no_new_privs`. The companion re-checks all of it at startup.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// The uid/gid companions run as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompanionUser {
    pub uid: u32,
    pub gid: u32,
}

impl CompanionUser {
    /// Resolves `name` (a passwd name, or a numeric uid used also as gid). Never root.
    pub fn resolve(name: &str) -> Result<Self, String> {
        let user = if let Ok(uid) = name.parse::<u32>() {
            CompanionUser { uid, gid: uid }
        } else {
            let u = nix::unistd::User::from_name(name)
                .map_err(|e| format!("looking up companion user {name:?}: {e}"))?
                .ok_or_else(|| {
                    format!(
                        "companion user {name:?} does not exist; create it (useradd --system --no-create-home --shell /usr/sbin/nologin {name}) or set companion.user to a numeric uid"
                    )
                })?;
            CompanionUser {
                uid: u.uid.as_raw(),
                gid: u.gid.as_raw(),
            }
        };
        if user.uid == 0 || user.gid == 0 {
            return Err(format!(
                "companion user {name:?} resolves to uid/gid 0; companions never run as root"
            ));
        }
        Ok(user)
    }
}

pub struct Spawned {
    pub child: Child,
    /// nhid's end of the channel.
    pub channel: tokio::net::UnixStream,
}

/// Where the companion serves, beyond its HTTP address.
#[derive(Debug, Clone, Copy)]
pub struct Serving<'a> {
    /// SPIFFE Workload API TCP address (`companion.workload_api_listen`).
    pub workload_api_listen: Option<&'a str>,
    /// A listening unix socket nhid bound for the Workload API; inherited by the child.
    pub listener_fd: Option<RawFd>,
    /// The re-adoption socket (bound, not listening; see `crate::adopt`); inherited.
    pub adopt_fd: Option<RawFd>,
    /// How long the companion serves without nhid, waiting to be re-adopted.
    pub orphan_timeout: Duration,
}

/// Forks and execs `binary` inside the network namespace behind `netns_fd`.
pub fn spawn_companion(
    binary: &Path,
    listen: &str,
    max_cached_audiences: usize,
    user: CompanionUser,
    netns_fd: &impl AsRawFd,
) -> io::Result<Spawned> {
    spawn_companion_serving(
        binary,
        listen,
        max_cached_audiences,
        user,
        netns_fd,
        Serving {
            workload_api_listen: None,
            listener_fd: None,
            adopt_fd: None,
            orphan_timeout: Duration::from_secs(600),
        },
    )
}

/// [`spawn_companion`], also passing the Workload API address and socket.
pub fn spawn_companion_serving(
    binary: &Path,
    listen: &str,
    max_cached_audiences: usize,
    user: CompanionUser,
    netns_fd: &impl AsRawFd,
    serving: Serving<'_>,
) -> io::Result<Spawned> {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let theirs: OwnedFd = theirs.into();
    let theirs_fd = theirs.as_raw_fd();
    let ns_fd = netns_fd.as_raw_fd();
    let mut cmd = Command::new(binary);
    cmd.arg("--listen")
        .arg(listen)
        .arg("--channel-fd")
        .arg(theirs_fd.to_string())
        .arg("--max-cached-audiences")
        .arg(max_cached_audiences.to_string());
    if let Some(addr) = serving.workload_api_listen {
        cmd.arg("--workload-api-listen").arg(addr);
    }
    let listener_fd = serving.listener_fd.unwrap_or(-1);
    if listener_fd >= 0 {
        cmd.arg("--listener-fd").arg(listener_fd.to_string());
    }
    let adopt_fd = serving.adopt_fd.unwrap_or(-1);
    if adopt_fd >= 0 {
        cmd.arg("--adopt-fd")
            .arg(adopt_fd.to_string())
            .arg("--orphan-timeout-secs")
            .arg(serving.orphan_timeout.as_secs().max(1).to_string());
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
    let CompanionUser { uid, gid } = user;
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls
    // (setns, close_range, fcntl, setsid, prctl, setgroups, setresgid, setresuid), which are
    // async-signal-safe; it allocates nothing and takes no locks (the array it loops over is
    // on the stack).
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
            // Keep only stdio and the channel fd across exec: nhid's own fds are CLOEXEC, but
            // whatever nhid itself inherited (from systemd, a shell, a test harness) may not be.
            // Marked close-on-exec rather than closed, so std's own pipe that reports a failed
            // exec back to nhid keeps working.
            cloexec_fds_except(theirs_fd);
            let flags = libc::fcntl(theirs_fd, libc::F_GETFD);
            check(flags as _)?;
            check(libc::fcntl(theirs_fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) as _)?;
            for fd in [listener_fd, adopt_fd] {
                if fd >= 0 {
                    let flags = libc::fcntl(fd, libc::F_GETFD);
                    check(flags as _)?;
                    check(libc::fcntl(fd, libc::F_SETFD, flags & !libc::FD_CLOEXEC) as _)?;
                }
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
            check(libc::setresuid(uid, uid, uid) as _)?;
            check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) as _)?;
            Ok(())
        });
    }
    let child = cmd.spawn()?;
    drop(theirs);
    ours.set_nonblocking(true)?;
    Ok(Spawned {
        child,
        channel: tokio::net::UnixStream::from_std(ours)?,
    })
}

/// Marks every fd from 3 up except `keep` close-on-exec. Async-signal-safe: `close_range(2)`
/// with `CLOSE_RANGE_CLOEXEC` where the kernel has it (5.11+), else `fcntl` over the fd table.
fn cloexec_fds_except(keep: libc::c_int) {
    let keep = keep as libc::c_uint;
    // SAFETY: only changes fd flags in the forked child before exec; closes nothing.
    unsafe {
        let mut ok = true;
        if keep > 3 {
            ok &= libc::syscall(
                libc::SYS_close_range,
                3 as libc::c_uint,
                keep - 1,
                libc::CLOSE_RANGE_CLOEXEC,
            ) == 0;
        }
        ok &= libc::syscall(
            libc::SYS_close_range,
            keep + 1,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        ) == 0;
        if !ok {
            let max = libc::sysconf(libc::_SC_OPEN_MAX).clamp(1024, 1 << 20) as libc::c_int;
            for fd in 3..max {
                if fd != keep as libc::c_int {
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

    #[test]
    fn resolves_users_and_refuses_root() {
        assert_eq!(
            CompanionUser::resolve("65533").unwrap(),
            CompanionUser {
                uid: 65533,
                gid: 65533
            }
        );
        assert!(CompanionUser::resolve("0").is_err());
        assert!(CompanionUser::resolve("root").is_err());
        let e = CompanionUser::resolve("no-such-user-nhi").unwrap_err();
        assert!(e.contains("useradd"), "{e}");
    }
}
