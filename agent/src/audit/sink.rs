//! The writer behind a bounded queue: one thread owns the log files; everyone else only
//! `try_send`s.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use nhi_core::audit::{now_ms, AuditEvent, AuditKind, Decision};
use nhi_core::audit_log::{Record, Writer, WriterOptions};

use crate::metrics::Metrics;

/// Most records written between two commits (file write, fsync per policy, head update).
const MAX_BATCH: usize = 1024;
/// How often an idle writer looks for drops to report.
const IDLE: Duration = Duration::from_millis(500);

enum Msg {
    Record(Box<Record>),
    /// Answered once everything queued before it is committed.
    Sync(std::sync::mpsc::Sender<()>),
}

pub struct AuditSink {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
}

impl AuditSink {
    /// Opens the log in `dir` (resuming its chain, or recording a break: see
    /// [`Writer::open`]) and starts the writer thread.
    pub fn start(
        dir: &Path,
        opts: WriterOptions,
        queue: usize,
        metrics: Arc<Metrics>,
    ) -> Result<AuditSink, String> {
        let err = |e: std::io::Error| format!("audit log {}: {e}", dir.display());
        let (mut writer, broken) = Writer::open(dir, opts).map_err(err)?;
        if let Some(why) = broken {
            tracing::error!(
                dir = %dir.display(),
                "audit log chain is broken ({why}); not appending to it: starting segment {} with a chain_break record",
                writer.segment() + u64::from(writer.segment() == 0)
            );
            writer
                .append(Record {
                    event: AuditEvent {
                        ts_ms: now_ms(),
                        kind: AuditKind::ChainBreak,
                        decision: Decision::Error,
                        detail: Some(why),
                        ..Default::default()
                    },
                    ..Default::default()
                })
                .map_err(err)?;
            metrics.records_written.inc();
        }
        writer.commit().map_err(err)?;
        let (tx, rx) = sync_channel(queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let (d, m) = (dropped.clone(), metrics.clone());
        std::thread::Builder::new()
            .name("nhi-audit".into())
            .spawn(move || write_loop(writer, rx, d, m))
            .map_err(|e| format!("audit writer thread: {e}"))?;
        Ok(AuditSink {
            tx,
            dropped,
            metrics,
        })
    }

    /// Never waits: a full queue drops the record and counts it (the count is written later).
    pub fn submit(&self, rec: Record) {
        match self.tx.try_send(Msg::Record(Box::new(rec))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                self.metrics.dropped("nhid", 1);
            }
        }
    }

    /// Blocks until everything submitted before is on disk (daemon shutdown, tests).
    pub fn sync(&self, timeout: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Sync(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }
}

fn write_loop(mut w: Writer, rx: Receiver<Msg>, dropped: Arc<AtomicU64>, metrics: Arc<Metrics>) {
    let mut failing = false;
    loop {
        let first = match rx.recv_timeout(IDLE) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let mut syncs = Vec::new();
        let mut result = Ok(());
        let mut take = |m: Msg, w: &mut Writer| match m {
            Msg::Record(r) => {
                if result.is_ok() {
                    result = w.append(*r).map(|_| {
                        metrics.records_written.inc();
                    });
                }
            }
            Msg::Sync(tx) => syncs.push(tx),
        };
        if let Some(m) = first {
            take(m, &mut w);
            for _ in 1..MAX_BATCH {
                match rx.try_recv() {
                    Ok(m) => take(m, &mut w),
                    Err(_) => break,
                }
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if lost > 0 && result.is_ok() {
            result = w
                .append(Record {
                    event: AuditEvent {
                        ts_ms: now_ms(),
                        kind: AuditKind::Dropped,
                        decision: Decision::Error,
                        detail: Some(format!("nhid's audit queue was full: {lost} events lost")),
                        ..Default::default()
                    },
                    dropped: Some(lost),
                    ..Default::default()
                })
                .map(|_| {
                    metrics.records_written.inc();
                });
        }
        let result = result.and_then(|()| w.commit());
        match result {
            Ok(()) => failing = false,
            Err(e) => {
                metrics.write_errors.inc();
                if !failing {
                    tracing::error!("writing the audit log: {e}");
                }
                failing = true;
            }
        }
        for s in syncs {
            let _ = s.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nhi_core::config::Fsync;

    fn rec(i: u64) -> Record {
        Record {
            spiffe_id: Some("spiffe://td/x".into()),
            event: AuditEvent {
                ts_ms: i,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_full_queue_drops_counts_and_writes_the_loss() {
        let d = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let opts = WriterOptions {
            max_file_bytes: 1 << 20,
            max_files: 0,
            fsync: Fsync::Never,
        };
        let sink = AuditSink::start(d.path(), opts, 4, metrics.clone()).unwrap();
        // Far more than the queue holds, faster than any disk: some must drop, none may block.
        for i in 0..5000 {
            sink.submit(rec(i));
        }
        assert!(sink.sync(Duration::from_secs(10)));
        // The drop count is written with the batch after the loss.
        std::thread::sleep(IDLE * 2);
        assert!(sink.sync(Duration::from_secs(10)));
        let v = nhi_core::audit_log::verify(d.path()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        let lines = nhi_core::audit_log::tail(d.path(), usize::MAX, None).unwrap();
        let recs: Vec<Record> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let written = recs
            .iter()
            .filter(|r| r.event.kind != AuditKind::Dropped)
            .count() as u64;
        let lost: u64 = recs.iter().filter_map(|r| r.dropped).sum();
        assert!(lost > 0, "a 4-slot queue must overflow");
        assert_eq!(
            written + lost,
            5000,
            "every event is either written or counted"
        );
        assert_eq!(metrics.dropped_total("nhid"), lost);
    }

    #[test]
    fn the_chain_continues_across_a_restart_of_the_sink_and_rotation() {
        let d = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            max_file_bytes: 4096,
            max_files: 0,
            fsync: Fsync::Batch,
        };
        for round in 0..2 {
            let sink = AuditSink::start(d.path(), opts, 1024, Arc::new(Metrics::new())).unwrap();
            for i in 0..100 {
                sink.submit(rec(round * 100 + i));
            }
            assert!(sink.sync(Duration::from_secs(10)));
        }
        let v = nhi_core::audit_log::verify(d.path()).unwrap();
        assert!(v.ok(), "{:?}", v.problems);
        assert_eq!(v.records, 200);
        assert!(v.files >= 3);
    }
}
