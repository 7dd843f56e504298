//! Secrets and revocation on the embedded store, with real containers: grants decide who reads
//! what (HTTP and `/run/nhi/secrets/<name>` files), rotation reaches workloads within seconds
//! with files swapped whole, revocation stops issuance, drops caches, denies issued tokens and
//! survives an nhid restart.

use std::fs;
use std::time::{Duration, Instant};

use nhi_integration::*;

/// Containers named `alpha` and `beta` (via annotation) get `container/alpha|beta`.
fn node() -> Node {
    let mut node = Node::new(ANNOTATED_RULE);
    node.append_config(&format!(
        r#"
[[grant]]
secrets = ["db-password", "api-*"]
spiffe_ids = ["spiffe://{TRUST_DOMAIN}/container/alpha"]
"#
    ));
    node.start();
    node
}

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn put(node: &Node, name: &str, value: &str) {
    ok(&node.nhictl(&["secret", "put", name, "--from-stdin"], value.as_bytes()));
}

/// Whether the workload sees `/run/nhi/secrets/db-password` (busybox sh's `test`).
fn has_secret_file(c: &Container) -> bool {
    let out = c.exec(&[
        "sh",
        "-c",
        "test -f /run/nhi/secrets/db-password && echo yes || echo no",
    ]);
    match String::from_utf8_lossy(&out.stdout).trim() {
        "yes" => true,
        "no" => false,
        other => panic!("test -f in {}: {other:?} {out:?}", c.id),
    }
}

fn environ(pid: i32) -> String {
    String::from_utf8_lossy(&fs::read(format!("/proc/{pid}/environ")).unwrap()).into_owned()
}

#[test]
fn a_granted_secret_reaches_its_workload_and_no_other() {
    let node = node();
    let value = format!("pw-{}", unique_id("v"));
    put(&node, "db-password", &value);
    let list = ok(&node.nhictl(&["secret", "list"], b""));
    assert!(list.contains("db-password\tversion=1"), "{list}");
    assert!(!list.contains(&value), "list never shows values");

    let a = node.named_container("alpha");
    let b = node.named_container("beta");
    let got = a.get_json("/v1/secrets/db-password");
    assert_eq!(got["value"], value.as_str());
    assert_eq!(got["version"], 1);
    assert!(got["expires_at"].as_u64().unwrap() > 0);
    let file = a.exec(&["cat", "/run/nhi/secrets/db-password"]);
    assert_eq!(String::from_utf8_lossy(&file.stdout), value, "{file:?}");
    let ls = a.exec(&["ls", "-ln", "/run/nhi/secrets/db-password"]);
    let ls = String::from_utf8_lossy(&ls.stdout);
    let f: Vec<&str> = ls.split_whitespace().collect();
    assert_eq!(
        (f[0], f[2]),
        ("-r--------", "0"),
        "mode 0400, owned by the container's uid: {ls}"
    );
    // Read-only for the workload.
    assert!(!a
        .exec(&["sh", "-c", "echo x > /run/nhi/secrets/db-password"])
        .status
        .success());

    // beta: not granted. 403 with a JSON error, and no file.
    let (status, body) = http_in_netns(b.pid(), "GET", "/v1/secrets/db-password");
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["error"],
        "forbidden"
    );
    assert!(!has_secret_file(&b));
    // Unknown secret (granted pattern, absent): 404; a bad name: 400.
    assert_eq!(http_in_netns(a.pid(), "GET", "/v1/secrets/api-key").0, 404);
    assert_eq!(http_in_netns(a.pid(), "GET", "/v1/secrets/..%2Fx").0, 400);

    // The value is in no environment, no log, no hook output.
    for c in [&a, &b] {
        assert!(!environ(c.pid()).contains(&value));
    }
    for cp in [
        node.companion_pid(&a.id).unwrap(),
        node.companion_pid(&b.id).unwrap(),
    ] {
        assert!(!environ(cp).contains(&value));
    }
    assert!(node.log().contains("delivered secret"));
    assert!(!node.log().contains(&value), "secret value in nhid's log");
    for c in [&a, &b] {
        let err = fs::read_to_string(c.bundle.join("runc.stderr")).unwrap_or_default();
        assert!(!err.contains(&value));
    }

    // Secret files go with the container.
    let dir = node.path(&format!("containers/{}", a.id));
    assert!(dir.join("secrets/db-password").exists());
    a.delete();
    assert!(!dir.exists(), "secret directory removed at detach");
    b.delete();
}

#[test]
fn rotation_reaches_http_and_files_within_5s_and_files_are_swapped_whole() {
    let node = node();
    put(&node, "db-password", "value-0000000000000001");
    let a = node.named_container("alpha");
    assert_eq!(a.get_json("/v1/secrets/db-password")["version"], 1);

    // A reader inside the container loops on the file while we rotate.
    let id = a.id.clone();
    let root = node.runc_root.clone();
    let reader = std::thread::spawn(move || {
        runc(
            &root,
            &[
                "exec",
                &id,
                "sh",
                "-c",
                "i=0; while [ $i -lt 3000 ]; do cat /run/nhi/secrets/db-password; echo; i=$((i+1)); done",
            ],
        )
    });
    let mut worst = Duration::ZERO;
    for v in 2..=11u32 {
        let value = format!("value-{v:016}");
        let t = Instant::now();
        if v % 2 == 0 {
            put(&node, "db-password", &value);
        } else {
            let f = node.path("next-value");
            fs::write(&f, &value).unwrap();
            ok(&node.nhictl(
                &[
                    "secret",
                    "rotate",
                    "db-password",
                    "--from-file",
                    f.to_str().unwrap(),
                ],
                b"",
            ));
        }
        assert!(
            eventually(Duration::from_secs(5), || {
                a.get_json("/v1/secrets/db-password")["version"] == v
                    && fs::read_to_string(
                        node.path(&format!("containers/{}/secrets/db-password", a.id)),
                    )
                    .unwrap()
                        == value
            }),
            "version {v} not served within 5 s"
        );
        worst = worst.max(t.elapsed());
        assert_eq!(
            a.get_json("/v1/secrets/db-password")["value"],
            value.as_str()
        );
    }
    eprintln!("rotation visible to the workload after at most {worst:?}");
    let out = reader.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), 3000);
    for l in &lines {
        assert!(
            l.len() == 22 && l.starts_with("value-"),
            "the reader saw a partial or empty value: {l:?}"
        );
    }
    // Random rotation: a new 256-bit value.
    ok(&node.nhictl(&["secret", "rotate", "db-password"], b""));
    let v = a.get_json("/v1/secrets/db-password");
    assert_eq!(v["version"], 12);
    assert_eq!(v["value"].as_str().unwrap().len(), 43);
    // Removal: gone over HTTP and as a file.
    ok(&node.nhictl(&["secret", "rm", "db-password"], b""));
    assert!(eventually(Duration::from_secs(5), || http_in_netns(
        a.pid(),
        "GET",
        "/v1/secrets/db-password"
    )
    .0 == 404));
    assert!(!has_secret_file(&a));
    // rotate needs an existing secret.
    assert!(!node
        .nhictl(&["secret", "rotate", "db-password"], b"")
        .status
        .success());
    a.delete();
}

fn validate(pid: i32, token: &str, audience: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"token": token, "audience": audience}).to_string();
    let (status, body) = http_in_netns_with(pid, "POST", "/v1/validate", &body);
    (status, serde_json::from_str(&body).unwrap_or_default())
}

#[test]
fn revocation_takes_effect_within_2s_denies_issued_tokens_and_survives_restart() {
    let mut node = node();
    put(&node, "db-password", "pw-revoke-test-0001");
    let a = node.named_container("alpha");
    let b = node.named_container("beta");
    let token = a.get_json("/v1/token?audience=svc")["token"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, v) = validate(b.pid(), &token, "svc");
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/container/alpha")
    );
    assert_eq!(validate(b.pid(), &token, "other").0, 403, "wrong audience");
    assert!(has_secret_file(&a));

    let t = Instant::now();
    let out = ok(&node.nhictl(&["revoke", "--workload", &a.id], b""));
    assert!(out.contains("revoked (1 tokens"), "{out}");
    assert!(
        eventually(Duration::from_secs(2), || {
            http_in_netns(a.pid(), "GET", "/v1/token?audience=svc").0 == 403
                && http_in_netns(a.pid(), "GET", "/v1/x509").0 == 403
                && http_in_netns(a.pid(), "GET", "/v1/secrets/db-password").0 == 403
                && validate(b.pid(), &token, "svc").0 == 403
        }),
        "revocation not in effect within 2 s"
    );
    eprintln!("revocation in effect after {:?}", t.elapsed());
    assert!(!has_secret_file(&a));
    // nhictl token verify consults the deny list too.
    let out = node.nhictl(&["token", "verify", "--audience", "svc"], token.as_bytes());
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("deny list"),
        "{out:?}"
    );
    // beta is untouched.
    assert!(b.get("/v1/token?audience=svc").is_ok());

    // The revocation survives a restart of nhid (the companion is restored, still refused).
    node.stop();
    node.start();
    assert!(eventually(Duration::from_secs(5), || node
        .companion_pid(&a.id)
        .is_some()));
    assert_eq!(
        http_in_netns(a.pid(), "GET", "/v1/token?audience=svc").0,
        403
    );
    assert_eq!(validate(b.pid(), &token, "svc").0, 403);
    let status = node.status();
    assert_eq!(status.revocations.len(), 1);
    assert_eq!(status.revocations[0].jtis.len(), 1);

    // Undo: service resumes, secrets come back; the old token stays denied (cut-off).
    let id = format!("spiffe://{TRUST_DOMAIN}/container/alpha");
    ok(&node.nhictl(&["revoke", "--spiffe-id", &id, "--undo"], b""));
    assert!(eventually(Duration::from_secs(2), || a
        .get("/v1/token?audience=svc")
        .is_ok()));
    assert!(has_secret_file(&a), "{}", node.log());
    assert!(node.status().revocations.is_empty());
    a.delete();
    b.delete();
}
