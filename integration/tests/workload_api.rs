//! The SPIFFE Workload API, proven with clients nobody here wrote: py-spiffe (PyPI `spiffe`)
//! and the crates.io `spiffe` crate, against real containers started through `nhi-runc`.
//!
//! py-spiffe speaks only unix sockets and busybox has no Python: it runs as a host process
//! joined to the workload's network namespace (`nsenter --net`), pointed by
//! `SPIFFE_ENDPOINT_SOCKET` alone at the same socket the container sees as
//! `/run/nhi/workload.sock` (host side `<containers_dir>/<id>/workload.sock`).

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use futures_util::StreamExt;
use nhi_integration::py::{ca_rotation_verifier, json_of, python, script};
use nhi_integration::*;

/// The host path of the container's `/run/nhi/workload.sock`.
fn host_socket(node: &Node, c: &Container) -> PathBuf {
    node.path("containers").join(&c.id).join("workload.sock")
}

/// Runs a Python client inside the workload's network namespace with exactly `env`.
fn py_in_netns(pid: i32, script_name: &str, args: &[&str], env: &[(&str, String)]) -> Output {
    Command::new("nsenter")
        .arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("--")
        .arg(python())
        .arg(script(script_name))
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("nsenter python")
}

fn json_out(out: &Output) -> serde_json::Value {
    json_of(out)
}

fn environ(pid: i32) -> String {
    String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap()).into_owned()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs `f` on a runtime in a thread that joined the network namespace of `pid`.
fn in_netns<T: Send + 'static>(pid: i32, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

#[test]
fn py_spiffe_gets_svids_through_the_socket_with_only_the_env_pointer() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.named_container("alpha");
    let pid = c.pid();
    // The container is told where the socket is, and it is there, owned by its uid. (`runc
    // run -d` returns before runc's init has exec'd the process: until then environ is runc's.)
    assert!(
        eventually(Duration::from_secs(5), || environ(pid)
            .contains("SPIFFE_ENDPOINT_SOCKET=unix:///run/nhi/workload.sock")),
        "{}",
        environ(pid)
    );
    let ls = c.exec(&["ls", "-ln", "/run/nhi/workload.sock"]);
    let ls = String::from_utf8_lossy(&ls.stdout).to_string();
    let f: Vec<&str> = ls.split_whitespace().collect();
    assert_eq!((f[0], f[2]), ("srw-------", "0"), "{ls}");

    let sock = format!("unix://{}", host_socket(&node, &c).display());
    let got = json_out(&py_in_netns(
        pid,
        "spiffe_client.py",
        &[],
        &[("SPIFFE_ENDPOINT_SOCKET", sock)],
    ));
    let id = format!("spiffe://{TRUST_DOMAIN}/container/alpha");
    assert_eq!(got["x509_spiffe_id"], id.as_str(), "{got}");
    assert_eq!(got["x509_chain_len"], 1, "{got}");
    assert_eq!(got["x509_bundle_authorities"], 1, "{got}");
    assert_eq!(got["jwt_spiffe_id"], id.as_str(), "{got}");
    assert_eq!(got["jwt_audience"], serde_json::json!(["aud-py"]), "{got}");
    assert!(got["jwt_bundle_keys"].as_u64().unwrap() >= 1, "{got}");
    assert_eq!(got["validate_good"], "accepted", "{got}");
    let wrong = got["validate_wrong_audience"].as_str().unwrap();
    assert!(wrong.starts_with("rejected"), "{got}");
    c.delete();
}

#[test]
fn requests_without_the_security_header_get_invalid_argument() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.named_container("beta");
    let pid = c.pid();
    let unix = format!("unix:{}", host_socket(&node, &c).display());
    for target in ["127.0.0.1:15101", unix.as_str()] {
        let got = json_out(&py_in_netns(pid, "raw_grpc.py", &[target], &[]));
        assert_eq!(
            got["jwt_without_header"], "INVALID_ARGUMENT",
            "{target}: {got}"
        );
        assert_eq!(
            got["x509_without_header"], "INVALID_ARGUMENT",
            "{target}: {got}"
        );
        assert_eq!(got["jwt_with_header"], "OK", "{target}: {got}");
        assert_eq!(
            got["jwt_no_audience"], "INVALID_ARGUMENT",
            "{target}: {got}"
        );
    }
    c.delete();
}

#[test]
fn rust_spiffe_crate_over_tcp_in_the_netns_and_over_the_socket() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.named_container("delta");
    let pid = c.pid();
    let id = format!("spiffe://{TRUST_DOMAIN}/container/delta");
    let check = |endpoint: String| async move {
        let client = spiffe::WorkloadApiClient::connect_to(&endpoint)
            .await
            .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
        let svid = client.fetch_x509_svid().await.expect("x509");
        let x509_id = svid.spiffe_id().to_string();
        let bundles = client.fetch_x509_bundles().await.expect("bundles");
        let td = spiffe::TrustDomain::new(TRUST_DOMAIN).unwrap();
        assert!(bundles.get(&td).is_some(), "bundle for {td}");
        let jwt = client.fetch_jwt_svid(["aud-rs"], None).await.expect("jwt");
        let ok = client.validate_jwt_token("aud-rs", jwt.token()).await;
        let wrong = client.validate_jwt_token("not-me", jwt.token()).await;
        let jwks = client.fetch_jwt_bundles().await.expect("jwt bundles");
        assert!(jwks.get(&td).is_some(), "jwt bundle for {td}");
        (
            x509_id,
            jwt.spiffe_id().to_string(),
            ok.is_ok(),
            wrong.err().map(|e| e.to_string()),
        )
    };
    let (x, j, ok, wrong) = in_netns(pid, move || {
        rt().block_on(check("tcp://127.0.0.1:15101".into()))
    });
    assert_eq!(
        (x.as_str(), j.as_str(), ok),
        (id.as_str(), id.as_str(), true)
    );
    assert!(wrong.is_some(), "a wrong audience is rejected");
    let sock = format!("unix://{}", host_socket(&node, &c).display());
    let (x, j, ok, wrong) = rt().block_on(check(sock));
    assert_eq!(
        (x.as_str(), j.as_str(), ok),
        (id.as_str(), id.as_str(), true)
    );
    assert!(wrong.is_some(), "a wrong audience is rejected");
    c.delete();
}

#[test]
fn x509_stream_rotates_without_reconnecting_and_revocation_ends_it() {
    // 10 s certificates: the companion refreshes at half-life (~5 s).
    let mut node = Node::with_config(ANNOTATED_RULE, "[issuer]\nx509_ttl = \"10s\"\n");
    node.start();
    let c = node.named_container("gamma");
    let sock = format!("unix://{}", host_socket(&node, &c).display());
    let id = format!("spiffe://{TRUST_DOMAIN}/container/gamma");
    rt().block_on(async {
        let client = spiffe::WorkloadApiClient::connect_to(&sock).await.unwrap();
        let mut stream = client.stream_x509_svids().await.expect("stream");
        macro_rules! next {
            ($s:expr) => {
                tokio::time::timeout(Duration::from_secs(15), $s.next())
            };
        }
        let first: spiffe::X509Svid = next!(stream)
            .await
            .expect("first SVID in time")
            .expect("stream open")
            .expect("first SVID");
        assert_eq!(first.spiffe_id().to_string(), id);
        let second: spiffe::X509Svid = next!(stream)
            .await
            .expect("rotated SVID within 15 s")
            .expect("stream open")
            .expect("rotated SVID");
        assert_eq!(second.spiffe_id().to_string(), id);
        assert_ne!(
            first.leaf().as_bytes(),
            second.leaf().as_bytes(),
            "a new certificate on the same stream"
        );
        let out = node.nhictl(&["revoke", "--spiffe-id", &id], b"");
        assert!(out.status.success(), "{out:?}");
        let after = next!(stream).await.expect("revocation reaches the stream");
        let err = after.expect("an answer").expect_err("no SVID once revoked");
        assert!(
            err.to_string().contains("PermissionDenied")
                || err.to_string().to_lowercase().contains("permission denied")
                || err.to_string().contains("revoked"),
            "{err}"
        );
        assert!(
            next!(stream).await.expect("stream closes").is_none(),
            "the stream ends after PermissionDenied"
        );
    });
    c.delete();
}

#[test]
fn the_socket_survives_a_companion_crash_and_an_nhid_restart_and_goes_with_the_container() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.named_container("epsilon");
    let sock_path = host_socket(&node, &c);
    let sock = format!("unix://{}", sock_path.display());
    let id = format!("spiffe://{TRUST_DOMAIN}/container/epsilon");
    let fetch = |sock: &str| {
        rt().block_on(async {
            let client = spiffe::WorkloadApiClient::connect_to(sock).await?;
            client
                .fetch_x509_svid()
                .await
                .map(|s| s.spiffe_id().to_string())
        })
    };
    assert_eq!(fetch(&sock).unwrap(), id);
    // The companion dies: its replacement serves the same socket (nhid kept the listener).
    let before = node.kill_companion(&c.id);
    assert!(
        eventually(Duration::from_secs(10), || node
            .companion_pid(&c.id)
            .is_some_and(|p| p != before && alive(p))
            && fetch(&sock).is_ok()),
        "{}",
        node.log()
    );
    assert_eq!(fetch(&sock).unwrap(), id);
    // nhid restarts: the companion keeps serving the socket and is re-adopted.
    node.stop();
    node.start();
    assert!(
        eventually(Duration::from_secs(10), || fetch(&sock).is_ok()),
        "{}",
        node.log()
    );
    assert_eq!(fetch(&sock).unwrap(), id);
    // The re-adopted companion dies: only it held that listener, so nhid binds a new socket
    // and moves the container's link over to it.
    let adopted = node.kill_companion(&c.id);
    assert!(
        eventually(Duration::from_secs(10), || node
            .companion_pid(&c.id)
            .is_some_and(|p| p != adopted && alive(p))
            && fetch(&sock).is_ok()),
        "{}",
        node.log()
    );
    assert_eq!(fetch(&sock).unwrap(), id);
    let ls = c.exec(&["ls", "-ln", "/run/nhi/workload.sock"]);
    let ls = String::from_utf8_lossy(&ls.stdout).to_string();
    assert!(
        ls.starts_with("srw-------"),
        "socket in the container again: {ls}"
    );
    // Gone with the container; nhid keeps no other copy on the host.
    c.delete();
    assert!(!sock_path.exists());
    assert!(!node.path("containers/.wapi").exists());
}

/// Workload Endpoint standard §7 (server reflection SHOULD be supported) and the SPIFFE bundle
/// format, each checked by a client nobody here wrote: grpcio-reflection lists the service
/// over TCP and the unix socket; the bundle served at `/v1/bundle.spiffe` and printed by
/// `nhictl bundle --format spiffe` is read by PyJWT, `cryptography` and py-spiffe, clause by
/// clause, and verifies the workload's own X.509-SVID and JWT-SVID.
#[test]
fn reflection_and_the_spiffe_bundle_format_read_by_independent_clients() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.named_container("refl");
    let pid = c.pid();
    let unix = format!("unix:{}", host_socket(&node, &c).display());
    for target in ["127.0.0.1:15101", unix.as_str()] {
        let got = json_out(&py_in_netns(pid, "reflection_client.py", &[target], &[]));
        let services: Vec<&str> = got["services"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap())
            .collect();
        assert!(services.contains(&"SpiffeWorkloadAPI"), "{target}: {got}");
        assert!(
            services.contains(&"grpc.reflection.v1alpha.ServerReflection"),
            "{target}: {got}"
        );
        let methods: Vec<&str> = got["methods"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            methods,
            [
                "FetchJWTBundles",
                "FetchJWTSVID",
                "FetchX509Bundles",
                "FetchX509SVID",
                "ValidateJWTSVID"
            ],
            "{target}: {got}"
        );
    }

    let served = c.get("/v1/bundle.spiffe").unwrap();
    let printed = node.nhictl(&["bundle", "--format", "spiffe"], b"");
    assert!(printed.status.success(), "{printed:?}");
    let served_v: serde_json::Value = serde_json::from_str(&served).unwrap();
    let printed_v: serde_json::Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(
        served_v, printed_v,
        "the companion and nhictl give the same bundle"
    );
    let pem = node.nhictl(&["bundle"], b"");
    assert_eq!(
        String::from_utf8_lossy(&pem.stdout),
        node.status().bundle_pem
    );

    let dir = node.path("spiffe-bundle");
    std::fs::create_dir_all(&dir).unwrap();
    let write = |name: &str, data: &str| {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        p
    };
    let bundle = write("bundle.json", &served);
    let x509 = c.get("/v1/x509").unwrap();
    let leaf_end = x509.find("-----END CERTIFICATE-----").unwrap() + 25;
    let leaf = write("leaf.pem", &x509[..leaf_end]);
    let token = c.get_json("/v1/token?audience=federated")["token"]
        .as_str()
        .unwrap()
        .to_string();
    let token = write("token", &token);
    let out = Command::new(python())
        .arg(script("spiffe_bundle.py"))
        .args([&bundle, &PathBuf::from(TRUST_DOMAIN), &leaf, &token])
        .arg("federated")
        .output()
        .unwrap();
    let got = json_out(&out);
    assert_eq!(got["problems"], serde_json::json!([]), "{got}");
    assert_eq!(got["x509_authorities"], 1, "{got}");
    assert_eq!(got["jwt_authorities"], 1, "{got}");
    assert_eq!(got["jwk_set_keys"], 2, "{got}");
    assert_eq!(got["leaf_verified"], true, "{got}");
    assert_eq!(
        got["jwt_spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/container/refl"),
        "{got}"
    );
    assert!(got["sequence"].as_u64().unwrap() > 0, "{got}");
    assert_eq!(got["refresh_hint"], 300, "{got}");
    c.delete();
}

/// `nhictl ca rotate` (issue 17) under continuous verification: two workloads' py-spiffe
/// X509Sources verify each other's current X.509-SVID with their own current bundle every
/// 50 ms while the CA rotates. The new CA reaches every bundle before it signs, SVIDs move to
/// it at their renewal, and not one verification fails.
#[test]
fn ca_rotation_under_continuous_py_spiffe_verification_fails_nothing() {
    let mut node = Node::with_config(
        ANNOTATED_RULE,
        "[issuer]\nx509_ttl = \"10s\"\nca_ttl = \"1h\"\n",
    );
    node.start();
    let a = node.named_container("alpha");
    let b = node.named_container("beta");
    let verifier = ca_rotation_verifier(
        &host_socket(&node, &a),
        &host_socket(&node, &b),
        TRUST_DOMAIN,
        22,
    );
    std::thread::sleep(Duration::from_secs(3));
    let out = node.nhictl(&["ca", "rotate", "--activate-after", "4s"], b"");
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(said.contains("new CA in every bundle now"), "{said}");
    assert_eq!(
        node.nhictl(&["ca", "rotate"], b"").status.code(),
        Some(1),
        "one rotation at a time"
    );
    let got = json_out(&verifier.wait_with_output().unwrap());
    eprintln!("CA rotation under py-spiffe verification: {got}");
    assert!(got["checks"].as_u64().unwrap() > 200, "{got}");
    assert_eq!(got["failures"], 0, "{got}");
    assert_eq!(
        got["signers"].as_array().unwrap().len(),
        2,
        "the SVIDs moved to the new CA: {got}"
    );
    assert_eq!(got["max_authorities"], 2, "{got}");
    assert_eq!(
        node.status()
            .bundle_pem
            .matches("BEGIN CERTIFICATE")
            .count(),
        2,
        "the old CA stays while its SVIDs live"
    );
}
