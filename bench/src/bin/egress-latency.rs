//! Edge proxy cost: the same requests from two containers in the same run, one without a policy
//! (direct) and one whose outbound TCP nhid redirects through its companion; each talks over its
//! own veth pair to identical upstreams in a peer namespace.
//!
//! - small HTTP request, new connection each (`GET /small`, `Connection: close`): latency of the
//!   whole exchange, through the per-request HTTP path (port 8080: a path rule makes the proxy
//!   read each request) and through the L4 path (port 9000: address/port rules only, splice(2));
//! - 100 MiB transfer (`GET /bytes/104857600`) through both paths: time and throughput;
//! - what each protection of issue 13 adds, each against its own baseline in the same run:
//!   UDP allowed by a kernel rule (the companion-cgroup match, conntrack and a list of UDP rules
//!   evaluated for every new flow) vs the same datagram from the container without a policy;
//!   a DNS query relayed (and learned) by the companion vs sent straight to the resolver; an
//!   HTTP request allowed by a `host` rule (its name bound to the destination) vs one allowed
//!   by a rule without a name, both through the proxy; path normalisation per request vs
//!   copying the path (in-process, nanoseconds).
//!
//! Runs are interleaved (direct and proxied alternate, alternating which goes first).
//! Run as root: `cargo run --release -p nhi-bench --bin egress-latency -- --runs 1000 --big-runs 10`

use std::net::{SocketAddr, UdpSocket};
use std::time::Instant;

use clap::Parser;
use nhi_bench::worker::Worker;
use nhi_bench::{compare, interleave, mibs, ms, report, summarize, BIG};
use nhi_integration::edge::*;
use nhi_integration::*;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    runs: nhi_bench::TransferRuns,
}

const POLICY: &str = r#"
[[policy]]
id = "bench"
spiffe_ids = ["spiffe://example.org/container/bench-proxied"]
default = "deny"
dns = ["10.77.0.1"]
[[policy.egress]]
id = "http"
ports = [8080]
path_prefix = "/"
[[policy.egress]]
id = "by-name"
ports = [8081]
host = "api.bench.test"
[[policy.egress]]
id = "l4"
ports = [9000]
"#;

/// UDP rules in front of the one that allows the echo: every new flow walks them.
const UDP_RULES: usize = 8;
const UDP_ECHO: u16 = 7000;

/// A DNS query for `api.bench.test` A (id 0x4242, recursion desired).
fn dns_query() -> Vec<u8> {
    let mut q = vec![0x42, 0x42, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["api", "bench", "test"] {
        q.push(label.len() as u8);
        q.extend(label.as_bytes());
    }
    q.extend([0, 0, 1, 0, 1]);
    q
}

/// Echoes every datagram on `l` back to its sender.
fn udp_echo(l: UdpSocket) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = l.recv_from(&mut buf) {
            let _ = l.send_to(&buf[..n], from);
        }
    });
}

fn main() {
    let args = Args::parse();
    let mut node = Node::new(ANNOTATED_RULE);
    let mut policy = POLICY.to_string();
    for i in 0..UDP_RULES {
        policy.push_str(&format!(
            "[[policy.egress]]\nid = \"udp-{i}\"\nprotocol = \"udp\"\ncidr = [\"10.99.{i}.0/24\"]\nports = [{}]\n",
            UDP_ECHO + 1 + i as u16
        ));
    }
    policy.push_str(&format!(
        "[[policy.egress]]\nid = \"udp-echo\"\nprotocol = \"udp\"\nports = [{UDP_ECHO}]\n"
    ));
    node.append_config(&policy);
    node.start();
    let direct = node.named_container("bench-direct");
    let proxied = node.named_container("bench-proxied");
    let mut peers = Vec::new();
    let mut dns = Vec::new();
    let mut workers = Vec::new();
    for c in [&direct, &proxied] {
        let p = peer(&unique_id("benchp"), c.pid());
        for port in [8080, 8081, 9000] {
            http_server(listen_in(&p.path(), SocketAddr::new(PEER_IP.into(), port)));
        }
        let echo_at = SocketAddr::new(PEER_IP.into(), UDP_ECHO);
        udp_echo(in_netns(&p.path(), move || {
            UdpSocket::bind(echo_at).unwrap()
        }));
        dns.push(dnsmasq(&p, PEER_IP, &[("api.bench.test", PEER_IP)], 3600));
        peers.push(p);
        workers.push(Worker::new(container_ns(c.pid())));
    }
    let to = |port| SocketAddr::new(PEER_IP.into(), port);
    for (port, what) in [
        (8080, "HTTP path (per-request decisions)"),
        (9000, "L4 path (spliced)"),
    ] {
        let (base, nhi) = interleave(args.runs.runs, args.runs.warmup, |with| {
            workers[with as usize].get(to(port), "/small")
        });
        report(
            &format!("Small HTTP request, new connection each, {what}"),
            "direct",
            &base,
            &nhi,
        );
    }
    for (port, what) in [(8080, "HTTP path"), (9000, "L4 path")] {
        let path = format!("/bytes/{BIG}");
        let (base, nhi) = interleave(args.runs.big_runs, 1, |with| {
            workers[with as usize].get(to(port), &path)
        });
        report(&format!("100 MiB transfer, {what}"), "direct", &base, &nhi);
        let (sb, sn) = (summarize(&base), summarize(&nhi));
        println!(
            "throughput (p50): direct {:.0} MiB/s, with nhi {:.0} MiB/s; nhi/direct {:.2}x (time {:.2} ms vs {:.2} ms)\n",
            mibs(sb.p50),
            mibs(sn.p50),
            mibs(sn.p50) / mibs(sb.p50),
            ms(sn.p50),
            ms(sb.p50),
        );
    }
    // What each protection of issue 13 adds.
    let echo = to(UDP_ECHO);
    let (base, nhi) = interleave(args.runs.runs, args.runs.warmup, |with| {
        workers[with as usize].udp(echo, vec![0u8; 64])
    });
    report(
        &format!("UDP datagram and its echo, new flow each: allowed by the {}th UDP rule (kernel rules) vs no policy", UDP_RULES + 1),
        "direct",
        &base,
        &nhi,
    );
    let resolver = to(53);
    let (base, nhi) = interleave(args.runs.runs, args.runs.warmup, |with| {
        workers[with as usize].udp(resolver, dns_query())
    });
    report(
        "DNS query (UDP) to the resolver: relayed and learned by the companion vs straight to it",
        "direct",
        &base,
        &nhi,
    );
    let (by_rule, by_name) = interleave(args.runs.runs, args.runs.warmup, |named| {
        if named {
            workers[1].get_as(to(8081), "/small", Some("api.bench.test"))
        } else {
            workers[1].get_as(to(8080), "/small", Some("api.bench.test"))
        }
    });
    compare(
        "Small HTTP request through the proxy, new connection each: allowed by a host rule (name bound to the address) vs by a rule without a name",
        ("no name", &by_rule),
        ("host bound", &by_name),
    );
    path_normalisation(args.runs.runs.max(1000) * 100);
    direct.delete();
    proxied.delete();
    drop(dns);
    drop(peers);
}

/// In-process: the cost of normalising a request path before comparing it with a rule's prefix
/// (what the proxy does per request now) vs comparing the path as sent (what it did before).
fn path_normalisation(iterations: usize) {
    use nhi_core::http_path::{has_prefix, normalize, EscapedSlashes};
    let paths = [
        "/api/v1/users/42",
        "/static/js/app.min.js",
        "/x/../admin//users/./%61bc",
        "/a/b/c/d/e/f/g/h/i/j/k/l/m/n/o/p",
    ];
    let time = |f: &dyn Fn(&str) -> bool| {
        let t = Instant::now();
        let mut hits = 0usize;
        for i in 0..iterations {
            hits += f(std::hint::black_box(paths[i % paths.len()])) as usize;
        }
        std::hint::black_box(hits);
        t.elapsed().as_nanos() as f64 / iterations as f64
    };
    let raw = time(&|p| has_prefix(p, "/admin", false));
    let norm = time(&|p| {
        normalize(p, EscapedSlashes::Reject).is_ok_and(|n| has_prefix(&n, "/admin", false))
    });
    println!(
        "## Path normalisation, in-process ({iterations} paths)\n\nprefix compare of the raw path {raw:.0} ns, normalise then compare {norm:.0} ns per request: added {:.0} ns\n",
        norm - raw
    );
}
