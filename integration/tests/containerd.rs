//! containerd 1.6 (Debian's) with `ctr run --runtime io.containerd.nhi.v2`: the stock runc v2
//! shim runs with nhi-runc as its `runc`, the container gets its companion, `ctr task exec`
//! works as with runc, and the companion is gone once the task is removed.

use std::fs;
use std::process::{Command, Output};
use std::time::Duration;

use nhi_integration::kube::CriContainerd;
use nhi_integration::*;

fn with_shim_bin_dir(node: &Node) {
    let dir = node.path("runtime-bin");
    node.append_config(&format!("[runtime]\nshim_bin_dir = \"{}\"", dir.display()));
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
    let mut ctd = CriContainerd::new(&node);
    ctd.start(&node.rootfs);
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
            "--header",
            PROOF_HEADER,
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
