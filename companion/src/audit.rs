//! The companion's audit recorder: the data path hands events over without ever waiting; a
//! background task batches them to `nhid` over the channel. If the queue is full (nhid or the
//! channel fell behind), the event is dropped and counted; the count travels with the next batch
//! so the loss itself lands in the audit log instead of vanishing.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nhi_core::audit::{AuditEvent, MAX_BATCH};
use nhi_core::wire::Notice;
use tokio::sync::mpsc;

use crate::channel::Channel;

/// Events buffered between the data path and the channel.
pub const QUEUE: usize = 16 * 1024;
/// How long a partial batch waits for company before it is sent.
const LINGER: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<AuditEvent>,
    dropped: Arc<AtomicU64>,
}

impl Recorder {
    /// Starts the batching task on the current runtime.
    pub fn start(channel: Channel) -> Self {
        Self::start_with(channel, QUEUE)
    }

    fn start_with(channel: Channel, queue: usize) -> Self {
        let (tx, rx) = mpsc::channel(queue);
        let dropped = Arc::new(AtomicU64::new(0));
        tokio::spawn(flush(channel, rx, dropped.clone()));
        Recorder { tx, dropped }
    }

    /// Never waits: a full queue drops the event and counts it.
    pub fn record(&self, ev: AuditEvent) {
        if self.tx.try_send(ev).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn flush(channel: Channel, mut rx: mpsc::Receiver<AuditEvent>, dropped: Arc<AtomicU64>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        // Wait for the first event (or a reported drop), then linger briefly to fill the batch.
        let first = tokio::select! {
            ev = rx.recv() => ev,
            _ = tokio::time::sleep(Duration::from_secs(1)), if dropped.load(Ordering::Relaxed) > 0 => None,
        };
        let closed = first.is_none() && rx.is_closed();
        batch.extend(first);
        let deadline = tokio::time::Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(ev)) => batch.push(ev),
                _ => break,
            }
        }
        let lost = dropped.swap(0, Ordering::Relaxed);
        if !batch.is_empty() || lost > 0 {
            let events = std::mem::replace(&mut batch, Vec::with_capacity(MAX_BATCH));
            if channel
                .notify(Notice::Audit {
                    events,
                    dropped: lost,
                })
                .await
                .is_err()
            {
                return;
            }
        }
        if closed {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use nhi_core::wire::{ChannelRequest, FromCompanion, EVENT_ID};

    /// Through a real channel: a flood far larger than the queue, recorded without ever
    /// yielding to the flush task, arrives at nhid's end as events plus reported drops that add
    /// up exactly, in notifications nhid never has to answer.
    #[test]
    fn every_event_is_delivered_or_counted_as_dropped() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (channel, _events, mut lines) = crate::channel::testing::pair().await;
            let recorder = Recorder::start_with(channel, 8);
            const N: u64 = 1000;
            for i in 0..N {
                recorder.record(AuditEvent {
                    ts_ms: i,
                    ..Default::default()
                });
            }
            let (mut delivered, mut dropped) = (0u64, 0u64);
            while delivered + dropped < N {
                let line = tokio::time::timeout(Duration::from_secs(5), lines.next())
                    .await
                    .expect("the recorder stalled")
                    .unwrap()
                    .unwrap();
                let req: ChannelRequest = serde_json::from_str(&line).unwrap();
                assert_eq!(req.id, EVENT_ID, "audit batches are notifications");
                match req.body {
                    FromCompanion::Notice(Notice::Audit { events, dropped: d }) => {
                        assert!(events.len() <= MAX_BATCH);
                        delivered += events.len() as u64;
                        dropped += d;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            assert_eq!(delivered + dropped, N, "nothing lost uncounted");
            assert!(dropped > 0, "a queue of 8 cannot hold a burst of {N}");
            assert!(delivered >= 8, "what the queue held was delivered");
        });
    }
}
