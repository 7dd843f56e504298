//! Edge proxy cost: the same requests from two containers in the same run, one without a policy
//! (direct) and one whose outbound TCP nhid redirects through its companion; each talks over its
//! own veth pair to identical upstreams in a peer namespace.
//!
//! - small HTTP request, new connection each (`GET /small`, `Connection: close`): latency of the
//!   whole exchange, through the per-request HTTP path (port 8080: a path rule makes the proxy
//!   read each request) and through the L4 path (port 9000: address/port rules only, splice(2));
//! - 100 MiB transfer (`GET /bytes/104857600`) through both paths: time and throughput.
//!
//! Runs are interleaved (direct and proxied alternate, alternating which goes first).
//! Run as root: `cargo run --release -p nhi-bench --bin egress-latency -- --runs 1000 --big-runs 10`

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use clap::Parser;
use nhi_bench::{interleave, ms, report, summarize};
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
id = "bench"
spiffe_ids = ["spiffe://example.org/container/bench-proxied"]
default = "deny"
[[policy.egress]]
id = "http"
ports = [8080]
path_prefix = "/"
[[policy.egress]]
id = "l4"
ports = [9000]
"#;

/// A thread living in one network namespace that runs requests on demand.
struct Worker {
    tx: mpsc::Sender<(SocketAddr, String, mpsc::Sender<Duration>)>,
}

impl Worker {
    fn new(ns: std::path::PathBuf) -> Worker {
        let (tx, rx) = mpsc::channel::<(SocketAddr, String, mpsc::Sender<Duration>)>();
        let file = std::fs::File::open(&ns).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            for (addr, path, reply) in rx {
                let t = Instant::now();
                let mut s = TcpStream::connect(addr).unwrap();
                s.set_nodelay(true).unwrap();
                write!(
                    s,
                    "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
                )
                .unwrap();
                let (mut total, mut want) = (0, None);
                loop {
                    let n = s.read(&mut buf).unwrap();
                    if n == 0 {
                        break;
                    }
                    // The head arrives in the first read (one small write by the server).
                    if want.is_none() {
                        want = expected(&buf[..n]);
                    }
                    total += n;
                    if want.is_some_and(|w| total >= w) {
                        break;
                    }
                }
                let _ = reply.send(t.elapsed());
            }
        });
        Worker { tx }
    }

    fn get(&self, addr: SocketAddr, path: &str) -> Duration {
        let (tx, rx) = mpsc::channel();
        self.tx.send((addr, path.into(), tx)).unwrap();
        rx.recv().expect("request failed")
    }
}

/// Header length + Content-Length, from the first bytes of a response.
fn expected(first: &[u8]) -> Option<usize> {
    let s = String::from_utf8_lossy(&first[..first.len().min(512)]);
    let head_end = s.find("\r\n\r\n")? + 4;
    let len: usize = s
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))?
        .trim()
        .parse()
        .ok()?;
    Some(head_end + len)
}

fn main() {
    let args = Args::parse();
    let mut node = Node::new(ANNOTATED_RULE);
    node.append_config(POLICY);
    node.start();
    let direct = node.named_container("bench-direct");
    let proxied = node.named_container("bench-proxied");
    let mut peers = Vec::new();
    let mut workers = Vec::new();
    for c in [&direct, &proxied] {
        let p = peer(&unique_id("benchp"), c.pid());
        http_server(listen_in(&p.path(), SocketAddr::new(PEER_IP.into(), 8080)));
        http_server(listen_in(&p.path(), SocketAddr::new(PEER_IP.into(), 9000)));
        peers.push(p);
        workers.push(Worker::new(container_ns(c.pid())));
    }
    let to = |port| SocketAddr::new(PEER_IP.into(), port);
    for (port, what) in [
        (8080, "HTTP path (per-request decisions)"),
        (9000, "L4 path (spliced)"),
    ] {
        let (base, nhi) = interleave(args.runs, args.warmup, |with| {
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
        let (base, nhi) = interleave(args.big_runs, 1, |with| {
            workers[with as usize].get(to(port), &path)
        });
        report(&format!("100 MiB transfer, {what}"), "direct", &base, &nhi);
        let mibs = |d: Duration| (BIG as f64 / (1 << 20) as f64) / d.as_secs_f64();
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
    direct.delete();
    proxied.delete();
    drop(peers);
}
