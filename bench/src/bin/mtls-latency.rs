//! What mutual TLS between workloads (issue 18) costs, against a direct connection and today's
//! L4 proxy path, in the same run. One callee container serves HTTP; three caller containers,
//! each over its own veth pair to it, make the same requests:
//!
//! - **direct**: no policy on the caller, no inbound rule on the callee's port;
//! - **L4 path**: the caller's companion splices the connection (an address/port allow rule);
//! - **mTLS**: the caller's companion originates TLS 1.3 with its X.509-SVID, the callee's
//!   terminates it, checks the caller's SPIFFE ID and hands the request to the app (HTTP: with
//!   the verified caller in a header).
//!
//! A TCP echo (not HTTP) on a new connection each, direct vs mTLS: the handshake and the two
//! proxies without HTTP delivery.
//! Small request on a new connection each (`GET /small`, `Connection: close`): latency of the
//! whole exchange, handshake included. 100 MiB transfer (`GET /bytes/104857600`): time and
//! throughput. Series interleaved round by round.
//!
//! Run as root: `cargo run --release -p nhi-bench --bin mtls-latency -- --runs 500 --big-runs 5`

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use nhi_bench::worker::Worker;
use nhi_bench::{compare, interleave_n, summarize};
use nhi_integration::edge::*;
use nhi_integration::*;

#[derive(Parser)]
struct Args {
    /// Small-request runs per series.
    #[arg(long, default_value_t = 500)]
    runs: usize,
    /// 100 MiB transfers per series.
    #[arg(long, default_value_t = 5)]
    big_runs: usize,
    #[arg(long, default_value_t = 20)]
    warmup: usize,
}

const BIG: usize = 100 << 20;

const POLICY: &str = r#"
[[policy]]
id = "callee"
spiffe_ids = ["spiffe://example.org/container/bench-callee"]
default = "allow"
[[policy.inbound]]
id = "mtls-echo"
ports = [8002]
allow = ["spiffe://example.org/container/bench-mtls"]
mtls = "strict"
[[policy.inbound]]
id = "mtls"
ports = [8001]
allow = ["spiffe://example.org/container/bench-mtls"]
mtls = "strict"

[[policy]]
id = "l4"
spiffe_ids = ["spiffe://example.org/container/bench-l4"]
default = "deny"
[[policy.egress]]
id = "l4"
cidr = ["10.82.0.2/32"]
ports = [8000]

[[policy]]
id = "mtls"
spiffe_ids = ["spiffe://example.org/container/bench-mtls"]
default = "deny"
[[policy.egress]]
id = "mtls"
cidr = ["10.83.0.2/32"]
ports = [8001, 8002]
mtls = { peer = "spiffe://example.org/container/bench-callee" }
"#;

fn main() {
    let args = Args::parse();
    let mut node = Node::new(ANNOTATED_RULE);
    node.append_config(POLICY);
    node.start();
    let callee = node.named_container("bench-callee");
    let callers = [
        node.named_container("bench-direct"),
        node.named_container("bench-l4"),
        node.named_container("bench-mtls"),
    ];
    let tag = unique_id("b").replace('-', "");
    let tag = tag[tag.len().saturating_sub(5)..].to_string();
    for (i, c) in callers.iter().enumerate() {
        link_containers(&format!("m{i}{tag}"), 81 + i as u8, c.pid(), callee.pid());
    }
    let ns = container_ns(callee.pid());
    // Direct and L4 reach the app on its own address; mTLS is delivered on loopback.
    http_server(listen_in(&ns, "0.0.0.0:8000".parse().unwrap()));
    http_server(listen_in(&ns, "127.0.0.1:8001".parse().unwrap()));
    echo_server(listen_in(&ns, "0.0.0.0:8003".parse().unwrap()));
    echo_server(listen_in(&ns, "127.0.0.1:8002".parse().unwrap()));
    let workers: Vec<Worker> = callers
        .iter()
        .map(|c| Worker::new(container_ns(c.pid())))
        .collect();
    let targets: [SocketAddr; 3] = [
        "10.81.0.2:8000".parse().unwrap(),
        "10.82.0.2:8000".parse().unwrap(),
        "10.83.0.2:8001".parse().unwrap(),
    ];
    let names = ["direct", "L4 path (spliced)", "mTLS (both companions)"];
    let small = interleave_n(args.runs, args.warmup, 3, |i| {
        workers[i].get(targets[i], "/small")
    });
    for i in 1..3 {
        compare(
            &format!("Small HTTP request, new connection each: {}", names[i]),
            (names[0], &small[0]),
            (names[i], &small[i]),
        );
    }
    // A non-HTTP protocol: the callee relays bytes (no HTTP delivery), so this is the
    // handshake and the two proxies alone.
    let echo = interleave_n(args.runs, args.warmup, 2, |i| {
        let (w, to) = if i == 0 {
            (&workers[0], "10.81.0.2:8003".parse().unwrap())
        } else {
            (&workers[2], "10.83.0.2:8002".parse().unwrap())
        };
        w.echo(to, b"0123456789abcdef0123456789abcdef")
    });
    compare(
        "TCP echo (32 bytes), new connection each: mTLS, bytes relayed",
        ("direct", &echo[0]),
        ("mTLS (both companions)", &echo[1]),
    );
    let path = format!("/bytes/{BIG}");
    let big = interleave_n(args.big_runs, 1, 3, |i| workers[i].get(targets[i], &path));
    let mibs = |d: Duration| (BIG as f64 / (1 << 20) as f64) / d.as_secs_f64();
    for i in 1..3 {
        compare(
            &format!("100 MiB transfer: {}", names[i]),
            (names[0], &big[0]),
            (names[i], &big[i]),
        );
        let (sb, sn) = (summarize(&big[0]), summarize(&big[i]));
        println!(
            "throughput (p50): direct {:.0} MiB/s, {} {:.0} MiB/s; ratio {:.2}x\n",
            mibs(sb.p50),
            names[i],
            mibs(sn.p50),
            mibs(sn.p50) / mibs(sb.p50)
        );
    }
    for c in callers {
        c.delete();
    }
    callee.delete();
}
