//! Kubernetes pod semantics on real runc, shaped as CRI shapes them: a sandbox (pause)
//! container owns the network namespace, app containers join it, the service account comes
//! from the kubelet-projected token on the host. One companion per pod; identity fixed by the
//! first app container; the pod's removal stops the companion.

use nhi_integration::kube::{kubelet_token as token_dir, Pod, PROJECTED};
use nhi_integration::*;

const RULES: &str = r#"
[[rule]]
name = "k8s"
spiffe_id = "ns/{k8s.namespace}/sa/{k8s.service_account}"
[rule.match]
k8s_namespaces = ["team-*"]
"#;

fn node() -> Node {
    let n = Node::new(RULES);
    n.with_kubelet_root();
    n
}

#[test]
fn one_companion_per_pod_with_the_service_account_identity() {
    let mut node = node();
    node.start();
    let pod = Pod::new("team-a", "web-0");
    let sandbox = pod.sandbox(&node);
    sandbox.start().unwrap();
    let st = node.status();
    assert_eq!(st.workloads.len(), 1);
    assert_eq!(
        st.workloads[0].spiffe_id, None,
        "identity pending until an app container"
    );
    assert_eq!(st.workloads[0].companion_pid, 0);

    let token = token_dir(&node, &pod.uid, PROJECTED, "team-a", "web");
    let app1 = pod.app(&node, &sandbox, "app", &token);
    app1.start().unwrap();
    let app2 = pod.app(&node, &sandbox, "sidecar", &token);
    app2.start().unwrap();
    let want = format!("spiffe://{TRUST_DOMAIN}/ns/team-a/sa/web");
    assert_eq!(app1.get_json("/v1/identity")["spiffe_id"], want);
    assert_eq!(app2.get_json("/v1/identity")["spiffe_id"], want);
    let st = node.status();
    assert_eq!(st.workloads.len(), 1, "one companion for the pod: {st:?}");
    let w = &st.workloads[0];
    assert_eq!(w.containers.len(), 3);
    assert_eq!(ns_of(w.companion_pid, "net"), ns_of(sandbox.pid(), "net"));
    let cp = w.companion_pid;

    // App containers come and go; the pod's companion stays.
    app1.delete();
    app2.delete();
    assert!(alive(cp), "companion must live as long as the pod");
    assert_eq!(
        node.status().workloads[0].containers,
        vec![sandbox.id.clone()]
    );
    // Pod removal (the sandbox's poststop) stops it.
    sandbox.delete();
    assert!(!alive(cp), "companion outlived its pod");
    assert!(node.status().workloads.is_empty());
}

#[test]
fn a_token_not_projected_by_kubelet_for_this_pod_is_refused() {
    let mut node = node();
    node.start();
    // A user Secret mounted at the service-account path, claiming another account.
    let pod = Pod::new("team-b", "sneaky");
    let sandbox = pod.sandbox(&node);
    sandbox.start().unwrap();
    let forged = token_dir(&node, &pod.uid, "kubernetes.io~secret", "team-b", "admin");
    let app = pod
        .annotate(node.bundle(&unique_id("app")), "container", "app")
        .join_netns(sandbox.pid())
        .mount("/var/run/secrets/kubernetes.io/serviceaccount", &forged)
        .args(&["true"])
        .write();
    let out = app.run();
    assert!(
        !out.status.success(),
        "a container with a forged service account must not start"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nhi-hook") && err.contains("projected volumes"),
        "{err}"
    );

    // Another pod's genuine token, mounted into this pod, is refused too.
    let other = Pod::new("team-b", "other");
    let stolen = token_dir(&node, &other.uid, PROJECTED, "team-b", "admin");
    let app = pod
        .annotate(node.bundle(&unique_id("app2")), "container", "app")
        .join_netns(sandbox.pid())
        .mount("/var/run/secrets/kubernetes.io/serviceaccount", &stolen)
        .args(&["true"])
        .write();
    assert!(!app.run().status.success());
    assert_eq!(
        node.status().workloads[0].spiffe_id,
        None,
        "no identity was ever issued"
    );
    sandbox.delete();
}

#[test]
fn pods_in_different_namespaces_get_their_own_identities_and_opt_out_works() {
    let mut node = node();
    node.start();
    let a = Pod::new("team-a", "a-0");
    let b = Pod::new("team-b", "b-0");
    let (sa, sb) = (a.sandbox(&node), b.sandbox(&node));
    sa.start().unwrap();
    sb.start().unwrap();
    let ca = a.app(
        &node,
        &sa,
        "app",
        &token_dir(&node, &a.uid, PROJECTED, "team-a", "api"),
    );
    let cb = b.app(
        &node,
        &sb,
        "app",
        &token_dir(&node, &b.uid, PROJECTED, "team-b", "worker"),
    );
    ca.start().unwrap();
    cb.start().unwrap();
    assert_eq!(
        ca.get_json("/v1/identity")["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/ns/team-a/sa/api")
    );
    assert_eq!(
        cb.get_json("/v1/identity")["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/ns/team-b/sa/worker")
    );

    // A pod outside the rule's namespaces, and a pod that opts out, get nothing.
    for (ns, opt_out) in [("default", false), ("team-c", true)] {
        let p = Pod::new(ns, "plain");
        let mut b = p.annotate(node.bundle(&unique_id("sb")), "sandbox", "POD");
        if opt_out {
            b = b.annotation("nhi.dev/inject", "false");
        }
        let s = b.write();
        s.start().unwrap();
        assert!(s.get("/healthz").is_err(), "{ns}: no companion expected");
        s.delete();
    }
    assert_eq!(node.status().workloads.len(), 2);
    for c in [ca, cb, sa, sb] {
        c.delete();
    }
    assert!(node.status().workloads.is_empty());
}

#[test]
fn with_the_cluster_jwks_only_signed_service_account_tokens_count() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let mut node = node();
    let testdata = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../hook/testdata");
    node.append_config(&format!(
        "service_account_jwks = \"{}\"\nservice_account_issuer = \"https://kubernetes.default.svc\"",
        testdata.join("sa-test-jwks.json").display()
    ));
    // append_config adds after [kubernetes] (from node()), so these keys land in that table.
    node.start();
    let pod = Pod::new("team-a", "signed");
    let sandbox = pod.sandbox(&node);
    sandbox.start().unwrap();

    // The kubelet-layout token of `token_dir` carries a fake signature: refused.
    let unsigned = token_dir(&node, &pod.uid, PROJECTED, "team-a", "web");
    let app = pod
        .annotate(node.bundle(&unique_id("unsigned")), "container", "app")
        .join_netns(sandbox.pid())
        .mount("/var/run/secrets/kubernetes.io/serviceaccount", &unsigned)
        .args(&["true"])
        .write();
    let out = app.run();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nhi-hook") && err.contains("service account for rule"),
        "{err}"
    );

    // Signed by the cluster key: accepted.
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc", "exp": exp,
        "kubernetes.io": {"namespace": "team-a", "serviceaccount": {"name": "web"}, "pod": {"uid": pod.uid}},
    });
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("test-key".into());
    let key = std::fs::read(testdata.join("sa-test-key.pem")).unwrap();
    let signed =
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_pem(&key).unwrap()).unwrap();
    std::fs::write(unsigned.join("token"), signed).unwrap();
    let app = pod.app(&node, &sandbox, "signed", &unsigned);
    app.start().unwrap();
    assert_eq!(
        app.get_json("/v1/identity")["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/ns/team-a/sa/web")
    );
    app.delete();
    sandbox.delete();
}

/// The API server's stand-in for discovery (`integration/py/oidc_server.py`) over HTTPS with a
/// private CA; killed on drop.
struct OidcServer {
    child: std::process::Child,
    dir: tempfile::TempDir,
    issuer: String,
    ca_file: std::path::PathBuf,
}

impl OidcServer {
    fn start() -> Self {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let server = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        let p = |n: &str| dir.path().join(n);
        std::fs::write(p("ca.pem"), ca_cert.pem()).unwrap();
        std::fs::write(p("cert.pem"), server.pem()).unwrap();
        std::fs::write(p("key.pem"), key.serialize_pem()).unwrap();
        std::fs::write(p("jwks.json"), r#"{"keys":[]}"#).unwrap();
        let mut child = std::process::Command::new(nhi_integration::py::python())
            .arg(nhi_integration::py::script("oidc_server.py"))
            .arg(dir.path())
            .arg(p("cert.pem"))
            .arg(p("key.pem"))
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().expect("the server's port");
        OidcServer {
            child,
            issuer: format!("https://127.0.0.1:{port}"),
            ca_file: p("ca.pem"),
            dir,
        }
    }

    fn serve_keys(&self, keys: &[&nhi_integration::kube::ClusterKey]) {
        let jwks = serde_json::json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
        std::fs::write(self.dir.path().join("jwks.json"), jwks.to_string()).unwrap();
    }

    fn fetches(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("jwks-fetches"))
            .map(|s| s.len())
            .unwrap_or(0)
    }
}

impl Drop for OidcServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Service-account keys from the issuer's OIDC discovery over HTTPS (issue 17): nhid fetches
/// them, checks each pod's token at attach, follows a key rotation in the cluster without a
/// restart (an unknown `kid` makes it fetch again), and refuses a token no current key signed.
#[test]
fn service_account_keys_follow_oidc_discovery_and_a_key_rotation() {
    use nhi_integration::kube::ClusterKey;
    let oidc = OidcServer::start();
    let (k1, k2, forger) = (
        ClusterKey::new("k1"),
        ClusterKey::new("k2"),
        ClusterKey::new("k3"),
    );
    oidc.serve_keys(&[&k1]);
    let mut node = Node::new(RULES);
    node.append_config(&format!(
        "[kubernetes]\nkubelet_root = \"{}\"\nservice_account_discovery = true\nservice_account_issuer = \"{}\"\nservice_account_ca_file = \"{}\"\n",
        node.path("kubelet").display(),
        oidc.issuer,
        oidc.ca_file.display()
    ));
    node.start();
    let started = std::time::Instant::now();
    let run = |pod: &Pod, key: &ClusterKey| -> Result<(Container, Container), String> {
        let token = key.token(
            &pod.ns,
            "web",
            &pod.uid,
            "https://kubernetes.default.svc",
            &oidc.issuer,
        );
        pod.run_with_token(&node, &token)
    };
    let (s1, a1) = run(&Pod::new("team-a", "web-0"), &k1).expect("a token signed by k1");
    assert_eq!(
        a1.get_json("/v1/identity")["spiffe_id"],
        format!("spiffe://{TRUST_DOMAIN}/ns/team-a/sa/web")
    );
    assert!(oidc.fetches() >= 1);

    // The cluster rotates to k2. A token signed by it names a kid nhid has not seen: it
    // fetches the keys again (at most every 5 s) and accepts it, without a restart.
    oidc.serve_keys(&[&k2]);
    std::thread::sleep(std::time::Duration::from_secs(5).saturating_sub(started.elapsed()));
    let before = oidc.fetches();
    let (s2, a2) = run(&Pod::new("team-b", "web-0"), &k2).expect("a token signed by k2");
    assert!(oidc.fetches() > before, "no fetch for the unknown kid");
    assert!(a2.get("/v1/identity").is_ok());

    // A key the cluster never had: refused at attach, the container does not start.
    let Err(e) = run(&Pod::new("team-c", "web-0"), &forger) else {
        panic!("a token signed by a key the cluster never had was accepted");
    };
    assert!(
        e.contains("service-account no key")
            && e.contains("k3")
            && e.contains("the cluster's keys"),
        "{e}"
    );
    for c in [a1, a2, s1, s2] {
        c.delete();
    }
}
