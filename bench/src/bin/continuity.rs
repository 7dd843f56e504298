//! Fairness and continuity (issue 14, items 4 and 5), each against a baseline in the same run,
//! from inside a workload's network namespace (one request per connection, as a client that
//! does not keep connections alive):
//!
//! - **fairness**: a fresh JWT-SVID (a new audience every time, so nhid signs one) with the
//!   secret store answering (baseline) vs while OpenBao hangs (SIGSTOP) and 32 requests for
//!   secrets nobody cached keep the workload's store lane full. Rounds alternate the two.
//! - **continuity**: a cached JWT-SVID with nhid running (baseline) vs right after nhid was
//!   killed with SIGKILL (the companion answers alone), then nhid is started again and re-adopts
//!   the companion. Rounds alternate; every request of both series is counted, and any that is
//!   not a 200 is reported as a failure. Also reports how long each restart took (nhid start
//!   to socket answering, re-adoption included).
//!
//! Run as root: `cargo run --release -p nhi-bench --bin continuity -- --rounds 4 --runs 200`

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use nhi_bench::{ms, row, summarize, HEADER};
use nhi_integration::bao::{BaoDev, NhiRoleOptions};
use nhi_integration::edge::{container_ns, in_netns};
use nhi_integration::*;

#[derive(Parser)]
struct Args {
    /// Rounds of each comparison (the two series alternate round by round).
    #[arg(long, default_value_t = 4)]
    rounds: usize,
    /// Requests per series per round.
    #[arg(long, default_value_t = 200)]
    runs: usize,
    /// Concurrent requests for uncached secrets while OpenBao hangs.
    #[arg(long, default_value_t = 32)]
    slow: usize,
}

/// `n` GETs of `path(i)` from the namespace at `ns`: each one's latency, and the answers that
/// were not a 200.
fn gets(
    ns: &std::path::Path,
    n: usize,
    path: impl Fn(usize) -> String + Send + 'static,
) -> (Vec<Duration>, Vec<String>) {
    in_netns(ns, move || {
        let (mut lat, mut bad) = (Vec::with_capacity(n), Vec::new());
        for i in 0..n {
            let p = path(i);
            let t = Instant::now();
            match companion_request("GET", &p, "") {
                Ok((200, _)) => lat.push(t.elapsed()),
                Ok((st, body)) => bad.push(format!("{p}: {st} {body}")),
                Err(e) => bad.push(format!("{p}: {e}")),
            }
        }
        (lat, bad)
    })
}

fn main() {
    let args = Args::parse();
    let dev = BaoDev::start();
    let setup = dev.setup_nhi(TRUST_DOMAIN, &NhiRoleOptions::default());
    let mut node = Node::with_config(
        &format!(
            r#"{ANNOTATED_RULE}
[[grant]]
secrets = ["slow-*"]
spiffe_ids = ["spiffe://{TRUST_DOMAIN}/container/bench"]
"#
        ),
        &format!(
            r#"node_name = "bench"
[issuer]
kind = "openbao"
[store]
kind = "openbao"
[openbao]
addresses = ["{}"]
request_timeout = "2s"
{}"#,
            dev.addr,
            setup.node("bench").auth_toml()
        ),
    );
    node.start();
    let c = node.named_container("bench");
    let ns = container_ns(c.pid());
    let runs = args.runs;

    // Fairness.
    let (mut base, mut loaded) = (Vec::new(), Vec::new());
    let mut failures = Vec::new();
    for r in 0..args.rounds {
        let (l, bad) = gets(&ns, runs, move |i| format!("/v1/token?audience=b-{r}-{i}"));
        base.extend(l);
        failures.extend(bad);
        dev.pause();
        let stop = Arc::new(AtomicBool::new(false));
        let slow: Vec<_> = (0..args.slow)
            .map(|k| {
                let (ns, stop) = (ns.clone(), stop.clone());
                std::thread::spawn(move || {
                    in_netns(&ns, move || {
                        let mut j = 0;
                        while !stop.load(Ordering::Relaxed) {
                            let _ =
                                companion_request("GET", &format!("/v1/secrets/slow-{k}-{j}"), "");
                            j += 1;
                        }
                    })
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(500));
        let (l, bad) = gets(&ns, runs, move |i| format!("/v1/token?audience=s-{r}-{i}"));
        loaded.extend(l);
        failures.extend(bad);
        stop.store(true, Ordering::Relaxed);
        dev.resume();
        for h in slow {
            h.join().unwrap();
        }
    }
    println!(
        "## Fresh JWT-SVID while {} secret requests wait for a hung OpenBao ({} rounds of {runs})\n",
        args.slow, args.rounds
    );
    println!("{HEADER}");
    let (sa, sb) = (summarize(&base), summarize(&loaded));
    println!("{}", row("store answering (baseline)", &sa));
    println!(
        "{}",
        row(
            &format!("store hung, {} secret requests in flight", args.slow),
            &sb
        )
    );
    println!(
        "\nratio hung/answering: p50 {:.2}x, p99 {:.2}x; failed requests: {}\n",
        ms(sb.p50) / ms(sa.p50),
        ms(sb.p99) / ms(sa.p99),
        failures.len()
    );

    // Continuity.
    assert!(c.get("/v1/token?audience=cached").is_ok());
    let (mut up, mut down, mut restarts) = (Vec::new(), Vec::new(), Vec::new());
    let mut failures = Vec::new();
    let cached = |_| "/v1/token?audience=cached".to_string();
    for _ in 0..args.rounds {
        let (l, bad) = gets(&ns, runs, cached);
        up.extend(l);
        failures.extend(bad);
        node.kill();
        let (l, bad) = gets(&ns, runs, cached);
        down.extend(l);
        failures.extend(bad);
        let t = Instant::now();
        node.start();
        restarts.push(t.elapsed());
    }
    println!(
        "## Cached JWT-SVID with nhid running vs killed (-9), re-adopted after each round ({} rounds of {runs})\n",
        args.rounds
    );
    println!("{HEADER}");
    let (sa, sb) = (summarize(&up), summarize(&down));
    println!("{}", row("nhid running (baseline)", &sa));
    println!("{}", row("nhid killed, companion alone", &sb));
    let rs = summarize(&restarts);
    println!(
        "\nratio killed/running: p50 {:.2}x, p99 {:.2}x; failed requests: {} of {}; nhid restart with re-adoption: p50 {:.1} ms, max {:.1} ms over {} restarts\n",
        ms(sb.p50) / ms(sa.p50),
        ms(sb.p99) / ms(sa.p99),
        failures.len(),
        up.len() + down.len() + failures.len(),
        ms(rs.p50),
        ms(*restarts.iter().max().unwrap()),
        rs.n
    );
    for f in failures.iter().take(5) {
        println!("failure: {f}");
    }
    c.delete();
}
