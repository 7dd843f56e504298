//! Isolation between workloads when a companion or an app is attacked, tried as an attacker
//! would on real runc and (for pods) containerd's CRI: one uid per companion, no dumpable
//! window when a companion (re)starts, seccomp + Landlock in the companion, the HTTP API's
//! proof header, `/run/nhi` owned by the container's `process.user`, only selectable rules
//! for `nhi.dev/rule`, and credentials that die with their workload.
//!
//! The attackers are forked children of the test (root) that switch to a companion's uid and
//! join its network namespace: exactly what a compromised companion is.

use std::collections::HashMap;
use std::ffi::CString;
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use nhi_integration::kube::{kubelet_token, CriContainerd, PodSpec, PROJECTED};
use nhi_integration::*;

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Forks a child that joins the network namespace of `netns_pid` and becomes `uid` (also its
/// gid, no supplementary groups), then runs `f`; returns the child's pid. `f` runs after a
/// fork of a multithreaded process: raw syscalls only, nothing that allocates.
fn fork_as(uid: u32, netns_pid: i32, f: impl FnOnce() -> i32) -> i32 {
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(format!("/proc/{netns_pid}/ns/net")).expect("netns");
    // SAFETY: the child only makes raw syscalls (setns, setgroups, setresgid, setresuid, and
    // whatever `f` does) and ends with _exit; the parent only reads the pid.
    unsafe {
        match libc::fork() {
            0 => {
                let ok = libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) == 0
                    && libc::setgroups(0, std::ptr::null()) == 0
                    && libc::setresgid(uid, uid, uid) == 0
                    && libc::setresuid(uid, uid, uid) == 0;
                libc::_exit(if ok { f() } else { 99 })
            }
            pid if pid > 0 => pid,
            _ => panic!("fork: {}", std::io::Error::last_os_error()),
        }
    }
}

/// The exit code of child `pid` (or 128 + the signal that ended it).
fn wait_child(pid: i32) -> i32 {
    let mut status = 0;
    // SAFETY: waits for a child this test forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

/// What a process of `uid` in `netns_pid`'s namespace achieves against process `victim`:
/// a bit per attack that was NOT refused (0: everything refused). `signals`: also try to
/// stop it (only meaningful from another uid: the kernel lets a uid signal its own processes).
fn attack(uid: u32, netns_pid: i32, victim: i32, signals: bool) -> i32 {
    let mem = CString::new(format!("/proc/{victim}/mem")).unwrap();
    let environ = CString::new(format!("/proc/{victim}/environ")).unwrap();
    let child = fork_as(uid, netns_pid, move || {
        let mut got = 0;
        // SAFETY: raw syscalls on another process; results are only inspected.
        unsafe {
            if signals && libc::kill(victim, 0) == 0 {
                got |= 1;
            }
            if signals && libc::kill(victim, libc::SIGSTOP) == 0 {
                got |= 2;
                libc::kill(victim, libc::SIGCONT);
            }
            if libc::ptrace(libc::PTRACE_SEIZE, victim, 0, 0) == 0 {
                got |= 4;
            }
            if libc::open(mem.as_ptr(), libc::O_RDONLY) >= 0 {
                got |= 8;
            }
            if libc::open(environ.as_ptr(), libc::O_RDONLY) >= 0 {
                got |= 16;
            }
            let pidfd = libc::syscall(libc::SYS_pidfd_open, victim, 0);
            if pidfd >= 0 && libc::syscall(libc::SYS_pidfd_getfd, pidfd, 3, 0) >= 0 {
                got |= 32;
            }
        }
        got
    });
    wait_child(child)
}

#[test]
fn one_companion_can_neither_signal_ptrace_nor_read_another_and_runs_confined() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let a = node.named_container("iso-a");
    let b = node.named_container("iso-b");
    let (uid_a, uid_b) = (node.companion_uid(&a.id), node.companion_uid(&b.id));
    assert_ne!(uid_a, uid_b, "each companion has a uid of its own");
    assert!(node.uids.contains(uid_a) && node.uids.contains(uid_b));
    let victim = node.companion_pid(&b.id).unwrap();

    // From companion A's uid, inside A's network namespace: B cannot be signalled, ptraced,
    // read through /proc or have its fds taken.
    assert_eq!(
        attack(uid_a, a.pid(), victim, true),
        0,
        "attack on B from A's uid"
    );
    // Not even B's own uid (what a process B left behind would have) can ptrace or read it:
    // it is not dumpable. Its /proc files belong to root for that reason.
    assert_eq!(
        attack(uid_b, b.pid(), victim, false),
        0,
        "attack on B from B's uid"
    );
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(format!("/proc/{victim}/mem"))
            .unwrap()
            .uid(),
        0
    );
    // B still serves.
    assert!(b.get("/healthz").is_ok());

    // Confined: seccomp (three filters) and no_new_privs; the sandbox is logged.
    assert_eq!(proc_status(victim, "Seccomp"), "2");
    assert_eq!(proc_status(victim, "Seccomp_filters"), "3");
    assert_eq!(proc_status(victim, "NoNewPrivs"), "1");
    assert!(
        node.log()
            .contains("sandbox: seccomp on, Landlock V7, fully enforced"),
        "{}",
        node.log()
    );
    a.delete();
    b.delete();
}

#[test]
fn nhid_refuses_a_companion_binary_its_uids_could_read() {
    let mut node = Node::new(ANNOTATED_RULE);
    let companion = node.path("bin/nhi-companion");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&companion, std::fs::Permissions::from_mode(0o755)).unwrap();
    let e = node.try_start().unwrap_err();
    assert!(
        e.contains("readable by companion uids") && e.contains("chmod 0711"),
        "{e}"
    );
}

/// `/proc/sys/kernel/ns_last_pid`, read with raw syscalls (usable after fork).
fn last_pid(buf: &mut [u8; 64]) -> i32 {
    read_small(c"/proc/sys/kernel/ns_last_pid", buf)
        .map(|n| parse_int(&buf[..n]))
        .unwrap_or(0)
}

/// `/proc/<pid><suffix>` (`suffix` NUL-terminated) in `path`, without allocating.
fn proc_path<'p>(pid: i32, suffix: &[u8], path: &'p mut [u8; 32]) -> Option<&'p std::ffi::CStr> {
    let mut digits = [0u8; 12];
    let (mut n, mut d) = (pid, 0);
    while n > 0 {
        digits[d] = b'0' + (n % 10) as u8;
        n /= 10;
        d += 1;
    }
    let mut i = 0;
    for b in b"/proc/"
        .iter()
        .chain(digits[..d].iter().rev())
        .chain(suffix.iter())
    {
        *path.get_mut(i)? = *b;
        i += 1;
    }
    std::ffi::CStr::from_bytes_until_nul(&path[..i]).ok()
}

/// The parent pid of `pid` from `/proc/<pid>/stat` (0 if gone).
fn ppid_of(pid: i32, path: &mut [u8; 32], buf: &mut [u8; 512]) -> i32 {
    let Some(c) = proc_path(pid, b"/stat\0", path) else {
        return 0;
    };
    let Some(len) = read_small(c, buf) else {
        return 0;
    };
    // After the last ')': " S <ppid> ..."
    let Some(close) = buf[..len].iter().rposition(|b| *b == b')') else {
        return 0;
    };
    let mut fields = buf[close + 1..len]
        .split(|b| *b == b' ')
        .filter(|f| !f.is_empty());
    fields.next();
    fields.next().map(parse_int).unwrap_or(0)
}

fn read_small(path: &std::ffi::CStr, buf: &mut [u8]) -> Option<usize> {
    // SAFETY: open/read/close into a caller-provided buffer of its length.
    unsafe {
        let fd = libc::open(path.as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        (n > 0).then_some(n as usize)
    }
}

fn parse_int(b: &[u8]) -> i32 {
    b.iter()
        .take_while(|c| c.is_ascii_digit())
        .fold(0, |n, c| n * 10 + (c - b'0') as i32)
}

static STOP: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_usr1(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Whether `/proc/<pid>/mem` belongs to a uid other than root, i.e. the process is dumpable
/// (the kernel gives a non-dumpable process's /proc files to root). Raw syscalls only.
fn dumpable(pid: i32, path: &mut [u8; 32]) -> bool {
    let Some(c) = proc_path(pid, b"/mem\0", path) else {
        return false;
    };
    // SAFETY: stat into a zeroed struct.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::stat(c.as_ptr(), &mut st) == 0 && st.st_uid != 0
    }
}

/// The race, as `uid` (another companion's): watch every new child of nhid (`nhid`) from the
/// moment it exists until told to stop (SIGUSR1), and over and over `PTRACE_SEIZE` it and look
/// whether it is dumpable. Exit code: bit 1 attached, bit 4 saw it dumpable (what a process of
/// its own uid could have attached to), 2 no new companion appeared (no race happened).
fn spawn_attacker(uid: u32, netns_pid: i32, nhid: i32) -> i32 {
    fork_as(uid, netns_pid, move || {
        // SAFETY: installs a handler that only stores to an atomic, in this child.
        unsafe { libc::signal(libc::SIGUSR1, on_usr1 as *const () as libc::sighandler_t) };
        let (mut buf, mut path, mut stat) = ([0u8; 64], [0u8; 32], [0u8; 512]);
        let mut seen_up_to = last_pid(&mut buf);
        let mut candidates = [0i32; 64];
        let (mut n, mut ever, mut got) = (0usize, 0usize, 0);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !STOP.load(Ordering::SeqCst) && Instant::now() < deadline {
            let last = last_pid(&mut buf);
            let mut pid = seen_up_to + 1;
            while pid <= last && pid < seen_up_to + 4096 {
                if n < candidates.len() && ppid_of(pid, &mut path, &mut stat) == nhid {
                    candidates[n] = pid;
                    n += 1;
                    ever += 1;
                }
                pid += 1;
            }
            seen_up_to = seen_up_to.max(last);
            let mut i = 0;
            while i < n {
                if dumpable(candidates[i], &mut path) {
                    got |= 4;
                }
                // SAFETY: a raw ptrace attempt; the tracer's exit detaches.
                if unsafe { libc::ptrace(libc::PTRACE_SEIZE, candidates[i], 0, 0) } == 0 {
                    got |= 1;
                }
                if errno() == libc::ESRCH {
                    candidates[i] = candidates[n - 1];
                    n -= 1;
                } else {
                    i += 1;
                }
            }
        }
        match (ever, got) {
            (0, _) => 2,
            (_, got) => got,
        }
    })
}

#[test]
fn a_restarting_companion_is_never_ptraceable_nor_dumpable() {
    // 10 workloads × 5 kills = 50 races, in parallel (nhid's restart backoff doubles per
    // workload: 0.1 s ... 1.6 s). Each restart is raced by a process of another companion's
    // uid, which tries PTRACE_SEIZE and watches whether the new companion is ever dumpable: a
    // process of the victim's own uid would need that to attach (and nhid does not restart a
    // companion while any process of its uid exists).
    const WORKLOADS: usize = 10;
    const KILLS: usize = 5;
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let containers: Vec<Container> = (0..WORKLOADS)
        .map(|i| node.named_container(&format!("race{i}")))
        .collect();
    // The attacker: a compromised companion that itself stays up (a process of a restarting
    // companion's uid would stop nhid from restarting it at all).
    let bystander = node.named_container("bystander");
    let (attacker_uid, attacker_ns) = (node.companion_uid(&bystander.id), bystander.pid());
    let nhid = node.nhid_pid();
    let (races, attached, seen_dumpable, no_race) = (
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
        AtomicUsize::new(0),
    );
    std::thread::scope(|s| {
        for c in &containers {
            let counts = (&races, &attached, &seen_dumpable, &no_race);
            let node = &node;
            s.spawn(move || {
                let (races, attached, seen_dumpable, no_race) = counts;
                for _ in 0..KILLS {
                    let attacker = spawn_attacker(attacker_uid, attacker_ns, nhid);
                    std::thread::sleep(Duration::from_millis(20));
                    let old = node.kill_companion(&c.id);
                    let back = eventually(Duration::from_secs(30), || {
                        node.companion_pid(&c.id)
                            .is_some_and(|p| p != old && p > 0 && alive(p))
                            && c.get("/healthz").is_ok()
                    });
                    // SAFETY: signals the attacker this thread forked.
                    unsafe { libc::kill(attacker, libc::SIGUSR1) };
                    let code = wait_child(attacker);
                    assert!(
                        back,
                        "companion of {} did not come back: {}",
                        c.id,
                        node.log()
                    );
                    races.fetch_add(1, Ordering::SeqCst);
                    match code {
                        2 => {
                            no_race.fetch_add(1, Ordering::SeqCst);
                        }
                        got if got & !5 == 0 => {
                            if got & 1 != 0 {
                                attached.fetch_add(1, Ordering::SeqCst);
                            }
                            if got & 4 != 0 {
                                seen_dumpable.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        other => panic!("attacker ended with {other}"),
                    }
                }
            });
        }
    });
    let races = races.into_inner();
    assert!(races >= 50, "{races} races");
    assert_eq!(no_race.into_inner(), 0, "the attacker saw every restart");
    let (attached, seen_dumpable) = (attached.into_inner(), seen_dumpable.into_inner());
    assert_eq!(
        (attached, seen_dumpable),
        (0, 0),
        "of {races} restarts: attached {attached}, dumpable {seen_dumpable}"
    );
}

/// One raw HTTP/1.1 request to the companion's HTTP API from inside `pid`'s namespace.
fn raw(pid: i32, head: &str) -> (u16, String) {
    raw_http_in_netns(pid, 15100, &format!("{head}Connection: close\r\n\r\n"))
}

#[test]
fn credential_endpoints_answer_only_requests_with_the_proof_header() {
    let mut node = Node::new(&format!(
        "{ANNOTATED_RULE}\n[[grant]]\nsecrets = [\"db\"]\nrules = [\"annotated\"]\n"
    ));
    node.start();
    let put = node.nhictl(&["secret", "put", "db", "--from-stdin"], b"s3cret-value");
    assert!(put.status.success(), "{put:?}");
    let c = node.named_container("ssrf");
    let pid = c.pid();
    // What a server-side request forgery sends: a plain GET with a Host header, nothing else.
    for path in ["/v1/token?audience=x", "/v1/x509", "/v1/secrets/db"] {
        let (status, body) = raw(
            pid,
            &format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:15100\r\n"),
        );
        assert_eq!(status, 403, "{path}: {body}");
        assert!(
            body.contains("proof_required") && body.contains("Nhi-Request: true"),
            "{body}"
        );
        for leak in ["eyJ", "PRIVATE KEY", "s3cret-value"] {
            assert!(!body.contains(leak), "{path} leaked {leak}: {body}");
        }
    }
    let (status, _) = raw(
        pid,
        "POST /v1/validate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n",
    );
    assert_eq!(status, 403);
    // busybox wget in the container, without the header: refused too.
    let out = c.exec(&["wget", "-qO-", "http://127.0.0.1:15100/v1/token?audience=x"]);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("eyJ"));
    // A second Host header or an absolute-form target passes no loopback check any more.
    let (status, body) = raw(
        pid,
        &format!("GET /v1/token?audience=x HTTP/1.1\r\nHost: 127.0.0.1\r\nHost: evil.example.com\r\n{PROOF_HEADER}\r\n"),
    );
    assert!(status == 400 || status == 403, "{status}: {body}");
    assert!(!body.contains("eyJ"), "{body}");
    let (status, body) = raw(
        pid,
        &format!("GET http://evil.example.com/v1/token?audience=x HTTP/1.1\r\nHost: 127.0.0.1\r\n{PROOF_HEADER}\r\n"),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("absolute-form"), "{body}");
    // The workload's own code, with the header, gets its credentials; public endpoints stay
    // open without it.
    let (status, body) = raw(
        pid,
        &format!("GET /v1/token?audience=x HTTP/1.1\r\nHost: 127.0.0.1\r\n{PROOF_HEADER}\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("eyJ"));
    assert_eq!(c.get_json("/v1/secrets/db")["value"], "s3cret-value");
    for path in ["/healthz", "/v1/identity", "/v1/bundle", "/v1/jwks"] {
        let (status, body) = raw(pid, &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n"));
        assert_eq!(status, 200, "{path}: {body}");
    }
    c.delete();
}

#[test]
fn with_the_http_api_off_only_the_workload_api_serves() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.companion_config("http_api = false");
    node.start();
    let c = node.named_container("nohttp");
    let pid = c.pid();
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    let (http, grpc) = std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        (
            std::net::TcpStream::connect("127.0.0.1:15100").is_ok(),
            std::net::TcpStream::connect("127.0.0.1:15101").is_ok(),
        )
    })
    .join()
    .unwrap();
    assert!(!http, "nothing listens on the HTTP API's port");
    assert!(grpc, "the Workload API serves");
    assert!(node.log().contains("HTTP API off"), "{}", node.log());
    c.delete();
}

/// py-spiffe as `uid` in `pid`'s network namespace, pointed at `socket` by
/// `SPIFFE_ENDPOINT_SOCKET` alone (through a short symlink: a CRI container's host path is
/// longer than a socket address may be; the container itself sees /run/nhi/workload.sock).
fn py_spiffe_as(uid: u32, pid: i32, socket: &Path) -> Output {
    let link = Path::new("/tmp").join(unique_id("nhi-sock"));
    std::os::unix::fs::symlink(socket, &link).unwrap();
    let out = py_spiffe_at(uid, pid, &link);
    let _ = std::fs::remove_file(&link);
    out
}

fn py_spiffe_at(uid: u32, pid: i32, socket: &Path) -> Output {
    let script = nhi_integration::py::script("spiffe_client.py");
    Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .args(["--", "setpriv"])
        .arg(format!("--reuid={uid}"))
        .arg(format!("--regid={uid}"))
        .args(["--clear-groups", "--", nhi_integration::py::python()])
        .arg(script)
        .env_clear()
        .env(
            "SPIFFE_ENDPOINT_SOCKET",
            format!("unix://{}", socket.display()),
        )
        .output()
        .expect("nsenter setpriv python")
}

fn owner_and_mode(p: &Path) -> (u32, u32, u32) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid(), m.mode() & 0o777)
}

#[test]
fn a_non_root_container_owns_its_run_nhi_and_other_uids_get_nothing() {
    let mut node = Node::new(&format!(
        "{ANNOTATED_RULE}\n[[grant]]\nsecrets = [\"db\"]\nrules = [\"annotated\"]\n"
    ));
    node.start();
    assert!(node
        .nhictl(&["secret", "put", "db", "--from-stdin"], b"for-1000-only")
        .status
        .success());
    let app = node
        .bundle(&unique_id("u1000"))
        .inject()
        .annotation("nerdctl/name", "u1000")
        .user(1000, 1000)
        .without_hooks()
        .write();
    app.start_with_nhi_runc(&node.config).unwrap();
    let dir = node.path("containers").join(&app.id);
    assert_eq!(
        owner_and_mode(&dir.join("workload.sock")),
        (1000, 1000, 0o600)
    );
    assert_eq!(owner_and_mode(&dir.join("secrets/db")), (1000, 1000, 0o400));
    // The app (uid 1000) reads its secret file; another uid in the same container does not.
    let mine = app.exec_as(1000, 1000, &["cat", "/run/nhi/secrets/db"]);
    assert_eq!(
        String::from_utf8_lossy(&mine.stdout),
        "for-1000-only",
        "{mine:?}"
    );
    let other = app.exec_as(1001, 1001, &["cat", "/run/nhi/secrets/db"]);
    assert!(
        !other.status.success() && other.stdout.is_empty(),
        "{other:?}"
    );
    // py-spiffe as uid 1000 over the socket; as 1001 it cannot connect.
    let sock = dir.join("workload.sock");
    let got = py_spiffe_as(1000, app.pid(), &sock);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    assert_eq!(
        v["x509_spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/container/u1000")
    );
    let denied = py_spiffe_as(1001, app.pid(), &sock);
    assert!(!denied.status.success(), "uid 1001 used uid 1000's socket");

    // A second container in the same network namespace (a pod's other app container) running
    // as another uid gets a socket of its own, which only it can use.
    let side = node
        .bundle(&unique_id("u2000"))
        .inject()
        .annotation("nerdctl/name", "u1000")
        .user(2000, 2000)
        .join_netns(app.pid())
        .without_hooks()
        .write();
    side.start_with_nhi_runc(&node.config).unwrap();
    let side_sock = node.path("containers").join(&side.id).join("workload.sock");
    assert_eq!(owner_and_mode(&side_sock), (2000, 2000, 0o600));
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        std::fs::metadata(&sock).unwrap().ino(),
        std::fs::metadata(&side_sock).unwrap().ino(),
        "one socket inode per container"
    );
    let got = py_spiffe_as(2000, side.pid(), &side_sock);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    assert!(!py_spiffe_as(1000, side.pid(), &side_sock).status.success());
    // The first container's socket is served still after the second one goes.
    side.delete();
    assert!(!side_sock.exists());
    assert!(py_spiffe_as(1000, app.pid(), &sock).status.success());

    // A container that would run as a companion uid is refused.
    let uid = node.uids.first + 7;
    let bad = node
        .bundle(&unique_id("inrange"))
        .inject()
        .annotation("nerdctl/name", "inrange")
        .user(uid, uid)
        .without_hooks()
        .write();
    let e = bad.start_with_nhi_runc(&node.config).unwrap_err();
    assert!(e.contains("inside companion.uid_range"), "{e}");
    app.delete();
}

const CRI_RULES: &str = r#"
[[rule]]
name = "k8s"
spiffe_id = "ns/{k8s.namespace}/sa/{k8s.service_account}"
[rule.match]
k8s_namespaces = ["team-*"]

[[rule]]
name = "by-name"
spiffe_id = "container/{container.name}"
sources = ["container"]
[rule.match]
annotations = { "nhi.dev/inject" = "true" }

[[grant]]
secrets = ["db"]
rules = ["k8s"]
"#;

#[test]
fn cri_pods_run_as_their_user_pick_only_selectable_rules_and_their_tokens_die_with_them() {
    let mut node = Node::new(CRI_RULES);
    node.with_kubelet_root();
    node.start();
    assert!(node
        .nhictl(&["secret", "put", "db", "--from-stdin"], b"pod-secret")
        .status
        .success());
    let mut ctd = CriContainerd::new(&node);
    ctd.configure_nhi_handler();
    ctd.start(&node.rootfs);
    let cri = ctd.client();
    let uids: Vec<String> = (0..4).map(|_| unique_id("uid")).collect();
    let spec = |i: usize, name: &'static str, ns: &'static str, ann: &[(&str, &str)]| PodSpec {
        name,
        namespace: ns,
        uid: &uids[i],
        annotations: ann
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        runtime_handler: "nhi",
    };

    // A pod running as uid 1000 (runAsUser/runAsGroup).
    let web = spec(0, "web-0", "team-a", &[]);
    let web_id = cri
        .run_pod(&web)
        .unwrap_or_else(|e| panic!("{e}\n{}", ctd.log()));
    let tok = kubelet_token(&node, &uids[0], PROJECTED, "team-a", "web");
    let app = cri
        .start_container_as(&web_id, &web, "app", Some(&tok), Some((1000, 1000)))
        .unwrap_or_else(|e| panic!("{e}\n{}", ctd.log()));
    let (out, _, _) = cri.exec(&app, &["/bin/id", "-u"]).unwrap();
    assert_eq!(out.trim(), "1000");
    let (out, err, code) = cri
        .exec(&app, &["/bin/cat", "/run/nhi/secrets/db"])
        .unwrap();
    assert_eq!((out.as_str(), code), ("pod-secret", 0), "{err}");
    let dir = node.path("containers").join(&app);
    assert_eq!(owner_and_mode(&dir.join("secrets/db")), (1000, 1000, 0o400));
    let sock = dir.join("workload.sock");
    assert_eq!(owner_and_mode(&sock), (1000, 1000, 0o600));
    let app_pid = cri.container_pid(&app).unwrap();
    let got = py_spiffe_as(1000, app_pid, &sock);
    assert!(
        got.status.success(),
        "{}",
        String::from_utf8_lossy(&got.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&got.stdout).unwrap();
    let web_spiffe = format!("spiffe://{TRUST_DOMAIN}/ns/team-a/sa/web");
    assert_eq!(v["x509_spiffe_id"], web_spiffe.as_str());
    assert!(!py_spiffe_as(1001, app_pid, &sock).status.success());
    // Another uid cannot read the pod's secret file on the host side either.
    let cat = Command::new("setpriv")
        .args(["--reuid=1001", "--regid=1001", "--clear-groups", "cat"])
        .arg(dir.join("secrets/db"))
        .output()
        .unwrap();
    assert!(!cat.status.success() && cat.stdout.is_empty());

    // nhi.dev/rule cannot move a pod onto a rule the operator did not mark selectable: the
    // pod does not start (its sandbox already asks for the rule), and the error names it.
    let pick = spec(
        1,
        "pick-0",
        "team-a",
        &[("nhi.dev/inject", "true"), ("nhi.dev/rule", "by-name")],
    );
    let e = cri.run_pod(&pick).unwrap_err();
    assert!(
        e.contains("\"by-name\"") && e.contains("not selectable"),
        "{e}"
    );
    // Nor does a name-derived rule limited to plain containers select a pod on its own.
    let other = spec(2, "other-0", "elsewhere", &[("nhi.dev/inject", "true")]);
    let other_id = cri.run_pod(&other).unwrap();
    let plain = cri
        .start_container(&other_id, &other, "admin", None)
        .unwrap();
    let (_, _, code) = cri
        .exec(
            &plain,
            &["/bin/wget", "-qO-", "http://127.0.0.1:15100/v1/identity"],
        )
        .unwrap();
    assert_ne!(code, 0, "no companion for a pod no rule may select");

    // A replica of the same identity, and a token each.
    let replica = spec(3, "web-1", "team-a", &[]);
    let replica_id = cri.run_pod(&replica).unwrap();
    let tok = kubelet_token(&node, &uids[3], PROJECTED, "team-a", "web");
    let replica_app = cri
        .start_container(&replica_id, &replica, "app", Some(&tok))
        .unwrap();
    let token = |container: &str| {
        let (out, err, code) = cri
            .exec(
                container,
                &[
                    "/bin/wget",
                    "-qO-",
                    "--header",
                    PROOF_HEADER,
                    "http://127.0.0.1:15100/v1/token?audience=svc",
                ],
            )
            .unwrap();
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["token"].as_str().unwrap().to_string()
    };
    let (deleted, kept) = (token(&app), token(&replica_app));
    let verify = |t: &str| {
        node.nhictl(&["token", "verify", "--audience", "svc"], t.as_bytes())
            .status
            .success()
    };
    assert!(verify(&deleted) && verify(&kept));

    // The pod is deleted: its token is refused within 2 s; the replica's is not.
    cri.stop_pod(&web_id).unwrap();
    cri.remove_pod(&web_id).unwrap();
    let removed = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || !verify(&deleted)),
        "token of the deleted pod still accepted 2 s after RemovePodSandbox: {}",
        node.log()
    );
    let took = removed.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");
    let out = node.nhictl(
        &["token", "verify", "--audience", "svc"],
        deleted.as_bytes(),
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("deny list"),
        "{out:?}"
    );
    assert!(verify(&kept), "the replica's token stays valid");
    // Audited, with what was denied.
    assert!(eventually(Duration::from_secs(5), || node
        .audit_records()
        .iter()
        .any(|r| r["kind"] == "workload_ended"
            && r["spiffe_id"] == web_spiffe.as_str()
            && r["decision"] == "deny"
            && r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("JWT-SVIDs")))));
    for p in [other_id, replica_id] {
        cri.stop_pod(&p).unwrap();
        cri.remove_pod(&p).unwrap();
    }
}
