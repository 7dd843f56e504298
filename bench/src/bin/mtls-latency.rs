//! What mutual TLS between workloads (issue 18) costs, against a direct connection and today's
//! L4 proxy path, in the same run. One callee container serves HTTP; three caller containers,
//! each over its own veth pair to it, make the same requests:
//!
//! - **direct**: no policy on the caller, no inbound rule on the callee's port;
//! - **L4 path**: the caller's companion splices the connection (an address/port allow rule);
//! - **mTLS**: the caller's companion originates TLS 1.3 with its X.509-SVID, the callee's
//!   terminates it, checks the caller's SPIFFE ID and hands the request to the app (HTTP: with
//!   the verified caller in a header). Two rules: the default (`mtls_warm` connections kept
//!   handshaken ahead of need, so a new connection takes a warm one), and `warm = 0` (every
//!   connection waits for its own handshake: the cold path).
//!
//! Small request on a new connection each (`GET /small`, `Connection: close`): latency of the
//! whole exchange. A TCP echo (not HTTP) on a new connection each: the two proxies without
//! HTTP delivery. 100 MiB transfers, HTTP (`GET /bytes/104857600`) and a raw byte stream (the
//! callee relays bytes): time, throughput, and the CPU time the whole machine spent per
//! transfer (from `/proc/stat`: on a machine with few cores the throughput is bounded by
//! it), and the part each companion spent (its threads' run time from
//! `/proc/<pid>/task/*/schedstat`): what a companion with a core of its own could relay on one
//! connection. Series interleaved round by round.
//!
//! Run as root: `cargo run --release -p nhi-bench --bin mtls-latency -- --runs 500 --big-runs 5`

use std::net::SocketAddr;

use clap::Parser;
use nhi_bench::worker::Worker;
use nhi_bench::{compare, interleave_n, mibs, summarize, BIG};
use nhi_integration::edge::*;
use nhi_integration::*;

#[derive(Parser)]
struct Args {
    #[command(flatten)]
    runs: nhi_bench::TransferRuns,
}

const POLICY: &str = r#"
[[policy]]
id = "callee"
spiffe_ids = ["spiffe://example.org/container/bench-callee"]
default = "allow"
[[policy.inbound]]
id = "mtls-bytes"
ports = [8002, 8004]
allow = ["spiffe://example.org/container/bench-mtls"]
mtls = "strict"
app_protocol = "tcp"
[[policy.inbound]]
id = "mtls"
ports = [8001, 8007]
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
ports = [8001, 8002, 8004]
mtls = { peer = "spiffe://example.org/container/bench-callee" }
[[policy.egress]]
id = "mtls-cold"
cidr = ["10.83.0.2/32"]
ports = [8007]
mtls = { peer = "spiffe://example.org/container/bench-callee", warm = 0 }
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
    http_server(listen_in(&ns, "127.0.0.1:8007".parse().unwrap()));
    bulk_server(listen_in(&ns, "0.0.0.0:8005".parse().unwrap()));
    bulk_server(listen_in(&ns, "127.0.0.1:8004".parse().unwrap()));
    let workers: Vec<Worker> = callers
        .iter()
        .map(|c| Worker::new(container_ns(c.pid())))
        .collect();
    let targets: [SocketAddr; 4] = [
        "10.81.0.2:8000".parse().unwrap(),
        "10.82.0.2:8000".parse().unwrap(),
        "10.83.0.2:8001".parse().unwrap(),
        "10.83.0.2:8007".parse().unwrap(),
    ];
    let names = [
        "direct",
        "L4 path (spliced)",
        "mTLS (warm connection)",
        "mTLS (handshake per connection)",
    ];
    let worker = |i: usize| &workers[i.min(2)];
    let small = interleave_n(args.runs.runs, args.runs.warmup, 4, |i| {
        worker(i).get(targets[i], "/small")
    });
    for i in 1..4 {
        compare(
            &format!("Small HTTP request, new connection each: {}", names[i]),
            (names[0], &small[0]),
            (names[i], &small[i]),
        );
    }
    // A non-HTTP protocol: the callee relays bytes (no HTTP delivery).
    let echo = interleave_n(args.runs.runs, args.runs.warmup, 2, |i| {
        let (w, to) = if i == 0 {
            (&workers[0], "10.81.0.2:8003".parse().unwrap())
        } else {
            (&workers[2], "10.83.0.2:8002".parse().unwrap())
        };
        w.echo(to, b"0123456789abcdef0123456789abcdef")
    });
    compare(
        "TCP echo (32 bytes), new connection each: mTLS (warm), bytes relayed",
        ("direct", &echo[0]),
        ("mTLS (warm connection)", &echo[1]),
    );
    let path = format!("/bytes/{BIG}");
    let mut cpu = [Cpu::default(); 5];
    // The companions each series goes through: the caller's, then (mTLS) the callee's.
    let companion = |c: &Container| {
        node.companion_pid(&c.id)
            .unwrap_or_else(|| panic!("no companion serves {}", c.id))
    };
    let (l4, caller, terminator) = (
        companion(&callers[1]),
        companion(&callers[2]),
        companion(&callee),
    );
    let through: [&[i32]; 5] = [
        &[],
        &[l4],
        &[caller, terminator],
        &[],
        &[caller, terminator],
    ];
    let mut companions = [[0u64; 2]; 5];
    let big = interleave_n(args.runs.big_runs, 1, 5, |i| {
        let before = Cpu::now();
        let own: Vec<u64> = through[i].iter().map(|&p| process_cpu_ns(p)).collect();
        let d = match i {
            0..=2 => workers[i].get(targets[i], &path),
            3 => workers[0].bulk("10.81.0.2:8005".parse().unwrap(), BIG),
            _ => workers[2].bulk("10.83.0.2:8004".parse().unwrap(), BIG),
        };
        cpu[i].add(before, Cpu::now());
        for (k, &p) in through[i].iter().enumerate() {
            companions[i][k] += process_cpu_ns(p) - own[k];
        }
        d
    });
    let series = [
        (0, 1, "100 MiB over HTTP: L4 path (spliced)"),
        (0, 2, "100 MiB over HTTP: mTLS"),
        (3, 4, "100 MiB raw byte stream: mTLS, bytes relayed"),
    ];
    for (b, i, title) in series {
        compare(title, ("direct", &big[b]), ("this path", &big[i]));
        let (sb, sn) = (summarize(&big[b]), summarize(&big[i]));
        println!(
            "throughput (p50): direct {:.0} MiB/s, this path {:.0} MiB/s; ratio {:.2}x",
            mibs(sb.p50),
            mibs(sn.p50),
            mibs(sn.p50) / mibs(sb.p50)
        );
        println!(
            "CPU per transfer (all cores, mean): direct {:.0} ms ({:.0}% of the machine busy), \
             this path {:.0} ms ({:.0}% busy); ratio {:.2}x\n",
            cpu[b].busy_ms(),
            cpu[b].busy_share() * 100.0,
            cpu[i].busy_ms(),
            cpu[i].busy_share() * 100.0,
            cpu[i].busy_ms() / cpu[b].busy_ms()
        );
        // Transfers of series i, warm-up included (interleave_n runs it once more).
        let transfers = (args.runs.big_runs + 1) as f64;
        let per: Vec<f64> = (0..through[i].len())
            .map(|k| companions[i][k] as f64 / 1e6 / transfers)
            .collect();
        let busiest = per.iter().cloned().fold(0.0, f64::max);
        let names = ["caller's companion", "callee's companion"];
        let spent: Vec<String> = per
            .iter()
            .zip(names)
            .map(|(ms, who)| format!("{who} {ms:.0} ms"))
            .collect();
        let bound = BIG as f64 / (1 << 20) as f64 / (busiest / 1e3);
        println!(
            "companions' CPU per transfer: {}; with a core of its own the busiest relays up to \
             {bound:.0} MiB/s on one connection ({:.2}x this run's direct)\n",
            spent.join(", "),
            bound / mibs(sb.p50)
        );
    }
    for c in callers {
        c.delete();
    }
    callee.delete();
}

/// Nanoseconds the threads of process `pid` have run so far (`/proc/<pid>/task/*/schedstat`,
/// first field). Softirq work the kernel does while a thread runs (the network stack of a
/// packet that arrived then) is counted in it, as on any machine.
fn process_cpu_ns(pid: i32) -> u64 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/task: {e}"));
    tasks
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// CPU time of the whole machine from `/proc/stat` (clock ticks, 100 per second): busy and
/// idle, summed over the transfers of one series.
#[derive(Clone, Copy, Default)]
struct Cpu {
    busy: u64,
    idle: u64,
    samples: u64,
}

impl Cpu {
    fn now() -> (u64, u64) {
        let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
        let v: Vec<u64> = stat
            .lines()
            .next()
            .expect("a cpu line")
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal
        let idle = v[3] + v[4];
        (v.iter().take(8).sum::<u64>() - idle, idle)
    }

    fn add(&mut self, before: (u64, u64), after: (u64, u64)) {
        self.busy += after.0 - before.0;
        self.idle += after.1 - before.1;
        self.samples += 1;
    }

    fn busy_ms(&self) -> f64 {
        self.busy as f64 * 10.0 / self.samples.max(1) as f64
    }

    fn busy_share(&self) -> f64 {
        self.busy as f64 / (self.busy + self.idle).max(1) as f64
    }
}
