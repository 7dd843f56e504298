//! Shared helpers for nhi's benchmarks: percentiles and side-by-side reports. Every benchmark
//! measures nhi and its baseline in the same run, interleaved, and reports the ratio.

pub mod worker;

/// The runs of a benchmark that compares small requests and 100 MiB transfers.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct TransferRuns {
    /// Small-request runs per series.
    #[arg(long, default_value_t = 500)]
    pub runs: usize,
    /// 100 MiB transfers per series.
    #[arg(long, default_value_t = 5)]
    pub big_runs: usize,
    #[arg(long, default_value_t = 20)]
    pub warmup: usize,
}

/// The size of a bulk transfer: 100 MiB.
pub const BIG: usize = 100 << 20;

/// MiB/s of a [`BIG`] transfer that took `d`.
pub fn mibs(d: std::time::Duration) -> f64 {
    (BIG as f64 / (1 << 20) as f64) / d.as_secs_f64()
}

use std::time::Duration;

/// Summary of one series of samples.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub mean: Duration,
}

pub fn summarize(samples: &[Duration]) -> Summary {
    assert!(!samples.is_empty(), "no samples");
    let mut s = samples.to_vec();
    s.sort();
    let pct = |p: f64| s[(((s.len() - 1) as f64) * p).round() as usize];
    Summary {
        n: s.len(),
        p50: pct(0.50),
        p99: pct(0.99),
        mean: s.iter().sum::<Duration>() / s.len() as u32,
    }
}

/// Runs `warmup + runs` rounds of `measure(false)` (baseline) and `measure(true)` (nhi),
/// alternating which goes first so neither series always runs on a warmer machine. Returns the
/// counted (baseline, nhi) samples.
pub fn interleave(
    runs: usize,
    warmup: usize,
    mut measure: impl FnMut(bool) -> Duration,
) -> (Vec<Duration>, Vec<Duration>) {
    let (mut base, mut nhi) = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for i in 0..warmup + runs {
        let order = if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_nhi in order {
            let d = measure(with_nhi);
            if i >= warmup {
                if with_nhi {
                    nhi.push(d)
                } else {
                    base.push(d)
                }
            }
        }
    }
    (base, nhi)
}

/// Like [`interleave`] for `n` series: each round measures every series once, rotating which
/// goes first, so all see the same machine conditions. Warm-up rounds are not kept.
pub fn interleave_n(
    runs: usize,
    warmup: usize,
    n: usize,
    mut measure: impl FnMut(usize) -> Duration,
) -> Vec<Vec<Duration>> {
    let mut out = vec![Vec::with_capacity(runs); n];
    for i in 0..warmup + runs {
        for k in 0..n {
            let series = (i + k) % n;
            let d = measure(series);
            if i >= warmup {
                out[series].push(d);
            }
        }
    }
    out
}

/// Prints a two-series comparison with its ratios.
pub fn report(title: &str, base_name: &str, base: &[Duration], nhi: &[Duration]) {
    table(title, (base_name, base), ("with nhi", nhi), "nhi/plain");
}

/// [`report`] with both series named: `other` against `base`.
pub fn compare(title: &str, base: (&str, &[Duration]), other: (&str, &[Duration])) {
    let ratio = format!("{}/{}", other.0, base.0);
    table(title, base, other, &ratio);
}

fn table(title: &str, base: (&str, &[Duration]), other: (&str, &[Duration]), ratio: &str) {
    let (sa, sb) = (summarize(base.1), summarize(other.1));
    println!("## {title} ({} runs each, interleaved)\n", sa.n);
    println!("{HEADER}");
    println!("{}", row(base.0, &sa));
    println!("{}", row(other.0, &sb));
    println!(
        "\nratio {ratio}: p50 {:.2}x, p99 {:.2}x; added p50 {:+.2} ms\n",
        ms(sb.p50) / ms(sa.p50),
        ms(sb.p99) / ms(sa.p99),
        ms(sb.p50) - ms(sa.p50)
    );
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// One Markdown table row: `| name | n | p50 | p99 | mean |`.
pub fn row(name: &str, s: &Summary) -> String {
    format!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} |",
        s.n,
        ms(s.p50),
        ms(s.p99),
        ms(s.mean)
    )
}

pub const HEADER: &str =
    "| series | runs | p50 (ms) | p99 (ms) | mean (ms) |\n|---|---|---|---|---|";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving_alternates_and_skips_warmup() {
        let mut calls = Vec::new();
        let (b, n) = interleave(2, 1, |x| {
            calls.push(x);
            Duration::from_millis(if x { 2 } else { 1 })
        });
        assert_eq!(calls, [false, true, true, false, false, true]);
        assert_eq!((b.len(), n.len()), (2, 2));
        assert!(n.iter().all(|d| *d == Duration::from_millis(2)));
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        let s = summarize(&v);
        assert_eq!(s.p50, Duration::from_millis(51));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.n, 100);
        let one = summarize(&[Duration::from_millis(3)]);
        assert_eq!(one.p50, one.p99);
    }
}
