//! Zero-code mutual TLS between workloads (issue 18), on real containers in separate network
//! namespaces joined by veth pairs: the caller's companion originates TLS 1.3 with its
//! X.509-SVID, the callee's companion terminates it and checks the caller's SPIFFE ID against
//! its inbound rule, for a plain TCP echo service the apps know nothing about. The wire carries
//! TLS records only (captured with tcpdump); an identity the rule does not allow and plaintext
//! (strict) are refused; permissive lets plaintext through, audited as unauthenticated.

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nhi_integration::edge::{
    container_ns, echo_server, greeting_server, h2c_request, h2c_server, http, http_server,
    link_containers, listen_in, peer, tcp_echo, upgrade_echo, upgrade_server,
};
use nhi_integration::*;

const POLICY: &str = r#"
[[policy]]
id = "db"
spiffe_ids = ["spiffe://example.org/container/mtls-db"]
default = "allow"
[[policy.inbound]]
id = "callers"
ports = [7000]
allow = ["spiffe://example.org/container/mtls-web"]
mtls = "strict"
# A byte protocol whose clients may send a bare word and wait: relayed at once, never sniffed.
app_protocol = "tcp"
[[policy.inbound]]
id = "web-api"
ports = [7002, 7003, 7005, 7006]
allow = ["spiffe://example.org/container/mtls-web"]
mtls = "strict"
[[policy.inbound]]
id = "migrating"
ports = [7001, 7004]
allow = ["spiffe://example.org/container/mtls-web"]
mtls = "permissive"

[[policy]]
id = "callers"
spiffe_ids = ["spiffe://example.org/container/mtls-web", "spiffe://example.org/container/mtls-other"]
default = "deny"
[[policy.egress]]
id = "to-db"
cidr = ["10.78.0.2/32", "10.79.0.2/32"]
ports = [7000, 7002, 7003, 7005, 7006]
mtls = { peer = "spiffe://example.org/container/mtls-db" }
"#;

/// tcpdump on `dev` inside the namespace of `pid`, writing the raw packets to `file`.
fn capture(pid: i32, dev: &str, file: &Path) -> Child {
    let child = Command::new("nsenter")
        .args([
            "-t",
            &pid.to_string(),
            "-n",
            "tcpdump",
            "-i",
            dev,
            "-U",
            "-c",
            "10",
            "-w",
        ])
        .arg(file)
        .args(["tcp"])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(file.with_extension("log")).unwrap())
        .spawn()
        .expect("tcpdump");
    // Until it has opened the device.
    assert!(eventually(Duration::from_secs(5), || file.exists()));
    std::thread::sleep(Duration::from_millis(300));
    child
}

/// Waits for tcpdump to have its packets (`-c`), at most 5 s.
fn stop(mut c: Child) {
    let done = eventually(Duration::from_secs(5), || {
        matches!(c.try_wait(), Ok(Some(_)))
    });
    if !done {
        let _ = c.kill();
        let _ = c.wait();
    }
}

/// Audit records of `node` whose JSON contains every one of `needles`.
fn audited(node: &Node, needles: &[&str]) -> usize {
    node.audit_records()
        .iter()
        .filter(|r| {
            let s = r.to_string();
            needles.iter().all(|n| s.contains(n))
        })
        .count()
}

type Rogue = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// A TLS 1.3 client outside nhi presenting `cert_der`/`key_der` (any server accepted), from
/// inside `ns`: whether it got an echo back.
fn rogue_tls(ns: &Path, addr: SocketAddr, cert_der: Vec<u8>, key_der: Vec<u8>) -> bool {
    rogue_connect(ns, addr, cert_der, key_der, b"nhi-mtls/2")
        .is_some_and(|mut s| rogue_echo(&mut s))
}

/// Speaks the companions' protocol on `s` as a caller's companion would (preface, one frame),
/// whether the 5 bytes came back.
fn rogue_echo(s: &mut Rogue) -> bool {
    use std::io::{Read, Write};
    let mut msg = b"NHI1".to_vec();
    msg.extend_from_slice(&5u32.to_be_bytes());
    msg.extend_from_slice(b"rogue");
    if s.write_all(&msg).is_err() || s.flush().is_err() {
        return false;
    }
    let mut buf = [0u8; 9];
    s.read_exact(&mut buf).is_ok() && buf == *b"\0\0\0\x05rogue"
}

/// A TLS 1.3 connection from inside `ns` presenting `cert_der`/`key_der`, its handshake done
/// (on the client's side: a callee that refuses the certificate says so at the next read).
fn rogue_connect(
    ns: &Path,
    addr: SocketAddr,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
    alpn: &'static [u8],
) -> Option<Rogue> {
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    #[derive(Debug)]
    struct Any;
    impl ServerCertVerifier for Any {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            Ok(HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::ring::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    nhi_integration::edge::in_netns(ns, move || {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(Any))
            .with_client_auth_cert(
                vec![CertificateDer::from(cert_der)],
                PrivateKeyDer::Pkcs8(key_der.into()),
            )
            .unwrap();
        cfg.alpn_protocols = vec![alpn.to_vec()];
        let name = ServerName::try_from("nhi.invalid").unwrap();
        let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
        let mut tcp = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut conn = conn;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp).ok()?;
        }
        Some(rustls::StreamOwned::new(conn, tcp))
    })
}

/// Asserts that the application saw exactly one caller identity in `head`: the one the
/// callee's companion verified (mtls-web), whatever the caller sent.
fn assert_verified_caller(head: &str) {
    assert_eq!(
        peer_headers(head),
        ["x-nhi-peer-spiffe-id: spiffe://example.org/container/mtls-web"],
        "{head}"
    );
}

/// The `x-nhi-peer-spiffe-id` lines of a request head.
fn peer_headers(head: &str) -> Vec<&str> {
    head.lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-nhi-peer-spiffe-id:"))
        .collect()
}

/// A certificate for `id` signed by a CA of its own (not in any nhi bundle), valid or expired.
fn foreign_svid(id: &str, expired: bool) -> (Vec<u8>, Vec<u8>) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.try_into().unwrap())];
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    if expired {
        p.not_after = rcgen::date_time_ymd(2020, 1, 1);
        p.not_before = rcgen::date_time_ymd(2019, 1, 1);
    }
    let cert = p.signed_by(&key, &issuer).unwrap();
    (cert.der().to_vec(), key.serialize_der())
}

#[test]
fn mutual_tls_between_two_workloads_for_any_tcp_protocol() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut node = Node::with_config(
        ANNOTATED_RULE,
        // (A connection without a first request lives 30 s: one is held across a revocation.)
        &format!(
            "[metrics]\nlisten = \"127.0.0.1:{port}\"\n[companion.limits]\nheader_timeout = \"30s\"\n"
        ),
    );
    node.append_config(POLICY);
    node.start();
    let db = node.named_container("mtls-db");
    let web = node.named_container("mtls-web");
    let other = node.named_container("mtls-other");
    let tag = unique_id("m").replace('-', "");
    let tag = &tag[tag.len().saturating_sub(6)..];
    link_containers(&format!("w{tag}"), 78, web.pid(), db.pid());
    link_containers(&format!("o{tag}"), 79, other.pid(), db.pid());
    // The callee's application: a TCP echo service on loopback, knowing nothing of TLS.
    let served = echo_server(listen_in(
        &container_ns(db.pid()),
        "127.0.0.1:7000".parse().unwrap(),
    ));
    let _permissive = echo_server(listen_in(
        &container_ns(db.pid()),
        "127.0.0.1:7001".parse().unwrap(),
    ));
    let to_db: SocketAddr = "10.78.0.2:7000".parse().unwrap();

    // The caller's application speaks plain TCP; the wire between the two namespaces carries
    // TLS records only.
    let pcap = node.path("wire.pcap");
    let dump = capture(web.pid(), &format!("w{tag}a"), &pcap);
    let secret = "payload-that-must-never-cross-in-plaintext";
    let got = tcp_echo(&container_ns(web.pid()), to_db, secret);
    stop(dump);
    assert_eq!(got.as_deref(), Ok(secret), "{}", node.log());
    assert_eq!(served.connections(), 1);
    let wire = std::fs::read(&pcap).unwrap();
    assert!(
        wire.len() > 200,
        "nothing captured: {}",
        std::fs::read_to_string(pcap.with_extension("log")).unwrap_or_default()
    );
    assert!(
        !wire.windows(secret.len()).any(|w| w == secret.as_bytes()),
        "plaintext payload on the wire"
    );
    // TLS 1.3 application data records (type 23, legacy version 3.3).
    assert!(
        wire.windows(3).any(|w| w == [0x17, 0x03, 0x03]),
        "no TLS records on the wire"
    );
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &[
            "\"inbound\"",
            "mtls peer=spiffe://example.org/container/mtls-web"
        ]
    ) == 1));
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &[
            "\"connection\"",
            "mtls peer=spiffe://example.org/container/mtls-db"
        ]
    ) == 1));

    // An HTTP callee learns who calls from the header its companion sets; a value the caller
    // sends itself never arrives.
    let api = http_server(listen_in(
        &container_ns(db.pid()),
        "127.0.0.1:7002".parse().unwrap(),
    ));
    // Whatever the method (WebDAV's PROPFIND is outside the common nine) and however the
    // header is spelled (`_` for `-`: CGI-style servers read both as one).
    for method in ["GET", "PROPFIND"] {
        let (status, body) = http(
            &container_ns(web.pid()),
            "10.78.0.2:7002".parse().unwrap(),
            method,
            "/whoami",
            &[
                (
                    "x-nhi-peer-spiffe-id",
                    "spiffe://example.org/container/forged",
                ),
                (
                    "X_Nhi_Peer_Spiffe_Id",
                    "spiffe://example.org/container/forged",
                ),
            ],
        )
        .unwrap();
        assert_eq!((status, body.as_str()), (200, "ok"), "{method}");
    }
    let heads = api.requests();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        assert_verified_caller(head);
        assert!(!head.contains("forged"), "{head}");
    }
    // The same request split over two writes (a first byte, a pause): still seen as HTTP, so
    // the forged header never reaches the application. Also a method outside the common nine,
    // its line split past the 500 ms the callee waits for it (old code relayed that one as
    // bytes, the forged header included).
    let to_api: SocketAddr = "10.78.0.2:7002".parse().unwrap();
    // And a caller silent past that wait before its request, and a method longer than any
    // registered one (Go's server takes any token).
    let long = "A".repeat(40);
    for (first, pause, rest, line) in [
        ("G".to_string(), 200, "ET /split", "GET /split".to_string()),
        ("PROPFIND".into(), 800, " /late", "PROPFIND /late".into()),
        (String::new(), 800, "GET /silent", "GET /silent".into()),
        (long.clone(), 0, " /long", format!("{long} /long")),
    ] {
        let answer = nhi_integration::edge::in_netns(&container_ns(web.pid()), move || {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect_timeout(&to_api, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(first.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(pause));
            s.write_all(rest.as_bytes()).unwrap();
            s.write_all(
                b" HTTP/1.1\r\nHost: db\r\nx-nhi-peer-spiffe-id: spiffe://example.org/container/forged\r\nConnection: close\r\n\r\n",
            )
            .unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        });
        assert!(answer.starts_with("HTTP/1.1 200"), "{line}: {answer}");
        let heads = api.requests();
        let split = heads
            .iter()
            .find(|h| h.starts_with(&line))
            .expect("delivered");
        assert_verified_caller(split);
    }

    // HTTP/2 with prior knowledge (h2c: gRPC without TLS) is served stream by stream the same
    // way: the verified caller in the header, the caller's own values removed, the trailers
    // (gRPC's status) passed through. Relayed as opaque bytes, the forged values would arrive.
    let grpc = h2c_server(listen_in(
        &container_ns(db.pid()),
        "127.0.0.1:7003".parse().unwrap(),
    ));
    let forged = [
        (
            "x-nhi-peer-spiffe-id",
            "spiffe://example.org/container/forged",
        ),
        (
            "X-Nhi-Peer-Spiffe-Id",
            "spiffe://example.org/container/forged-too",
        ),
    ];
    let to_grpc: SocketAddr = "10.78.0.2:7003".parse().unwrap();
    for call in [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
    ] {
        let got = h2c_request(&container_ns(web.pid()), to_grpc, call, &forged);
        assert_eq!(
            got,
            Ok((200, "ok".to_string(), Some("0".to_string()))),
            "{}",
            node.log()
        );
    }
    let heads = grpc.requests();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        assert!(head.starts_with("POST /grpc.health.v1.Health/"), "{head}");
        assert_verified_caller(head);
    }

    // An HTTP/1 upgrade the application accepts (a WebSocket, say) carries on byte for byte
    // after the 101, the request itself delivered with the verified caller.
    let sockets = upgrade_server(listen_in(
        &container_ns(db.pid()),
        "127.0.0.1:7005".parse().unwrap(),
    ));
    let to_sockets: SocketAddr = "10.78.0.2:7005".parse().unwrap();
    let got = upgrade_echo(
        &container_ns(web.pid()),
        to_sockets,
        "websocket",
        &forged,
        "frames after the upgrade",
    );
    assert_eq!(
        got,
        Ok((
            "HTTP/1.1 101 Switching Protocols".to_string(),
            "frames after the upgrade".to_string()
        )),
        "{}",
        node.log()
    );
    // `Upgrade: h2c` (an application that takes it, as Go's h2c handler does, would then read
    // HTTP/2 streams the companion relays as bytes, caller-set headers and all): taken out,
    // the request goes on as a plain one.
    let got = upgrade_echo(&container_ns(web.pid()), to_sockets, "h2c", &forged, "xy");
    assert_eq!(
        got,
        Ok(("HTTP/1.1 200 OK".to_string(), "ok".to_string())),
        "{got:?}"
    );
    let heads = sockets.requests();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in &heads {
        assert_verified_caller(head);
    }
    assert!(
        !heads[1].to_ascii_lowercase().contains("upgrade:"),
        "{heads:?}"
    );

    // A protocol whose server speaks first (MySQL, SMTP): the callee's companion passes the
    // greeting on as soon as the application sends it, not after waiting for the caller's
    // first bytes (which never come: its client waits for the greeting). That wait is 500 ms;
    // one connection of three answered well within it shows it is not taken.
    let _greeter = greeting_server(
        listen_in(&container_ns(db.pid()), "127.0.0.1:7006".parse().unwrap()),
        "220 ready\r\n",
    );
    let to_greeter: SocketAddr = "10.78.0.2:7006".parse().unwrap();
    let greetings = nhi_integration::edge::in_netns(&container_ns(web.pid()), move || {
        use std::io::{Read, Write};
        (0..3)
            .map(|_| {
                let mut s =
                    std::net::TcpStream::connect_timeout(&to_greeter, Duration::from_secs(5))
                        .unwrap();
                let started = std::time::Instant::now();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut hello = [0u8; 11];
                s.read_exact(&mut hello).unwrap();
                let waited = started.elapsed();
                s.write_all(b"ping").unwrap();
                let mut back = [0u8; 4];
                s.read_exact(&mut back).unwrap();
                (String::from_utf8_lossy(&hello).into_owned(), waited, back)
            })
            .collect::<Vec<_>>()
    });
    for (hello, _, back) in &greetings {
        assert_eq!((hello.as_str(), back), ("220 ready\r\n", b"ping"));
    }
    assert!(
        greetings
            .iter()
            .any(|(_, waited, _)| *waited < Duration::from_millis(400)),
        "every greeting waited for the sniff timeout: {greetings:?}"
    );

    // An nhi workload the inbound rule does not allow: its companion completes the handshake
    // (it is a valid identity), the callee's refuses it; the application never sees it.
    let refused = tcp_echo(
        &container_ns(other.pid()),
        "10.79.0.2:7000".parse().unwrap(),
        "x",
    );
    assert!(refused.is_err(), "{refused:?}");
    assert_eq!(served.connections(), 1);
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &["mtls peer spiffe://example.org/container/mtls-other is not allowed"]
    ) == 1));

    // Plaintext from outside (a client that is no nhi workload): strict refuses it, permissive
    // lets it through and audits it as unauthenticated.
    let outside = peer(&unique_id("mo"), db.pid());
    let plain = tcp_echo(&outside.path(), "10.77.0.2:7000".parse().unwrap(), "plain");
    assert!(plain.is_err(), "{plain:?}");
    assert_eq!(served.connections(), 1);
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &["plaintext refused"]
    ) == 1));
    assert_eq!(
        tcp_echo(
            &outside.path(),
            "10.77.0.2:7001".parse().unwrap(),
            "plain\n"
        )
        .as_deref(),
        Ok("plain\n")
    );
    // Unauthenticated h2c through permissive: served, and no identity reaches the app, not
    // even one the client claims.
    let open_grpc = h2c_server(listen_in(
        &container_ns(db.pid()),
        "127.0.0.1:7004".parse().unwrap(),
    ));
    let got = h2c_request(
        &outside.path(),
        "10.77.0.2:7004".parse().unwrap(),
        "/grpc.health.v1.Health/Check",
        &forged,
    );
    assert_eq!(got, Ok((200, "ok".to_string(), Some("0".to_string()))));
    let heads = open_grpc.requests();
    assert_eq!(heads.len(), 1, "{heads:?}");
    assert!(peer_headers(&heads[0]).is_empty(), "{heads:?}");
    // TLS with a certificate from another trust domain, or claiming an allowed ID from a CA
    // nhi does not trust, or expired: refused in the handshake, the app never sees it.
    let to_strict: SocketAddr = "10.77.0.2:7000".parse().unwrap();
    for (what, (cert, key)) in [
        (
            "another trust domain",
            foreign_svid("spiffe://other.org/container/mtls-web", false),
        ),
        (
            "an unknown CA",
            foreign_svid("spiffe://example.org/container/mtls-web", false),
        ),
        (
            "expired",
            foreign_svid("spiffe://example.org/container/mtls-web", true),
        ),
    ] {
        assert!(
            !rogue_tls(&outside.path(), to_strict, cert, key),
            "{what} accepted"
        );
    }
    assert_eq!(served.connections(), 1, "a rogue handshake reached the app");
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &["mtls handshake refused"]
    ) >= 3));

    // A revoked identity is refused by the callee at once, even with its genuine SVID (say
    // stolen before the revocation): the deny list reaches every companion.
    let pem = web.get("/v1/x509").unwrap();
    let blocks: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap())
        .collect();
    let cert = blocks
        .iter()
        .find(|p| p.label == "CERTIFICATE")
        .unwrap()
        .contents
        .clone();
    let key = blocks
        .iter()
        .find(|p| p.label == "PRIVATE KEY")
        .unwrap()
        .contents
        .clone();
    assert!(
        rogue_tls(&outside.path(), to_strict, cert.clone(), key.clone()),
        "web's own SVID"
    );
    // A caller's companion not yet upgraded speaks the first protocol (no preface, no
    // frames): still served, one connection, bytes as they are.
    let mut v1 = rogue_connect(
        &outside.path(),
        to_strict,
        cert.clone(),
        key.clone(),
        b"nhi-mtls/1",
    )
    .expect("nhi-mtls/1 handshake");
    {
        use std::io::{Read, Write};
        v1.write_all(b"old-protocol").unwrap();
        v1.flush().unwrap();
        let mut buf = [0u8; 12];
        v1.read_exact(&mut buf).expect("nhi-mtls/1 echo");
        assert_eq!(&buf, b"old-protocol");
    }
    drop(v1);
    // A connection handshaken before the revocation and kept idle (as a caller's companion
    // keeps warm ones, or a compromised one would) carries nothing after it.
    let mut held = rogue_connect(
        &outside.path(),
        to_strict,
        cert.clone(),
        key.clone(),
        b"nhi-mtls/2",
    )
    .expect("handshake with web's SVID");
    let web_id = "spiffe://example.org/container/mtls-web";
    let out = node.nhictl(&["revoke", "--spiffe-id", web_id], b"");
    assert!(out.status.success(), "{out:?}");
    assert!(
        eventually(Duration::from_secs(2), || !rogue_tls(
            &outside.path(),
            to_strict,
            cert.clone(),
            key.clone()
        )),
        "the callee still accepts a revoked identity"
    );
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &["is revoked (or its node is cut off)"]
    ) >= 1));
    let served_before = served.connections();
    assert!(
        !rogue_echo(&mut held),
        "a connection made before the revocation still carries one after it"
    );
    assert_eq!(served.connections(), served_before);
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &["mtls peer spiffe://example.org/container/mtls-web no longer stands"]
    ) == 1));
    let out = node.nhictl(&["revoke", "--spiffe-id", web_id, "--undo"], b"");
    assert!(out.status.success(), "{out:?}");
    assert!(eventually(Duration::from_secs(2), || rogue_tls(
        &outside.path(),
        to_strict,
        cert.clone(),
        key.clone()
    )));
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &["unauthenticated plaintext (permissive mTLS)"]
    ) == 2));

    // New connections one after another take a connection handshaken ahead of need, or reuse
    // one whose application connection ended: no handshake waits on the way, and each
    // connection is still one audit record on both sides.
    let before = served.connections();
    for i in 0..6 {
        let msg = format!("again-{i}\n");
        assert_eq!(
            tcp_echo(&container_ns(web.pid()), to_db, &msg).as_deref(),
            Ok(msg.as_str())
        );
        // (A connection is back in the pool a round trip after its application closed.)
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(served.connections(), before + 6);
    let warm = "mtls peer=spiffe://example.org/container/mtls-db; warm";
    assert!(
        eventually(Duration::from_secs(3), || audited(&node, &[warm]) >= 5),
        "{} of 6 connections warm",
        audited(&node, &[warm])
    );
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &[
            "\"inbound\"",
            "mtls peer=spiffe://example.org/container/mtls-web"
        ]
    ) >= 7));
    // The same facts, structured, and counted in nhid's metrics.
    let records = node.audit_records();
    // Allowed connections of `role` with `peer` over a warm connection.
    let warm = |role: &str, peer: &str| {
        records
            .iter()
            .filter(|r| {
                r["mtls"]["role"] == role
                    && r["mtls"]["peer"] == peer
                    && r["mtls"]["warm"] == true
                    && r["decision"] == "allow"
            })
            .count()
    };
    let caller_warm = warm("caller", "spiffe://example.org/container/mtls-db");
    assert!(caller_warm >= 5, "{caller_warm}");
    // And reused: on the callee's side, connections that arrived over a TLS connection which
    // had carried an earlier one (no handshake at all, not only none on the way).
    let callee_reused = warm("callee", "spiffe://example.org/container/mtls-web");
    assert!(callee_reused >= 4, "{callee_reused}");
    let scrape = || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let sample = |text: &str, series: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let text = scrape();
    for (series, at_least) in [
        (r#"{role="caller",decision="allow",warm="true"}"#, 5.0),
        (r#"{role="callee",decision="deny",warm="false"}"#, 4.0),
    ] {
        let n = sample(&text, &format!("nhi_mtls_connections_total{series}"));
        assert!(n >= at_least, "{series}: {n}\n{text}");
    }
    for c in [db, web, other] {
        c.delete();
    }
}

/// SVIDs renew (10 s TTL, renewal at half-life) under live connections: a connection opened
/// before keeps working after the certificate it was opened with expired, and new connections
/// handshake with the renewed SVIDs.
#[test]
fn mutual_tls_connections_outlive_svid_rotations() {
    let mut node = Node::with_config(
        ANNOTATED_RULE,
        // (A connection without a first request lives 30 s: one held past its SVID's end below.)
        "[issuer]\nx509_ttl = \"10s\"\nca_ttl = \"1h\"\n[companion.limits]\nheader_timeout = \"30s\"\n",
    );
    node.append_config(POLICY);
    node.start();
    let db = node.named_container("mtls-db");
    let web = node.named_container("mtls-web");
    let tag = unique_id("r").replace('-', "");
    let tag = &tag[tag.len().saturating_sub(6)..];
    link_containers(&format!("r{tag}"), 78, web.pid(), db.pid());
    let served = echo_server(listen_in(
        &container_ns(db.pid()),
        "127.0.0.1:7000".parse().unwrap(),
    ));
    let to_db: SocketAddr = "10.78.0.2:7000".parse().unwrap();
    let ns = container_ns(web.pid());
    let serial = |c: &Container| {
        let pem = c.get("/v1/x509").unwrap();
        let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(&der.contents).unwrap();
        cert.raw_serial_as_string()
    };
    let first = (serial(&web), serial(&db));
    let (live, fresh) = nhi_integration::edge::in_netns(&ns, move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(&to_db, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let (mut live, mut fresh) = (0, 0);
        for i in 0..14 {
            let msg = format!("tick-{i:02}");
            s.write_all(msg.as_bytes()).unwrap();
            let mut buf = vec![0u8; msg.len()];
            s.read_exact(&mut buf).unwrap();
            assert_eq!(buf, msg.as_bytes());
            live += 1;
            // And a new connection each time, with whatever SVIDs are current.
            let mut n =
                std::net::TcpStream::connect_timeout(&to_db, Duration::from_secs(5)).unwrap();
            n.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            n.write_all(b"new").unwrap();
            let mut b = [0u8; 3];
            n.read_exact(&mut b).unwrap();
            fresh += 1;
            std::thread::sleep(Duration::from_secs(1));
        }
        (live, fresh)
    });
    assert_eq!((live, fresh), (14, 14));
    assert_eq!(served.connections(), 15);
    // A connection handshaken with an SVID that has expired since carries nothing new: held
    // idle past the certificate's end (10 s TTL), then claimed.
    let pem = web.get("/v1/x509").unwrap();
    let blocks: Vec<_> = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap())
        .collect();
    let der = |label: &str| {
        blocks
            .iter()
            .find(|p| p.label == label)
            .unwrap()
            .contents
            .clone()
    };
    let (cert, key) = (der("CERTIFICATE"), der("PRIVATE KEY"));
    let (_, parsed) = x509_parser::parse_x509_certificate(&cert).unwrap();
    let ends = parsed.validity().not_after.timestamp();
    let outside = nhi_integration::edge::peer(&unique_id("mx"), db.pid());
    let to_strict: SocketAddr = "10.77.0.2:7000".parse().unwrap();
    let mut held =
        rogue_connect(&outside.path(), to_strict, cert, key, b"nhi-mtls/2").expect("handshake");
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    };
    assert!(ends - now() <= 10, "a 10 s SVID");
    while now() <= ends {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!rogue_echo(&mut held), "claimed after its SVID expired");
    assert_eq!(served.connections(), 15);
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &["its certificate has expired since the handshake"]
    ) == 1));
    let now = (serial(&web), serial(&db));
    assert!(
        now.0 != first.0 && now.1 != first.1,
        "both SVIDs renewed during the test: {first:?} -> {now:?}"
    );
    db.delete();
    web.delete();
}
