//! The walking skeleton against real runc: a container started with the nhi hooks gets a
//! companion in its network namespace and a SPIFFE identity that verifies against the node's
//! trust bundle. Every test has its own nhid, state dir, socket and runc root.
//!
//! Size: one test binary per capability; each test here is one scenario on its own node.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use nhi_core::wire::{AgentRequest, AgentResponse};
use nhi_core::Workload;
use nhi_integration::*;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::*;

fn spiffe(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/container/{name}")
}

fn jwks_of(c: &Container) -> String {
    c.get("/v1/jwks").expect("jwks")
}

#[test]
fn container_fetches_a_jwt_svid_that_verifies_against_jwks() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.bundle(&unique_id("jwt")).inject().write();
    c.start().unwrap();

    let identity = c.get_json("/v1/identity");
    assert_eq!(identity["spiffe_id"], spiffe(&c.id));
    assert_eq!(identity["workload"]["container_id"], c.id.as_str());
    assert_eq!(identity["rule"], "annotated");

    let tok = c.get_json("/v1/token?audience=it-audience");
    let token = tok["token"].as_str().unwrap();
    let claims = nhi_ctl::verify_token(token, &jwks_of(&c), "it-audience", Some(TRUST_DOMAIN))
        .expect("token verifies against the companion's JWKS");
    assert_eq!(
        claims["sub"],
        spiffe(&c.id),
        "sub is the template's SPIFFE ID"
    );
    assert_eq!(claims["aud"], serde_json::json!(["it-audience"]));
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 300, "default JWT-SVID TTL is 5 minutes");
    assert!(claims["jti"].as_str().is_some_and(|j| !j.is_empty()));
    // Wrong audience is refused.
    assert!(nhi_ctl::verify_token(token, &jwks_of(&c), "other", None).is_err());
    // Cached: the same audience gets the same token until its half-life.
    let again = c.get_json("/v1/token?audience=it-audience");
    assert_eq!(again["token"], tok["token"]);
    // The JWKS the companion serves is the node's.
    let jwks_path = node.path("jwks.json");
    fs::write(&jwks_path, jwks_of(&c)).unwrap();
    let out = std::process::Command::new(bin("nhictl"))
        .arg("--config")
        .arg(&node.config)
        .args(["token", "verify", "--audience", "it-audience", "--jwks"])
        .arg(&jwks_path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut ch| {
            use std::io::Write;
            ch.stdin.take().unwrap().write_all(token.as_bytes())?;
            ch.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success(), "nhictl token verify: {out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&spiffe(&c.id)));
    c.delete();
}

fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap())
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

#[test]
fn x509_svid_chains_to_the_bundle_with_one_uri_san() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.bundle(&unique_id("x509")).inject().write();
    c.start().unwrap();
    let pem = c.get("/v1/x509").unwrap();
    let bundle = c.get("/v1/bundle").unwrap();
    assert_eq!(
        bundle,
        node.status().bundle_pem,
        "companion serves the node's bundle"
    );
    assert!(pem.contains("PRIVATE KEY"), "the SVID's key comes with it");

    let chain = pem_certs(&pem);
    assert_eq!(chain.len(), 1, "leaf directly under the root");
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let sans: Vec<_> = leaf
        .subject_alternative_name()
        .unwrap()
        .expect("has SANs")
        .value
        .general_names
        .iter()
        .collect();
    assert_eq!(sans.len(), 1, "exactly one SAN: {sans:?}");
    assert!(
        matches!(sans[0], GeneralName::URI(u) if *u == spiffe(&c.id)),
        "{sans:?}"
    );
    assert!(!leaf.is_ca());
    let ku = leaf.key_usage().unwrap().expect("key usage");
    assert!(ku.critical && ku.value.digital_signature() && !ku.value.key_cert_sign());
    let ttl = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert!(
        (3600..=3630).contains(&ttl),
        "1 h TTL (+30 s backdating): {ttl}"
    );

    let roots = pem_certs(&bundle);
    let root_der = CertificateDer::from(roots[0].clone());
    let anchor = webpki::anchor_from_trusted_cert(&root_der).unwrap();
    let leaf_der = CertificateDer::from(chain[0].clone());
    let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .expect("X.509-SVID chains to /v1/bundle");
    c.delete();
}

#[test]
fn two_containers_get_distinct_identities_each_from_its_own_companion() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let a = node.bundle(&unique_id("alpha")).inject().write();
    let b = node.bundle(&unique_id("beta")).inject().write();
    a.start().unwrap();
    b.start().unwrap();
    let (ia, ib) = (a.get_json("/v1/identity"), b.get_json("/v1/identity"));
    assert_eq!(ia["spiffe_id"], spiffe(&a.id));
    assert_eq!(ib["spiffe_id"], spiffe(&b.id));
    let ta = a.get_json("/v1/token?audience=x");
    let claims =
        nhi_ctl::verify_token(ta["token"].as_str().unwrap(), &jwks_of(&a), "x", None).unwrap();
    assert_eq!(
        claims["sub"],
        spiffe(&a.id),
        "a's companion never hands out b's identity"
    );

    let (pa, pb) = (
        node.companion_pid(&a.id).unwrap(),
        node.companion_pid(&b.id).unwrap(),
    );
    assert_ne!(pa, pb, "one companion per network namespace");
    assert_eq!(ns_of(pa, "net"), ns_of(a.pid(), "net"));
    assert_eq!(ns_of(pb, "net"), ns_of(b.pid(), "net"));
    assert_ne!(ns_of(a.pid(), "net"), ns_of(b.pid(), "net"));
    // a's namespace has nothing but loopback: b's companion is unreachable from it.
    let links = String::from_utf8_lossy(&a.exec(&["ip", "-o", "link"]).stdout).into_owned();
    assert_eq!(
        links.lines().count(),
        1,
        "only lo in the workload netns: {links}"
    );
    assert_eq!(node.status().workloads.len(), 2);
    a.delete();
    b.delete();
}

#[test]
fn companion_is_invisible_to_the_workload_and_unprivileged() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.bundle(&unique_id("priv")).inject().write();
    c.start().unwrap();
    let cp = node.companion_pid(&c.id).expect("companion attached");
    let wp = c.pid();

    let ps = String::from_utf8_lossy(&c.exec(&["ps", "-o", "pid,user,comm"]).stdout).into_owned();
    assert!(ps.contains("sleep"), "ps works in the container: {ps}");
    assert!(
        !ps.contains("nhi"),
        "companion visible inside the container: {ps}"
    );
    // Nor can the workload signal it: its pid does not exist in the container's pid namespace
    // (and where the number exists, it is another process).
    let kill = c.exec(&["kill", "-0", &cp.to_string()]);
    assert!(
        !kill.status.success() || cp == 1,
        "kill -0 {cp} from the workload succeeded"
    );

    // Its own uid from the node's companion range, also as its gid.
    let uid = node.companion_uid(&c.id);
    assert!(
        node.uids.contains(uid),
        "companion uid {uid} outside {}",
        node.uids.range()
    );
    for field in ["Uid", "Gid"] {
        let ids = proc_status(cp, field);
        assert!(
            ids.split_whitespace().all(|u| u == uid.to_string()),
            "{field}: {ids}"
        );
    }
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(proc_status(cp, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(proc_status(cp, "NoNewPrivs"), "1");
    assert_eq!(
        ns_of(cp, "net"),
        ns_of(wp, "net"),
        "in the workload's netns"
    );
    for kind in ["pid", "mnt", "ipc", "uts"] {
        assert_ne!(
            ns_of(cp, kind),
            ns_of(wp, kind),
            "must not share the workload's {kind} ns"
        );
        assert_eq!(
            ns_of(cp, kind),
            ns_of(std::process::id() as i32, kind),
            "host {kind} ns"
        );
    }
    // Only stdio and the channel to nhid are inherited.
    let fds: Vec<String> = fs::read_dir(format!("/proc/{cp}/fd"))
        .unwrap()
        .map(|e| {
            fs::read_link(e.unwrap().path())
                .unwrap()
                .display()
                .to_string()
        })
        .collect();
    let sockets = fds.iter().filter(|f| f.starts_with("socket:")).count();
    assert!(sockets >= 3, "listener + channel + fd channel: {fds:?}");
    assert!(
        !fds.iter().any(|f| f.starts_with('/') && f != "/dev/null"),
        "no files of nhid's leak into the companion: {fds:?}"
    );
    c.delete();
}

#[test]
fn host_network_namespace_is_never_attached() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let sel = node
        .bundle(&unique_id("hostnet"))
        .inject()
        .host_netns()
        .args(&["true"])
        .write();
    let out = sel.run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a selected host-netns container must not start"
    );
    assert!(
        err.contains("nhi") && err.contains("host network namespace"),
        "{err}"
    );

    let plain = node
        .bundle(&unique_id("hostnet-plain"))
        .host_netns()
        .args(&["true"])
        .write();
    let out = plain.run();
    assert!(
        out.status.success(),
        "unselected host-netns containers are untouched: {out:?}"
    );

    // nhid refuses on its own too, whatever a caller claims.
    let resp = node.agent(&AgentRequest::Attach {
        workload: Box::new(Workload {
            container_id: "sneaky".into(),
            annotations: [("nhi.dev/inject".to_string(), "true".to_string())].into(),
            ..Default::default()
        }),
        pid: std::process::id() as i32,
        rule: "annotated".into(),
    });
    match resp {
        AgentResponse::Error { message } => {
            assert!(message.contains("host network namespace"), "{message}")
        }
        other => panic!("nhid attached a host-netns process: {other:?}"),
    }
    assert!(node.status().workloads.is_empty());
}

#[test]
fn selected_container_fails_closed_when_nhid_is_down() {
    let node = Node::new(ANNOTATED_RULE); // nhid never started
    let c = node
        .bundle(&unique_id("closed"))
        .inject()
        .args(&["true"])
        .write();
    let out = c.run();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "container started without its companion"
    );
    assert!(
        err.contains("nhi-hook") && err.contains("nhid"),
        "error names nhi: {err}"
    );
    // An unselected container does not care whether nhid runs.
    let plain = node.bundle(&unique_id("plain")).args(&["true"]).write();
    assert!(plain.run().status.success());
}

#[test]
fn fail_open_rule_starts_without_a_companion() {
    let node = Node::new(
        r#"
[[rule]]
name = "lenient"
spiffe_id = "container/{container.name}"
fail_open = true
"#,
    );
    let c = node
        .bundle(&unique_id("open"))
        .args(&[
            "sh",
            "-c",
            "wget -qO- http://127.0.0.1:15100/healthz || echo NO-COMPANION",
        ])
        .write();
    let out = c.run();
    assert!(
        out.status.success(),
        "fail_open container must start: {out:?}"
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("NO-COMPANION"));
}

#[test]
fn restart_keeps_the_trust_bundle_and_keys_are_sealed_on_disk() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.bundle(&unique_id("restart")).inject().write();
    c.start().unwrap();
    let token = c.get_json("/v1/token?audience=r")["token"]
        .as_str()
        .unwrap()
        .to_string();
    let bundle = node.status().bundle_pem;
    c.delete();
    node.stop();
    node.start();
    assert_eq!(
        node.status().bundle_pem,
        bundle,
        "same trust bundle after restart"
    );
    let c2 = node.bundle(&unique_id("restart2")).inject().write();
    c2.start().unwrap();
    nhi_ctl::verify_token(&token, &jwks_of(&c2), "r", None)
        .expect("old token verifies with the new JWKS");
    c2.delete();
    node.stop();

    let key = node.state_dir.join("master.key");
    let meta = fs::metadata(&key).unwrap();
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o400,
        "master key root-only"
    );
    assert_eq!(meta.len(), 32);
    let sealed = fs::read(node.state_dir.join("issuer.sealed")).unwrap();
    let p256_oid = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    // Every file under the state dir (attachment and companion records included) but the
    // master key (re-adoption sockets hold no data).
    let mut files = vec![];
    let mut dirs = vec![node.state_dir.clone()];
    while let Some(d) = dirs.pop() {
        for e in fs::read_dir(d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p)
            } else if p.is_file() {
                files.push(p)
            }
        }
    }
    for f in files {
        if f == key {
            continue;
        }
        let data = fs::read(&f).unwrap();
        assert!(
            !String::from_utf8_lossy(&data).contains("PRIVATE KEY"),
            "{} holds a PEM key",
            f.display()
        );
        assert!(
            !data.windows(7).any(|w| w == p256_oid),
            "{} holds a DER EC key",
            f.display()
        );
    }
    // Tampering is detected, not silently replaced by new keys.
    let mut bad = sealed.clone();
    let pos = bad.len() / 2;
    bad[pos] = if bad[pos] == b'A' { b'B' } else { b'A' };
    fs::write(node.state_dir.join("issuer.sealed"), &bad).unwrap();
    let e = node.try_start().unwrap_err();
    assert!(e.contains("issuer.sealed"), "{e}");
    fs::write(node.state_dir.join("issuer.sealed"), &sealed).unwrap();
    node.start();
    assert_eq!(node.status().bundle_pem, bundle);
}

#[test]
fn poststop_stops_the_companion() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    // Detached container removed with runc delete.
    let c = node.bundle(&unique_id("stop")).inject().write();
    c.start().unwrap();
    let cp = node.companion_pid(&c.id).unwrap();
    assert!(alive(cp));
    c.delete();
    assert!(!alive(cp), "companion {cp} outlived its container");
    assert!(node.status().workloads.is_empty());

    // Foreground container that exits by itself: runc runs poststop when it destroys it.
    let f = node
        .bundle(&unique_id("fg"))
        .inject()
        .args(&["sh", "-c", "wget -qO- http://127.0.0.1:15100/healthz"])
        .write();
    let out = f.run();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"status\":\"ok\""));
    assert!(
        node.status().workloads.is_empty(),
        "companion stopped after the container exited"
    );
}

#[test]
fn companion_without_poststop_is_collected_when_its_container_dies() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.bundle(&unique_id("gc")).inject().write();
    c.start().unwrap();
    let cp = node.companion_pid(&c.id).unwrap();
    // Kill the workload behind the runtime's back, as a crashed runtime or shim would leave it:
    // runc runs poststop only on `runc delete`, which nobody calls here.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.pid()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(
        eventually(Duration::from_secs(15), || !alive(cp)),
        "companion not collected"
    );
    assert!(node.status().workloads.is_empty());
}

#[test]
fn http_errors_are_json_4xx() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.bundle(&unique_id("http")).inject().write();
    c.start().unwrap();
    let pid = c.pid();
    let (s, body) = http_in_netns(pid, "GET", "/healthz");
    assert_eq!(s, 200, "{body}");
    for (method, path, want) in [
        ("GET", "/nope", 404),
        ("GET", "/v1/token", 400),
        ("GET", "/v1/token?audience=", 400),
        ("GET", "/v1/token?aud=x", 400),
        ("POST", "/v1/identity", 405),
    ] {
        let (s, body) = http_in_netns(pid, method, path);
        assert_eq!(s, want, "{method} {path}: {body}");
        let v: serde_json::Value =
            serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
        assert!(v["error"].is_string() && v["message"].is_string(), "{body}");
    }
    c.delete();
}

#[test]
fn credentials_never_reach_logs_env_or_hook_stdout() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    // Create without hooks, then run the hook by hand to see its stdout.
    let c = node
        .bundle(&unique_id("leak"))
        .inject()
        .without_hooks()
        .write();
    c.create().unwrap();
    let state = serde_json::json!({
        "ociVersion": "1.0.2", "id": c.id, "status": "created", "pid": c.pid(),
        "bundle": c.bundle, "annotations": {"nhi.dev/inject": "true"},
    });
    let hook_out = run_hook(&node, "createRuntime", &state);
    assert!(hook_out.status.success(), "{hook_out:?}");
    assert!(
        hook_out.stdout.is_empty(),
        "the hook printed to stdout: {hook_out:?}"
    );
    assert!(hook_out.stderr.is_empty(), "{hook_out:?}");
    assert!(runc(&node.runc_root, &["start", &c.id]).status.success());

    let token = c.get_json("/v1/token?audience=leak")["token"]
        .as_str()
        .unwrap()
        .to_string();
    let x509 = c.get("/v1/x509").unwrap();
    let key_b64 = x509
        .split("-----BEGIN PRIVATE KEY-----")
        .nth(1)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    let environ = fs::read(format!("/proc/{}/environ", c.pid())).unwrap();
    let environ = String::from_utf8_lossy(&environ);
    let hook_out = run_hook(&node, "poststop", &state);
    assert!(hook_out.stdout.is_empty());
    let log = node.log();
    let sig = token.rsplit('.').next().unwrap();
    for (what, text) in [
        ("nhid/companion log", &log),
        ("workload environ", &environ.to_string()),
    ] {
        assert!(!text.contains(sig), "token in {what}");
        assert!(!text.contains(&key_b64), "private key in {what}");
    }
    assert!(
        log.contains("issued JWT-SVID"),
        "issuance is logged (without the token)"
    );
    let _ = runc(&node.runc_root, &["delete", "-f", &c.id]);
}

fn run_hook(node: &Node, stage: &str, state: &serde_json::Value) -> std::process::Output {
    use std::io::Write;
    let mut ch = std::process::Command::new(bin("nhi-hook"))
        .args([stage, "--config", node.config.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    ch.stdin
        .take()
        .unwrap()
        .write_all(state.to_string().as_bytes())
        .unwrap();
    ch.wait_with_output().unwrap()
}

/// Nomad's own proof: the task's workload identity (signed by the test cluster's key, laid out
/// as the Nomad client lays it out) gives `nomad.*`; what the job author can write (the task's
/// env, extra mounts, the token file in its own secrets directory) cannot change it. Plus the
/// CRI annotations of a Kubernetes container in the same node.
#[test]
fn nomad_identity_comes_from_the_signed_workload_identity_never_the_env() {
    let mut node = Node::new(
        r#"
[[rule]]
name = "nomad"
spiffe_id = "nomad/{nomad.namespace}/job/{nomad.job}/task/{nomad.task}"
[rule.match]
nomad_jobs = ["*"]
[[rule]]
name = "k8s"
spiffe_id = "ns/{k8s.namespace}/pod/{k8s.pod}"
[rule.match]
k8s_namespaces = ["prod"]
[[rule]]
name = "nomad-annotated"
spiffe_id = "nomad/{nomad.namespace}/job/{nomad.job}/task/{nomad.task}"
selectable = true
[rule.match]
annotations = { "nhi.dev/inject" = "true" }
"#,
    );
    nomad::configure(&node);
    node.start();
    let nomad_task = |name: &str, t: &nomad::Task, env: &[&str]| {
        let mut b = node
            .bundle(&unique_id(name))
            .mount("/alloc", &t.alloc)
            .mount("/local", &t.local)
            .mount("/secrets", &t.secrets);
        for e in env {
            b = b.env(e);
        }
        b
    };
    // Job "billing"; its env block overrides what Nomad wrote: NOMAD_JOB_NAME=payments.
    let a1 = "5e0f6a55-6c4b-4b8b-9c1e-6f0a2a7b7c11";
    let t1 = nomad::task(
        &node,
        a1,
        "api",
        Some(&nomad::token("default", "billing", "web", "api", a1)),
    );
    let env = [
        "NOMAD_NAMESPACE=default",
        "NOMAD_JOB_NAME=payments",
        "NOMAD_GROUP_NAME=web",
        "NOMAD_TASK_NAME=api",
        &format!("NOMAD_ALLOC_ID={a1}"),
    ];
    let n = nomad_task("nomad", &t1, &env).write();
    n.start().unwrap();
    let id = n.get_json("/v1/identity");
    assert_eq!(
        id["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/nomad/default/job/billing/task/api"),
        "the env override does not change the identity: {id}"
    );
    assert_eq!(id["workload"]["nomad"]["group"], "web");
    assert_eq!(id["workload"]["nomad"]["alloc_id"], a1);

    let k = node
        .bundle(&unique_id("k8s"))
        .annotation("io.kubernetes.cri.container-type", "container")
        .annotation("io.kubernetes.cri.sandbox-namespace", "prod")
        .annotation("io.kubernetes.cri.sandbox-name", "web-0")
        .write();
    k.start().unwrap();
    assert_eq!(
        k.get_json("/v1/identity")["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/ns/prod/pod/web-0")
    );

    // A task whose job id is not a valid SPIFFE segment is refused, not rewritten.
    let a2 = "6f1a7b66-7d5c-4c9c-8d2f-7a1b3b8c8d22";
    let t2 = nomad::task(
        &node,
        a2,
        "t",
        Some(&nomad::token("default", "a b", "g", "t", a2)),
    );
    let out = nomad_task("badnomad", &t2, &[])
        .args(&["true"])
        .write()
        .run();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid SPIFFE ID path segment"));

    // A valid token of another allocation written into this task's secrets proves nothing
    // about this task: no Nomad metadata, no Nomad rule selects it, no identity. A rule that
    // selects it by other means and names nomad.* refuses it with the reason.
    let a3 = "7a2b8c77-8e6d-4dad-9e30-8b2c4c9d9e33";
    let t3 = nomad::task(
        &node,
        a3,
        "api",
        Some(&nomad::token("default", "payments", "web", "api", a1)),
    );
    let stolen = nomad_task("stolen", &t3, &[]).write();
    stolen.start().unwrap();
    assert!(
        stolen.get("/v1/identity").is_err(),
        "no identity from a stolen token"
    );
    assert!(node.companion_pid(&stolen.id).is_none());
    stolen.delete();
    let out = nomad_task("stolen2", &t3, &[])
        .annotation("nhi.dev/inject", "true")
        .annotation("nhi.dev/rule", "nomad-annotated")
        .args(&["true"])
        .write()
        .run();
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is for allocation"), "{err}");

    // NOMAD_* by hand, with Nomad-looking mounts but no workload identity (or a job without
    // `identity { file = true }`): no Nomad metadata, so no Nomad rule selects it.
    let a4 = "8b3c9d88-9f7e-4ebe-8f41-9c3d5d0e0f44";
    let t4 = nomad::task(&node, a4, "api", None);
    let fake = nomad_task(
        "fakenomad",
        &t4,
        &[
            "NOMAD_NAMESPACE=default",
            "NOMAD_JOB_NAME=billing",
            "NOMAD_TASK_NAME=api",
        ],
    )
    .write();
    fake.start().unwrap();
    assert!(
        fake.get("/v1/identity").is_err(),
        "no companion for a fake Nomad task"
    );
    assert!(node.companion_pid(&fake.id).is_none());
    fake.delete();
    n.delete();
    k.delete();
}

#[test]
fn credentials_are_refreshed_at_half_life_cycle_after_cycle() {
    let mut node = Node::new(ANNOTATED_RULE);
    let cfg = fs::read_to_string(&node.config).unwrap();
    // Shortest TTLs the config allows, so several half-lives pass within the test.
    let cfg = cfg.replacen(
        "[companion]",
        "[issuer]\njwt_ttl = \"10s\"\nx509_ttl = \"10s\"\n\n[companion]",
        1,
    );
    fs::write(&node.config, cfg).unwrap();
    node.start();
    // One companion caches only a token, the other only a certificate: each must refresh its
    // single credential at every half-life, not only the first.
    let (a, b) = (
        node.bundle(&unique_id("jwt-refresh")).inject().write(),
        node.bundle(&unique_id("x509-refresh")).inject().write(),
    );
    a.start().unwrap();
    b.start().unwrap();
    let (pa, pb) = (a.pid(), b.pid());
    let mut tokens = std::collections::BTreeSet::new();
    let mut certs = std::collections::BTreeSet::new();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(17) {
        let now = || {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs()
        };
        let (s, body) = http_in_netns(pa, "GET", "/v1/token?audience=refresh");
        assert_eq!(s, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let iat = v["issued_at"].as_u64().unwrap();
        // Never older than half its life (5 s), plus clock granularity and polling.
        assert!(
            now() <= iat + 6,
            "served a token issued at {iat} at {}: not refreshed at half-life",
            now()
        );
        tokens.insert(v["token"].as_str().unwrap().to_string());

        let (s, pem) = http_in_netns(pb, "GET", "/v1/x509");
        assert_eq!(s, 200);
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents;
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let nbf = cert.validity().not_before.timestamp() as u64 + 30; // issued 30 s after not_before
        assert!(
            now() <= nbf + 6,
            "served a certificate issued at {nbf} at {}: not refreshed at half-life",
            now()
        );
        certs.insert(pem.lines().nth(1).unwrap().to_string());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        tokens.len() >= 3,
        "expected a token refresh every ~5 s, got {}",
        tokens.len()
    );
    assert!(
        certs.len() >= 3,
        "expected a certificate refresh every ~5 s, got {}",
        certs.len()
    );
    a.delete();
    b.delete();
}

#[test]
fn nhid_restart_readopts_companions_of_running_containers_and_stops_the_rest() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let a = node.bundle(&unique_id("survivor")).inject().write();
    let b = node.bundle(&unique_id("gone")).inject().write();
    a.start().unwrap();
    b.start().unwrap();
    let (pa, pb) = (
        node.companion_pid(&a.id).unwrap(),
        node.companion_pid(&b.id).unwrap(),
    );
    let token = a.get_json("/v1/token?audience=cached")["token"].clone();
    // nhid stops (an upgrade, systemctl restart): its companions keep serving their cache.
    node.stop();
    assert!(alive(pa) && alive(pb), "companions outlive nhid");
    assert_eq!(a.get_json("/v1/token?audience=cached")["token"], token);
    // What needs nhid is refused at once with the reason, never left hanging.
    let (st, body) = http_in_netns(a.pid(), "GET", "/v1/token?audience=new");
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("no connection to nhid"), "{body}");
    // b ends while nhid is down (its poststop cannot reach nhid).
    b.delete();

    node.start();
    let st = node.status();
    assert_eq!(
        st.workloads.len(),
        1,
        "only the running container is restored: {st:?}"
    );
    assert_eq!(
        node.companion_pid(&a.id),
        Some(pa),
        "the running companion is re-adopted, not restarted: {}",
        node.log()
    );
    assert!(
        eventually(Duration::from_secs(5), || !alive(pb)),
        "the companion of the container that ended meanwhile is stopped"
    );
    assert_eq!(ns_of(pa, "net"), ns_of(a.pid(), "net"));
    assert_eq!(a.get_json("/v1/identity")["spiffe_id"], spiffe(&a.id));
    assert!(
        a.get("/v1/token?audience=new").is_ok(),
        "served through the new nhid"
    );
    assert!(node.log().contains("companion re-adopted"));
    // SIGUSR2 (decommission, package removal): nhid stops its companions too; the next start
    // gives the running container a new one.
    node.signal(nix::sys::signal::Signal::SIGUSR2);
    node.wait_exit();
    assert!(!alive(pa), "SIGUSR2 stops the companions");
    node.start();
    let pa = node.companion_pid(&a.id).expect("a new companion");
    assert!(a.get("/v1/token?audience=new").is_ok());
    let records: Vec<_> = fs::read_dir(node.state_dir.join("attachments"))
        .unwrap()
        .collect();
    assert_eq!(records.len(), 1);
    a.delete();
    assert!(!alive(pa));
    assert!(
        fs::read_dir(node.state_dir.join("attachments"))
            .unwrap()
            .next()
            .is_none(),
        "record removed on detach"
    );
    assert!(
        fs::read_dir(node.state_dir.join("companions"))
            .unwrap()
            .next()
            .is_none(),
        "companion record and re-adoption socket removed with it"
    );
}

#[test]
fn a_crashed_companion_is_restarted_with_the_same_identity() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node.bundle(&unique_id("crash")).inject().write();
    c.start().unwrap();
    let before = node.kill_companion(&c.id);
    assert!(
        eventually(Duration::from_secs(10), || node
            .companion_pid(&c.id)
            .is_some_and(|p| p != before && alive(p))
            && c.get("/healthz").is_ok()),
        "companion not restarted: {}",
        node.log()
    );
    let after = node.companion_pid(&c.id).unwrap();
    assert_eq!(ns_of(after, "net"), ns_of(c.pid(), "net"));
    assert_eq!(c.get_json("/v1/identity")["spiffe_id"], spiffe(&c.id));
    assert!(node.log().contains("restarting"), "the restart is logged");
    c.delete();
    assert!(!alive(after));
}

#[test]
fn containers_sharing_a_namespace_share_one_identity_and_companion() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    // Two containers with the same name (so the same identity) in one network namespace.
    let a = node
        .bundle(&unique_id("share-a"))
        .inject()
        .annotation("nerdctl/name", "shared")
        .write();
    a.start().unwrap();
    let b = node
        .bundle(&unique_id("share-b"))
        .inject()
        .annotation("nerdctl/name", "shared")
        .join_netns(a.pid())
        .write();
    b.start().unwrap();
    let cp = node.companion_pid(&a.id).unwrap();
    assert_eq!(
        node.companion_pid(&b.id),
        Some(cp),
        "one companion per namespace"
    );
    assert_eq!(node.status().workloads.len(), 1);

    // A third container claiming another identity in the same namespace is refused.
    let other = node
        .bundle(&unique_id("share-x"))
        .inject()
        .annotation("nerdctl/name", "intruder")
        .join_netns(a.pid())
        .args(&["true"])
        .write();
    let out = other.run();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("one network namespace has one identity"),
        "{out:?}"
    );
    assert_eq!(
        b.get_json("/v1/identity")["spiffe_id"],
        spiffe("shared"),
        "the refused container changed nothing"
    );

    // Removing one of the two keeps the companion for the other.
    a.delete();
    assert!(alive(cp), "companion stopped while b still runs");
    assert_eq!(node.companion_pid(&b.id), Some(cp));
    let t = b.get_json("/v1/token?audience=x");
    let claims =
        nhi_ctl::verify_token(t["token"].as_str().unwrap(), &jwks_of(&b), "x", None).unwrap();
    assert_eq!(claims["sub"], spiffe("shared"));
    b.delete();
    assert!(
        !alive(cp),
        "companion outlived the last container of its namespace"
    );
    assert!(node.status().workloads.is_empty());
}
