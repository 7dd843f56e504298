//! nhid's OpenBao client (`nhi_openbao`) against a real OpenBao: AppRole login, KV v2,
//! token renewal and re-login, node-scoped PKI signing, TLS with a private CA, and failover in
//! a 3-node raft cluster whose leader is killed.

use std::time::{Duration, Instant};

use nhi_core::openbao_config::OpenBaoAuth;
use nhi_integration::bao::{node_config, BaoApi, BaoCluster, BaoDev, NhiRoleOptions};
use nhi_openbao::{Bao, BaoError};
use rustls_pki_types::{CertificateDer, UnixTime};
use serde_json::{json, Map, Value};
use x509_parser::pem::Pem;
use x509_parser::prelude::*;

const TD: &str = "example.org";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// OpenBao service tokens look like `s.` followed by 24 base62 characters.
fn looks_like_token(s: &str) -> bool {
    s.match_indices("s.").any(|(i, _)| {
        s[i + 2..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric())
            .count()
            >= 20
    })
}

/// Runs a harness call (blocking HTTP) from async test code. The [`BaoApi`] is made outside
/// the runtime and dropped on the blocking thread: the blocking client must not be built or
/// dropped in async context.
async fn blocking(api: BaoApi, f: impl FnOnce(&BaoApi) + Send + 'static) {
    tokio::task::spawn_blocking(move || f(&api)).await.unwrap();
}

fn map(v: Value) -> Map<String, Value> {
    v.as_object().unwrap().clone()
}

#[test]
fn approle_login_and_kv_versions_and_secrets_stay_out_of_debug() {
    let bao = BaoDev::start();
    let setup = bao.setup_nhi(TD, &NhiRoleOptions::default()).node("node-a");
    let secret_id = std::fs::read_to_string(&setup.secret_id_file).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&setup.secret_id_file)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "secret_id file is private");
    // What an operator (root here) puts under nhi/secrets/ for workloads.
    bao.root().must(
        "POST",
        "secret/data/nhi/secrets/db",
        Some(json!({"data": {"password": "db-pass-0123456789"}})),
    );

    let root = bao.root();
    rt().block_on(async {
        let client = Bao::connect(&node_config(vec![bao.addr.clone()], &setup, None))
            .await
            .unwrap();
        let h = client.health();
        assert!(h.logged_in && h.last_error.is_none(), "{h:?}");
        assert_eq!(h.address, bao.addr);
        assert_eq!(h.logins, 1);
        assert!(h.token_expires_at.is_some());

        let db = client.kv_read("secrets/db").await.unwrap().unwrap();
        assert_eq!(db.data["password"], "db-pass-0123456789");
        assert_eq!(db.version, 1);

        // Versions, check-and-set, metadata.
        let path = "nodes/node-a/jwks";
        assert!(client.kv_read(path).await.unwrap().is_none());
        assert!(client.kv_metadata(path).await.unwrap().is_none());
        let v1 = client
            .kv_write(path, map(json!({"keys": [1]})), Some(0))
            .await
            .unwrap();
        assert_eq!(v1, 1);
        let e = client
            .kv_write(path, map(json!({"keys": [9]})), Some(0))
            .await
            .unwrap_err();
        assert!(matches!(e, BaoError::CasMismatch { cas: 0, .. }), "{e}");
        let v2 = client
            .kv_write(path, map(json!({"keys": [1, 2]})), Some(1))
            .await
            .unwrap();
        assert_eq!(v2, 2);
        let v3 = client
            .kv_write(path, map(json!({"keys": [3]})), None)
            .await
            .unwrap();
        assert_eq!(v3, 3);
        let s = client.kv_read(path).await.unwrap().unwrap();
        assert_eq!((s.version, s.data["keys"].clone()), (3, json!([3])));
        assert!(!s.created_time.is_empty());
        let m = client.kv_metadata(path).await.unwrap().unwrap();
        assert_eq!(m.current_version, 3);
        assert!(!m.updated_time.is_empty());

        // A node publishes under its own name only: node-a cannot put a key in node-b's entry
        // (the policy's path is templated with the AppRole role's name).
        let e = client
            .kv_write("nodes/node-b/jwks", map(json!({"keys": ["forged"]})), None)
            .await
            .unwrap_err();
        assert!(matches!(e, BaoError::Denied { .. }), "{e}");
        // Listing: a missing directory is empty, sub-directories end in '/'.
        let root2 = root.clone();
        blocking(root2, |root| {
            root.must(
                "POST",
                "secret/data/nhi/nodes/node-b/jwks",
                Some(json!({"data": {"keys": []}})),
            );
        })
        .await;
        let mut nodes = client.kv_list("nodes").await.unwrap();
        nodes.sort();
        assert_eq!(nodes, ["node-a/", "node-b/"]);
        assert_eq!(client.kv_list("nodes/node-a").await.unwrap(), ["jwks"]);
        assert!(client.kv_list("nodes/nobody").await.unwrap().is_empty());
        assert_eq!(
            client.kv_list("").await.unwrap().len(),
            2,
            "nodes/ and secrets/"
        );

        // A soft-deleted current version reads as absent; kv_delete removes everything.
        blocking(root, |root| {
            root.must("DELETE", "secret/data/nhi/nodes/node-b/jwks", None);
        })
        .await;
        assert!(client.kv_read("nodes/node-b/jwks").await.unwrap().is_none());
        client.kv_delete(path).await.unwrap();
        assert!(client.kv_read(path).await.unwrap().is_none());
        assert!(client.kv_metadata(path).await.unwrap().is_none());
        client.kv_delete(path).await.unwrap();

        // The policy holds: a node may not write workload secrets.
        let e = client
            .kv_write("secrets/db", map(json!({"password": "x"})), None)
            .await
            .unwrap_err();
        assert!(matches!(e, BaoError::Denied { .. }), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("secret/data/nhi/secrets/db") && msg.contains(&bao.addr),
            "{msg}"
        );
        assert_eq!(
            client.health().logins,
            1,
            "a policy denial is not a dead token"
        );

        // Nothing secret in Debug, health or errors.
        let shown = format!("{client:?} {:?} {db:?} {e:?}", client.health());
        assert!(!shown.contains(secret_id.trim()), "{shown}");
        assert!(!shown.contains(&setup.role_id), "{shown}");
        assert!(!shown.contains("db-pass"), "{shown}");
        assert!(!looks_like_token(&shown), "{shown}");
    });
}

#[test]
fn token_is_renewed_past_its_ttl_and_replaced_after_max_ttl_and_revocation() {
    let bao = BaoDev::start();
    let setup = bao
        .setup_nhi(
            TD,
            &NhiRoleOptions {
                token_ttl: Duration::from_secs(4),
                token_max_ttl: Duration::from_secs(9),
            },
        )
        .node("node-a");
    let root = bao.root();
    rt().block_on(async {
        let client = Bao::connect(&node_config(vec![bao.addr.clone()], &setup, None))
            .await
            .unwrap();
        let first_expiry = client.health().token_expires_at.unwrap();
        // Renewals at 2/3 TTL until the 9 s max TTL caps them, then a fresh login; requests
        // keep working throughout.
        let start = Instant::now();
        loop {
            client.kv_list("nodes").await.unwrap();
            let h = client.health();
            if h.renewals >= 2 && h.logins >= 2 {
                assert!(h.logged_in && h.last_error.is_none(), "{h:?}");
                assert!(h.token_expires_at.unwrap() > first_expiry, "{h:?}");
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "no renewal + re-login within 20 s: {h:?}"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        assert!(
            start.elapsed() > Duration::from_secs(4),
            "outlived the first TTL"
        );

        // Revoked out of band: the next request notices, logs in again and succeeds.
        let before = client.health().logins;
        blocking(root, |root| root.revoke_approle_tokens()).await;
        client.kv_list("nodes").await.unwrap();
        assert_eq!(client.health().logins, before + 1);
    });
}

fn pem_ders(pem: &str) -> Vec<Vec<u8>> {
    Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

/// A CSR for `uri` and its key.
fn csr(uri: &str) -> (rcgen::KeyPair, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    let pem = p.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

/// With its own token, node `node` has OpenBao sign a leaf under its own path only: the leaf
/// has exactly the requested URI SAN, is an X509-SVID leaf (digitalSignature, not a CA) and
/// chains to pki/ca/pem; an identity outside `spiffe://<td>/node/<node>/` is refused by
/// OpenBao, naming the URI SAN.
async fn sign_and_verify(client: &Bao, node: &str) {
    let uri = format!("spiffe://{TD}/node/{node}/web");
    let (_key, pem) = csr(&uri);
    let signed = client
        .pki_sign_as_node("nhi-node", &pem, &uri, Duration::from_secs(600))
        .await
        .unwrap();
    let root_pem = client.pki_root_ca_pem().await.unwrap();
    let root_der = pem_ders(&root_pem).remove(0);
    assert_eq!(pem_ders(&signed.issuing_ca_pem).remove(0), root_der);
    let leaf_der = pem_ders(&signed.certificate_pem).remove(0);
    let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
    let (_, root) = X509Certificate::from_der(&root_der).unwrap();
    assert!(!leaf.is_ca());
    // X509-SVID standard 4.1: the extension is there and says cA=false (py-spiffe refuses a
    // leaf without it).
    let bc = leaf
        .basic_constraints()
        .unwrap()
        .expect("basicConstraints on the leaf");
    assert!(!bc.value.ca);
    assert_eq!(leaf.issuer(), root.subject());
    // X509-SVID standard, appendix A: digitalSignature on leaves, keyCertSign only on CAs.
    let ku = leaf.key_usage().unwrap().expect("key usage").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign(), "{ku:?}");
    let ku = root.key_usage().unwrap().expect("key usage").value;
    assert!(
        ku.key_cert_sign() && ku.crl_sign() && !ku.digital_signature(),
        "root key usage: {ku:?}"
    );
    let sans: Vec<String> = leaf
        .subject_alternative_name()
        .unwrap()
        .unwrap()
        .value
        .general_names
        .iter()
        .map(|g| g.to_string())
        .collect();
    assert_eq!(sans, [format!("URI({uri})")], "exactly the requested SAN");
    let ttl = signed.expiration as i64 - time_now();
    assert!((500..=700).contains(&ttl), "10 min TTL: {ttl}");
    let root_cd = CertificateDer::from(root_der);
    let anchor = webpki::anchor_from_trusted_cert(&root_cd).unwrap();
    let leaf_cd = CertificateDer::from(leaf_der);
    let ee = webpki::EndEntityCert::try_from(&leaf_cd).unwrap();
    ee.verify_for_usage(
        webpki::ALL_VERIFICATION_ALGS,
        &[anchor],
        &[],
        UnixTime::now(),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .expect("leaf → pki/ca/pem");

    for other in [
        format!("spiffe://{TD}/ns/default/sa/web"),
        format!("spiffe://{TD}/node/{node}-evil/web"),
        format!("spiffe://{TD}/node/other/web"),
    ] {
        let (_k, pem) = csr(&other);
        let e = client
            .pki_sign_as_node("nhi-node", &pem, &other, Duration::from_secs(600))
            .await
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            matches!(e, BaoError::Status { code: 400, .. })
                && msg.contains("URI Subject Alternative Name"),
            "{other}: {msg}"
        );
    }
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

#[test]
fn node_scoped_signing_chains_to_the_root_over_tls_and_token_login() {
    let bao = BaoDev::start_tls();
    let setup = bao.setup_nhi(TD, &NhiRoleOptions::default()).node("node-a");
    let ca = bao.ca_file.clone().unwrap();
    rt().block_on(async {
        let client = Bao::connect(&node_config(vec![bao.addr.clone()], &setup, Some(&ca)))
            .await
            .unwrap();
        assert!(bao.addr.starts_with("https://"));
        sign_and_verify(&client, "node-a").await;
        let root = client.pki_root_ca_pem().await.unwrap();
        let root_der = pem_ders(&root).remove(0);
        let (_, root) = X509Certificate::from_der(&root_der).unwrap();
        assert_eq!(
            root.subject()
                .iter_common_name()
                .next()
                .unwrap()
                .as_str()
                .unwrap(),
            format!("nhi {TD} root CA")
        );
        // Token login (a token file, e.g. written by an OpenBao agent): the root token here,
        // which never expires, so there is nothing to renew.
        let token_file = bao.dir.path().join("token");
        std::fs::write(&token_file, format!("{}\n", bao.root_token)).unwrap();
        let mut cfg = node_config(vec![bao.addr.clone()], &setup, Some(&ca));
        cfg.auth = OpenBaoAuth::Token { token_file };
        let by_token = Bao::connect(&cfg).await.unwrap();
        let h = by_token.health();
        assert!(h.logged_in && h.token_expires_at.is_none(), "{h:?}");
        by_token
            .kv_write("secrets/api", map(json!({"key": "v"})), None)
            .await
            .unwrap();
        assert_eq!(
            client
                .kv_read("secrets/api")
                .await
                .unwrap()
                .unwrap()
                .version,
            1
        );
        assert!(!format!("{by_token:?}").contains(&bao.root_token));

        // Without the CA the server's certificate is not trusted: no silent fallback.
        let e = Bao::connect(&node_config(vec![bao.addr.clone()], &setup, None))
            .await
            .unwrap_err();
        assert!(matches!(e, BaoError::Unreachable { .. }), "{e}");
    });
}

#[test]
fn raft_cluster_survives_the_leader_being_killed() {
    let mut cluster = BaoCluster::start(3);
    let setup = cluster
        .setup_nhi(TD, &NhiRoleOptions::default())
        .node("node-a");
    let leader = cluster.leader_index();
    // Workload issuance on the raft cluster too: a pod's token logs in, a forged one does not.
    let sa = nhi_integration::kube::ClusterKey::new("raft-sa");
    let forger = nhi_integration::kube::ClusterKey::new("raft-sa");
    let issuer = "https://kubernetes.default.svc.cluster.local";
    let w = nhi_integration::bao::setup_workload_issuance(
        &cluster.root(leader),
        TD,
        issuer,
        &sa.key.public_key_pem(),
        "nhi",
    );
    // The leader first, so the client's remembered address is the one that dies.
    let mut addresses = cluster.addresses();
    addresses.rotate_left(leader);
    let runtime = rt();
    let client = runtime.block_on(async {
        let client = Bao::connect(&node_config(addresses, &setup, None))
            .await
            .unwrap();
        assert_eq!(client.health().address, cluster.address(leader));
        let v = client
            .kv_write("nodes/node-a/jwks", map(json!({"keys": ["k1"]})), None)
            .await
            .unwrap();
        assert_eq!(v, 1);
        client
    });

    cluster.stop(leader);
    let t = Instant::now();
    runtime.block_on(async {
        let v = client
            .kv_write("nodes/node-a/jwks", map(json!({"keys": ["k2"]})), Some(1))
            .await
            .unwrap();
        assert_eq!(v, 2);
        let s = client.kv_read("nodes/node-a/jwks").await.unwrap().unwrap();
        assert_eq!(s.data["keys"], json!(["k2"]));
        sign_and_verify(&client, "node-a").await;
    });
    let took = t.elapsed();
    runtime.block_on(async {
        let uri = format!("spiffe://{TD}/ns/prod/sa/web");
        let good = sa.token("prod", "web", "u1", "nhi", issuer);
        let token = client
            .login_jwt(&w.jwt_mount, &w.role, &good)
            .await
            .unwrap();
        let (_k, pem) = csr(&uri);
        let leaf = client
            .pki_sign(&token, &w.role, &pem, &uri, Duration::from_secs(600))
            .await
            .unwrap();
        assert!(leaf.certificate_pem.contains("BEGIN CERTIFICATE"));
        let forged = forger.token("prod", "web", "u1", "nhi", issuer);
        let e = client
            .login_jwt(&w.jwt_mount, &w.role, &forged)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("error validating token"),
            "OpenBao's refusal: {e}"
        );
    });
    assert!(took < Duration::from_secs(10), "failover took {took:?}");
    assert_ne!(client.health().address, cluster.address(leader));
    eprintln!("kv write + read + signing after killing the leader: {took:?}");

    // The old leader comes back as a follower with its data and the cluster keeps serving.
    cluster.restart(leader);
    let new_leader = cluster.leader_index();
    assert_ne!(new_leader, leader);
    runtime.block_on(async {
        assert_eq!(
            client
                .kv_metadata("nodes/node-a/jwks")
                .await
                .unwrap()
                .unwrap()
                .current_version,
            2
        );
        assert_eq!(client.health().logins, 1, "failover needed no new login");
    });
}
