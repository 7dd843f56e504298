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
    container_ns, echo_server, http, http_server, listen_in, peer, tcp_echo,
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
[[policy.inbound]]
id = "web-api"
ports = [7002]
allow = ["spiffe://example.org/container/mtls-web"]
mtls = "strict"
[[policy.inbound]]
id = "migrating"
ports = [7001]
allow = ["spiffe://example.org/container/mtls-web"]
mtls = "permissive"

[[policy]]
id = "callers"
spiffe_ids = ["spiffe://example.org/container/mtls-web", "spiffe://example.org/container/mtls-other"]
default = "deny"
[[policy.egress]]
id = "to-db"
cidr = ["10.78.0.2/32", "10.79.0.2/32"]
ports = [7000, 7002]
mtls = { peer = "spiffe://example.org/container/mtls-db" }
"#;

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap();
    assert!(out.status.success(), "{cmd} {args:?}: {out:?}");
}

/// A veth pair between the network namespaces of `a` and `b` (pids): `a` gets
/// `10.<net>.0.1/24` on `<name>a`, `b` gets `10.<net>.0.2/24` on `<name>b`.
fn link(name: &str, net: u8, a: i32, b: i32) {
    let (ea, eb) = (format!("{name}a"), format!("{name}b"));
    sh(
        "ip",
        &["link", "add", &ea, "type", "veth", "peer", "name", &eb],
    );
    for (end, pid, host) in [(&ea, a, 1), (&eb, b, 2)] {
        let pid = pid.to_string();
        sh("ip", &["link", "set", end, "netns", &pid]);
        let addr = format!("10.{net}.0.{host}/24");
        sh(
            "nsenter",
            &["-t", &pid, "-n", "ip", "addr", "add", &addr, "dev", end],
        );
        sh(
            "nsenter",
            &["-t", &pid, "-n", "ip", "link", "set", end, "up"],
        );
    }
}

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

#[test]
fn mutual_tls_between_two_workloads_for_any_tcp_protocol() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.append_config(POLICY);
    node.start();
    let db = node.named_container("mtls-db");
    let web = node.named_container("mtls-web");
    let other = node.named_container("mtls-other");
    let tag = unique_id("m").replace('-', "");
    let tag = &tag[tag.len().saturating_sub(6)..];
    link(&format!("w{tag}"), 78, web.pid(), db.pid());
    link(&format!("o{tag}"), 79, other.pid(), db.pid());
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
    let (status, body) = http(
        &container_ns(web.pid()),
        "10.78.0.2:7002".parse().unwrap(),
        "GET",
        "/whoami",
        &[(
            "x-nhi-peer-spiffe-id",
            "spiffe://example.org/container/forged",
        )],
    )
    .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    let heads = api.requests();
    assert_eq!(heads.len(), 1, "{heads:?}");
    let seen: Vec<&str> = heads[0]
        .lines()
        .filter(|l| l.to_ascii_lowercase().starts_with("x-nhi-peer-spiffe-id:"))
        .collect();
    assert_eq!(
        seen,
        ["x-nhi-peer-spiffe-id: spiffe://example.org/container/mtls-web"],
        "{heads:?}"
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
        tcp_echo(&outside.path(), "10.77.0.2:7001".parse().unwrap(), "plain").as_deref(),
        Ok("plain")
    );
    assert!(eventually(Duration::from_secs(3), || audited(
        &node,
        &["unauthenticated plaintext (permissive mTLS)"]
    ) == 1));
    for c in [db, web, other] {
        c.delete();
    }
}
