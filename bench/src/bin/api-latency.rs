//! Credential fetch latency and throughput from one client core, inside a workload's network
//! namespace, against a plain loopback echo server measured in the same run as the floor:
//!
//! - floor: HTTP/1.1 keep-alive `GET` to a minimal echo server (std, one thread) on loopback in
//!   the same namespace: the cost of the kernel's loopback and an HTTP round trip;
//! - `GET /v1/token?audience=bench` on the companion's HTTP API (keep-alive, cached token);
//! - `FetchJWTSVID` on the companion's SPIFFE Workload API (gRPC over TCP 15101) through the
//!   crates.io `spiffe` client, as an application would call it.
//!
//! Latency: one request at a time, the three series interleaved request by request (rotating
//! which goes first). Throughput: sequential requests for a fixed count per series. Then the
//! companion's VmRSS after serving all of it.
//!
//! Run as root: `cargo run --release -p nhi-bench --bin api-latency -- --runs 5000`

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Parser;
use nhi_bench::{ms, row, summarize, HEADER};
use nhi_integration::*;

#[derive(Parser)]
struct Args {
    /// Latency samples per series.
    #[arg(long, default_value_t = 2000)]
    runs: usize,
    /// Warm-up requests per series, not counted.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Requests per series for the throughput figure.
    #[arg(long, default_value_t = 5000)]
    throughput: usize,
}

const ECHO_ADDR: &str = "127.0.0.1:15199";

/// A keep-alive HTTP/1.1 client on one connection (Content-Length bodies only).
struct Http {
    r: BufReader<TcpStream>,
    req: Vec<u8>,
}

impl Http {
    fn new(addr: &str, path: &str) -> Http {
        let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
        s.set_nodelay(true).unwrap();
        Http {
            r: BufReader::new(s),
            // The proof header the companion's credential endpoints require (the floor
            // server ignores it).
            req: format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{PROOF_HEADER}\r\n\r\n")
                .into_bytes(),
        }
    }

    fn get(&mut self) -> usize {
        self.r.get_mut().write_all(&self.req).unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        assert!(line.starts_with("HTTP/1.1 200"), "{line}");
        let mut len = 0;
        loop {
            line.clear();
            self.r.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            if let Some(v) = line
                .to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().to_string())
            {
                len = v.parse().unwrap();
            }
        }
        let mut body = vec![0; len];
        self.r.read_exact(&mut body).unwrap();
        len
    }
}

/// The floor: answers every request on a connection with a small fixed body.
fn echo_server(l: TcpListener) {
    for conn in l.incoming() {
        let Ok(s) = conn else { continue };
        std::thread::spawn(move || {
            s.set_nodelay(true).unwrap();
            let mut r = BufReader::new(s);
            let body = r#"{"echo":"ok"}"#;
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let mut line = String::new();
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" => {
                        if r.get_mut().write_all(resp.as_bytes()).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                }
            }
        });
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Series {
    Echo,
    HttpToken,
    GrpcJwt,
}

const SERIES: [(Series, &str); 3] = [
    (Series::Echo, "loopback HTTP echo (floor)"),
    (Series::HttpToken, "companion HTTP GET /v1/token"),
    (
        Series::GrpcJwt,
        "companion gRPC FetchJWTSVID (spiffe crate)",
    ),
];

fn main() {
    let args = Args::parse();
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let c = node
        .bundle(&unique_id("bench"))
        .inject()
        .args(&["sleep", "3600"])
        .write();
    c.start().expect("container");
    let pid = c.pid();
    let companion = node.companion_pid(&c.id).expect("companion");

    let ns = std::fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
    let (runs, warmup, tput) = (args.runs, args.warmup, args.throughput);
    let results = std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let l = TcpListener::bind(ECHO_ADDR).unwrap();
        let ns2 = ns.try_clone().unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&ns2, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            echo_server(l)
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let grpc = rt
            .block_on(spiffe::WorkloadApiClient::connect_to(
                "tcp://127.0.0.1:15101",
            ))
            .expect("workload API");
        let mut echo = Http::new(ECHO_ADDR, "/");
        let mut token = Http::new("127.0.0.1:15100", "/v1/token?audience=bench");
        let mut one = |s: Series| -> Duration {
            let t = Instant::now();
            match s {
                Series::Echo => assert!(echo.get() > 0),
                Series::HttpToken => assert!(token.get() > 100),
                Series::GrpcJwt => {
                    let tok = rt
                        .block_on(grpc.fetch_jwt_token(["bench"], None))
                        .expect("FetchJWTSVID");
                    assert!(tok.len() > 100);
                }
            }
            t.elapsed()
        };
        let mut lat: Vec<Vec<Duration>> = (0..3).map(|_| Vec::with_capacity(runs)).collect();
        for i in 0..warmup + runs {
            for k in 0..3 {
                let idx = (i + k) % 3;
                let d = one(SERIES[idx].0);
                if i >= warmup {
                    lat[idx].push(d);
                }
            }
        }
        let mut rps = Vec::new();
        for (s, _) in SERIES {
            let t = Instant::now();
            for _ in 0..tput {
                one(s);
            }
            rps.push(tput as f64 / t.elapsed().as_secs_f64());
        }
        (lat, rps)
    })
    .join()
    .expect("client thread");
    let (lat, rps) = results;

    println!(
        "## Credential fetch from inside the workload netns, one client core ({} requests per series, interleaved)\n",
        args.runs
    );
    println!("{HEADER}");
    for (i, (_, name)) in SERIES.iter().enumerate() {
        println!("{}", row(name, &summarize(&lat[i])));
    }
    let floor = summarize(&lat[0]);
    println!("\n| series | p50 (µs) | p99 (µs) | p50 vs floor | sequential req/s |");
    println!("|---|---|---|---|---|");
    for (i, (_, name)) in SERIES.iter().enumerate() {
        let s = summarize(&lat[i]);
        println!(
            "| {name} | {:.0} | {:.0} | {:.2}x | {:.0} |",
            ms(s.p50) * 1e3,
            ms(s.p99) * 1e3,
            ms(s.p50) / ms(floor.p50),
            rps[i]
        );
    }
    let rss = proc_status(companion, "VmRSS");
    println!("\ncompanion VmRSS after serving all of the above: {rss}");
    c.delete();
}
