//! The companion's own confinement, on top of what `nhid` set before exec (its own uid from
//! `companion.uid_range`, no capabilities, `no_new_privs`, an exec-only binary so the kernel
//! starts it non-dumpable).
//!
//! [`harden`] re-checks the privileges (never root, no capabilities in any set,
//! `no_new_privs`, not dumpable), so the contract holds however the binary was started.
//! [`sandbox`] then, before the companion runs any of its own code that talks to the workload
//! or to `nhid`, applies:
//!
//! - **Landlock** (where the kernel has it): every filesystem access right the kernel knows is
//!   handled and no path is allowed, so after this point the companion opens, creates,
//!   executes, renames, truncates nothing at all; with ABI 6+ also scoped: it can signal only
//!   itself and connect to no abstract unix socket outside its domain. Landlock (ABI ≤ 7) does
//!   not restrict `connect(2)` to a pathname unix socket: a reconnect to an `nhid` socket keeps
//!   working. Network rights are not handled: the edge proxy binds its ports when a policy
//!   arrives and connects upstream to whatever the policy allows.
//! - **seccomp** (three filters, newest evaluated first, most restrictive result wins):
//!   1. *kill*: syscalls only an attacker would make (`ptrace`, `process_vm_readv/writev`,
//!      `pidfd_open`, `pidfd_getfd`, `pidfd_send_signal`, `kcmp`, `execve(at)`, `mount` and the
//!      new mount API, `unshare`, `setns`, `bpf`, `keyctl`/`add_key`/`request_key`,
//!      `perf_event_open`, `userfaultfd`, `io_uring_*`, module and kexec calls,
//!      `open_by_handle_at`, id changes, `capset`, `chroot`, `pivot_root`) kill the process
//!      (`SIGSYS`): `nhid` logs the exit and restarts it from a clean image.
//!   2. *clone3*: `ENOSYS`, so glibc falls back to `clone(2)`, whose flags filter 3 can see.
//!   3. *allowlist*: what the companion really calls (tokio's current-thread runtime and
//!      blocking pool, hyper, tonic/h2, the splice proxy, the channels to `nhid`); anything
//!      else fails with `EPERM`. Conditions: `clone` only with `CLONE_THREAD` (threads, never a
//!      new process); `socket` only `AF_UNIX`, `AF_INET`, `AF_INET6` (any type: UDP stays
//!      possible for a DNS path); `mmap`/`mprotect` never with `PROT_EXEC` (no new code);
//!      `ioctl` only `FIONBIO`, `FIONREAD`, `FIOCLEX`, `FIONCLEX`; `prctl` only
//!      `PR_SET_NAME`/`PR_GET_NAME`/`PR_SET_NO_NEW_PRIVS` (so `PR_SET_DUMPABLE` can never be
//!      turned back on); `seccomp` itself, which can only add filters.
//!      No `open`/`openat` at all (no file access after start, like Landlock), no `kill`
//!      (only `tgkill`, for `abort()` of its own threads), no `fork`/`vfork`.
//!
//! `companion.seccomp` / `companion.landlock = "if_available"` let it start where a layer
//! cannot be applied (logged); by default (`required`) it refuses to start, naming the layer.

use caps::CapSet;
use nhi_core::config::Enforcement;

pub fn harden() -> Result<(), String> {
    // SAFETY: getuid/geteuid have no preconditions and cannot fail.
    let (uid, euid) = unsafe { (libc::getuid(), libc::geteuid()) };
    if uid == 0 || euid == 0 {
        return Err(
            "refusing to run as root: the companion runs as its own unprivileged uid".into(),
        );
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
    ] {
        caps::clear(None, set).map_err(|e| format!("clearing {set:?} capabilities: {e}"))?;
    }
    for set in [
        CapSet::Effective,
        CapSet::Permitted,
        CapSet::Inheritable,
        CapSet::Ambient,
        CapSet::Bounding,
    ] {
        let held =
            caps::read(None, set).map_err(|e| format!("reading {set:?} capabilities: {e}"))?;
        if !held.is_empty() {
            return Err(format!(
                "still holds {set:?} capabilities {held:?}; start companions through nhid"
            ));
        }
    }
    // SAFETY: prctl with these constant arguments only changes flags of this process.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(format!("no_new_privs: {}", std::io::Error::last_os_error()));
        }
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            return Err(format!("dumpable: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// What [`sandbox`] applied, for the companion's startup log line.
#[derive(Debug, Default)]
pub struct Applied {
    pub landlock: Option<String>,
    pub seccomp: bool,
    pub warnings: Vec<String>,
}

/// Applies Landlock, then seccomp, to the whole process. Call before any thread exists (the
/// seccomp filters are synchronised to every thread anyway; Landlock before ABI 8 restricts
/// the calling thread and the threads it starts later).
pub fn sandbox(landlock: Enforcement, seccomp: Enforcement) -> Result<Applied, String> {
    let mut applied = Applied::default();
    applied.landlock = layer(
        "Landlock",
        "landlock",
        landlock,
        restrict_files(),
        &mut applied,
    )?;
    let filtered = filters().and_then(|f| install(&f));
    applied.seccomp = layer("seccomp", "seccomp", seccomp, filtered, &mut applied)?.is_some();
    Ok(applied)
}

/// The outcome of applying one layer: what it applied, `None` with a warning where the
/// operator allowed it to be missing (`companion.<key> = "if_available"`), else an error that
/// stops the companion.
fn layer<T>(
    name: &str,
    key: &str,
    enforcement: Enforcement,
    result: Result<T, String>,
    applied: &mut Applied,
) -> Result<Option<T>, String> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if enforcement == Enforcement::IfAvailable => {
            applied.warnings.push(format!(
                "{name} not applied (companion.{key} = \"if_available\"): {e}"
            ));
            Ok(None)
        }
        Err(e) => Err(format!(
            "cannot apply {name}: {e}; the companion refuses to start without it (set companion.{key} = \"if_available\" to allow it on this kernel)"
        )),
    }
}

/// Landlock: no filesystem access at all from now on; signals and abstract unix sockets
/// scoped to the companion itself where the kernel can (ABI 6+).
fn restrict_files() -> Result<String, String> {
    use landlock::{
        Access, AccessFs, CompatLevel, Compatible, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        Scope, ABI,
    };
    // The newest ABI this code was written and tested against; older kernels get what they
    // have of it.
    let abi = ABI::V7;
    let status = landlock::Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| r.no_new_privs(true).restrict_self())
        .map_err(|e| e.to_string())?;
    match status.ruleset {
        RulesetStatus::FullyEnforced => Ok(format!("Landlock {:?}, fully enforced", abi)),
        RulesetStatus::PartiallyEnforced => Ok(format!(
            "Landlock partially enforced (the kernel has fewer rights than {abi:?})"
        )),
        RulesetStatus::NotEnforced => {
            Err("this kernel has no Landlock (or it is disabled: lsm= boot parameter)".into())
        }
    }
}

fn target_arch() -> Result<seccompiler::TargetArch, String> {
    seccompiler::TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|_| format!("no seccomp filter for {}", std::env::consts::ARCH))
}

/// The three programs, in installation order (oldest first).
fn filters() -> Result<Vec<seccompiler::BpfProgram>, String> {
    use seccompiler::{SeccompAction, SeccompFilter};
    let arch = target_arch()?;
    let build = |rules, mismatch, matched| -> Result<seccompiler::BpfProgram, String> {
        SeccompFilter::new(rules, mismatch, matched, arch)
            .and_then(|f| f.try_into())
            .map_err(|e: seccompiler::BackendError| e.to_string())
    };
    Ok(vec![
        build(
            allowlist()?,
            SeccompAction::Errno(libc::EPERM as u32),
            SeccompAction::Allow,
        )?,
        build(
            [(libc::SYS_clone3, vec![])].into(),
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS as u32),
        )?,
        build(
            KILL.iter().map(|s| (*s, vec![])).collect(),
            SeccompAction::Allow,
            SeccompAction::KillProcess,
        )?,
    ])
}

fn install(programs: &[seccompiler::BpfProgram]) -> Result<(), String> {
    for p in programs {
        seccompiler::apply_filter_all_threads(p).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Syscalls that end the process.
const KILL: &[i64] = &[
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_open,
    libc::SYS_pidfd_getfd,
    libc::SYS_pidfd_send_signal,
    libc::SYS_kcmp,
    libc::SYS_execve,
    libc::SYS_execveat,
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_fsopen,
    libc::SYS_fsconfig,
    libc::SYS_fsmount,
    libc::SYS_fspick,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    libc::SYS_mount_setattr,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_bpf,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_setgroups,
    libc::SYS_capset,
    libc::SYS_chroot,
    libc::SYS_pivot_root,
];

/// Allowed unconditionally.
const ALLOW: &[i64] = &[
    // I/O on fds it holds: sockets, pipes, the channels, stderr.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_fcntl,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_pipe2,
    libc::SYS_splice,
    libc::SYS_socketpair, // AF_UNIX only (tokio's signal driver)
    // Sockets (creation is conditioned below).
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt, // incl. SO_ORIGINAL_DST
    libc::SYS_shutdown,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg, // incl. SCM_RIGHTS from nhid's fd channel
    libc::SYS_sendmmsg,
    libc::SYS_recvmmsg,
    // Event loop.
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_pwait2,
    libc::SYS_eventfd2,
    libc::SYS_ppoll,
    // Memory (PROT_EXEC is conditioned below).
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    // Threads, time, signals to itself.
    libc::SYS_futex,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_tgkill,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_getrandom,
    libc::SYS_exit,
    libc::SYS_exit_group,
    // Only ever adds restrictions (the later filters are installed through it).
    libc::SYS_seccomp,
];

/// Allowed on x86_64 only (aarch64 has no such syscalls: libc uses the `*at`/`p*` ones).
#[cfg(target_arch = "x86_64")]
const ALLOW_X86_64: &[i64] = &[libc::SYS_epoll_wait, libc::SYS_poll];
#[cfg(not(target_arch = "x86_64"))]
const ALLOW_X86_64: &[i64] = &[];

fn allowlist() -> Result<std::collections::BTreeMap<i64, Vec<seccompiler::SeccompRule>>, String> {
    use seccompiler::{SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition, SeccompRule};
    let cond = |arg, len, op, value| {
        SeccompCondition::new(arg, len, op, value)
            .and_then(|c| SeccompRule::new(vec![c]))
            .map_err(|e| e.to_string())
    };
    let one_of = |arg: u8, len: Len, values: &[u64]| -> Result<Vec<SeccompRule>, String> {
        values
            .iter()
            .map(|v| cond(arg, len.clone(), Op::Eq, *v))
            .collect()
    };
    let mut rules: std::collections::BTreeMap<i64, Vec<SeccompRule>> = ALLOW
        .iter()
        .chain(ALLOW_X86_64)
        .map(|s| (*s, vec![]))
        .collect();
    let no_exec = || cond(2, Len::Dword, Op::MaskedEq(libc::PROT_EXEC as u64), 0);
    rules.insert(libc::SYS_mmap, vec![no_exec()?]);
    rules.insert(libc::SYS_mprotect, vec![no_exec()?]);
    rules.insert(
        libc::SYS_clone,
        vec![cond(
            0,
            Len::Qword,
            Op::MaskedEq(libc::CLONE_THREAD as u64),
            libc::CLONE_THREAD as u64,
        )?],
    );
    rules.insert(
        libc::SYS_socket,
        one_of(
            0,
            Len::Dword,
            &[
                libc::AF_UNIX as u64,
                libc::AF_INET as u64,
                libc::AF_INET6 as u64,
            ],
        )?,
    );
    // ioctl request numbers are `c_ulong`, whose width depends on the target.
    let ioctls: [libc::c_ulong; 4] = [libc::FIONBIO, libc::FIONREAD, libc::FIOCLEX, libc::FIONCLEX];
    #[allow(clippy::unnecessary_cast)]
    let ioctls = ioctls.map(|r| r as u64);
    rules.insert(libc::SYS_ioctl, one_of(1, Len::Dword, &ioctls)?);
    rules.insert(
        libc::SYS_prctl,
        one_of(
            0,
            Len::Dword,
            &[
                libc::PR_SET_NAME as u64,
                libc::PR_GET_NAME as u64,
                // One-way; set before each later filter is installed.
                libc::PR_SET_NO_NEW_PRIVS as u64,
            ],
        )?,
    );
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child after [`sandbox`] and returns how the child ended: its exit
    /// code, or the signal that killed it.
    fn in_sandboxed_child(f: impl FnOnce() -> i32) -> Result<i32, i32> {
        // SAFETY: the test process forks; the child only runs `f` and `_exit`s, never returns.
        match unsafe { libc::fork() } {
            0 => {
                // SAFETY: setting no_new_privs on this child only.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                let code = match sandbox(Enforcement::Required, Enforcement::Required) {
                    Ok(_) => f(),
                    Err(e) => {
                        crate::log!("sandbox: {e}");
                        100
                    }
                };
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(code) }
            }
            pid if pid > 0 => {
                let mut status = 0;
                // SAFETY: waits for the child forked above.
                unsafe { libc::waitpid(pid, &mut status, 0) };
                if libc::WIFSIGNALED(status) {
                    Err(libc::WTERMSIG(status))
                } else {
                    Ok(libc::WEXITSTATUS(status))
                }
            }
            _ => panic!("fork: {}", std::io::Error::last_os_error()),
        }
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn filters_compile_for_this_arch() {
        let f = filters().unwrap();
        assert_eq!(f.len(), 3);
        assert!(f.iter().all(|p| !p.is_empty()));
    }

    #[test]
    fn attack_syscalls_kill_the_process() {
        // SAFETY: raw syscalls with harmless arguments in the sandboxed child.
        let ptrace = in_sandboxed_child(|| unsafe {
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            0
        });
        assert_eq!(ptrace, Err(libc::SIGSYS), "ptrace");
        let getfd = in_sandboxed_child(|| unsafe {
            libc::syscall(libc::SYS_pidfd_getfd, 0, 0, 0);
            0
        });
        assert_eq!(getfd, Err(libc::SIGSYS), "pidfd_getfd");
        let vm = in_sandboxed_child(|| unsafe {
            libc::syscall(libc::SYS_process_vm_readv, 1, 0, 0, 0, 0, 0);
            0
        });
        assert_eq!(vm, Err(libc::SIGSYS), "process_vm_readv");
        let exec = in_sandboxed_child(|| unsafe {
            libc::execv(c"/bin/true".as_ptr(), [std::ptr::null()].as_ptr());
            0
        });
        assert_eq!(exec, Err(libc::SIGSYS), "execve");
        let ns = in_sandboxed_child(|| unsafe {
            libc::unshare(libc::CLONE_NEWUSER);
            0
        });
        assert_eq!(ns, Err(libc::SIGSYS), "unshare");
    }

    #[test]
    fn everything_else_outside_the_allowlist_is_refused() {
        // SAFETY: raw syscalls in the sandboxed child; results are only inspected.
        let code = in_sandboxed_child(|| unsafe {
            // A new process: refused (threads stay possible, below).
            if libc::fork() != -1 || errno() != libc::EPERM {
                return 1;
            }
            // clone3 says ENOSYS, so glibc falls back to clone(CLONE_THREAD).
            if libc::syscall(libc::SYS_clone3, 0, 0) != -1 || errno() != libc::ENOSYS {
                return 2;
            }
            // No file, not even its own /proc entries.
            if libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) != -1 {
                return 3;
            }
            if libc::kill(1, 0) != -1 || errno() != libc::EPERM {
                return 4;
            }
            // Dumpable can never be turned back on.
            if libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) != -1 || errno() != libc::EPERM {
                return 5;
            }
            if libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0) != -1 || errno() != libc::EPERM {
                return 6;
            }
            let exec = libc::PROT_READ | libc::PROT_EXEC;
            let p = libc::mmap(
                std::ptr::null_mut(),
                4096,
                exec,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if p != libc::MAP_FAILED || errno() != libc::EPERM {
                return 7;
            }
            // What the companion needs still works: threads, sockets, pipes.
            let t = std::thread::spawn(|| 42).join();
            if t.ok() != Some(42) {
                return 8;
            }
            let l = std::net::TcpListener::bind("127.0.0.1:0");
            let Ok(l) = l else { return 9 };
            let Ok(addr) = l.local_addr() else { return 10 };
            if std::net::TcpStream::connect(addr).is_err() {
                return 11;
            }
            let mut fds = [0; 2];
            if libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) != 0 {
                return 12;
            }
            if std::os::unix::net::UnixDatagram::unbound().is_err() {
                return 13;
            }
            0
        });
        assert_eq!(code, Ok(0));
    }
}
