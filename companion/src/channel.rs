//! The companion's end of the socketpair `nhid` handed it at spawn: its only way to credentials.
//! Requests are multiplexed by id; when `nhid` closes its end (detach, shutdown) the companion
//! exits, so it never outlives the decision to serve its workload.

use std::collections::HashMap;
use std::os::fd::OwnedFd;

use futures_util::StreamExt;
use nhi_core::wire::{
    ChannelRequest, ChannelResponse, CompanionRequest, CompanionResponse, EVENT_ID, MAX_LINE,
};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec};

type Reply = oneshot::Sender<CompanionResponse>;
pub type Events = mpsc::UnboundedReceiver<CompanionResponse>;

#[derive(Clone)]
pub struct Channel {
    tx: mpsc::Sender<(CompanionRequest, Option<Reply>)>,
}

impl Channel {
    /// Takes ownership of the channel fd and starts its I/O task. `on_close` runs when nhid
    /// closes the channel. Events nhid pushes (rotation, revocation) arrive on the receiver.
    pub fn start(
        fd: OwnedFd,
        on_close: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<(Self, Events)> {
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream.set_nonblocking(true)?;
        let stream = UnixStream::from_std(std_stream)?;
        let (tx, rx) = mpsc::channel(64);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            io_task(stream, rx, events_tx).await;
            on_close();
        });
        Ok((Channel { tx }, events_rx))
    }

    pub async fn call(&self, req: CompanionRequest) -> Result<CompanionResponse, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send((req, Some(reply)))
            .await
            .map_err(|_| "channel to nhid is closed".to_string())?;
        rx.await
            .map_err(|_| "channel to nhid is closed".to_string())
    }

    /// Sends a notification nhid does not answer (audit events). Waits only for room in the
    /// channel's queue, never for nhid.
    pub async fn notify(&self, req: CompanionRequest) -> Result<(), String> {
        self.tx
            .send((req, None))
            .await
            .map_err(|_| "channel to nhid is closed".to_string())
    }
}

async fn io_task(
    stream: UnixStream,
    mut rx: mpsc::Receiver<(CompanionRequest, Option<Reply>)>,
    events: mpsc::UnboundedSender<CompanionResponse>,
) {
    let (rd, mut wr) = stream.into_split();
    let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE));
    let mut pending: HashMap<u64, Reply> = HashMap::new();
    let mut next_id: u64 = 1;
    loop {
        tokio::select! {
            req = rx.recv() => {
                let Some((body, reply)) = req else { return };
                let id = if reply.is_some() {
                    next_id += 1;
                    next_id - 1
                } else {
                    EVENT_ID
                };
                let mut line = serde_json::to_vec(&ChannelRequest { id, body }).expect("request serializes");
                line.push(b'\n');
                if wr.write_all(&line).await.is_err() {
                    return;
                }
                if let Some(reply) = reply {
                    pending.insert(id, reply);
                }
            }
            line = lines.next() => {
                let Some(Ok(line)) = line else { return };
                match serde_json::from_str::<ChannelResponse>(&line) {
                    Ok(resp) if resp.id == EVENT_ID => {
                        let _ = events.send(resp.body);
                    }
                    Ok(resp) => {
                        if let Some(reply) = pending.remove(&resp.id) {
                            let _ = reply.send(resp.body);
                        }
                    }
                    Err(e) => eprintln!("nhi-companion: bad message from nhid: {e}"),
                }
            }
        }
    }
}
