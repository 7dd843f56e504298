//! The hook runs as root on the host and reads what a pod chose: its service-account mount's
//! source. Shown here with CRI pods (containerd's CRI driven as a kubelet drives it): a pod that
//! mounts an emptyDir, or a doctored projected volume, at the service-account path, holding a
//! `token` that is a symlink to a host file or a FIFO, never makes the hook open the host file,
//! wait on the FIFO, or take longer than a second; a pod no rule selects causes no read at all.
//! What was opened is observed with inotify, not taken from the code; how long the hook ran is
//! measured by a wrapper around it.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nhi_integration::kube::{kubelet_token, CriContainerd, PodSpec, PROJECTED, SA_RULE};
use nhi_integration::*;
use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

const SA_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// A hook wrapper that logs `<stage> <exit code> <milliseconds>` per run to `log`.
fn timed_hook(node: &Node, log: &Path) -> PathBuf {
    let script = node.path("bin/timed-hook");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\ns=$(date +%s%N)\n\"{hook}\" \"$@\"\nrc=$?\ne=$(date +%s%N)\necho \"$1 $rc $(( (e - s) / 1000000 ))\" >> \"{log}\"\nexit $rc\n",
            hook = bin("nhi-hook").display(),
            log = log.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

fn mkfifo(p: &Path) {
    nix::unistd::mkfifo(p, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

/// A directory under the pod's volumes of `kind`, holding `token` made by `plant`.
fn volume(
    node: &Node,
    pod_uid: &str,
    kind: &str,
    name: &str,
    plant: impl FnOnce(&Path),
) -> PathBuf {
    let dir = node.path(&format!("kubelet/pods/{pod_uid}/volumes/{kind}/{name}"));
    fs::create_dir_all(&dir).unwrap();
    plant(&dir.join("token"));
    dir
}

#[test]
fn planted_links_and_fifos_at_the_service_account_path_are_never_followed_or_waited_on() {
    let mut node = Node::new(SA_RULE);
    node.with_kubelet_root();
    let hook_log = node.path("hook-times.log");
    let hook = timed_hook(&node, &hook_log);
    node.append_config(&format!("[runtime]\nhook = \"{}\"", hook.display()));
    node.start();
    let mut ctd = CriContainerd::new(&node);
    ctd.configure_nhi_handler();
    ctd.start(&node.rootfs);
    let cri = ctd.client();

    // The host file a hostile pod points its token at, watched for any open or read.
    let host_file = node.path("host-shadow");
    fs::write(&host_file, "root:$6$secret:19000:0:99999:7:::\n").unwrap();
    let watch = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC).unwrap();
    let opened = AddWatchFlags::IN_OPEN | AddWatchFlags::IN_ACCESS;
    watch.add_watch(&host_file, opened).unwrap();

    let uid = unique_id("uid");
    let pod = PodSpec {
        name: "hostile-0",
        namespace: "team-a",
        uid: &uid,
        annotations: HashMap::new(),
        runtime_handler: "nhi",
    };
    let pod_id = cri
        .run_pod(&pod)
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", ctd.log()));
    let link_to_host = |t: &Path| std::os::unix::fs::symlink(&host_file, t).unwrap();
    let empty_link = volume(
        &node,
        &uid,
        "kubernetes.io~empty-dir",
        "sa-link",
        link_to_host,
    );
    let projected_link = volume(&node, &uid, PROJECTED, "doctored-link", link_to_host);
    let projected_fifo = volume(&node, &uid, PROJECTED, "doctored-fifo", mkfifo);
    let empty_fifo = volume(&node, &uid, "kubernetes.io~empty-dir", "sa-fifo", mkfifo);
    // The emptyDir's FIFO is outside the projected volumes: the hook must not even open it.
    watch
        .add_watch(&empty_fifo.join("token"), AddWatchFlags::IN_OPEN)
        .unwrap();

    // A blocked hook would hang StartContainer: give up long before the test harness would.
    let deadline = Duration::from_secs(60);
    for (name, dir, reason) in [
        (
            "empty-link",
            &empty_link,
            "not in kubelet's projected volumes",
        ),
        ("projected-link", &projected_link, "symbolic link"),
        ("projected-fifo", &projected_fifo, "is a FIFO"),
        (
            "empty-fifo",
            &empty_fifo,
            "not in kubelet's projected volumes",
        ),
    ] {
        let err = cri
            .start_container_with(&pod_id, &pod, name, &[(SA_PATH, dir.as_path())], deadline)
            .expect_err(name);
        assert!(
            err.contains("nhi-hook") && err.contains("service account") && err.contains(reason),
            "{name}: {err}"
        );
    }
    // The pod itself is fine: a genuine kubelet token (atomic-writer layout) gives the identity.
    let token = kubelet_token(&node, &uid, PROJECTED, "team-a", "web");
    let app = cri
        .start_container_with(
            &pod_id,
            &pod,
            "app",
            &[(SA_PATH, token.as_path())],
            deadline,
        )
        .unwrap_or_else(|e| panic!("genuine token: {e}"));
    let (out, _, code) = cri
        .exec(
            &app,
            &["/bin/wget", "-qO-", "http://127.0.0.1:15100/v1/identity"],
        )
        .unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!("spiffe://{TRUST_DOMAIN}/ns/team-a/sa/web")),
        "{out}"
    );

    // A pod no rule selects: its link is never touched, the container just runs.
    let other_uid = unique_id("uid");
    let plain = PodSpec {
        name: "plain-0",
        namespace: "default",
        uid: &other_uid,
        annotations: HashMap::new(),
        runtime_handler: "nhi",
    };
    let plain_id = cri.run_pod(&plain).unwrap();
    let plain_link = volume(
        &node,
        &other_uid,
        "kubernetes.io~empty-dir",
        "sa",
        link_to_host,
    );
    cri.start_container_with(
        &plain_id,
        &plain,
        "app",
        &[(SA_PATH, plain_link.as_path())],
        deadline,
    )
    .unwrap_or_else(|e| panic!("unselected pod: {e}"));

    let events = match watch.read_events() {
        Ok(ev) => ev,
        Err(nix::errno::Errno::EAGAIN) => Vec::new(),
        Err(e) => panic!("inotify: {e}"),
    };
    assert!(
        events.is_empty(),
        "the hook opened or read a file outside the pod's projected volume: {events:?}"
    );
    let times = fs::read_to_string(&hook_log).unwrap();
    let runs: Vec<(String, i32, u64)> = times
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (
                f[0].to_string(),
                f[1].parse().unwrap(),
                f[2].parse().unwrap(),
            )
        })
        .collect();
    let creates: Vec<_> = runs.iter().filter(|r| r.0 == "createRuntime").collect();
    // 2 sandboxes, 4 refused containers, 2 started.
    assert_eq!(creates.len(), 8, "{times}");
    assert_eq!(creates.iter().filter(|r| r.1 != 0).count(), 4, "{times}");
    for (stage, _, ms) in &creates {
        assert!(*ms < 1000, "{stage} took {ms} ms:\n{times}");
    }
    for id in [pod_id, plain_id] {
        cri.stop_pod(&id).unwrap();
        cri.remove_pod(&id).unwrap();
    }
}

/// Runs the real `nhi-hook createRuntime` on `state`; (exit code, stderr, peak RSS in KiB,
/// wall time).
// Reaped with wait4(2) below, for its resource usage, which `Child::wait` does not give.
#[allow(clippy::zombie_processes)]
fn run_hook(config: &Path, state: &str) -> (i32, String, i64, Duration) {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    let started = std::time::Instant::now();
    let mut child = std::process::Command::new(bin("nhi-hook"))
        .args(["createRuntime", "--config"])
        .arg(config)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(state.as_bytes())
        .unwrap();
    // A hook that blocks (the old one on a FIFO) is killed after 10 s, so the test fails
    // instead of hanging. The child is not reaped before wait4 below: its pid stays ours.
    let (done, timer) = std::sync::mpsc::channel::<()>();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let watchdog = std::thread::spawn(move || {
        if timer.recv_timeout(Duration::from_secs(10)).is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let mut status = 0;
    // SAFETY: rusage is plain data; all-zero is valid and wait4 fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child's pid with valid pointers to a status and a rusage.
    let r = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    assert_eq!(r, child.id() as i32, "wait4");
    let _ = done.send(());
    watchdog.join().unwrap();
    let code = std::process::ExitStatus::from_raw(status)
        .code()
        .unwrap_or(-1);
    (code, err, usage.ru_maxrss, started.elapsed())
}

#[test]
fn a_fifo_or_a_100_mb_config_json_costs_the_hook_neither_a_wait_nor_memory() {
    let node = Node::new(&ANNOTATED_RULE.replace("nhi.dev/inject", "nhi.dev/any"));
    let bundle = node.path("bundles/hostile");
    fs::create_dir_all(&bundle).unwrap();
    let spec = bundle.join("config.json");
    let state = format!(
        r#"{{"ociVersion":"1.0.2","id":"hostile","status":"creating","pid":1,"bundle":"{}"}}"#,
        bundle.display()
    );
    mkfifo(&spec);
    let (code, err, _, took) = run_hook(&node.config, &state);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&spec.display().to_string()) && err.contains("is a FIFO"),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    fs::remove_file(&spec).unwrap();
    // 100 MB of JSON whitespace after a valid spec: a size, not a parse, refuses it. Written in
    // pieces: the child's peak RSS counts this process's own peak from before its exec.
    {
        use std::io::Write;
        let mut f = fs::File::create(&spec).unwrap();
        f.write_all(br#"{"ociVersion":"1.0.2"}"#).unwrap();
        let spaces = vec![b' '; 1 << 20];
        for _ in 0..100 {
            f.write_all(&spaces).unwrap();
        }
    }
    let (code, err, rss_kib, took) = run_hook(&node.config, &state);
    eprintln!("hook on a 100 MB config.json: {took:?}, peak RSS {rss_kib} KiB");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("is 104857622 bytes, more than the 4194304 bytes allowed"),
        "{err}"
    );
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The old hook read it whole: over 200 MB.
    assert!(rss_kib < 48 * 1024, "the hook peaked at {rss_kib} KiB");
}
