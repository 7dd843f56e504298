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
//! - With `--baseline-bin-dir DIR` (the binaries of another nhi build, e.g. main's, from
//!   `cargo build --release --bins` in its checkout): a third interleaved series, `runc run`
//!   through that build's nhid and hook, so a change is measured against its base in one run.
//!   `--baseline-legacy-user` when that build predates `companion.uid_range`.
//!
//! Run as root: `cargo run --release -p nhi-bench --bin start-latency -- --runs 200`

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use nhi_bench::{interleave_n, ms, row, summarize, HEADER};
use nhi_integration::*;

#[derive(Parser)]
struct Args {
    /// Runs per series.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Warm-up runs per series, not counted.
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    /// Binaries of another nhi build to measure in the same run (a third series).
    #[arg(long)]
    baseline_bin_dir: Option<std::path::PathBuf>,
    /// The baseline build takes `companion.user` (before `companion.uid_range`).
    #[arg(long)]
    baseline_legacy_user: bool,
}

fn main() {
    let args = Args::parse();
    let mut node = Node::new(ANNOTATED_RULE);
    node.start();
    let mut baseline = args.baseline_bin_dir.as_deref().map(|dir| {
        let mut n = Node::with_bin_dir(ANNOTATED_RULE, dir, args.baseline_legacy_user);
        n.start();
        n
    });
    let series = if baseline.is_some() { 3 } else { 2 };
    let mut all = interleave_n(args.runs, args.warmup, series, |s| {
        let c = match s {
            0 => node
                .bundle(&unique_id("plain"))
                .without_hooks()
                .args(&["true"])
                .write(),
            1 => node
                .bundle(&unique_id("nhi"))
                .inject()
                .args(&["true"])
                .write(),
            _ => baseline
                .as_ref()
                .expect("baseline node")
                .bundle(&unique_id("base"))
                .inject()
                .args(&["true"])
                .write(),
        };
        let t = Instant::now();
        let out = c.run();
        let d = t.elapsed();
        assert!(out.status.success(), "{}: {out:?}", c.id);
        let _ = std::fs::remove_dir_all(&c.bundle);
        d
    });
    let based = (series == 3).then(|| all.pop().expect("baseline series"));
    let hooked = all.pop().expect("nhi series");
    let plain = all.pop().expect("plain series");
    assert!(node.status().workloads.is_empty(), "companions left behind");
    if let Some(b) = baseline.as_mut() {
        b.stop();
    }

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
    c.get("/v1/token?audience=rss").unwrap(); // Container::get sends the proof header
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
    let sb = based.as_deref().map(summarize);
    if let Some(sb) = &sb {
        println!("{}", row("runc + nhi hook, baseline build", sb));
    }
    println!(
        "\nratio nhi/plain: p50 {:.2}x, p99 {:.2}x; added p50 {:+.2} ms (target <= +15 ms)",
        ms(sh.p50) / ms(sp.p50),
        ms(sh.p99) / ms(sp.p99),
        ms(sh.p50) - ms(sp.p50)
    );
    if let Some(sb) = &sb {
        println!(
            "baseline/plain: p50 {:.2}x; this build vs the baseline: p50 {:+.2} ms, p99 {:+.2} ms",
            ms(sb.p50) / ms(sp.p50),
            ms(sh.p50) - ms(sb.p50),
            ms(sh.p99) - ms(sb.p99)
        );
    }
    println!();
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
