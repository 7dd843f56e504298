//! nhi-runc on real runc: hooks injected once, companion attached, runc's output and exit
//! codes passed through untouched.

use std::fs;
use std::process::{Command, Output, Stdio};

use nhi_integration::*;

fn nhi_runc(node: &Node, args: &[&str]) -> Output {
    Command::new(bin("nhi-runc"))
        .arg("--root")
        .arg(&node.runc_root)
        .args(args)
        .env("NHI_CONFIG", &node.config)
        .stdin(Stdio::null())
        .output()
        .expect("nhi-runc")
}

fn nhi_hooks(bundle: &std::path::Path) -> (usize, usize) {
    let spec: serde_json::Value =
        serde_json::from_slice(&fs::read(bundle.join("config.json")).unwrap()).unwrap();
    let count = |stage: &str| {
        spec["hooks"][stage]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|h| h["path"].as_str().unwrap_or("").ends_with("nhi-hook"))
                    .count()
            })
            .unwrap_or(0)
    };
    (count("createRuntime"), count("poststop"))
}

#[test]
fn nhi_runc_injects_hooks_once_and_the_container_gets_its_companion() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node
        .bundle(&unique_id("wrap"))
        .inject()
        .without_hooks()
        .write();
    // Another tool's hook must survive.
    let cfg = c.bundle.join("config.json");
    let mut spec: serde_json::Value = serde_json::from_slice(&fs::read(&cfg).unwrap()).unwrap();
    spec["hooks"] = serde_json::json!({"poststop": [{"path": "/bin/true", "args": ["true"]}]});
    spec["x-vendor-extension"] = serde_json::json!({"keep": [1, 2, 3]});
    fs::write(&cfg, serde_json::to_vec(&spec).unwrap()).unwrap();

    let bundle = c.bundle.to_str().unwrap();
    for round in 0..2 {
        // Detached create: the container inherits stdio, so none of it may be a pipe we read.
        let st = Command::new(bin("nhi-runc"))
            .arg("--root")
            .arg(&node.runc_root)
            .args(["create", "--bundle", bundle, &c.id])
            .env("NHI_CONFIG", &node.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "round {round}: nhi-runc create failed");
        assert_eq!(
            nhi_hooks(&c.bundle),
            (1, 1),
            "round {round}: hooks injected exactly once"
        );
        let out = nhi_runc(&node, &["start", &c.id]);
        assert!(out.status.success(), "{out:?}");
        assert_eq!(
            c.get_json("/v1/identity")["spiffe_id"],
            format!("spiffe://{TRUST_DOMAIN}/container/{}", c.id)
        );
        let cp = node.companion_pid(&c.id).unwrap();
        let out = nhi_runc(&node, &["delete", "-f", &c.id]);
        assert!(out.status.success(), "{out:?}");
        assert!(!alive(cp), "poststop through nhi-runc stops the companion");
    }
    let spec: serde_json::Value = serde_json::from_slice(&fs::read(&cfg).unwrap()).unwrap();
    assert_eq!(
        spec["hooks"]["poststop"][0]["path"], "/bin/true",
        "foreign hooks kept, first"
    );
    assert_eq!(
        spec["x-vendor-extension"],
        serde_json::json!({"keep": [1, 2, 3]})
    );
}

#[test]
fn nhi_runc_passes_exit_codes_stdout_and_errors_through() {
    let node = Node::new(""); // no rules: nothing selected, nhid not even needed
    let c = node
        .bundle(&unique_id("exit"))
        .without_hooks()
        .args(&["sh", "-c", "echo out-from-container; exit 7"])
        .write();
    let out = nhi_runc(
        &node,
        &["run", "--bundle", c.bundle.to_str().unwrap(), &c.id],
    );
    assert_eq!(out.status.code(), Some(7), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out-from-container\n");

    let ours = nhi_runc(&node, &["--version"]);
    let theirs = Command::new("runc").arg("--version").output().unwrap();
    assert_eq!(ours.stdout, theirs.stdout);
    assert_eq!(ours.status.code(), theirs.status.code());

    let ours = nhi_runc(&node, &["state", "no-such-container"]);
    let theirs = runc(&node.runc_root, &["state", "no-such-container"]);
    assert_eq!(ours.status.code(), theirs.status.code());
    assert!(ours.stdout.is_empty());

    // A bundle nhi-runc cannot parse: error in runc's JSON log format and on stderr, never stdout.
    let bad = node.path("bad-bundle");
    fs::create_dir_all(&bad).unwrap();
    fs::write(bad.join("config.json"), "{not json").unwrap();
    let log = node.path("runc-log.json");
    let out = nhi_runc(
        &node,
        &[
            "--log",
            log.to_str().unwrap(),
            "--log-format",
            "json",
            "create",
            "--bundle",
            bad.to_str().unwrap(),
            "bad",
        ],
    );
    assert!(!out.status.success());
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nhi-runc"));
    let line: serde_json::Value =
        serde_json::from_str(fs::read_to_string(&log).unwrap().lines().last().unwrap()).unwrap();
    assert_eq!(line["level"], "error");
    assert!(line["msg"].as_str().unwrap().contains("config.json"));
}
