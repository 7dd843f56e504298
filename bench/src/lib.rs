//! Shared helpers for nhi's benchmarks: percentiles and side-by-side reports. Every benchmark
//! measures nhi and its baseline in the same run, interleaved, and reports the ratio.

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
