//! nhid on a real OpenBao: two "nodes" (separate nhid, state dir, socket) share one trust
//! domain, secrets and revocations through it; OpenBao signs every X.509-SVID (a plain
//! container's only under its node's path); a 3-node raft cluster loses its leader and then
//! its quorum while workloads keep running.

use std::fs;
use std::time::{Duration, Instant};

use nhi_integration::bao::{BaoCluster, BaoDev, BaoNhiSetup, NhiRoleOptions};

/// Plain containers have no proof OpenBao could check: in cluster mode their identity lives
/// under their node's path, the only one the node's own OpenBao token may have signed.
const NODE_RULE: &str = r#"
[[rule]]
name = "annotated"
spiffe_id = "node/{node.name}/container/{container.name}"
[rule.match]
annotations = { "nhi.dev/inject" = "true" }
"#;

/// The identity of container `name` on node `node`.
fn id_of(node: &str, name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/node/{node}/container/{name}")
}
use nhi_integration::*;
use rustls_pki_types::{CertificateDer, UnixTime};

fn rules() -> String {
    format!(
        r#"{NODE_RULE}
[[grant]]
secrets = ["db-password"]
spiffe_ids = ["{}"]
"#,
        id_of("node-a", "alpha")
    )
}

/// A node whose issuer and store are OpenBao at `addresses`.
fn bao_node(name: &str, addresses: &[String], setup: &BaoNhiSetup) -> Node {
    let mut node = Node::with_config(&rules(), &bao_config(name, addresses, setup, "6s"));
    node.start();
    node
}

/// The top of a node's config for OpenBao at `addresses` as issuer and store; enrols the node
/// (its own AppRole role).
fn bao_config(name: &str, addresses: &[String], setup: &BaoNhiSetup, secret_ttl: &str) -> String {
    let addrs: Vec<String> = addresses.iter().map(|a| format!("{a:?}")).collect();
    format!(
        r#"node_name = "{name}"
[issuer]
kind = "openbao"
[store]
kind = "openbao"
secret_ttl = "{secret_ttl}"
[openbao]
addresses = [{}]
poll_interval = "1s"
request_timeout = "2s"
{}"#,
        addrs.join(", "),
        setup.node(name).auth_toml()
    )
}

fn ok(out: &std::process::Output) -> String {
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn validate(pid: i32, token: &str, audience: &str) -> u16 {
    let body = serde_json::json!({"token": token, "audience": audience}).to_string();
    http_in_netns_with(pid, "POST", "/v1/validate", &body).0
}

fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap())
        .filter(|p| p.label == "CERTIFICATE")
        .map(|p| p.contents)
        .collect()
}

fn secret_version(c: &Container) -> Option<u64> {
    let (status, body) = http_in_netns(c.pid(), "GET", "/v1/secrets/db-password");
    (status == 200).then(|| {
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["version"]
            .as_u64()
            .unwrap()
    })
}

#[test]
fn two_nodes_share_one_trust_domain_secrets_and_revocations() {
    let dev = BaoDev::start();
    let setup = dev.setup_nhi(TRUST_DOMAIN, &NhiRoleOptions::default());
    let addrs = vec![dev.addr.clone()];
    let a = bao_node("node-a", &addrs, &setup);
    let b = bao_node("node-b", &addrs, &setup);
    assert_eq!(a.status().issuer, "openbao");
    assert_eq!(a.status().store.kind, "openbao");
    let alpha = a.named_container("alpha");
    let beta = b.named_container("beta");

    // Both nodes serve the same root, and each JWKS ends up holding both nodes' keys.
    assert_eq!(
        alpha.get("/v1/bundle").unwrap(),
        beta.get("/v1/bundle").unwrap()
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            let ka = alpha.get_json("/v1/jwks")["keys"]
                .as_array()
                .map_or(0, |k| k.len());
            let kb = beta.get_json("/v1/jwks")["keys"]
                .as_array()
                .map_or(0, |k| k.len());
            ka == 2 && kb == 2
        }),
        "JWKS not shared"
    );

    // A JWT-SVID from node A validates on node B.
    let token = alpha.get_json("/v1/token?audience=svc")["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(validate(beta.pid(), &token, "svc"), 200);
    assert!(verify_offline(&b, &beta, &token, "svc").contains(&id_of("node-a", "alpha")));

    // OpenBao signed node A's X.509-SVID (no intermediate on the node: the leaf alone) for
    // exactly node A's path, and it verifies with the bundle node B serves.
    let pem = alpha.get("/v1/x509").unwrap();
    assert_eq!(
        pem_certs(&pem).len(),
        1,
        "a leaf signed by OpenBao's root, no node CA"
    );
    chains_to(&pem, &beta.get("/v1/bundle").unwrap())
        .expect("node A's X.509-SVID verifies with node B's bundle");
    let ders = pem_certs(&pem);
    let (_, leaf) = x509_parser::parse_x509_certificate(&ders[0]).unwrap();
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        format!("{:?}", san.value.general_names),
        format!("[URI({:?})]", id_of("node-a", "alpha"))
    );

    // Secrets are the operators': a node's policy refuses writes, and nhictl says what to do.
    let out = b.nhictl(&["secret", "put", "db-password", "--from-stdin"], b"nope");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("bao kv put"),
        "{out:?}"
    );
    // Written in OpenBao: served on node A to the granted identity only; then a new version
    // reaches node A's workload (HTTP and file) within 5 s.
    put_secret(&dev.root(), "from-operator");
    assert!(eventually(Duration::from_secs(5), || secret_version(
        &alpha
    ) == Some(1)));
    assert_eq!(
        alpha.get_json("/v1/secrets/db-password")["value"],
        "from-operator"
    );
    assert!(ok(&a.nhictl(&["secret", "list"], b"")).contains("db-password\tversion=1"));
    assert_eq!(
        http_in_netns(beta.pid(), "GET", "/v1/secrets/db-password").0,
        403
    );
    let t = Instant::now();
    put_secret(&dev.root(), "written-in-openbao");
    assert!(
        eventually(Duration::from_secs(5), || {
            secret_version(&alpha) == Some(2)
                && fs::read_to_string(
                    a.path(&format!("containers/{}/secrets/db-password", alpha.id)),
                )
                .is_ok_and(|v| v == "written-in-openbao")
        }),
        "a change made in OpenBao did not reach the workload within 5 s"
    );
    eprintln!(
        "OpenBao-side rotation reached the workload after {:?}",
        t.elapsed()
    );

    // Revocation on node B reaches node A within 2 s.
    let id = id_of("node-a", "alpha");
    let t = Instant::now();
    ok(&b.nhictl(&["revoke", "--spiffe-id", &id], b""));
    assert_eq!(
        validate(beta.pid(), &token, "svc"),
        403,
        "denied on B at once"
    );
    assert!(
        eventually(Duration::from_secs(2), || http_in_netns(
            alpha.pid(),
            "GET",
            "/v1/token?audience=svc"
        )
        .0 == 403),
        "revocation made on node B not in effect on node A within 2 s"
    );
    eprintln!("revocation reached the other node after {:?}", t.elapsed());
    ok(&a.nhictl(&["revoke", "--spiffe-id", &id, "--undo"], b""));
    assert!(eventually(Duration::from_secs(3), || alpha
        .get("/v1/token?audience=svc")
        .is_ok()));
    for n in [&a, &b] {
        assert!(!n.log().contains("from-operator") && !n.log().contains("written-in-openbao"));
    }

    // A workload ends on node A: the token it was issued is refused on node B within 2 s (the
    // deny-list entry travels through OpenBao), while alpha's own tokens stay good.
    let gamma = a.named_container("gamma");
    let ended = gamma.get_json("/v1/token?audience=svc")["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(validate(beta.pid(), &ended, "svc"), 200);
    let t = Instant::now();
    gamma.delete();
    assert!(
        eventually(Duration::from_secs(2), || validate(
            beta.pid(),
            &ended,
            "svc"
        ) == 403),
        "the ended workload's token is still accepted on node B after 2 s"
    );
    eprintln!(
        "an ended workload's token was refused on the other node after {:?}",
        t.elapsed()
    );
    let fresh = alpha.get_json("/v1/token?audience=svc")["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(validate(beta.pid(), &fresh, "svc"), 200);
    alpha.delete();
    beta.delete();
}

/// What an operator does: `bao kv put secret/nhi/secrets/db-password value=...`.
fn put_secret(root: &nhi_integration::bao::BaoApi, value: &str) {
    root.must(
        "POST",
        "secret/data/nhi/secrets/db-password",
        Some(serde_json::json!({"data": {"value": value}})),
    );
}

/// [`put_secret`] on whichever cluster node answers (during a failover).
fn put_secret_anywhere(cluster: &BaoCluster, value: &str) -> bool {
    (0..3).any(|i| {
        cluster.is_running(i)
            && cluster
                .root(i)
                .call(
                    "POST",
                    "secret/data/nhi/secrets/db-password",
                    Some(serde_json::json!({"data": {"value": value}})),
                )
                .is_ok_and(|(st, _)| st == 200)
    })
}

/// `nhictl token verify` of `token` for `audience` on `node`, offline, against the JWKS
/// container `c` serves; its output.
fn verify_offline(node: &Node, c: &Container, token: &str, audience: &str) -> String {
    let jwks = node_path_write(
        node,
        &format!("jwks-{}.json", c.id),
        &c.get("/v1/jwks").unwrap(),
    );
    ok(&node.nhictl(
        &[
            "token",
            "verify",
            "--audience",
            audience,
            "--jwks",
            jwks.to_str().unwrap(),
        ],
        token.as_bytes(),
    ))
}

fn node_path_write(node: &Node, rel: &str, content: &str) -> std::path::PathBuf {
    let p = node.path(rel);
    fs::write(&p, content).unwrap();
    p
}

#[test]
fn raft_leader_loss_and_full_outage_with_workloads_running() {
    let mut cluster = BaoCluster::start(3);
    let setup = cluster.setup_nhi(TRUST_DOMAIN, &NhiRoleOptions::default());
    let node = bao_node("node-a", &cluster.addresses(), &setup);
    let alpha = node.named_container("alpha");
    put_secret(&cluster.root(cluster.leader_index()), "v1");
    assert!(eventually(Duration::from_secs(5), || secret_version(
        &alpha
    ) == Some(1)));

    // The leader goes: the operator's next version still reaches the workload, through
    // whichever node nhid fails over to, without restarting nhid.
    let leader = cluster.leader_index();
    cluster.stop(leader);
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(20), || put_secret_anywhere(
            &cluster, "v2"
        )),
        "OpenBao took no write after the leader stopped"
    );
    assert!(
        eventually(Duration::from_secs(20), || secret_version(&alpha)
            == Some(2)),
        "new version not served after failover: {}",
        node.log()
    );
    eprintln!(
        "new secret version served {:?} after the leader stopped",
        t.elapsed()
    );
    assert!(alpha.get("/v1/token?audience=after-failover").is_ok());
    assert!(alpha.get("/v1/x509").is_ok());

    // Quorum lost: the cached secret is served until its lease (`expires_at`, secret_ttl 6 s)
    // ends, never after; status says what is degraded.
    let (st, body) = http_in_netns(alpha.pid(), "GET", "/v1/secrets/db-password");
    assert_eq!(st, 200);
    let expires_at = serde_json::from_str::<serde_json::Value>(&body).unwrap()["expires_at"]
        .as_u64()
        .unwrap();
    for i in 0..3 {
        if i != leader {
            cluster.stop(i);
        }
    }
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused_at = loop {
        let st = http_in_netns(alpha.pid(), "GET", "/v1/secrets/db-password").0;
        let now = unix();
        if st == 200 {
            assert!(
                now <= expires_at,
                "served after its lease ended ({now} > {expires_at})"
            );
        } else {
            assert_eq!(st, 503);
            break now;
        }
        assert!(Instant::now() < deadline, "cached secret never expired");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        refused_at + 1 >= expires_at,
        "dropped before its lease ended"
    );
    assert!(
        eventually(Duration::from_secs(10), || !node
            .status()
            .store
            .degraded
            .is_empty()),
        "outage not reported"
    );
    let status = ok(&node.nhictl(&["status"], b""));
    assert!(status.contains("DEGRADED"), "{status}");

    // OpenBao back: service resumes by itself, no nhid restart.
    for i in 0..3 {
        cluster.restart(i);
    }
    assert!(
        eventually(Duration::from_secs(30), || secret_version(&alpha)
            == Some(2)),
        "secrets not served again after OpenBao came back: {}",
        node.log()
    );
    assert!(eventually(Duration::from_secs(10), || node
        .status()
        .store
        .degraded
        .is_empty()));
    alpha.delete();
}

/// Verifies `leaf_chain_pem` (leaf + intermediates) up to the first certificate of
/// `bundle_pem`.
fn chains_to(leaf_chain_pem: &str, bundle_pem: &str) -> Result<(), String> {
    let chain = pem_certs(leaf_chain_pem);
    let bundle = pem_certs(bundle_pem);
    let root = CertificateDer::from(bundle[0].clone());
    let anchor = webpki::anchor_from_trusted_cert(&root).map_err(|e| e.to_string())?;
    let leaf = CertificateDer::from(chain[0].clone());
    let inter: Vec<CertificateDer> = chain[1..]
        .iter()
        .map(|c| CertificateDer::from(c.clone()))
        .collect();
    webpki::EndEntityCert::try_from(&leaf)
        .map_err(|e| e.to_string())?
        .verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &[anchor],
            &inter,
            UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Issue 14, items 4 and 5 on a real OpenBao (one raft node, so it comes back with its data):
/// during an outage, 32 slow secret requests never delay a fresh token (< 100 ms); nhid then
/// starts, reboot-style (nhid and companions killed), while OpenBao is still down, serving
/// workloads from its sealed cache, marked degraded; and it recovers by itself.
#[test]
fn during_an_openbao_outage_tokens_never_wait_for_secrets_and_nhid_starts_from_its_sealed_cache() {
    let mut cluster = BaoCluster::start(1);
    let setup = cluster.setup_nhi(TRUST_DOMAIN, &NhiRoleOptions::default());
    let mut node = Node::with_config(
        &format!(
            r#"{NODE_RULE}
[[grant]]
secrets = ["db-password", "slow-*"]
spiffe_ids = ["{}"]
"#,
            id_of("node-a", "alpha")
        ),
        &bao_config("node-a", &[cluster.address(0)], &setup, "120s"),
    );
    node.start();
    put_secret(&cluster.root(0), "cached-value-1");
    let alpha = node.named_container("alpha");
    assert_eq!(
        alpha.get_json("/v1/secrets/db-password")["value"],
        "cached-value-1"
    );
    let bundle = alpha.get("/v1/bundle").unwrap();
    assert!(alpha.get("/v1/token?audience=warm").is_ok());
    let held = alpha.get("/v1/x509").unwrap();

    cluster.stop(0);
    // The X.509-SVID the companion holds is served while OpenBao is down (until it expires).
    assert_eq!(alpha.get("/v1/x509").unwrap(), held);
    // 32 requests for secrets nobody cached: each waits for OpenBao (request_timeout).
    let ns = nhi_integration::edge::container_ns(alpha.pid());
    let slow: Vec<_> = (0..32)
        .map(|i| {
            let ns = ns.clone();
            std::thread::spawn(move || {
                nhi_integration::edge::in_netns(&ns, move || {
                    let t = Instant::now();
                    let r = companion_request("GET", &format!("/v1/secrets/slow-{i}"), "");
                    (r, t.elapsed())
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    // Meanwhile fresh tokens (an audience never asked for: nhid must sign it) come at once.
    let fresh: Vec<(u16, Duration)> = nhi_integration::edge::in_netns(&ns, || {
        (0..3)
            .map(|i| {
                let t = Instant::now();
                let (st, _) =
                    companion_request("GET", &format!("/v1/token?audience=fresh-{i}"), "")
                        .expect("token");
                (st, t.elapsed())
            })
            .collect()
    });
    eprintln!("fresh tokens during 32 slow secret requests: {fresh:?}");
    for (st, took) in &fresh {
        assert_eq!(*st, 200);
        assert!(
            *took < Duration::from_millis(100),
            "a fresh token took {took:?} behind the slow secret requests"
        );
    }
    for h in slow {
        let (r, took) = h.join().unwrap();
        let (st, body) = r.expect("every slow request is answered");
        assert_eq!(st, 503, "{body}");
        assert!(
            body.contains("unreachable") || body.contains("busy"),
            "the 503 says why: {body}"
        );
        assert!(
            took < Duration::from_secs(12),
            "bounded wait, took {took:?}"
        );
    }

    // Reboot-style: nhid and the companion die, nhid starts again while OpenBao is still down.
    let companion = node.companion_pid(&alpha.id).unwrap();
    node.kill();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(companion),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    node.start();
    let st = node.status();
    assert!(
        st.store.degraded.iter().any(|d| d.contains("sealed cache")),
        "{:?}",
        st.store.degraded
    );
    let status = ok(&node.nhictl(&["status"], b""));
    assert!(status.contains("DEGRADED"), "{status}");
    // The container still runs: it gets a new companion, served from the sealed cache.
    assert!(node
        .companion_pid(&alpha.id)
        .is_some_and(|p| p != companion));
    assert_eq!(alpha.get("/v1/bundle").unwrap(), bundle);
    let (code, body) = http_in_netns(alpha.pid(), "GET", "/v1/secrets/db-password");
    assert_eq!(code, 200, "{body}");
    let secret: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(secret["value"], "cached-value-1");
    // A new companion holds no X.509-SVID, and only OpenBao signs them: refused with the
    // reason until OpenBao answers (JWT-SVIDs are signed with the node's own key).
    let (code, body) = http_in_netns(alpha.pid(), "GET", "/v1/x509");
    assert_ne!(code, 200, "{body}");
    assert!(body.contains("unavailable"), "{code}: {body}");
    let token = alpha.get_json("/v1/token?audience=after")["token"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(verify_offline(&node, &alpha, &token, "after").contains(&id_of("node-a", "alpha")));
    // A container started during the outage gets its identity too.
    let beta = node.named_container("beta");
    assert!(beta.get("/v1/token?audience=x").is_ok());
    assert_eq!(
        http_in_netns(beta.pid(), "GET", "/v1/secrets/db-password").0,
        403,
        "the cache never widens a grant"
    );

    // OpenBao back: nhid recovers by itself, and follows changes again.
    cluster.restart(0);
    assert!(
        eventually(Duration::from_secs(30), || node
            .status()
            .store
            .degraded
            .is_empty()),
        "still degraded: {:?}\n{}",
        node.status().store.degraded,
        node.log()
    );
    assert!(
        eventually(Duration::from_secs(10), || alpha
            .get("/v1/x509")
            .is_ok_and(|pem| chains_to(&pem, &bundle).is_ok())),
        "no X.509-SVID after OpenBao came back: {}",
        node.log()
    );
    put_secret(&cluster.root(0), "cached-value-2");
    assert!(
        eventually(Duration::from_secs(10), || secret_version(&alpha)
            == Some(2)),
        "{}",
        node.log()
    );
    assert!(
        !node.log().contains("cached-value"),
        "a secret value in the log"
    );
    alpha.delete();
    beta.delete();
}

/// The `kid` in a JWT's header.
fn kid_of(token: &str) -> String {
    use base64::Engine;
    let header = token.split('.').next().unwrap();
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .unwrap();
    serde_json::from_slice::<serde_json::Value>(&raw).unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Whether node `n`'s audit log says node `cut` was cut off (`deny`) or taken back (`allow`).
fn audited_node(n: &Node, cut: &str, decision: &str) -> bool {
    n.audit_records().iter().any(|r| {
        let s = r.to_string();
        s.contains("\"node_revoked\"")
            && s.contains(&format!("node {cut} "))
            && s.contains(&format!("\"decision\":\"{decision}\""))
    })
}

/// `nhictl node revoke` (issue 17): run on node B with an operator's token, it cuts node A off.
/// OpenBao refuses A at once (its entity is disabled: no X.509-SVID for a new workload), B
/// rejects A's JWT-SVIDs at once and node C within 2 s (A's key leaves the JWKS it serves and
/// validates with), and B and C audit it. `--undo` takes A back.
#[test]
fn node_revoke_cuts_a_node_off_within_two_seconds() {
    let dev = BaoDev::start();
    let setup = dev.setup_nhi(TRUST_DOMAIN, &NhiRoleOptions::default());
    let addrs = vec![dev.addr.clone()];
    let a = bao_node("node-a", &addrs, &setup);
    let b = bao_node("node-b", &addrs, &setup);
    let c = bao_node("node-c", &addrs, &setup);
    let alpha = a.named_container("alpha");
    let beta = b.named_container("beta");
    let gamma = c.named_container("gamma");
    let token = alpha.get_json("/v1/token?audience=svc")["token"]
        .as_str()
        .unwrap()
        .to_string();
    let kid = kid_of(&token);
    assert!(
        eventually(Duration::from_secs(5), || validate(
            gamma.pid(),
            &token,
            "svc"
        ) == 200
            && validate(beta.pid(), &token, "svc") == 200),
        "node A's JWT-SVID not accepted on B and C before the revocation"
    );
    assert!(alpha.get("/v1/x509").is_ok());

    // The operator's token (the nhi-operator policy only), in a root-only file (never argv or
    // the environment).
    let op = node_path_write(&b, "operator-token", &setup.operator_token());
    let t = Instant::now();
    let out = ok(&b.nhictl(
        &[
            "node",
            "revoke",
            "node-a",
            "--openbao-token-file",
            op.to_str().unwrap(),
        ],
        b"",
    ));
    assert!(out.contains("node node-a: cut off"), "{out}");
    assert_eq!(
        validate(beta.pid(), &token, "svc"),
        403,
        "refused at once on the node that ran the command"
    );
    assert!(
        eventually(Duration::from_secs(2), || validate(
            gamma.pid(),
            &token,
            "svc"
        ) == 403),
        "node C still accepts node A's JWT-SVID 2 s after the revocation"
    );
    eprintln!("node C refused node A's JWT-SVID after {:?}", t.elapsed());
    let jwks = gamma.get("/v1/jwks").unwrap();
    assert!(
        !jwks.contains(&kid),
        "node A's key still served by C: {jwks}"
    );
    assert!(gamma.get("/v1/jwks").unwrap().contains("\"keys\""));
    // OpenBao itself refuses node A: a new workload there gets no X.509-SVID.
    let delta = a.named_container("delta");
    let (code, body) = http_in_netns(delta.pid(), "GET", "/v1/x509");
    assert_eq!(code, 403, "{body}");
    assert!(
        body.contains("permission denied"),
        "OpenBao's reason: {body}"
    );
    eprintln!("node A's new workload after the revocation: {code} {body}");
    // Audited where it was done and where it was learnt; status says it.
    assert!(audited_node(&b, "node-a", "deny"));
    assert!(eventually(Duration::from_secs(2), || audited_node(
        &c, "node-a", "deny"
    )));
    assert!(ok(&c.nhictl(&["status"], b"")).contains("nodes cut off: node-a"));
    // A node cannot do this itself: with its own OpenBao token (a compromised node has it),
    // OpenBao refuses both steps; node C stays in.
    let login = setup.node("node-b");
    let own = nhi_integration::bao::BaoApi::new(&dev.addr, None, None).must(
        "POST",
        &format!("auth/{}/login", nhi_integration::bao::NODES_APPROLE_MOUNT),
        Some(serde_json::json!({
            "role_id": login.role_id,
            "secret_id": fs::read_to_string(&login.secret_id_file).unwrap(),
        })),
    )["auth"]["client_token"]
        .as_str()
        .unwrap()
        .to_string();
    let node_token = node_path_write(&b, "not-an-operator", &own);
    let out = b.nhictl(
        &[
            "node",
            "revoke",
            "node-c",
            "--openbao-token-file",
            node_token.to_str().unwrap(),
        ],
        b"",
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("permission denied"),
        "{out:?}"
    );
    let status = ok(&c.nhictl(&["status"], b""));
    assert!(
        status.lines().any(|l| l == "nodes cut off: node-a"),
        "{status}"
    );
    assert!(
        gamma.get("/v1/x509").is_ok(),
        "node C still served by OpenBao"
    );

    // Taken back: OpenBao serves A again and C accepts A's JWT-SVIDs again.
    ok(&c.nhictl(
        &[
            "node",
            "revoke",
            "node-a",
            "--undo",
            "--openbao-token-file",
            node_path_write(&c, "operator-token", &setup.operator_token())
                .to_str()
                .unwrap(),
        ],
        b"",
    ));
    assert!(
        eventually(Duration::from_secs(5), || validate(
            beta.pid(),
            &token,
            "svc"
        ) == 200
            && validate(gamma.pid(), &token, "svc") == 200),
        "node A's JWT-SVID not accepted again after --undo"
    );
    assert!(
        eventually(Duration::from_secs(5), || delta.get("/v1/x509").is_ok()),
        "node A still refused by OpenBao after --undo: {}",
        a.log()
    );
    assert!(audited_node(&c, "node-a", "allow"));
    assert!(eventually(Duration::from_secs(2), || audited_node(
        &b, "node-a", "allow"
    )));
    for x in [alpha, beta, gamma, delta] {
        x.delete();
    }

    // A node cut off before it ever ran: its first login is refused by OpenBao, and nhid does
    // not start.
    let mut z = Node::with_config(&rules(), &bao_config("node-z", &addrs, &setup, "6s"));
    let op = node_path_write(&b, "operator-token", &setup.operator_token());
    let out = ok(&b.nhictl(
        &[
            "node",
            "revoke",
            "node-z",
            "--openbao-token-file",
            op.to_str().unwrap(),
        ],
        b"",
    ));
    assert!(out.contains("node node-z: cut off"), "{out}");
    let e = z
        .try_start()
        .expect_err("a node cut off before its first start");
    eprintln!("node cut off before its first start: {e}");
}

/// A node's JWT-SVID keys rotate (`issuer.jwt_key_rotation`, issue 17) with no token failing
/// anywhere: the next key is published before it signs (node B accepts the first token it
/// signs), the previous one stays while its tokens live, and every `kid` names its node.
#[test]
fn node_jwt_keys_rotate_without_a_token_failing_on_another_node() {
    let dev = BaoDev::start();
    let setup = dev.setup_nhi(TRUST_DOMAIN, &NhiRoleOptions::default());
    let addrs = vec![dev.addr.clone()];
    let rotating = bao_config("node-a", &addrs, &setup, "6s").replacen(
        "[issuer]\n",
        "[issuer]\njwt_key_rotation = \"10s\"\njwt_ttl = \"30s\"\n",
        1,
    );
    let mut a = Node::with_config(&rules(), &rotating);
    a.start();
    let b = bao_node("node-b", &addrs, &setup);
    let alpha = a.named_container("alpha");
    let beta = b.named_container("beta");
    let first = alpha.get_json("/v1/token?audience=aud-0")["token"]
        .as_str()
        .unwrap()
        .to_string();
    let first_kid = kid_of(&first);
    assert!(first_kid.starts_with("node-a:"), "{first_kid}");
    assert!(eventually(Duration::from_secs(5), || validate(
        beta.pid(),
        &first,
        "aud-0"
    ) == 200));
    // Fresh tokens (a new audience each: nhid signs each) checked on node B at once, across
    // the rotation.
    let t = Instant::now();
    let mut kids = vec![first_kid.clone()];
    let mut after_switch = 0;
    let mut i = 1;
    while after_switch < 5 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no rotation within 30 s: {kids:?}\n{}",
            a.log()
        );
        let aud = format!("aud-{i}");
        i += 1;
        let token = alpha.get_json(&format!("/v1/token?audience={aud}"))["token"]
            .as_str()
            .unwrap()
            .to_string();
        let kid = kid_of(&token);
        assert_eq!(
            validate(beta.pid(), &token, &aud),
            200,
            "node B refused a token of node A's key {kid} (keys seen: {kids:?})"
        );
        if !kids.contains(&kid) {
            eprintln!("node A signs with {kid} after {:?}", t.elapsed());
            kids.push(kid);
        } else if kids.len() > 1 {
            after_switch += 1;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(kids.iter().all(|k| k.starts_with("node-a:")), "{kids:?}");
    // The token of the previous key still validates everywhere while it lives.
    assert_eq!(validate(beta.pid(), &first, "aud-0"), 200);
    assert_eq!(validate(alpha.pid(), &first, "aud-0"), 200);
    let served = beta.get("/v1/jwks").unwrap();
    assert!(
        served.contains(&first_kid) && served.contains(&kids[1]),
        "{served}"
    );
    alpha.delete();
    beta.delete();
}

/// A CA rotation in OpenBao (its own multi-issuer primitives; issue 17) under continuous
/// verification by py-spiffe: the new issuer is in every node's bundle within a poll of its
/// creation, before it is made the default and signs anything; SVIDs move to it at renewal
/// with not one verification failing; a deleted old issuer leaves the bundle.
#[test]
fn an_openbao_ca_rotation_reaches_every_bundle_before_it_signs() {
    let dev = BaoDev::start();
    let setup = dev.setup_nhi(TRUST_DOMAIN, &NhiRoleOptions::default());
    let root = dev.root();
    let config = bao_config("node-a", std::slice::from_ref(&dev.addr), &setup, "6s").replacen(
        "[issuer]\n",
        "[issuer]\nx509_ttl = \"10s\"\n",
        1,
    );
    let mut a = Node::with_config(&rules(), &config);
    a.start();
    let alpha = a.named_container("alpha");
    let beta = a.named_container("beta");
    let socket = |c: &Container| a.path("containers").join(&c.id).join("workload.sock");
    let old = root.must("LIST", "pki/issuers", None)["data"]["keys"][0]
        .as_str()
        .unwrap()
        .to_string();
    let certs = |c: &Container| pem_certs(&c.get("/v1/bundle").unwrap()).len();
    assert_eq!(certs(&alpha), 1);
    let verifier = nhi_integration::py::ca_rotation_verifier(
        &socket(&alpha),
        &socket(&beta),
        TRUST_DOMAIN,
        25,
    );
    std::thread::sleep(Duration::from_secs(3));
    // 1. A new root issuer, not the default: it signs nothing yet.
    root.must(
        "POST",
        "pki/root/rotate/internal",
        Some(serde_json::json!({
            "common_name": format!("nhi {TRUST_DOMAIN} root CA 2"),
            "uri_sans": format!("spiffe://{TRUST_DOMAIN}"),
            "exclude_cn_from_sans": true,
            "key_type": "ec",
            "key_bits": 256,
            "ttl": "87600h",
            "issuer_name": "next",
        })),
    );
    let t = Instant::now();
    assert!(
        eventually(Duration::from_secs(2), || certs(&alpha) == 2
            && certs(&beta) == 2),
        "the new issuer is not in the bundles within 2 s: {}",
        a.log()
    );
    eprintln!("new issuer in every bundle after {:?}", t.elapsed());
    // 2. Once every workload has it (two polls here), it becomes the default and signs.
    std::thread::sleep(Duration::from_secs(3));
    root.must(
        "POST",
        "pki/root/replace",
        Some(serde_json::json!({"default": "next"})),
    );
    let got = nhi_integration::py::json_of(&verifier.wait_with_output().unwrap());
    eprintln!("OpenBao CA rotation under py-spiffe verification: {got}");
    assert!(got["checks"].as_u64().unwrap() > 200, "{got}");
    assert_eq!(got["failures"], 0, "{got}");
    assert_eq!(got["signers"].as_array().unwrap().len(), 2, "{got}");
    // 3. After the old issuer's last SVID expired, the operator deletes it: it leaves the
    // bundles within a poll.
    root.must("DELETE", &format!("pki/issuer/{old}"), None);
    assert!(
        eventually(Duration::from_secs(3), || certs(&alpha) == 1),
        "the deleted issuer is still in the bundle"
    );
    chains_to(
        &alpha.get("/v1/x509").unwrap(),
        &alpha.get("/v1/bundle").unwrap(),
    )
    .expect("the SVID chains to the new issuer alone");
    alpha.delete();
    beta.delete();
}
