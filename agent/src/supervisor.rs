//! One task per companion: serves its channel (the socketpair is the capability: whatever
//! arrives on it is answered for this one identity and no other), restarts the companion with
//! backoff if it dies while its workload lives, and stops it on detach.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use nhi_core::wire::{
    ChannelRequest, ChannelResponse, CompanionRequest, CompanionResponse, Init, MAX_LINE,
};
use nhi_core::{SpiffeId, Workload};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Child;
use tokio::sync::oneshot;
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::issuer::Issuer;
use crate::netns::NetNs;
use crate::spawn::{spawn_companion, CompanionUser, Spawned};

/// What every companion task needs from the daemon.
pub struct Ctx {
    pub config: nhi_core::Config,
    pub issuer: Arc<dyn Issuer>,
    pub user: CompanionUser,
}

/// The identity a companion serves, fixed for its life.
#[derive(Debug)]
pub struct Identity {
    pub spiffe_id: SpiffeId,
    pub rule: String,
    pub workload: Workload,
}

/// `nhid`'s handle on a running companion.
pub struct CompanionHandle {
    pid: Arc<AtomicI32>,
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
}

impl CompanionHandle {
    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Stops the companion and waits until its process is gone (bounded: SIGTERM, a grace
    /// period, then SIGKILL).
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let (done_tx, done_rx) = oneshot::channel();
            if tx.send(done_tx).is_ok() {
                let bound = STOP_GRACE + WRITE_TIMEOUT + Duration::from_secs(1);
                if tokio::time::timeout(bound, done_rx).await.is_err() {
                    tracing::error!(pid = self.pid(), "companion did not stop in {bound:?}");
                }
            }
        }
    }
}

const STOP_GRACE: Duration = Duration::from_secs(2);
/// A companion that does not take an answer within this long is treated as hung and replaced.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest companion log line relayed; the rest of a longer line follows as its own line.
const MAX_LOG_LINE: u64 = 4096;
/// A companion that ran this long before exiting restarts at the shortest backoff again.
const HEALTHY_RUN: Duration = Duration::from_secs(30);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Starts a companion for `identity` in `netns` and returns once it is ready to serve.
pub async fn start(
    ctx: Arc<Ctx>,
    identity: Arc<Identity>,
    netns: NetNs,
) -> Result<CompanionHandle, String> {
    let last_stderr = Arc::new(Mutex::new(String::new()));
    let spawned = spawn(&ctx, &identity, &netns, &last_stderr).map_err(|e| {
        format!(
            "cannot start companion {}: {e}",
            ctx.config.companion.binary.display()
        )
    })?;
    let pid = Arc::new(AtomicI32::new(
        spawned.child.id().map(|p| p as i32).unwrap_or(0),
    ));
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    tokio::spawn(run(
        ctx.clone(),
        identity,
        netns,
        spawned,
        pid.clone(),
        ready_tx,
        stop_rx,
        last_stderr.clone(),
    ));
    let handle = CompanionHandle {
        pid,
        stop: Some(stop_tx),
    };
    match tokio::time::timeout(ctx.config.companion.ready_timeout, ready_rx).await {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(_)) => {
            handle.stop().await;
            let why = last_stderr.lock().map(|s| s.clone()).unwrap_or_default();
            Err(format!("companion exited before it was ready: {why}"))
        }
        Err(_) => {
            handle.stop().await;
            Err(format!(
                "companion not ready within {:?}",
                ctx.config.companion.ready_timeout
            ))
        }
    }
}

fn spawn(
    ctx: &Ctx,
    identity: &Identity,
    netns: &NetNs,
    last_stderr: &Arc<Mutex<String>>,
) -> std::io::Result<Spawned> {
    let c = &ctx.config.companion;
    let mut s = spawn_companion(
        &c.binary,
        &c.listen,
        c.max_cached_audiences,
        ctx.user,
        &netns.file,
    )?;
    // Relay the companion's log lines into nhid's log, tagged with the identity. Lines are cut
    // at MAX_LOG_LINE bytes: a misbehaving companion cannot grow nhid's memory.
    if let Some(err) = s.child.stderr.take() {
        let id = identity.spiffe_id.to_string();
        let last = last_stderr.clone();
        tokio::spawn(async move {
            let mut err = BufReader::new(err);
            let mut buf = Vec::with_capacity(256);
            loop {
                buf.clear();
                match (&mut err)
                    .take(MAX_LOG_LINE)
                    .read_until(b'\n', &mut buf)
                    .await
                {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let line = String::from_utf8_lossy(&buf);
                let line = line.trim_end_matches('\n');
                tracing::info!(spiffe_id = %id, "companion: {line}");
                if let Ok(mut l) = last.lock() {
                    line.clone_into(&mut l);
                }
            }
        });
    }
    Ok(s)
}

enum Ended {
    Stop(oneshot::Sender<()>),
    Exited(String),
}

#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: Arc<Ctx>,
    identity: Arc<Identity>,
    netns: NetNs,
    mut spawned: Spawned,
    pid: Arc<AtomicI32>,
    ready_tx: oneshot::Sender<()>,
    mut stop_rx: oneshot::Receiver<oneshot::Sender<()>>,
    last_stderr: Arc<Mutex<String>>,
) {
    let mut ready_tx = Some(ready_tx);
    let mut backoff = MIN_BACKOFF;
    loop {
        let started_at = tokio::time::Instant::now();
        let ended = serve(&ctx, &identity, &mut spawned, &mut ready_tx, &mut stop_rx).await;
        match ended {
            Ended::Stop(done) => {
                terminate(&mut spawned.child).await;
                let _ = done.send(());
                return;
            }
            Ended::Exited(why) => {
                // It may still run (closed its channel, sent garbage, stopped reading): make sure
                // it is gone before a new one binds the same port.
                terminate(&mut spawned.child).await;
                if ready_tx.is_some() {
                    // Never became ready: report to the attach call (dropping ready_tx), no restart.
                    tracing::warn!(spiffe_id = %identity.spiffe_id, "companion failed at startup: {why}");
                    wait_for_stop(stop_rx).await;
                    return;
                }
                if started_at.elapsed() >= HEALTHY_RUN {
                    backoff = MIN_BACKOFF;
                }
                tracing::warn!(spiffe_id = %identity.spiffe_id, "companion exited ({why}); restarting in {backoff:?}");
            }
        }
        // Restart with backoff until it runs again or nhid detaches the workload.
        loop {
            tokio::select! {
                done = &mut stop_rx => {
                    if let Ok(done) = done { let _ = done.send(()); }
                    return;
                }
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            match spawn(&ctx, &identity, &netns, &last_stderr) {
                Ok(s) => {
                    spawned = s;
                    pid.store(
                        spawned.child.id().map(|p| p as i32).unwrap_or(0),
                        Ordering::Relaxed,
                    );
                    break;
                }
                Err(e) => {
                    tracing::error!(spiffe_id = %identity.spiffe_id, "restarting companion: {e}")
                }
            }
        }
    }
}

async fn wait_for_stop(stop_rx: oneshot::Receiver<oneshot::Sender<()>>) {
    if let Ok(done) = stop_rx.await {
        let _ = done.send(());
    }
}

async fn serve(
    ctx: &Ctx,
    identity: &Identity,
    spawned: &mut Spawned,
    ready_tx: &mut Option<oneshot::Sender<()>>,
    stop_rx: &mut oneshot::Receiver<oneshot::Sender<()>>,
) -> Ended {
    let (rd, mut wr) = spawned.channel.split();
    let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE));
    loop {
        tokio::select! {
            done = &mut *stop_rx => {
                return match done {
                    Ok(done) => Ended::Stop(done),
                    // The handle was dropped without stop(): treat as stop.
                    Err(_) => Ended::Stop(oneshot::channel().0),
                };
            }
            status = spawned.child.wait() => {
                return Ended::Exited(format!("{status:?}"));
            }
            next = lines.next() => {
                let line = match next {
                    Some(Ok(line)) => line,
                    Some(Err(e)) => return Ended::Exited(format!("channel: {e}")),
                    None => return Ended::Exited("channel closed".into()),
                };
                let resp = match serde_json::from_str::<ChannelRequest>(&line) {
                    Ok(req) => {
                        let body = answer(ctx, identity, req.body, ready_tx);
                        ChannelResponse { id: req.id, body }
                    }
                    Err(e) => ChannelResponse { id: 0, body: CompanionResponse::Error { message: format!("bad request: {e}") } },
                };
                let mut out = serde_json::to_vec(&resp).expect("response serializes");
                out.push(b'\n');
                match tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return Ended::Exited("channel closed".into()),
                    Err(_) => return Ended::Exited("companion stopped reading its channel".into()),
                }
            }
        }
    }
}

fn answer(
    ctx: &Ctx,
    identity: &Identity,
    req: CompanionRequest,
    ready_tx: &mut Option<oneshot::Sender<()>>,
) -> CompanionResponse {
    let err = |e: crate::issuer::IssueError| CompanionResponse::Error {
        message: e.to_string(),
    };
    match req {
        CompanionRequest::Hello => {
            if let Some(tx) = ready_tx.take() {
                let _ = tx.send(());
            }
            CompanionResponse::Init(Box::new(Init {
                spiffe_id: identity.spiffe_id.to_string(),
                trust_domain: ctx.issuer.trust_domain().to_string(),
                rule: identity.rule.clone(),
                workload: identity.workload.clone(),
                bundle_pem: ctx.issuer.bundle_pem().to_string(),
                jwks: ctx.issuer.jwks().clone(),
            }))
        }
        CompanionRequest::Jwt { audience } => {
            match ctx.issuer.issue_jwt(&identity.spiffe_id, &audience) {
                Ok(j) => {
                    tracing::info!(spiffe_id = %identity.spiffe_id, audience = ?audience, expires_at = j.expires_at, "issued JWT-SVID");
                    CompanionResponse::Jwt(j)
                }
                Err(e) => err(e),
            }
        }
        CompanionRequest::X509 => match ctx.issuer.issue_x509(&identity.spiffe_id) {
            Ok(x) => {
                tracing::info!(spiffe_id = %identity.spiffe_id, serial = %x.serial, expires_at = x.expires_at, "issued X.509-SVID");
                CompanionResponse::X509(Box::new(x))
            }
            Err(e) => err(e),
        },
    }
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_ok() {
            return;
        }
    }
    let _ = child.kill().await;
}
