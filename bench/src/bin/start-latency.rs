//! Container start latency with nhi vs plain runc, in one run.
//!
//! - `runc run` of a busybox `true`, full cycle (create, start, exit, delete): without hooks vs
//!   with the nhi hooks and a selecting rule (companion started, made ready, and stopped).
//!   Runs are interleaved so both series see the same machine conditions.
//! - The hook alone: `nhi-hook createRuntime` (attach: companion spawned in the container's
//!   netns and ready) and `nhi-hook poststop`, timed around the process, on containers made
//!   with `runc create`.
//! - Companion resident memory once idle, next to the container's own busybox `sleep`.
//!
//! Run as root: `cargo run --release -p nhi-bench --bin start-latency -- --runs 200`

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use nhi_bench::{interleave, ms, row, summarize, HEADER};
use nhi_integration::*;

#[derive(Parser)]
struct Args {
    /// Runs per series.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Warm-up runs per series, not counted.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
}

fn main() {
    let args = Args::parse();
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();

    let (plain, hooked) = interleave(args.runs, args.warmup, |with_nhi| {
        let c = if with_nhi {
            node.bundle(&unique_id("nhi"))
                .inject()
                .args(&["true"])
                .write()
        } else {
            node.bundle(&unique_id("plain"))
                .without_hooks()
                .args(&["true"])
                .write()
        };
        let t = Instant::now();
        let out = c.run();
        let d = t.elapsed();
        assert!(out.status.success(), "{}: {out:?}", c.id);
        let _ = std::fs::remove_dir_all(&c.bundle);
        d
    });
    assert!(node.status().workloads.is_empty(), "companions left behind");

    // The hook alone.
    let mut attach = Vec::new();
    let mut detach = Vec::new();
    for i in 0..args.warmup + args.runs {
        let c = node
            .bundle(&unique_id("hook"))
            .inject()
            .without_hooks()
            .write();
        c.create().expect("runc create");
        let state = serde_json::json!({
            "ociVersion": "1.0.2", "id": c.id, "status": "created", "pid": c.pid(), "bundle": c.bundle,
        });
        let a = time_hook(&node, "createRuntime", &state);
        let d = time_hook(&node, "poststop", &state);
        if i >= args.warmup {
            attach.push(a);
            detach.push(d);
        }
        c.delete();
        let _ = std::fs::remove_dir_all(&c.bundle);
    }

    // Idle companion memory.
    let c = node.bundle(&unique_id("rss")).inject().write();
    c.start().unwrap();
    c.get("/v1/token?audience=rss").unwrap();
    c.get("/v1/x509").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let comp_pid = node.companion_pid(&c.id).unwrap();
    let comp_rss = rss_kib(comp_pid, "VmRSS");
    // Code pages shared with every other companion (file) vs this one's own memory (anon).
    let (comp_anon, comp_file) = (rss_kib(comp_pid, "RssAnon"), rss_kib(comp_pid, "RssFile"));
    let sleep_rss = rss_kib(c.pid(), "VmRSS");
    c.delete();

    let (sp, sh) = (summarize(&plain), summarize(&hooked));
    let (sa, sd) = (summarize(&attach), summarize(&detach));
    println!("## Container start: `runc run` busybox `true`, plain vs with nhi ({} runs each, interleaved)\n", args.runs);
    println!("{HEADER}");
    println!("{}", row("plain runc", &sp));
    println!("{}", row("runc + nhi hook (companion attached)", &sh));
    println!(
        "\nratio nhi/plain: p50 {:.2}x, p99 {:.2}x; added p50 {:+.2} ms (target <= +15 ms)\n",
        ms(sh.p50) / ms(sp.p50),
        ms(sh.p99) / ms(sp.p99),
        ms(sh.p50) - ms(sp.p50)
    );
    println!("## Hook wall time (process start to exit)\n");
    println!("{HEADER}");
    println!(
        "{}",
        row("nhi-hook createRuntime (attach, companion ready)", &sa)
    );
    println!("{}", row("nhi-hook poststop (detach, companion gone)", &sd));
    println!(
        "\ncreateRuntime p99 vs the 50 ms budget: {:.2}x\n",
        ms(sa.p99) / 50.0
    );
    println!("## Companion resident memory, idle (after one token and one X.509-SVID)\n");
    println!("| process | VmRSS (KiB) |\n|---|---|");
    println!("| nhi-companion | {comp_rss} |");
    println!("| nhi-companion, of which anonymous (its own heap and stacks) | {comp_anon} |");
    println!(
        "| nhi-companion, of which file-backed (code, shared by all companions) | {comp_file} |"
    );
    println!("| busybox sleep (the workload, baseline) | {sleep_rss} |");
    println!(
        "\ncompanion vs the 4 MiB target: {:.2}x",
        comp_rss as f64 / 4096.0
    );
}

fn time_hook(node: &Node, stage: &str, state: &serde_json::Value) -> Duration {
    let input = state.to_string();
    let t = Instant::now();
    let mut ch = Command::new(bin("nhi-hook"))
        .args([stage, "--config", node.config.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    ch.stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let st = ch.wait().unwrap();
    let d = t.elapsed();
    assert!(st.success(), "hook {stage} failed");
    d
}

fn rss_kib(pid: i32, field: &str) -> u64 {
    proc_status(pid, field)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}
