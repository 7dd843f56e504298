//! containerd 1.6 (Debian's) with `ctr run --runtime io.containerd.nhi.v2`: the stock runc v2
//! shim runs with nhi-runc as its `runc`, the container gets its companion, `ctr task exec`
//! works as with runc, and the companion is gone once the task is removed.

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use nhi_integration::*;

/// A private containerd: own root, state and socket under the node's temp dir; CRI disabled
/// (not needed by ctr).
struct Containerd {
    sock: PathBuf,
    dir: PathBuf,
    child: Child,
}

impl Containerd {
    fn start(node: &Node) -> Containerd {
        assert!(
            which("containerd").is_some(),
            "containerd is not installed: run scripts/install-deps"
        );
        let dir = node.path("containerd");
        fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("containerd.sock");
        let cfg = dir.join("config.toml");
        fs::write(
            &cfg,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = \"{1}\"\n",
                dir.display(),
                sock.display()
            ),
        )
        .unwrap();
        // containerd finds containerd-shim-nhi-v2 on its PATH; the shim finds the nhi config
        // through NHI_CONFIG, which containerd passes on to shims.
        let path = format!(
            "{}:{}",
            bin_dir().display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let log = fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&cfg)
            .env("PATH", path)
            .env("NHI_CONFIG", &node.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start containerd");
        let c = Containerd { sock, dir, child };
        assert!(
            eventually(Duration::from_secs(20), || c
                .ctr(&["version"])
                .status
                .success()),
            "containerd did not come up: {}",
            fs::read_to_string(c.dir.join("containerd.log")).unwrap_or_default()
        );
        c
    }

    fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr")
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Ok(out) = Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(["task", "ls", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["task", "kill", "-s", "KILL", id]);
                std::thread::sleep(Duration::from_millis(200));
                let _ = self.ctr(&["task", "rm", "-f", id]);
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Shims of this instance outlive containerd by design; stop them too.
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!(
                "containerd-shim.* -address {}",
                self.sock.display()
            ))
            .status();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("state"))
            .stderr(Stdio::null())
            .status();
    }
}

fn with_shim_bin_dir(node: &Node) {
    let cfg = fs::read_to_string(&node.config).unwrap();
    let dir = node.path("runtime-bin");
    fs::write(
        &node.config,
        format!("{cfg}\n[runtime]\nshim_bin_dir = \"{}\"\n", dir.display()),
    )
    .unwrap();
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn ctr_run_with_the_nhi_runtime_gets_a_companion_and_exec_works() {
    let mut node = Node::new(
        r#"
[[rule]]
name = "containerd"
spiffe_id = "ctr/{container.id}"
"#,
    );
    with_shim_bin_dir(&node);
    node.start();
    let ctd = Containerd::start(&node);
    let rootfs = node.rootfs.to_str().unwrap().to_string();
    let id = unique_id("ctr");
    ok(ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.nhi.v2",
        "--env",
        "PATH=/bin",
        "--rootfs",
        &rootfs,
        &id,
        "/bin/sleep",
        "600",
    ]));

    let exec = |exec_id: &str, args: &[&str]| {
        let mut a = vec!["task", "exec", "--exec-id", exec_id, id.as_str()];
        a.extend_from_slice(args);
        ctd.ctr(&a)
    };
    let tok = ok(exec(
        "tok",
        &[
            "/bin/wget",
            "-qO-",
            "http://127.0.0.1:15100/v1/token?audience=ctr",
        ],
    ));
    let tok: serde_json::Value = serde_json::from_str(&tok).unwrap();
    let jwks = ok(exec(
        "jwks",
        &["/bin/wget", "-qO-", "http://127.0.0.1:15100/v1/jwks"],
    ));
    let claims = nhi_ctl::verify_token(
        tok["token"].as_str().unwrap(),
        &jwks,
        "ctr",
        Some(TRUST_DOMAIN),
    )
    .unwrap();
    assert_eq!(claims["sub"], format!("spiffe://{TRUST_DOMAIN}/ctr/{id}"));

    // Exec behaves as with runc: output and exit codes.
    let out = exec("code", &["/bin/sh", "-c", "echo hi; exit 3"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hi\n");
    assert!(!out.status.success());

    // The shim delegated to the stock runc shim, with nhi-runc as its runc.
    let shims = Command::new("pgrep")
        .args(["-af", &format!("containerd-shim-runc-v2 .*-id {id}")])
        .output()
        .unwrap();
    assert!(shims.status.success(), "stock runc shim serves the task");
    assert_eq!(
        fs::read_link(node.path("runtime-bin/runc")).unwrap(),
        bin_dir().join("nhi-runc"),
        "runc on the shim's PATH is nhi-runc"
    );

    let cp = node.companion_pid(&id).expect("companion attached");
    ok(ctd.ctr(&["task", "kill", "-s", "KILL", &id]));
    assert!(eventually(Duration::from_secs(10), || {
        !String::from_utf8_lossy(&ctd.ctr(&["task", "ls"]).stdout).contains("RUNNING")
    }));
    ok(ctd.ctr(&["task", "rm", &id]));
    assert!(
        eventually(Duration::from_secs(5), || !alive(cp)),
        "companion outlived ctr task rm"
    );
    assert!(node.status().workloads.is_empty());
    ok(ctd.ctr(&["container", "rm", &id]));
}
