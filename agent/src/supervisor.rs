//! One task per companion: serves its channel (the socketpair is the capability: whatever
//! arrives on it is answered for this one identity and no other), restarts the companion with
//! backoff if it dies while its workload lives, and stops it on detach.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use futures_util::StreamExt;
use nhi_core::wire::{
    ChannelRequest, ChannelResponse, CompanionRequest, CompanionResponse, Init, SecretValue,
    Validated, EVENT_ID, MAX_LINE,
};
use nhi_core::{SpiffeId, Workload};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, LinesCodec};

use crate::issuer::{now_unix, Issuer};
use crate::netns::NetNs;
use crate::revoke::Revocations;
use crate::spawn::Spawned;
use crate::store::Store;

/// What every companion task needs from the daemon.
pub struct Ctx {
    pub config: nhi_core::Config,
    pub audit: Arc<crate::audit::AuditSink>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub issuer: Arc<dyn Issuer>,
    /// One uid per companion, from `companion.uid_range`.
    pub uids: Arc<crate::uids::UidAllocator>,
    pub store: Arc<Store>,
    pub revocations: Arc<Revocations>,
    /// Companions' cgroups (bounds, and the edge policy's exemption).
    pub cgroups: Arc<crate::cgroup::Cgroups>,
    /// Edge policies: from the config at start, replaced on SIGHUP.
    pub policies: std::sync::RwLock<Arc<Vec<nhi_core::policy::Policy>>>,
}

impl Ctx {
    /// The edge policy of an identity now (the first `[[policy]]` that covers it).
    pub fn policy_for(&self, identity: &Identity) -> Option<nhi_core::policy::Policy> {
        let all = self
            .policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        nhi_core::policy::policy_for(&all, identity.spiffe_id.as_str(), &identity.rule).cloned()
    }

    /// A JWT-SVID of this trust domain: signature by one of its keys, audience, expiry, and not
    /// on the deny list.
    pub fn validate(&self, token: &str, audience: &str) -> Result<Validated, String> {
        let jwks = serde_json::to_string(&self.issuer.jwks()).expect("jwks serializes");
        let claims =
            nhi_core::jwt::verify_token(token, &jwks, audience, Some(self.issuer.trust_domain()))?;
        let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("");
        let jti = claims.get("jti").and_then(|v| v.as_str());
        let iat = claims.get("iat").and_then(|v| v.as_u64());
        if let Some(why) = self.revocations.denies_jwt(sub, jti, iat) {
            return Err(format!("token revoked: {why}"));
        }
        Ok(Validated {
            spiffe_id: sub.to_string(),
            claims: serde_json::Value::Object(claims),
        })
    }
}

/// The identity a companion serves, fixed for its life, and what it was issued.
#[derive(Debug)]
pub struct Identity {
    pub spiffe_id: SpiffeId,
    pub rule: String,
    pub workload: Workload,
    /// Every JWT-SVID `jti` and X.509-SVID serial issued over this companion's channel: denied
    /// when the workload ends.
    pub issued: crate::revoke::WorkloadLedger,
}

impl Identity {
    pub fn new(spiffe_id: SpiffeId, rule: String, workload: Workload) -> Self {
        Identity {
            spiffe_id,
            rule,
            workload,
            issued: Default::default(),
        }
    }
}

/// The listening sockets a companion serves besides its TCP ports (each container's Workload
/// API socket), and the fd channel of its current incarnation: every incarnation gets all of
/// them, containers that join later get theirs while it runs.
#[derive(Default)]
struct Handover {
    sockets: std::collections::BTreeMap<String, Arc<crate::wapi::ContainerSocket>>,
    channel: Option<std::os::fd::OwnedFd>,
}

impl Handover {
    fn send(&self, key: &str, socket: Option<&crate::wapi::ContainerSocket>) {
        use std::os::fd::AsRawFd;
        let Some(ch) = &self.channel else { return };
        let fd = socket.map(|s| s.listener.as_raw_fd());
        if let Err(e) = crate::spawn::send_listener(ch, key, fd) {
            // The incarnation is going away (its restart resends everything) or hung.
            tracing::warn!(container = %key, "handing the Workload API socket to the companion: {e}");
        }
    }

    /// A new incarnation: hand it every socket.
    fn attach(&mut self, channel: std::os::fd::OwnedFd) {
        self.channel = Some(channel);
        for (key, s) in &self.sockets {
            self.send(key, Some(s));
        }
    }
}

/// `nhid`'s handle on a running companion.
pub struct CompanionHandle {
    pid: Arc<AtomicI32>,
    uid: u32,
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
    events: mpsc::UnboundedSender<CompanionResponse>,
    handover: Arc<Mutex<Handover>>,
    /// The AWS container-credential token of its workload, when its rule names an AWS source.
    aws_token: Option<Arc<zeroize::Zeroizing<String>>>,
}

impl CompanionHandle {
    /// The uid (and gid) the companion runs as, for its whole life.
    pub fn uid(&self) -> u32 {
        self.uid
    }

    pub fn aws_token(&self) -> Option<&str> {
        self.aws_token.as_deref().map(|t| t.as_str())
    }

    /// Serves the Workload API on `socket` too (container `key`'s `/run/nhi/workload.sock`),
    /// now and in every later incarnation; replaces the container's previous socket.
    pub fn add_socket(&self, key: &str, socket: crate::wapi::ContainerSocket) {
        let mut h = self.handover.lock().unwrap_or_else(|p| p.into_inner());
        let socket = Arc::new(socket);
        h.send(key, Some(&socket));
        h.sockets.insert(key.to_string(), socket);
    }

    /// Stops serving container `key`'s socket (the container is gone).
    pub fn remove_socket(&self, key: &str) {
        let mut h = self.handover.lock().unwrap_or_else(|p| p.into_inner());
        if h.sockets.remove(key).is_some() {
            h.send(key, None);
        }
    }

    /// Pushes an event (secret changed, revoked, restored) to the companion; delivered to its
    /// next incarnation too if it is restarting.
    pub fn notify(&self, event: CompanionResponse) {
        let _ = self.events.send(event);
    }

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

/// Starts a companion for `identity` in `netns` as `uid` (allocated from
/// `ctx.uids`; released here when the companion fails to start or, later, ends) and returns
/// once it is ready to serve.
pub async fn start(
    ctx: Arc<Ctx>,
    identity: Arc<Identity>,
    netns: NetNs,
    uid: u32,
) -> Result<CompanionHandle, String> {
    let last_stderr = Arc::new(Mutex::new(String::new()));
    let cgroup = match ctx.cgroups.companion(netns.inode) {
        Ok(c) => Arc::new(c),
        Err(e) => {
            ctx.uids.release(uid);
            return Err(e);
        }
    };
    let aws_token = ctx
        .config
        .rule(&identity.rule)
        .is_some_and(|r| r.aws_credentials.is_some())
        .then(|| Arc::new(crate::wapi::new_token()));
    let spawned = match spawn(&ctx, &identity, &netns, &last_stderr, uid, &cgroup) {
        Ok(s) => s,
        Err(e) => {
            ctx.uids.release(uid);
            cgroup.remove().await;
            return Err(format!(
                "cannot start companion {} (cgroup {}): {e}",
                ctx.config.companion.binary.display(),
                cgroup.path()
            ));
        }
    };
    let handover = Arc::new(Mutex::new(Handover::default()));
    if let Ok(fds) = spawned.fds.try_clone() {
        handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attach(fds);
    }
    let pid = Arc::new(AtomicI32::new(
        spawned.child.id().map(|p| p as i32).unwrap_or(0),
    ));
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop_tx, stop_rx) = oneshot::channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let runner = run(
        ctx.clone(),
        identity,
        netns,
        spawned,
        pid.clone(),
        ready_tx,
        stop_rx,
        events_rx,
        last_stderr.clone(),
        Incarnation {
            handover: handover.clone(),
            aws_token: aws_token.clone(),
            cgroup: cgroup.clone(),
        },
    );
    let uids = ctx.uids.clone();
    tokio::spawn(async move {
        runner.await;
        // Its process is gone (waited for); the uid is reused once nothing else has it.
        uids.release(uid);
        cgroup.remove().await;
    });
    let handle = CompanionHandle {
        pid,
        uid,
        stop: Some(stop_tx),
        events: events_tx,
        handover,
        aws_token,
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

/// What every incarnation of one companion shares: its sockets and its AWS token.
struct Incarnation {
    handover: Arc<Mutex<Handover>>,
    aws_token: Option<Arc<zeroize::Zeroizing<String>>>,
    /// The companion's cgroup, kept across restarts (removed when it ends for good).
    cgroup: Arc<crate::cgroup::CompanionCgroup>,
}

fn spawn(
    ctx: &Ctx,
    identity: &Identity,
    netns: &NetNs,
    last_stderr: &Arc<Mutex<String>>,
    uid: u32,
    cgroup: &crate::cgroup::CompanionCgroup,
) -> std::io::Result<Spawned> {
    let c = &ctx.config.companion;
    // Opened here, written by the child before exec, closed when this returns.
    let procs = cgroup.procs_files()?;
    let procs_fds: Vec<i32> = procs.iter().map(std::os::fd::AsRawFd::as_raw_fd).collect();
    let mut s = crate::spawn::spawn_companion(
        &crate::spawn::Launch {
            binary: &c.binary,
            listen: c.http_api.then_some(c.listen.as_str()),
            workload_api_listen: Some(&c.workload_api_listen),
            max_cached_audiences: c.max_cached_audiences,
            uid,
            seccomp: c.seccomp,
            landlock: c.landlock,
            cgroup_procs: &procs_fds,
        },
        &netns.file,
    )?;
    drop(procs);
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
    mut events_rx: mpsc::UnboundedReceiver<CompanionResponse>,
    last_stderr: Arc<Mutex<String>>,
    inc: Incarnation,
) {
    let mut ready_tx = Some(ready_tx);
    let mut backoff = MIN_BACKOFF;
    let uid = spawned.uid;
    loop {
        let started_at = tokio::time::Instant::now();
        let ended = serve(
            &ctx,
            &identity,
            inc.aws_token.as_deref(),
            &mut spawned,
            &mut ready_tx,
            &mut stop_rx,
            &mut events_rx,
        )
        .await;
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
                if let Some(tx) = ready_tx.take() {
                    // Never became ready: report to the attach call at once (dropping the
                    // sender: it then shows the companion's last log line), no restart.
                    drop(tx);
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
            // The uid is this companion's for its life, but a new incarnation never shares it
            // with anything the old one may have left: wait until no process has it.
            if crate::uids::has_processes(uid) {
                tracing::error!(spiffe_id = %identity.spiffe_id, uid, "companion uid still has processes; not restarting until they are gone");
                continue;
            }
            match spawn(&ctx, &identity, &netns, &last_stderr, uid, &inc.cgroup) {
                Ok(s) => {
                    spawned = s;
                    if let Ok(fds) = spawned.fds.try_clone() {
                        inc.handover
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .attach(fds);
                    }
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

/// Most requests of one companion answered at once; more wait in its channel.
const MAX_IN_FLIGHT: usize = 16;

async fn write_line(
    wr: &mut (impl AsyncWriteExt + Unpin),
    resp: &ChannelResponse,
) -> Result<(), Ended> {
    let mut out = serde_json::to_vec(resp).expect("response serializes");
    out.push(b'\n');
    let res = tokio::time::timeout(WRITE_TIMEOUT, wr.write_all(&out)).await;
    // Responses may carry credentials: wipe the buffer.
    zeroize::Zeroize::zeroize(&mut out);
    match res {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err(Ended::Exited("channel closed".into())),
        Err(_) => Err(Ended::Exited(
            "companion stopped reading its channel".into(),
        )),
    }
}

async fn serve(
    ctx: &Arc<Ctx>,
    identity: &Arc<Identity>,
    aws_token: Option<&zeroize::Zeroizing<String>>,
    spawned: &mut Spawned,
    ready_tx: &mut Option<oneshot::Sender<()>>,
    stop_rx: &mut oneshot::Receiver<oneshot::Sender<()>>,
    events_rx: &mut mpsc::UnboundedReceiver<CompanionResponse>,
) -> Ended {
    let (rd, mut wr) = spawned.channel.split();
    let mut lines = FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE));
    // Requests are answered concurrently (a slow store read does not hold up a token).
    let (out_tx, mut out_rx) = mpsc::channel::<ChannelResponse>(MAX_IN_FLIGHT);
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let res = tokio::select! {
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
            Some(body) = events_rx.recv() => {
                write_line(&mut wr, &ChannelResponse { id: EVENT_ID, body }).await
            }
            Some(resp) = out_rx.recv() => write_line(&mut wr, &resp).await,
            next = lines.next() => {
                let line = match next {
                    Some(Ok(line)) => line,
                    Some(Err(e)) => return Ended::Exited(format!("channel: {e}")),
                    None => return Ended::Exited("channel closed".into()),
                };
                match serde_json::from_str::<ChannelRequest>(&line) {
                    Ok(ChannelRequest { id, body: CompanionRequest::Hello }) => {
                        let body = hello(ctx, identity, ready_tx, aws_token);
                        write_line(&mut wr, &ChannelResponse { id, body }).await
                    }
                    Ok(ChannelRequest { body: CompanionRequest::Audit { events, dropped }, .. }) => {
                        crate::audit::ingest(ctx, identity, events, dropped);
                        Ok(())
                    }
                    Ok(req) => {
                        let permit = in_flight.clone().acquire_owned().await.expect("never closed");
                        let (ctx, identity, out) = (ctx.clone(), identity.clone(), out_tx.clone());
                        tokio::spawn(async move {
                            let body = answer(&ctx, &identity, req.body).await;
                            let _ = out.send(ChannelResponse { id: req.id, body }).await;
                            drop(permit);
                        });
                        Ok(())
                    }
                    Err(e) => {
                        let body = CompanionResponse::Error { message: format!("bad request: {e}") };
                        write_line(&mut wr, &ChannelResponse { id: 0, body }).await
                    }
                }
            }
        };
        if let Err(ended) = res {
            return ended;
        }
    }
}

fn hello(
    ctx: &Ctx,
    identity: &Identity,
    ready_tx: &mut Option<oneshot::Sender<()>>,
    aws_token: Option<&zeroize::Zeroizing<String>>,
) -> CompanionResponse {
    if let Some(tx) = ready_tx.take() {
        let _ = tx.send(());
    }
    CompanionResponse::Init(Box::new(Init {
        spiffe_id: identity.spiffe_id.to_string(),
        trust_domain: ctx.issuer.trust_domain().to_string(),
        rule: identity.rule.clone(),
        workload: identity.workload.clone(),
        bundle_pem: ctx.issuer.bundle_pem(),
        jwks: ctx.issuer.jwks(),
        bundle_spiffe: ctx.issuer.spiffe_bundle(),
        revoked: ctx.revocations.is_revoked(identity.spiffe_id.as_str()),
        policy: ctx.policy_for(identity),
        egress: ctx.config.egress,
        aws: aws_provider(ctx, identity, aws_token),
        limits: ctx.config.companion.limits,
    }))
}

/// The AWS container-credential provider of a companion whose rule names an AWS source (its
/// token reaches containers with a `/run/nhi` directory of `nhi-runc`).
fn aws_provider(
    ctx: &Ctx,
    identity: &Identity,
    token: Option<&zeroize::Zeroizing<String>>,
) -> Option<nhi_core::wire::AwsProvider> {
    let source = ctx.config.rule(&identity.rule)?.aws_credentials.as_ref()?;
    let token = token?;
    Some(nhi_core::wire::AwsProvider {
        secret: source.secret.clone(),
        token: token.to_string(),
    })
}

async fn answer(ctx: &Ctx, identity: &Identity, req: CompanionRequest) -> CompanionResponse {
    let id = identity.spiffe_id.as_str();
    let err = |e: crate::issuer::IssueError| CompanionResponse::Error {
        message: e.to_string(),
    };
    let revoked = || CompanionResponse::Denied {
        message: format!("{id} is revoked"),
    };
    // One audit record (and metric) per issuance outcome.
    let (started, requested) = (std::time::Instant::now(), crate::audit::requested(&req));
    let audit = |version: Option<String>, decision, detail: Option<String>| {
        crate::audit::credential(
            ctx,
            identity,
            requested.clone(),
            version,
            decision,
            detail,
            started,
        )
    };
    use nhi_core::audit::Decision::{Allow, Deny, Error as Failed};
    match req {
        CompanionRequest::Hello => CompanionResponse::Error {
            message: "hello is answered once".into(),
        },
        CompanionRequest::Audit { .. } => CompanionResponse::Error {
            message: "audit events are notifications".into(),
        },
        CompanionRequest::Validate { token, audience } => match ctx.validate(&token, &audience) {
            Ok(v) => CompanionResponse::Validated(v),
            Err(message) => CompanionResponse::Denied { message },
        },
        _ if ctx.revocations.is_revoked(id) => {
            tracing::warn!(spiffe_id = %id, "refused: identity is revoked");
            audit(None, Deny, Some("identity is revoked".into()));
            revoked()
        }
        CompanionRequest::Jwt { audience } => {
            match ctx.issuer.issue_jwt(&identity.spiffe_id, &audience) {
                Ok(j) => {
                    ctx.revocations.record_jwt(id, &j.jti, j.expires_at);
                    identity.issued.record_jwt(&j.jti, j.expires_at);
                    tracing::info!(spiffe_id = %id, audience = ?audience, jti = %j.jti, expires_at = j.expires_at, "issued JWT-SVID");
                    audit(
                        Some(j.jti.clone()),
                        Allow,
                        Some(format!("audience={}", audience.join(","))),
                    );
                    CompanionResponse::Jwt(j)
                }
                Err(e) => {
                    audit(None, Failed, Some(e.to_string()));
                    err(e)
                }
            }
        }
        CompanionRequest::X509 => match ctx.issuer.issue_x509(&identity.spiffe_id) {
            Ok(x) => {
                ctx.revocations.record_x509(id, &x.serial, x.expires_at);
                identity.issued.record_x509(&x.serial, x.expires_at);
                tracing::info!(spiffe_id = %id, serial = %x.serial, expires_at = x.expires_at, "issued X.509-SVID");
                audit(Some(x.serial.clone()), Allow, None);
                CompanionResponse::X509(Box::new(x))
            }
            Err(e) => {
                audit(None, Failed, Some(e.to_string()));
                err(e)
            }
        },
        CompanionRequest::BrokeredSecret { rule_id } => {
            brokered_secret(ctx, identity, &rule_id).await
        }
        CompanionRequest::Secret { name } => {
            if !nhi_core::grant::granted(&ctx.config.grants, id, &identity.rule, &name) {
                tracing::warn!(spiffe_id = %id, secret = %name, "refused: secret not granted");
                audit(None, Deny, Some("not granted".into()));
                return CompanionResponse::Denied {
                    message: format!("secret {name:?} is not granted to {id}"),
                };
            }
            read_secret(ctx, id, name, "delivered secret", |v, d, why| {
                audit(v, d, why.map(str::to_string))
            })
            .await
        }
    }
}

/// A secret for the companion to inject upstream: only the one egress rule `rule_id` of the
/// identity's current policy names. Never a grant: the workload's `/v1/secrets` still refuses it.
async fn brokered_secret(ctx: &Ctx, identity: &Identity, rule_id: &str) -> CompanionResponse {
    use nhi_core::audit::Decision::Deny;
    let id = identity.spiffe_id.as_str();
    let started = std::time::Instant::now();
    let name = ctx
        .policy_for(identity)
        .and_then(|p| p.brokered_secret(rule_id).map(str::to_string));
    // One audit record per outcome, like every other issuance; the detail names the rule.
    let audit = |name: &str, version: Option<String>, decision, why: Option<&str>| {
        crate::audit::credential(
            ctx,
            identity,
            Some(nhi_core::audit::CredentialRef {
                name: format!("secret:{name}"),
                version: None,
            }),
            version,
            decision,
            Some(match why {
                Some(why) => format!("brokered by rule {rule_id}: {why}"),
                None => format!("brokered by rule {rule_id}"),
            }),
            started,
        )
    };
    let Some(name) = name else {
        tracing::warn!(spiffe_id = %id, rule = %rule_id, "refused: no brokered secret in that rule");
        audit("?", None, Deny, Some("the rule brokers no secret"));
        return CompanionResponse::Denied {
            message: format!("no egress rule {rule_id:?} brokering a secret for {id}"),
        };
    };
    let (n, what) = (
        name.clone(),
        format!("delivered brokered secret (rule {rule_id})"),
    );
    read_secret(ctx, id, name, &what, |v, d, why| audit(&n, v, d, why)).await
}

/// Reads secret `name` from the store for a companion that may have it (granted, or brokered
/// by its policy) and audits the outcome through `audit(version, decision, why)`: the version
/// when delivered, never the value.
async fn read_secret(
    ctx: &Ctx,
    spiffe_id: &str,
    name: String,
    what: &str,
    audit: impl Fn(Option<String>, nhi_core::audit::Decision, Option<&str>),
) -> CompanionResponse {
    use nhi_core::audit::Decision::{Allow, Deny, Error as Failed};
    match ctx.store.get(&name).await {
        Ok(Some(s)) => {
            tracing::info!(spiffe_id = %spiffe_id, secret = %name, version = s.version, "{what}");
            audit(Some(s.version.to_string()), Allow, None);
            CompanionResponse::Secret(SecretValue {
                name,
                version: s.version,
                value_b64: B64.encode(&s.value[..]),
                expires_at: now_unix() + ctx.config.store.secret_ttl.as_secs(),
            })
        }
        Ok(None) => {
            audit(None, Deny, Some("not found"));
            CompanionResponse::NotFound {
                message: format!("no secret named {name:?}"),
            }
        }
        Err(e) => {
            audit(None, Failed, Some(&e.to_string()));
            CompanionResponse::Error {
                message: e.to_string(),
            }
        }
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
