//! Audit log write cost: the hash-chained log (`nhi_core::audit_log::Writer`: chain, rotation
//! check, atomic head after each batch) against a plain append of the same JSON event lines with
//! the same fsync pattern, in the same run, interleaved. One sample = `--records` records written
//! in batches of `--batch` (one commit/fsync per batch, as nhid's writer does under load).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use clap::Parser;
use nhi_bench::{interleave, ms, row, summarize, HEADER};
use nhi_core::audit::{AuditEvent, AuditKind, CredentialRef, Decision, Destination};
use nhi_core::audit_log::{Record, WorkloadRef, Writer, WriterOptions};
use nhi_core::config::Fsync;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 50)]
    runs: usize,
    #[arg(long, default_value_t = 5)]
    warmup: usize,
    #[arg(long, default_value_t = 10_000)]
    records: usize,
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// Directory for the two logs (default: a temp dir under /var/tmp, on disk, not tmpfs).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

fn event(i: usize) -> (Option<String>, Option<WorkloadRef>, AuditEvent) {
    (
        Some("spiffe://cluster.example.org/ns/shop/sa/web".into()),
        Some(WorkloadRef {
            container_id: "4b1e6f0c2d9a8e7f6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a".into(),
            container_name: Some("web".into()),
            pod_namespace: Some("shop".into()),
            pod_name: Some("web-7d9f".into()),
            pod_uid: Some("0c6a3b1e-1111-2222-3333-444455556666".into()),
            ..Default::default()
        }),
        AuditEvent {
            ts_ms: 1_795_000_000_000 + i as u64,
            kind: AuditKind::HttpRequest,
            source: Some("10.1.2.3:51234".into()),
            destination: Some(Destination {
                addr: Some("10.9.8.7:80".into()),
                host: Some("payments.internal".into()),
                method: Some("POST".into()),
                path: Some("/v1/charge".into()),
                ..Default::default()
            }),
            decision: Decision::Allow,
            rule: Some("payments-api".into()),
            bytes_out: 512,
            bytes_in: 2048,
            duration_ms: 3,
            credential: Some(CredentialRef {
                name: "secret:payments-key".into(),
                version: Some("7".into()),
            }),
            detail: None,
            mtls: None,
        },
    )
}

fn main() {
    let a = Args::parse();
    let tmp = tempfile::Builder::new()
        .prefix("nhi-bench-audit-")
        .tempdir_in(a.dir.clone().unwrap_or_else(|| "/var/tmp".into()))
        .expect("temp dir");
    let opts = WriterOptions {
        max_file_bytes: 64 * 1024 * 1024,
        max_files: 0,
        fsync: Fsync::Batch,
    };
    let (mut chained, broken) = Writer::open(&tmp.path().join("chained"), opts).expect("writer");
    assert!(broken.is_none());
    let mut plain = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(tmp.path().join("plain.jsonl"))
        .expect("plain file");
    let mut buf = Vec::new();
    let mut n = 0usize;
    let (base, nhi) = interleave(a.runs, a.warmup, |with_nhi| {
        let t = Instant::now();
        for i in 0..a.records {
            n += 1;
            let (spiffe_id, workload, ev) = event(n);
            if with_nhi {
                chained
                    .append(Record {
                        spiffe_id,
                        workload,
                        event: ev,
                        ..Default::default()
                    })
                    .unwrap();
                if (i + 1) % a.batch == 0 || i + 1 == a.records {
                    chained.commit().unwrap();
                }
            } else {
                // Same fields, no seq/prev/hash, no head.
                serde_json::to_writer(
                    &mut buf,
                    &serde_json::json!({"spiffe_id": spiffe_id, "workload": workload, "event": ev}),
                )
                .unwrap();
                buf.push(b'\n');
                if (i + 1) % a.batch == 0 || i + 1 == a.records {
                    plain.write_all(&buf).unwrap();
                    buf.clear();
                    plain.sync_data().unwrap();
                }
            }
        }
        t.elapsed()
    });
    let (sb, sn) = (summarize(&base), summarize(&nhi));
    let per_sec = |d: Duration| a.records as f64 / d.as_secs_f64();
    println!(
        "## Audit log write: {} records per sample in batches of {} (fsync per batch), {} samples each, interleaved\n",
        a.records, a.batch, sb.n
    );
    println!("{HEADER}");
    println!("{}", row("plain JSON-lines append (baseline)", &sb));
    println!("{}", row("hash-chained log + atomic head", &sn));
    println!(
        "\nthroughput p50: baseline {:.0} records/s, chained {:.0} records/s; ratio chained/plain time p50 {:.2}x, p99 {:.2}x\n",
        per_sec(sb.p50),
        per_sec(sn.p50),
        ms(sn.p50) / ms(sb.p50),
        ms(sn.p99) / ms(sb.p99)
    );
}
