//! Issue 17's foundation, against a real OpenBao: with the one-time setup of
//! `nhi_integration::bao::setup_workload_issuance`, OpenBao itself (not nhid) decides which
//! SPIFFE ID a workload may get. A workload's short-lived token comes from a JWT login with its
//! service-account token, and can have a CSR signed only for the URI SAN that token proves;
//! forged, other-cluster and wrong-audience tokens get no token; a node's own AppRole token
//! cannot sign under that role at all, and under its own role only its own path. The private
//! key never leaves the caller (CSR). Last, the whole path through nhid: pods on real runc get
//! their X.509-SVID from OpenBao on the strength of their projected token, and a pod whose token
//! another cluster signed gets none, with OpenBao's refusal.

use nhi_integration::bao::{
    node_config, setup_workload_issuance, BaoApi, BaoDev, NhiRoleOptions, NodeLogin,
    WorkloadIssuance, NODES_APPROLE_MOUNT,
};
use rcgen::{CertificateParams, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use serde_json::{json, Value};
use x509_parser::prelude::*;

const TD: &str = "example.org";
const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "nhi";

/// A cluster's service-account signing key.
struct Cluster(nhi_integration::kube::ClusterKey);

impl Cluster {
    fn new() -> Self {
        Cluster(nhi_integration::kube::ClusterKey::new("sa-key-1"))
    }

    /// A projected service-account token as kubelet gets it from the API server.
    fn token(&self, ns: &str, sa: &str, audience: &str, issuer: &str) -> String {
        self.pod_token(
            ns,
            sa,
            "7c1f0c1e-0000-4000-8000-000000000002",
            audience,
            issuer,
        )
    }

    /// [`Cluster::token`] bound to pod `pod_uid`.
    fn pod_token(&self, ns: &str, sa: &str, pod_uid: &str, audience: &str, issuer: &str) -> String {
        self.0.token(ns, sa, pod_uid, audience, issuer)
    }
}

/// A CSR for `uri` with a key that stays here.
fn csr(uri: &str) -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::default();
    p.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    p.serialize_request(&key).unwrap().pem().unwrap()
}

/// JWT login: the workload's OpenBao token, or OpenBao's refusal.
fn login(bao: &BaoDev, w: &WorkloadIssuance, jwt: &str) -> Result<String, (u16, Value)> {
    let anon = BaoApi::new(&bao.addr, None, None);
    match anon
        .call(
            "POST",
            &format!("auth/{}/login", w.jwt_mount),
            Some(json!({"role": w.role, "jwt": jwt})),
        )
        .unwrap()
    {
        (200, v) => Ok(v["auth"]["client_token"].as_str().unwrap().to_string()),
        other => Err(other),
    }
}

/// Asks OpenBao to sign a CSR for `uri` under the workload role with `token`.
fn sign(bao: &BaoDev, w: &WorkloadIssuance, token: &str, uri: &str) -> (u16, Value) {
    BaoApi::new(&bao.addr, Some(token), None)
        .call(
            "POST",
            &format!("pki/sign/{}", w.role),
            Some(json!({"csr": csr(uri), "uri_sans": uri, "ttl": "10m"})),
        )
        .unwrap()
}

/// A dev OpenBao set up for nhi and for workload issuance, with the cluster whose
/// service-account tokens it trusts.
fn setup() -> (BaoDev, NodeLogin, Cluster, WorkloadIssuance) {
    let bao = BaoDev::start();
    let setup = bao.setup_nhi(TD, &NhiRoleOptions::default()).node("node-a");
    let cluster = Cluster::new();
    let w = setup_workload_issuance(
        &bao.root(),
        TD,
        SA_ISSUER,
        &cluster.0.key.public_key_pem(),
        AUDIENCE,
    );
    (bao, setup, cluster, w)
}

/// The SANs of a PEM certificate; anything but a URI is named as such.
fn uri_sans(pem: &str) -> Vec<String> {
    let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    let (_, cert) = X509Certificate::from_der(&der.contents).unwrap();
    cert.subject_alternative_name()
        .unwrap()
        .expect("a SAN extension")
        .value
        .general_names
        .iter()
        .map(|n| match n {
            GeneralName::URI(u) => u.to_string(),
            other => format!("not a URI: {other:?}"),
        })
        .collect()
}

fn errors(v: &Value) -> String {
    v["errors"].to_string()
}

#[test]
fn openbao_signs_only_the_identity_a_service_account_token_proves() {
    let (bao, setup, cluster, w) = setup();

    // prod/web proves spiffe://example.org/ns/prod/sa/web, and gets exactly that.
    let web = login(&bao, &w, &cluster.token("prod", "web", AUDIENCE, SA_ISSUER))
        .unwrap_or_else(|e| panic!("login refused: {e:?}"));
    let own = format!("spiffe://{TD}/ns/prod/sa/web");
    let (status, v) = sign(&bao, &w, &web, &own);
    assert_eq!(status, 200, "{v}");
    let sans = uri_sans(v["data"]["certificate"].as_str().unwrap());
    assert_eq!(sans, vec![own.clone()]);
    assert!(v["data"]["private_key"].is_null(), "the key never left us");

    // The same token for any other identity: refused by OpenBao, naming the URI SAN.
    for other in [
        format!("spiffe://{TD}/ns/prod/sa/admin"),
        format!("spiffe://{TD}/ns/kube-system/sa/web"),
        format!("spiffe://{TD}/ns/prod/sa/web/extra"),
        "spiffe://other.org/ns/prod/sa/web".to_string(),
    ] {
        let (status, v) = sign(&bao, &w, &web, &other);
        assert_eq!(status, 400, "{other}: {v}");
        assert!(
            errors(&v).contains("URI Subject Alternative Name"),
            "{other}: OpenBao's reason: {}",
            errors(&v)
        );
    }

    // Tokens that prove nothing get no OpenBao token at all.
    let forger = Cluster::new();
    for (what, jwt) in [
        (
            "signed by another cluster's key",
            forger.token("prod", "web", AUDIENCE, SA_ISSUER),
        ),
        (
            "for another audience",
            cluster.token("prod", "web", "vault", SA_ISSUER),
        ),
        (
            "from another issuer",
            cluster.token("prod", "web", AUDIENCE, "https://evil.example"),
        ),
        ("unsigned", {
            let t = cluster.token("prod", "web", AUDIENCE, SA_ISSUER);
            let mut parts: Vec<&str> = t.split('.').collect();
            parts[2] = "";
            parts.join(".")
        }),
    ] {
        let e = login(&bao, &w, &jwt).expect_err(what);
        assert_eq!(e.0, 400, "{what}: {:?}", e.1);
        eprintln!("{what}: OpenBao says {}", errors(&e.1));
    }

    // The node's own identity (AppRole, the nhi-node policy) cannot sign under the workload
    // role, for any URI SAN; under its own role only its own path; and no intermediate CA.
    let node_token = BaoApi::new(&bao.addr, None, None).must(
        "POST",
        &format!("auth/{NODES_APPROLE_MOUNT}/login"),
        Some(json!({
            "role_id": setup.role_id,
            "secret_id": std::fs::read_to_string(&setup.secret_id_file).unwrap(),
        })),
    )["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, v) = sign(&bao, &w, &node_token, &own);
    assert_eq!(status, 403, "{v}");
    let node_api = BaoApi::new(&bao.addr, Some(&node_token), None);
    let node_sign = |uri: &str| {
        node_api
            .call(
                "POST",
                "pki/sign/nhi-node",
                Some(json!({"csr": csr(uri), "uri_sans": uri, "ttl": "10m"})),
            )
            .unwrap()
    };
    let mine = format!("spiffe://{TD}/node/node-a/container/db");
    let (status, v) = node_sign(&mine);
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        uri_sans(v["data"]["certificate"].as_str().unwrap()),
        vec![mine]
    );
    for other in [
        own.clone(),
        format!("spiffe://{TD}/node/node-b/container/db"),
        format!("spiffe://{TD}/container/db"),
    ] {
        let (status, v) = node_sign(&other);
        assert_eq!(status, 400, "{other}: {v}");
        eprintln!("node token for {other}: OpenBao says {}", errors(&v));
    }
    let (status, v) = node_api
        .call(
            "POST",
            "pki/root/sign-intermediate",
            Some(json!({"csr": csr(&own), "common_name": "evil"})),
        )
        .unwrap();
    assert_eq!(
        status, 403,
        "the nhi-node policy signs no intermediate: {v}"
    );
    // And the workload's token can do nothing else: no KV, no intermediate CA.
    let api = BaoApi::new(&bao.addr, Some(&web), None);
    assert_eq!(
        api.call("GET", "secret/data/nhi/secrets/db", None)
            .unwrap()
            .0,
        403
    );
    assert_eq!(
        api.call(
            "POST",
            "pki/root/sign-intermediate",
            Some(json!({"csr": csr(&own)}))
        )
        .unwrap()
        .0,
        403
    );
}

/// The same through nhid's OpenBao client (`nhi_openbao`): the node's client logs a workload
/// in with its proof and has its CSR signed with the workload's token, never its own.
#[test]
fn the_nhi_client_gets_a_workload_its_own_svid_and_openbaos_refusal_otherwise() {
    use std::time::Duration;
    let (bao, setup, cluster, w) = setup();
    let cfg = node_config(vec![bao.addr.clone()], &setup, None);
    let jwt = cluster.token("prod", "web", AUDIENCE, SA_ISSUER);
    let forged = Cluster::new().token("prod", "web", AUDIENCE, SA_ISSUER);
    let own = format!("spiffe://{TD}/ns/prod/sa/web");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let client = nhi_openbao::Bao::connect(&cfg).await.unwrap();
        let token = client.login_jwt(&w.jwt_mount, &w.role, &jwt).await.unwrap();
        let shown = format!("{token:?}");
        assert!(
            shown.contains("<redacted>") && !shown.contains("s."),
            "{shown}"
        );
        let leaf = client
            .pki_sign(&token, &w.role, &csr(&own), &own, Duration::from_secs(600))
            .await
            .unwrap();
        assert_eq!(uri_sans(&leaf.certificate_pem), vec![own.clone()]);
        assert!(!leaf.serial_number.is_empty() && !leaf.issuing_ca_pem.is_empty());
        let admin = format!("spiffe://{TD}/ns/prod/sa/admin");
        let e = client
            .pki_sign(
                &token,
                &w.role,
                &csr(&admin),
                &admin,
                Duration::from_secs(600),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("URI Subject Alternative Name"), "{e}");
        let e = client
            .login_jwt(&w.jwt_mount, &w.role, &forged)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("error validating token"), "{e}");
    });
}

/// The whole path: nhid in cluster mode, pods on real runc shaped as CRI shapes them. A pod's
/// X.509-SVID is signed by OpenBao after a JWT login with the pod's projected token, for the
/// identity OpenBao derives from it; a pod whose token another cluster's key signed gets no
/// SVID, refused by OpenBao (its reason reaches the workload), not by nhid. JWT-SVIDs and the
/// bundle are unaffected.
#[test]
fn pods_get_x509_svids_from_openbao_only_with_a_token_it_accepts() {
    use nhi_integration::kube::{Pod, SA_RULE};
    use nhi_integration::*;
    let (bao, _node_a, cluster, _w) = setup();
    let setup_again = bao.setup_nhi(TD, &NhiRoleOptions::default());
    let login = setup_again.node("k8s-node");
    // The hook checks claims and where the token lies; the signature is OpenBao's to check.
    let mut node = Node::with_config(
        SA_RULE,
        &format!(
            r#"node_name = "k8s-node"
[issuer]
kind = "openbao"
[openbao]
addresses = ["{}"]
request_timeout = "2s"
{}"#,
            bao.addr,
            login.auth_toml()
        ),
    );
    node.with_kubelet_root();
    node.start();

    let pod = Pod::new("team-a", "web-0");
    let token = cluster.pod_token("team-a", "web", &pod.uid, AUDIENCE, SA_ISSUER);
    let (sandbox, app) = pod.run_with_token(&node, &token).unwrap();
    let want = format!("spiffe://{TD}/ns/team-a/sa/web");
    let pem = app.get("/v1/x509").unwrap();
    assert_eq!(uri_sans(&pem), vec![want.clone()]);
    let bundle = app.get("/v1/bundle").unwrap();
    let root = bao.root().must("GET", "pki/cert/ca", None)["data"]["certificate"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        bundle.trim(),
        root.trim(),
        "the bundle is OpenBao's root, nothing of the node's"
    );
    assert!(
        !node.log().contains(token.trim()),
        "the pod's token in nhid's log"
    );

    // Another cluster's key signed this pod's token: the hook's claim checks pass, OpenBao's
    // signature check does not. The workload learns why; it has no X.509-SVID.
    let forger = Cluster::new();
    let pod2 = Pod::new("team-b", "api-0");
    let forged = forger.pod_token("team-b", "api", &pod2.uid, AUDIENCE, SA_ISSUER);
    let (sandbox2, app2) = pod2.run_with_token(&node, &forged).unwrap();
    let (code, body) = http_in_netns(app2.pid(), "GET", "/v1/x509");
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("refused") && body.contains("error validating token"),
        "OpenBao's refusal reaches the workload: {code} {body}"
    );
    eprintln!("forged service-account token: {code} {body}");
    // The first pod is unaffected.
    assert_eq!(uri_sans(&app.get("/v1/x509").unwrap()), vec![want]);

    // A pod in the same namespace that claims the same service account with a token no key
    // of the cluster signed, right after a genuine team-a/web pod logged in: it gets no
    // SVID. OpenBao sees its own token (the login of another pod's token is never reused).
    let pod3 = Pod::new("team-a", "impostor-0");
    let fake = forger.pod_token("team-a", "web", &pod3.uid, AUDIENCE, SA_ISSUER);
    let (sandbox3, app3) = pod3.run_with_token(&node, &fake).unwrap();
    let (code, body) = http_in_netns(app3.pid(), "GET", "/v1/x509");
    assert_eq!(code, 403, "an impostor of team-a/web got an SVID: {body}");
    assert!(body.contains("error validating token"), "{body}");
    for c in [app, app2, app3, sandbox, sandbox2, sandbox3] {
        c.delete();
    }
}
