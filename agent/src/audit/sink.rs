//! The writer behind a bounded queue: one thread owns the log files; everyone else only
//! `try_send`s.
//!
//! Nothing is lost silently. An event that does not fit in the queue is counted, and so is
//! every record a failed write could not put on disk (a full or failing disk: the writer cuts
//! the partial batch back, see [`Writer`]). Each count becomes a `dropped` record (how many, the
//! time span, why) in the first batch that can be written; until then it is retried every
//! [`IDLE`], and the loss shows in `nhi_audit_dropped_total{source="nhid"|"disk"}`. Issuance
//! never waits for any of it.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use nhi_core::audit::{now_ms, AuditEvent, AuditKind, Decision};
use nhi_core::audit_log::{Lost, Record, Storage, Writer, WriterOptions};

use crate::metrics::Metrics;

/// Most records written between two commits (file write, fsync per policy, head update).
const MAX_BATCH: usize = 1024;
/// How often an idle writer looks for drops to report (and retries a failing disk).
const IDLE: Duration = Duration::from_millis(500);

enum Msg {
    Record(Box<Record>),
    /// Answered once everything queued before it was committed (or failed to be).
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
        let opened = Writer::open(dir, opts);
        Self::start_with(dir, opened, queue, metrics)
    }

    /// [`AuditSink::start`] over a writer already opened (e.g. on a [`Storage`] that fails on
    /// command).
    pub fn start_with<S: Storage>(
        dir: &Path,
        opened: std::io::Result<(Writer<S>, Option<String>)>,
        queue: usize,
        metrics: Arc<Metrics>,
    ) -> Result<AuditSink, String> {
        let (writer, broken) = opened.map_err(|e| format!("audit log {}: {e}", dir.display()))?;
        let pending_break = broken.map(|why| {
            tracing::error!(
                dir = %dir.display(),
                "audit log chain is broken ({why}); not appending to it: starting segment {} with a chain_break record",
                writer.segment()
            );
            Record {
                event: AuditEvent {
                    ts_ms: now_ms(),
                    kind: AuditKind::ChainBreak,
                    decision: Decision::Error,
                    detail: Some(why),
                    ..Default::default()
                },
                ..Default::default()
            }
        });
        let (tx, rx) = sync_channel(queue);
        let dropped = Arc::new(AtomicU64::new(0));
        let mut state = Loop {
            w: writer,
            queue_dropped: dropped.clone(),
            metrics: metrics.clone(),
            pending_break,
            disk_loss: Lost::default(),
            why: String::new(),
            failing: false,
        };
        // The head (and a chain break) go to disk before nhid serves; a disk that fails now
        // does not stop nhid: the writer keeps retrying and counts what it cannot write.
        state.commit_batch(&mut Vec::new());
        std::thread::Builder::new()
            .name("nhi-audit".into())
            .spawn(move || state.run(rx))
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

    /// Blocks until everything submitted before went through a commit (daemon shutdown,
    /// tests).
    pub fn sync(&self, timeout: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.tx.send(Msg::Sync(tx)).is_err() {
            return false;
        }
        rx.recv_timeout(timeout).is_ok()
    }
}

/// The writer thread's state.
struct Loop<S: Storage> {
    w: Writer<S>,
    /// Events the queue had no room for, not yet in a `dropped` record.
    queue_dropped: Arc<AtomicU64>,
    metrics: Arc<Metrics>,
    /// A chain break found at open, written first and retried until it is.
    pending_break: Option<Record>,
    /// Events a failed write lost, not yet in a `dropped` record, and the last reason.
    disk_loss: Lost,
    why: String,
    failing: bool,
}

impl<S: Storage> Loop<S> {
    fn run(mut self, rx: Receiver<Msg>) {
        loop {
            let first = match rx.recv_timeout(IDLE) {
                Ok(m) => Some(m),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => return,
            };
            let mut syncs = Vec::new();
            let mut records = Vec::new();
            let mut take = |m: Msg| match m {
                Msg::Record(r) => records.push(*r),
                Msg::Sync(tx) => syncs.push(tx),
            };
            if let Some(m) = first {
                take(m);
                for _ in 1..MAX_BATCH {
                    match rx.try_recv() {
                        Ok(m) => take(m),
                        Err(_) => break,
                    }
                }
            }
            self.commit_batch(&mut records);
            for s in syncs {
                let _ = s.send(());
            }
        }
    }

    /// Appends a pending break, the counts of earlier losses and `records`, and commits them.
    fn commit_batch(&mut self, records: &mut Vec<Record>) {
        let mut unappendable = Lost::default();
        if let Some(b) = &self.pending_break {
            let _ = self.w.append(b.clone());
        }
        if self.disk_loss.total() > 0 {
            let lost = std::mem::take(&mut self.disk_loss);
            let rec = dropped_record(
                lost.total(),
                Some([lost.first_ms, lost.last_ms]),
                format!("not written to the log: {}", self.why),
            );
            // Re-counted from the commit error if this record is lost too.
            let _ = self.w.append(rec);
        }
        for r in records.drain(..) {
            let ts = r.event.ts_ms;
            if let Err(e) = self.w.append(r) {
                // Not serializable: never happens with these types; counted all the same.
                tracing::error!("audit record not serializable: {e}");
                unappendable.add(&Lost {
                    records: 1,
                    events: 1,
                    first_ms: ts,
                    last_ms: ts,
                    ..Default::default()
                });
            }
        }
        let queue_lost = self.queue_dropped.swap(0, Ordering::Relaxed);
        if queue_lost > 0 {
            let _ = self.w.append(dropped_record(
                queue_lost,
                None,
                format!("nhid's audit queue was full: {queue_lost} events lost"),
            ));
        }
        self.metrics.dropped("disk", unappendable.events);
        self.disk_loss.add(&unappendable);
        if self.w.pending() == 0 && self.disk_loss.total() == 0 {
            // Nothing to write; a head left dirty by a failure is retried all the same.
            if let Err(e) = self.w.commit() {
                self.failed(&e.source.to_string());
            }
            return;
        }
        match self.w.commit() {
            Ok(n) => {
                self.metrics.records_written.inc_by(n);
                self.pending_break = None;
                if self.failing {
                    tracing::warn!("audit log writable again; the loss is recorded in the log");
                }
                self.failing = false;
            }
            Err(e) => {
                self.metrics.records_written.inc_by(e.written);
                match e.lost {
                    Some(mut lost) => {
                        // The break is retried, not counted; earlier counts come back.
                        if self.pending_break.is_some() {
                            lost.records -= 1;
                        }
                        self.metrics.dropped("disk", lost.events);
                        self.disk_loss.add(&lost);
                    }
                    None => self.pending_break = None,
                }
                self.failed(&e.source.to_string());
            }
        }
    }

    fn failed(&mut self, why: &str) {
        self.metrics.write_errors.inc();
        if !self.failing {
            tracing::error!(
                "writing the audit log: {why}; counting what is lost until it can be written"
            );
        }
        self.why = why.to_string();
        self.failing = true;
    }
}

fn dropped_record(n: u64, between: Option<[u64; 2]>, detail: String) -> Record {
    Record {
        event: AuditEvent {
            ts_ms: now_ms(),
            kind: AuditKind::Dropped,
            decision: Decision::Error,
            detail: Some(detail),
            ..Default::default()
        },
        dropped: Some(n),
        lost_between: between,
        ..Default::default()
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

    /// (events written, events the log says it lost), and whether the log verifies.
    fn accounting(dir: &Path) -> (u64, u64, bool) {
        let v = nhi_core::audit_log::verify(dir).unwrap();
        let lines = nhi_core::audit_log::tail(dir, usize::MAX, None).unwrap();
        let written = lines
            .iter()
            .map(|l| serde_json::from_str::<Record>(l).unwrap())
            .filter(|r| !matches!(r.event.kind, AuditKind::Dropped | AuditKind::ChainBreak))
            .count() as u64;
        (written, v.lost, v.ok())
    }

    #[test]
    fn a_full_disk_loses_records_only_counted_and_recorded_once_space_returns() {
        use nhi_core::audit_log::FaultyDisk;
        let d = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let opts = WriterOptions {
            max_file_bytes: 4096,
            max_files: 0,
            fsync: Fsync::Batch,
        };
        let disk = FaultyDisk::default();
        let opened = Writer::open_with(d.path(), opts, disk.clone());
        let sink = AuditSink::start_with(d.path(), opened, 1 << 16, metrics.clone()).unwrap();
        for i in 0..100 {
            sink.submit(rec(i));
        }
        assert!(sink.sync(Duration::from_secs(10)));
        // The disk fills up in the middle of a batch, and stays full for a while.
        disk.faults.lock().unwrap().space = Some(2000);
        for i in 100..1100 {
            sink.submit(rec(i));
            if i % 50 == 0 {
                assert!(sink.sync(Duration::from_secs(10)));
            }
        }
        assert!(sink.sync(Duration::from_secs(10)));
        std::thread::sleep(IDLE * 2);
        let (_, lost_so_far, _) = accounting(d.path());
        assert_eq!(lost_so_far, 0, "nothing written while the disk is full");
        let lost_disk = metrics.dropped_total("disk");
        assert!(lost_disk > 0 && metrics.write_errors.get() > 0);
        // Space returns: the next commit writes the count first.
        disk.faults.lock().unwrap().space = None;
        for i in 1100..1110 {
            sink.submit(rec(i));
        }
        assert!(sink.sync(Duration::from_secs(10)));
        let (written, lost, ok) = accounting(d.path());
        assert!(ok, "loss is never reported as tampering");
        assert_eq!(written + lost, 1110, "every event is written or counted");
        assert_eq!(lost, lost_disk, "the metrics show the loss");
        let lines = nhi_core::audit_log::tail(d.path(), usize::MAX, None).unwrap();
        let drop: Record = lines
            .iter()
            .map(|l| serde_json::from_str::<Record>(l).unwrap())
            .find(|r| r.event.kind == AuditKind::Dropped)
            .unwrap();
        let detail = drop.event.detail.unwrap();
        assert!(
            detail.contains("not written to the log") && detail.contains("No space left"),
            "{detail}"
        );
        let [first, last] = drop.lost_between.unwrap();
        assert!(
            first >= 100 && last < 1100 && first <= last,
            "{first}..{last}"
        );
    }

    #[test]
    fn a_chain_break_on_a_failing_disk_is_retried_until_written() {
        use nhi_core::audit_log::FaultyDisk;
        let d = tempfile::tempdir().unwrap();
        let opts = WriterOptions {
            max_file_bytes: 1 << 20,
            max_files: 0,
            fsync: Fsync::Batch,
        };
        let sink = AuditSink::start(d.path(), opts, 64, Arc::new(Metrics::new())).unwrap();
        for i in 0..5 {
            sink.submit(rec(i));
        }
        assert!(sink.sync(Duration::from_secs(10)));
        drop(sink);
        std::fs::remove_file(d.path().join("head.json")).unwrap();
        let disk = FaultyDisk::default();
        disk.faults.lock().unwrap().space = Some(0);
        let metrics = Arc::new(Metrics::new());
        let opened = Writer::open_with(d.path(), opts, disk.clone());
        let sink = AuditSink::start_with(d.path(), opened, 64, metrics.clone()).unwrap();
        sink.submit(rec(5));
        assert!(sink.sync(Duration::from_secs(10)));
        disk.faults.lock().unwrap().space = None;
        sink.submit(rec(6));
        assert!(sink.sync(Duration::from_secs(10)));
        let lines = nhi_core::audit_log::tail(d.path(), usize::MAX, None).unwrap();
        let recs: Vec<Record> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let kinds: Vec<AuditKind> = recs[5..].iter().map(|r| r.event.kind).collect();
        assert_eq!(
            kinds,
            vec![
                AuditKind::ChainBreak,
                AuditKind::Dropped,
                AuditKind::Connection
            ],
            "the break first, then the count of what the full disk lost"
        );
        assert_eq!(recs[6].dropped, Some(1));
        assert_eq!(metrics.dropped_total("disk"), 1);
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
