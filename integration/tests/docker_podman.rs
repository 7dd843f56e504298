//! Docker (Nomad's docker-driver path) and Podman (the hooks.d path CRI-O shares), each wired
//! in with `nhictl configure`, each a private daemon or store in the test's temp dir.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nhi_integration::*;

fn nhictl(node: &Node, args: &[&str]) -> Output {
    let out = Command::new(bin("nhictl"))
        .arg("--config")
        .arg(&node.config)
        .args(args)
        .output()
        .expect("nhictl");
    assert!(out.status.success(), "nhictl {args:?}: {out:?}");
    out
}

/// A private dockerd: own data root, exec root, socket and (managed) containerd.
struct Dockerd {
    sock: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl Dockerd {
    fn start(node: &Node, daemon_json: &std::path::Path) -> Dockerd {
        assert!(
            which("dockerd").is_some(),
            "docker.io is not installed: run scripts/install-deps"
        );
        let dir = node.path("docker");
        // dockerd limits the length of its socket paths; keep exec-root short.
        let exec_root = PathBuf::from(format!("/run/nhi-it-docker-{}", unique_id("x")));
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("docker.sock");
        let log = fs::File::create(dir.join("dockerd.log")).unwrap();
        let child = Command::new("dockerd")
            .arg("--config-file")
            .arg(daemon_json)
            .arg("--data-root")
            .arg(dir.join("data"))
            .arg("--exec-root")
            .arg(&exec_root)
            .arg("--pidfile")
            .arg(dir.join("dockerd.pid"))
            .arg("-H")
            .arg(format!("unix://{}", sock.display()))
            .args([
                "--iptables=false",
                "--ip6tables=false",
                "--bridge=none",
                "--storage-driver=vfs",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start dockerd");
        fs::write(dir.join("exec-root"), exec_root.display().to_string()).unwrap();
        let d = Dockerd { sock, dir, child };
        assert!(
            eventually(Duration::from_secs(60), || d
                .docker(&["info"])
                .status
                .success()),
            "dockerd did not come up: {}",
            fs::read_to_string(d.dir.join("dockerd.log")).unwrap_or_default()
        );
        d
    }

    fn docker(&self, args: &[&str]) -> Output {
        Command::new("docker")
            .arg("-H")
            .arg(format!("unix://{}", self.sock.display()))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("docker")
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if !eventually(Duration::from_secs(15), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Ok(root) = fs::read_to_string(self.dir.join("exec-root")) {
            let _ = Command::new("umount")
                .arg("-R")
                .arg(&root)
                .stderr(Stdio::null())
                .status();
            let _ = fs::remove_dir_all(&root);
        }
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("data"))
            .stderr(Stdio::null())
            .status();
    }
}

#[test]
fn docker_run_with_the_nhi_runtime_takes_the_nomad_identity_from_the_signed_token() {
    let mut node = Node::new(
        r#"
[[rule]]
name = "nomad"
spiffe_id = "nomad/{nomad.namespace}/job/{nomad.job}/task/{nomad.task}"
[rule.match]
nomad_jobs = ["*"]
"#,
    );
    nomad::configure(&node);
    node.start();
    let daemon_json = node.path("daemon.json");
    // dockerd 20.10 writes its trust key to /etc/docker/key.json unless told otherwise.
    let key = node.path("docker-key.json");
    fs::write(
        &daemon_json,
        format!(
            "{{\"log-level\": \"warn\", \"deprecated-key-path\": \"{}\"}}\n",
            key.display()
        ),
    )
    .unwrap();
    nhictl(
        &node,
        &[
            "configure",
            "docker",
            "--file",
            daemon_json.to_str().unwrap(),
        ],
    );
    let docker = Dockerd::start(&node, &daemon_json);

    // The busybox rootfs as an image (no registry here).
    let tar = node.path("rootfs.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&node.rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let out = docker.docker(&["import", tar.to_str().unwrap(), "nhi-busybox:test"]);
    assert!(out.status.success(), "{out:?}");

    // What Nomad's docker driver does: `runtime = "nhi"`, NOMAD_* in the task env, the
    // allocation directory at /alloc and the task's local and secrets directories at /local and
    // /secrets, where the Nomad client wrote the task's workload identity
    // (`identity { file = true }`). The job's env block overrides NOMAD_JOB_NAME: the identity
    // still follows the signed token.
    let alloc = "5e0f6a55-6c4b-4b8b-9c1e-6f0a2a7b7c11";
    let t = nomad::task(
        &node,
        alloc,
        "server",
        Some(&nomad::token("default", "billing", "api", "server", alloc)),
    );
    let mounts: Vec<String> = [
        (&t.alloc, "/alloc"),
        (&t.local, "/local"),
        (&t.secrets, "/secrets"),
    ]
    .iter()
    .map(|(h, c)| format!("{}:{c}", h.display()))
    .collect();
    let alloc_env = format!("NOMAD_ALLOC_ID={alloc}");
    let out = docker.docker(&[
        "run",
        "--rm",
        "--runtime",
        "nhi",
        "--network",
        "none",
        "-v",
        &mounts[0],
        "-v",
        &mounts[1],
        "-v",
        &mounts[2],
        "-e",
        "NOMAD_NAMESPACE=default",
        "-e",
        "NOMAD_JOB_NAME=payments",
        "-e",
        "NOMAD_GROUP_NAME=api",
        "-e",
        "NOMAD_TASK_NAME=server",
        "-e",
        &alloc_env,
        "nhi-busybox:test",
        "/bin/wget",
        "-qO-",
        "http://127.0.0.1:15100/v1/identity",
    ]);
    assert!(
        out.status.success(),
        "{out:?}\n{}",
        fs::read_to_string(docker.dir.join("dockerd.log")).unwrap_or_default()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/nomad/default/job/billing/task/server"),
        "the job's NOMAD_JOB_NAME=payments does not pick the identity: {v}"
    );
    assert_eq!(v["workload"]["nomad"]["alloc_id"], alloc);
    assert_eq!(v["workload"]["nomad"]["group"], "api");
    // Nothing else of the environment reached nhi.
    assert!(!serde_json::to_string(&v).unwrap().contains("PATH"));

    // Without --runtime nhi: untouched.
    let out = docker.docker(&[
        "run",
        "--rm",
        "--network",
        "none",
        "-e",
        "NOMAD_JOB_NAME=billing",
        "nhi-busybox:test",
        "/bin/sh",
        "-c",
        "/bin/wget -qO- http://127.0.0.1:15100/healthz || echo NONE",
    ]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "NONE",
        "{out:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || node
            .status()
            .workloads
            .is_empty()),
        "companion gone after --rm"
    );
}

#[test]
fn podman_with_hooks_d_attaches_annotated_containers_only() {
    assert!(
        which("podman").is_some(),
        "podman is not installed: run scripts/install-deps"
    );
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let hooks = node.path("hooks.d");
    nhictl(
        &node,
        &[
            "configure",
            "podman",
            "--hooks-dir",
            hooks.to_str().unwrap(),
        ],
    );
    // Podman wants no default ulimits on this machine kind (no CAP_SYS_RESOURCE).
    let conf = node.path("containers.conf");
    fs::write(&conf, "[containers]\ndefault_ulimits = []\n[engine]\ncgroup_manager = \"cgroupfs\"\nevents_logger = \"file\"\n").unwrap();
    let store = node.path("podman");
    let podman = |args: &[&str]| {
        Command::new("podman")
            .env("CONTAINERS_CONF", &conf)
            .arg("--root")
            .arg(store.join("root"))
            .arg("--runroot")
            .arg(store.join("runroot"))
            .arg("--tmpdir")
            .arg(store.join("tmp"))
            .arg("--hooks-dir")
            .arg(&hooks)
            .args(["--runtime", "runc", "--storage-driver", "vfs"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("podman")
    };
    let rootfs = node.rootfs.to_str().unwrap().to_string();
    let run = |annotated: bool| {
        let mut a = vec!["run", "--rm", "--network", "none", "--env", "PATH=/bin"];
        if annotated {
            a.extend(["--annotation", "nhi.dev/inject=true"]);
        }
        a.extend([
            "--rootfs",
            rootfs.as_str(),
            "/bin/sh",
            "-c",
            "/bin/wget -qO- http://127.0.0.1:15100/v1/identity || echo NONE",
        ]);
        podman(&a)
    };
    let out = run(true);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {out:?}"));
    assert!(
        v["spiffe_id"]
            .as_str()
            .unwrap()
            .starts_with(&format!("spiffe://{TRUST_DOMAIN}/container/")),
        "{v}"
    );
    let out = run(false);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "NONE",
        "unannotated: {out:?}"
    );
    assert!(
        eventually(Duration::from_secs(5), || node
            .status()
            .workloads
            .is_empty()),
        "poststop via hooks.d"
    );
    let _ = Command::new("umount")
        .arg("-R")
        .arg(&store)
        .stderr(Stdio::null())
        .status();
}
