use super::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn answer(code: u16, body: &str) -> Answer {
    Answer {
        address: "https://bao-1:8200".into(),
        status: StatusCode::from_u16(code).unwrap(),
        body: Zeroizing::new(body.as_bytes().to_vec()),
    }
}

#[test]
fn kv_paths() {
    assert_eq!(
        kv_api_path("secret", "data", "nhi", "secrets/db", false).unwrap(),
        "secret/data/nhi/secrets/db"
    );
    assert_eq!(
        kv_api_path("secret", "metadata", "nhi", "/nodes/n-1/", true).unwrap(),
        "secret/metadata/nhi/nodes/n-1/"
    );
    assert_eq!(
        kv_api_path("kv", "metadata", "a/b", "", true).unwrap(),
        "kv/metadata/a/b/"
    );
    assert_eq!(
        kv_api_path("secret", "data", "nhi", "secrets/a b?x=1#y%", false).unwrap(),
        "secret/data/nhi/secrets/a%20b%3Fx%3D1%23y%25"
    );
    for bad in ["", "/", "a//b", "a/../b", "./a", "..", "a/."] {
        assert!(
            matches!(
                kv_api_path("secret", "data", "nhi", bad, false),
                Err(BaoError::Invalid(_))
            ),
            "{bad:?}"
        );
    }
}

#[test]
fn failover_starts_at_current_and_wraps() {
    assert_eq!(failover_order(0, 3).collect::<Vec<_>>(), [0, 1, 2]);
    assert_eq!(failover_order(2, 3).collect::<Vec<_>>(), [2, 0, 1]);
    assert_eq!(failover_order(0, 1).collect::<Vec<_>>(), [0]);
}

#[test]
fn which_answers_move_to_the_next_address() {
    for code in [500, 502, 503, 504, 429, 307, 301] {
        assert_eq!(
            classify(StatusCode::from_u16(code).unwrap(), b""),
            Verdict::TryNext,
            "{code}"
        );
    }
    for code in [200, 204, 400, 403, 404, 405, 412] {
        assert_eq!(
            classify(StatusCode::from_u16(code).unwrap(), b"{}"),
            Verdict::Final,
            "{code}"
        );
    }
    let upgrading = br#"{"errors":["Waiting for the primary to upgrade from non-versioned to versioned data. This backend will be unavailable for a brief period and will resume service when the primary is finished."]}"#;
    assert_eq!(
        classify(StatusCode::BAD_REQUEST, upgrading),
        Verdict::TryNext
    );
    assert_eq!(
        classify(
            StatusCode::BAD_REQUEST,
            br#"{"errors":["check-and-set parameter did not match"]}"#
        ),
        Verdict::Final
    );
    assert_eq!(
        describe_status(
            StatusCode::SERVICE_UNAVAILABLE,
            br#"{"errors":["Vault is sealed"]}"#
        ),
        "HTTP 503: Vault is sealed"
    );
    assert_eq!(
        describe_status(StatusCode::TOO_MANY_REQUESTS, b""),
        "HTTP 429"
    );
}

#[test]
fn errors_name_address_path_and_openbao_messages() {
    let e = check(
        answer(403, r#"{"errors":["permission denied"]}"#),
        "secret/data/nhi/x",
    )
    .err()
    .unwrap();
    assert!(matches!(e, BaoError::Denied { .. }));
    assert_eq!(
        e.to_string(),
        "OpenBao at https://bao-1:8200 denied secret/data/nhi/x (403 permission denied): permission denied"
    );
    let e = check(
        answer(400, r#"{"errors":["a","b"]}"#),
        "pki/root/sign-intermediate",
    )
    .err()
    .unwrap();
    assert!(matches!(e, BaoError::Status { code: 400, .. }));
    assert_eq!(
        e.to_string(),
        "OpenBao at https://bao-1:8200: pki/root/sign-intermediate: HTTP 400: a; b"
    );
    let e = check(answer(500, "<html>"), "x").err().unwrap();
    assert_eq!(e.to_string(), "OpenBao at https://bao-1:8200: x: HTTP 500");
    assert!(check(answer(204, ""), "x").is_ok());
    let e = BaoError::Unreachable {
        path: "secret/data/nhi/x".into(),
        tried: vec![
            "http://a (connection failed)".into(),
            "http://b (HTTP 503)".into(),
        ],
    };
    assert_eq!(
        e.to_string(),
        "OpenBao unreachable for secret/data/nhi/x: tried http://a (connection failed); http://b (HTTP 503)"
    );
}

#[test]
fn decode_errors_never_quote_the_body() {
    let secret = "s.VERYSECRETTOKEN";
    let ans = answer(
        200,
        &format!(r#"{{"auth":{{"client_token":"{secret}","lease_duration":"{secret}"}}}}"#),
    );
    let e = parse_auth(&ans, "auth/approle/login", Instant::now())
        .err()
        .unwrap();
    let msg = format!("{e} {e:?}");
    assert!(!msg.contains("VERYSECRET"), "{msg}");
    assert!(msg.contains("wrong shape"), "{msg}");
    let e = decode::<Value>(&answer(200, &format!("{{\"x\": {secret}")), "p")
        .err()
        .unwrap();
    assert!(!e.to_string().contains("VERYSECRET"), "{e}");
}

#[test]
fn auth_and_lookup_answers() {
    let now = Instant::now();
    let (tok, t, exp) = parse_auth(
        &answer(
            200,
            r#"{"auth":{"client_token":"s.abc","lease_duration":30,"renewable":true,"policies":["x"]}}"#,
        ),
        "auth/approle/login",
        now,
    )
    .unwrap();
    assert_eq!(&*tok, "s.abc");
    assert_eq!(t.lease, Duration::from_secs(30));
    assert!(t.renewable && !t.capped);
    assert!(exp.is_some());
    let (t, exp) = parse_lookup(
        &answer(200, r#"{"data":{"id":"root","ttl":0,"renewable":false}}"#),
        "auth/token/lookup-self",
        now,
    )
    .unwrap();
    assert!(t.lease.is_zero() && exp.is_none());
    assert!(parse_auth(&answer(200, r#"{"auth":null}"#), "x", now).is_err());
}

#[test]
fn renewal_plan() {
    let t0 = Instant::now();
    let t = LeaseTimes {
        obtained: t0,
        lease: Duration::from_secs(30),
        renewable: true,
        capped: false,
    };
    assert_eq!(
        plan(&t, t0),
        Some((Action::Renew, t0 + Duration::from_secs(20)))
    );
    let capped = LeaseTimes { capped: true, ..t };
    assert_eq!(
        plan(&capped, t0),
        Some((Action::Relogin, t0 + Duration::from_secs(20)))
    );
    let fixed = LeaseTimes {
        renewable: false,
        ..t
    };
    assert_eq!(plan(&fixed, t0).unwrap().0, Action::Relogin);
    // Expired (e.g. after a suspend): log in now.
    let late = t0 + Duration::from_secs(31);
    assert_eq!(plan(&t, late), Some((Action::Relogin, late)));
    // A token that never expires needs nothing.
    let forever = LeaseTimes {
        lease: Duration::ZERO,
        ..t
    };
    assert_eq!(plan(&forever, t0), None);
    // Tiny TTLs never make the loop spin faster than MIN_STEP (or half the TTL).
    let tiny = LeaseTimes {
        lease: Duration::from_millis(600),
        ..t
    };
    assert_eq!(plan(&tiny, t0).unwrap().1, t0 + Duration::from_millis(400));
    let short = LeaseTimes {
        lease: Duration::from_millis(1200),
        ..t
    };
    assert_eq!(plan(&short, t0).unwrap().1, t0 + Duration::from_millis(800));
    let s3 = LeaseTimes {
        lease: Duration::from_secs(3),
        ..t
    };
    assert_eq!(plan(&s3, t0).unwrap().1, t0 + Duration::from_secs(2));

    let first = Duration::from_secs(30);
    assert!(!is_capped(first, Duration::from_secs(30)));
    assert!(!is_capped(first, Duration::from_millis(29_500)));
    assert!(!is_capped(
        Duration::from_secs(10),
        Duration::from_secs(3600)
    ));
    assert!(is_capped(first, Duration::from_secs(12)));
}

#[test]
fn backoff_grows_with_jitter_and_is_capped() {
    assert_eq!(backoff(1, 0.0), Duration::from_millis(250));
    assert_eq!(backoff(1, 0.999_999).as_millis(), 499);
    assert_eq!(backoff(3, 0.0), Duration::from_secs(1));
    assert_eq!(backoff(30, 0.0), BACKOFF_MAX / 2);
    assert!(backoff(30, 1.0) <= BACKOFF_MAX);
    assert_eq!(round_pause(1), Duration::from_millis(100));
    assert_eq!(round_pause(2), Duration::from_millis(200));
    assert_eq!(round_pause(20), ROUND_PAUSE_MAX);
}

#[test]
fn kv_secret_debug_hides_values() {
    let mut data = Map::new();
    data.insert("password".into(), Value::String("hunter2-secret".into()));
    let s = KvSecret {
        data,
        version: 3,
        created_time: "t".into(),
    };
    let d = format!("{s:?}");
    assert!(d.contains("password") && d.contains('3'), "{d}");
    assert!(!d.contains("hunter2"), "{d}");
}

#[test]
fn secret_files_are_trimmed_and_must_not_be_empty() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sid");
    std::fs::write(&p, "  abc-123\n").unwrap();
    assert_eq!(&*read_secret_file(&p).unwrap(), "abc-123");
    std::fs::write(&p, "\n").unwrap();
    let e = read_secret_file(&p).unwrap_err().to_string();
    assert!(e.contains("empty") && e.contains("sid"), "{e}");
    let e = read_secret_file(&dir.path().join("missing")).unwrap_err();
    assert!(matches!(e, BaoError::Io { .. }));
}

/// A one-shot HTTP server on loopback: answers every request with `status` and `body`,
/// counting requests.
async fn fake(status: u16, body: &'static str) -> (String, Arc<AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = format!("http://{}", l.local_addr().unwrap());
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let h = h.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                h.fetch_add(1, Ordering::SeqCst);
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    (addr, hits)
}

fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    a
}

fn inner_for(addresses: Vec<String>, timeout: Duration) -> Inner {
    Inner {
        http: reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .timeout(timeout)
            .build()
            .unwrap(),
        addresses,
        current: AtomicUsize::new(0),
        namespace: None,
        auth: OpenBaoAuth::AppRole {
            role_id: "role-id-value".into(),
            secret_id_file: "/nonexistent".into(),
            mount: "approle".into(),
        },
        kv_mount: "secret".into(),
        kv_prefix: "nhi".into(),
        pki_mount: "pki".into(),
        request_timeout: timeout,
        session: RwLock::new(Some(Session {
            token: Zeroizing::new("s.TOPSECRETTOKEN".into()),
            generation: 1,
            times: LeaseTimes {
                obtained: Instant::now(),
                lease: Duration::from_secs(60),
                renewable: true,
                capped: false,
            },
            first_lease: Duration::from_secs(60),
            expires_at: None,
        })),
        login_lock: tokio::sync::Mutex::new(()),
        status: Mutex::new(Status::default()),
        renewer: Mutex::new(None),
    }
}

#[tokio::test]
async fn fails_over_in_order_and_remembers_the_address_that_answered() {
    let down = closed_port();
    let (sealed, sealed_hits) = fake(503, r#"{"errors":["Vault is sealed"]}"#).await;
    let (active, active_hits) = fake(200, r#"{"data":{"keys":["a","b/"]}}"#).await;
    let inner = inner_for(
        vec![down.clone(), sealed.clone(), active.clone()],
        Duration::from_secs(2),
    );
    let bao = Bao {
        inner: Arc::new(inner),
    };
    assert_eq!(bao.kv_list("nodes").await.unwrap(), ["a", "b/"]);
    assert_eq!(sealed_hits.load(Ordering::SeqCst), 1);
    assert_eq!(bao.health().address, active);
    // The next request goes straight to the address that worked.
    bao.kv_list("nodes").await.unwrap();
    assert_eq!(sealed_hits.load(Ordering::SeqCst), 1, "one health probe");
    assert_eq!(active_hits.load(Ordering::SeqCst), 3, "probe + 2 requests");
    let dbg = format!("{bao:?}");
    assert!(
        !dbg.contains("TOPSECRET") && !dbg.contains("role-id-value"),
        "{dbg}"
    );
    assert!(dbg.contains("<redacted>"), "{dbg}");
}

#[tokio::test]
async fn unreachable_lists_every_address_and_reason() {
    let down = closed_port();
    let (sealed, _) = fake(503, r#"{"errors":["Vault is sealed"]}"#).await;
    let bao = Bao {
        inner: Arc::new(inner_for(
            vec![down.clone(), sealed.clone()],
            Duration::from_millis(300),
        )),
    };
    let t = Instant::now();
    let e = bao.kv_read("secrets/x").await.unwrap_err();
    // Bounded by request_timeout × addresses (plus one pass).
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let msg = e.to_string();
    assert!(matches!(e, BaoError::Unreachable { .. }), "{msg}");
    assert!(msg.contains("secret/data/nhi/secrets/x"), "{msg}");
    assert!(msg.contains(&format!("{down} (connection failed")), "{msg}");
    assert!(msg.contains(&format!("{sealed} (sealed)")), "{msg}");
    assert!(!msg.contains("TOPSECRET"), "{msg}");
}

#[tokio::test]
async fn a_stalled_node_costs_at_most_request_timeout() {
    // Accepts connections but never answers, like a SIGSTOPped leader.
    let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stalled_addr = format!("http://{}", stalled.local_addr().unwrap());
    let (active, _) = fake(200, r#"{"data":{"current_version":4,"updated_time":"t"}}"#).await;
    let bao = Bao {
        inner: Arc::new(inner_for(
            vec![stalled_addr, active.clone()],
            Duration::from_millis(400),
        )),
    };
    let t = Instant::now();
    let m = bao.kv_metadata("secrets/x").await.unwrap().unwrap();
    assert_eq!(m.current_version, 4);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(bao.health().address, active);
}

#[tokio::test]
async fn a_workload_logs_in_with_its_own_proof_and_its_token_stays_out_of_debug() {
    let (addr, hits) = fake(
        200,
        r#"{"auth":{"client_token":"s.WORKLOADTOKEN0123456789ab","lease_duration":300,"renewable":true}}"#,
    )
    .await;
    let bao = Bao {
        inner: Arc::new(inner_for(vec![addr], Duration::from_secs(2))),
    };
    let t = bao
        .login_jwt("nhi-k8s", "nhi-workload", "a.b.c")
        .await
        .unwrap();
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let shown = format!("{t:?}");
    assert!(
        !shown.contains("WORKLOADTOKEN") && shown.contains("redacted"),
        "{shown}"
    );
    let now = nhi_core::clock::now_unix();
    assert!(t
        .expires_at
        .is_some_and(|e| e >= now + 290 && e <= now + 310));

    // OpenBao's refusal of a proof comes back with its reason, never the token sent.
    let (addr, _) = fake(
        400,
        r#"{"errors":["error validating token: invalid audience (aud) claim"]}"#,
    )
    .await;
    let bao = Bao {
        inner: Arc::new(inner_for(vec![addr], Duration::from_secs(2))),
    };
    let e = bao
        .login_jwt("nhi-k8s", "nhi-workload", "eyJ.secret-jwt.sig")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("invalid audience") && e.contains("auth/nhi-k8s/login"),
        "{e}"
    );
    assert!(!e.contains("secret-jwt"), "{e}");
}

#[tokio::test]
async fn a_signed_leaf_is_decoded_and_a_refused_uri_san_names_the_reason() {
    let (addr, _) = fake(
        200,
        r#"{"data":{"certificate":"-----BEGIN CERTIFICATE-----\nA\n-----END CERTIFICATE-----\n","issuing_ca":"CA","ca_chain":["CA"],"serial_number":"3a:01","expiration":1900000000}}"#,
    )
    .await;
    let bao = Bao {
        inner: Arc::new(inner_for(vec![addr], Duration::from_secs(2))),
    };
    let token = WorkloadToken {
        token: Zeroizing::new("s.T".into()),
        expires_at: None,
    };
    let leaf = bao
        .pki_sign(
            &token,
            "nhi-workload",
            "CSR",
            "spiffe://td/ns/a/sa/b",
            Duration::from_secs(600),
        )
        .await
        .unwrap();
    assert_eq!(
        (leaf.serial_number.as_str(), leaf.expiration),
        ("3a:01", 1900000000)
    );
    let (addr, _) = fake(
        400,
        r#"{"errors":["URI Subject Alternative Name spiffe://td/ns/a/sa/admin not allowed by this role"]}"#,
    )
    .await;
    let bao = Bao {
        inner: Arc::new(inner_for(vec![addr], Duration::from_secs(2))),
    };
    let e = bao
        .pki_sign(
            &token,
            "nhi-workload",
            "CSR",
            "spiffe://td/ns/a/sa/admin",
            Duration::from_secs(600),
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("not allowed by this role") && e.contains("pki/sign/nhi-workload"),
        "{e}"
    );
}
