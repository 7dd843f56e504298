//! One task per companion: serves its channel (the socketpair is the capability: whatever
//! arrives on it is answered for this one identity and no other), restarts the companion with
//! backoff if it dies while its workload lives, and stops it on detach. When `nhid` shuts down
//! it releases the companion instead (it keeps serving its cache), and the next `nhid`
//! re-adopts it ([`adopt`], `crate::adopt`) and serves it here again.
//!
//! Requests are answered concurrently in two lanes (`crate::lanes`): what needs the secret
//! store never delays what `nhid` signs itself, and nothing waits unboundedly.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nhi_core::wire::Event;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot};

use crate::adopt::{AdoptKey, CompanionRecord, Pidfd, Records};
pub use crate::identity::Identity;
use crate::netns::{NetNs, ProcRef};
pub use crate::services::Services;

mod channel;

/// What every companion task needs from the daemon: the shared services, and what manages
/// companion processes (uids, cgroups, re-adoption records). Derefs to [`Services`], so code
/// that needs only the services takes `&Services` and is handed a `Ctx` as is.
pub struct Ctx {
    pub services: Services,
    /// One uid per companion, from `companion.uid_range`.
    pub uids: Arc<crate::uids::UidAllocator>,
    /// Companions' cgroups (bounds, and the edge policy's exemption).
    pub cgroups: Arc<crate::cgroup::Cgroups>,
    /// Companion records and re-adoption sockets (`<state_dir>/companions`).
    pub companions: Records,
}

impl std::ops::Deref for Ctx {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.services
    }
}

/// The listening sockets a companion serves besides its TCP ports (each container's Workload
/// API socket), and the fd channel of its current incarnation: every incarnation gets all of
/// them, containers that join later get theirs while it runs. A re-adopted companion gets a
/// new fd channel with its re-adoption (`crate::adopt::send_fd_channel`).
#[derive(Default)]
struct Handover {
    sockets: std::collections::BTreeMap<String, Arc<crate::workload_socket::ContainerSocket>>,
    channel: Option<std::os::fd::OwnedFd>,
}

impl Handover {
    fn send(&self, key: &str, socket: Option<&crate::workload_socket::ContainerSocket>) {
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

    /// `nhid` lets go of a running companion (shutdown): its sockets stay where they are, in
    /// the containers and in the companion, for the next `nhid` to take over.
    fn release(&mut self) {
        self.channel = None;
        for (_, s) in std::mem::take(&mut self.sockets) {
            if let Ok(s) = Arc::try_unwrap(s) {
                s.keep_path();
            }
        }
    }
}

/// What every incarnation of one companion shares, for its whole life: its uid, its cgroup,
/// its sockets and its AWS token.
struct Shared {
    uid: u32,
    cgroup: Arc<crate::cgroup::CompanionCgroup>,
    handover: Arc<Mutex<Handover>>,
    aws_token: Option<Arc<zeroize::Zeroizing<String>>>,
}

/// `nhid`'s handle on a running companion.
pub struct CompanionHandle {
    pid: Arc<AtomicI32>,
    uid: u32,
    ctl: Option<oneshot::Sender<Control>>,
    events: mpsc::UnboundedSender<Event>,
    handover: Arc<Mutex<Handover>>,
    /// The AWS container-credential token of its workload, when its rule names an AWS source.
    aws_token: Option<Arc<zeroize::Zeroizing<String>>>,
}

/// What `nhid` tells a companion's task.
enum Control {
    /// Stop the companion (detach) and report when it is gone.
    Stop(oneshot::Sender<()>),
    /// `nhid` shuts down: leave the companion running for the next `nhid` to re-adopt.
    Release(oneshot::Sender<()>),
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
    pub fn add_socket(&self, key: &str, socket: crate::workload_socket::ContainerSocket) {
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
    pub fn notify(&self, event: Event) {
        let _ = self.events.send(event);
    }

    pub fn pid(&self) -> i32 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Stops the companion and waits until its process is gone (bounded: SIGTERM, a grace
    /// period, then SIGKILL).
    pub async fn stop(mut self) {
        let bound = STOP_GRACE + WRITE_TIMEOUT + Duration::from_secs(1);
        if !self.control(Control::Stop, bound).await {
            tracing::error!(pid = self.pid(), "companion did not stop in {bound:?}");
        }
    }

    /// Lets go of the companion without stopping it (`nhid` shutting down): it keeps serving
    /// what it has cached and waits for the next `nhid`, which re-adopts it. Its records stay.
    pub async fn release(mut self) {
        self.control(Control::Release, Duration::from_secs(2)).await;
    }

    async fn control(&mut self, c: fn(oneshot::Sender<()>) -> Control, bound: Duration) -> bool {
        let Some(tx) = self.ctl.take() else {
            return true;
        };
        let (done_tx, done_rx) = oneshot::channel();
        if tx.send(c(done_tx)).is_err() {
            return true;
        }
        tokio::time::timeout(bound, done_rx).await.is_ok()
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

/// How long a restarted `nhid` waits for a running companion to answer its re-adoption.
const ADOPT_TIMEOUT: Duration = Duration::from_secs(2);

/// A companion process: one `nhid` started (its child), or one it re-adopted (a pidfd).
enum Proc {
    Child(Child),
    Adopted(Pidfd),
}

impl Proc {
    fn pid(&self) -> i32 {
        match self {
            Proc::Child(c) => c.id().map(|p| p as i32).unwrap_or(0),
            Proc::Adopted(p) => p.pid(),
        }
    }

    /// Returns once the process has exited, saying how.
    async fn wait(&mut self) -> String {
        match self {
            Proc::Child(c) => format!("{:?}", c.wait().await),
            Proc::Adopted(p) => {
                p.exited().await;
                "exited".into()
            }
        }
    }

    /// SIGTERM, a grace period, SIGKILL; returns once it is gone.
    async fn terminate(&mut self) {
        match self {
            Proc::Child(child) => {
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
            Proc::Adopted(p) => p.terminate(STOP_GRACE).await,
        }
    }
}

/// How the companion opens its channel.
enum Greeting {
    /// Started by this `nhid`: it says `hello`; the answer hands it `key`, its proof for a
    /// later re-adoption (`None`: no re-adoption socket could be made).
    Hello(Option<AdoptKey>),
    /// Re-adopted: its first message must be `reattach` with the key of this SHA-256.
    Reattach(String),
}

/// One companion process and `nhid`'s end of its channel.
struct Incarnation {
    proc: Proc,
    channel: tokio::net::UnixStream,
    greeting: Greeting,
}

/// Starts a companion for `identity` in `netns` as `uid` (allocated from `ctx.uids`; released
/// when the companion fails to start or, later, ends for good) and returns once it is ready to
/// serve.
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
        .then(|| Arc::new(crate::workload_socket::new_token()));
    let shared = Shared {
        uid,
        cgroup,
        handover: Arc::new(Mutex::new(Handover::default())),
        aws_token,
    };
    let inc = match spawn(&ctx, &identity, &netns, &last_stderr, &shared) {
        Ok(i) => i,
        Err(e) => {
            ctx.uids.release(uid);
            shared.cgroup.remove().await;
            return Err(format!(
                "cannot start companion {} (cgroup {}): {e}",
                ctx.config.companion.binary.display(),
                shared.cgroup.path()
            ));
        }
    };
    launch(ctx, identity, netns, inc, shared, last_stderr).await
}

/// Takes over the companion a previous `nhid` started for `identity` in `netns`, as recorded
/// in `rec`: only exactly that process, proving itself with its key (see `crate::adopt`), and
/// only for this identity. Its uid (`rec.uid`) must already be claimed in `ctx.uids`; its
/// cgroup is the one it runs in; `aws_token` is the token its containers' files hold. On
/// failure nothing of it is left running.
pub async fn adopt(
    ctx: Arc<Ctx>,
    identity: Arc<Identity>,
    netns: NetNs,
    rec: &CompanionRecord,
    aws_token: Option<zeroize::Zeroizing<String>>,
) -> Result<CompanionHandle, String> {
    let cgroup = Arc::new(ctx.cgroups.companion(netns.inode)?);
    let (channel, pidfd) =
        crate::adopt::connect(&ctx.companions, netns.inode, rec, ADOPT_TIMEOUT).await?;
    // A new fd channel for the containers' Workload API sockets, handed over first thing.
    let fds = crate::adopt::send_fd_channel(&channel)
        .map_err(|e| format!("handing the re-adopted companion its fd channel: {e}"))?;
    let mut handover = Handover::default();
    handover.attach(fds);
    let shared = Shared {
        uid: rec.uid,
        cgroup,
        handover: Arc::new(Mutex::new(handover)),
        aws_token: aws_token.map(Arc::new),
    };
    let inc = Incarnation {
        proc: Proc::Adopted(pidfd),
        channel,
        greeting: Greeting::Reattach(rec.key_sha256.clone()),
    };
    let last_stderr = Arc::new(Mutex::new(String::new()));
    launch(ctx, identity, netns, inc, shared, last_stderr).await
}

/// Runs the companion's task and waits until it is ready (hello or reattach answered).
async fn launch(
    ctx: Arc<Ctx>,
    identity: Arc<Identity>,
    netns: NetNs,
    inc: Incarnation,
    shared: Shared,
    last_stderr: Arc<Mutex<String>>,
) -> Result<CompanionHandle, String> {
    let pid = Arc::new(AtomicI32::new(inc.proc.pid()));
    let (uid, handover, aws_token) = (
        shared.uid,
        shared.handover.clone(),
        shared.aws_token.clone(),
    );
    let (ready_tx, ready_rx) = oneshot::channel();
    let (ctl_tx, ctl_rx) = oneshot::channel();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let adopted = matches!(inc.greeting, Greeting::Reattach(_));
    tokio::spawn(run(
        ctx.clone(),
        identity,
        netns,
        inc,
        pid.clone(),
        ready_tx,
        ctl_rx,
        events_rx,
        last_stderr.clone(),
        shared,
    ));
    let handle = CompanionHandle {
        pid,
        uid,
        ctl: Some(ctl_tx),
        events: events_tx,
        handover,
        aws_token,
    };
    let timeout = if adopted {
        ADOPT_TIMEOUT
    } else {
        ctx.config.companion.ready_timeout
    };
    match tokio::time::timeout(timeout, ready_rx).await {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(_)) => {
            handle.stop().await;
            let why = last_stderr.lock().map(|s| s.clone()).unwrap_or_default();
            Err(if adopted {
                "the companion did not prove itself".to_string()
            } else {
                format!("companion exited before it was ready: {why}")
            })
        }
        Err(_) => {
            handle.stop().await;
            Err(format!("companion not ready within {timeout:?}"))
        }
    }
}

/// Spawns a companion (see `crate::spawn`) as `shared.uid` in `shared.cgroup`, with a fresh
/// re-adoption socket and key, records it for a later `nhid`, and hands it every socket.
fn spawn(
    ctx: &Ctx,
    identity: &Identity,
    netns: &NetNs,
    last_stderr: &Arc<Mutex<String>>,
    shared: &Shared,
) -> std::io::Result<Incarnation> {
    use std::os::fd::AsRawFd;
    let c = &ctx.config.companion;
    let inode = netns.inode;
    let adopt_fd = ctx
        .companions
        .bind(inode)
        .map_err(|e| {
            tracing::warn!(spiffe_id = %identity.spiffe_id, "no re-adoption socket (this companion will be restarted, not re-adopted, after an nhid restart): {e}")
        })
        .ok();
    // Opened here, written by the child before exec, closed when this returns.
    let procs = shared.cgroup.procs_files()?;
    let procs_fds: Vec<i32> = procs.iter().map(AsRawFd::as_raw_fd).collect();
    let mut s = crate::spawn::spawn_companion(
        &crate::spawn::Launch {
            binary: &c.binary,
            listen: c.http_api.then_some(c.listen.as_str()),
            workload_api_listen: Some(&c.workload_api_listen),
            max_cached_audiences: c.max_cached_audiences,
            uid: shared.uid,
            seccomp: c.seccomp,
            landlock: c.landlock,
            cgroup_procs: &procs_fds,
            adopt_fd: adopt_fd.as_ref().map(|f| f.as_raw_fd()),
            orphan_timeout: c.orphan_timeout,
        },
        &netns.file,
    )?;
    drop(procs);
    let pid = s.child.id().map(|p| p as i32).unwrap_or(0);
    let key = match (&adopt_fd, ProcRef::of(pid)) {
        (Some(_), Ok(p)) => {
            let key = AdoptKey::generate();
            ctx.companions.save(
                inode,
                &CompanionRecord {
                    pid,
                    start_time: p.start_time,
                    uid: shared.uid,
                    key_sha256: key.digest(),
                },
            );
            Some(key)
        }
        _ => {
            ctx.companions.remove(inode);
            None
        }
    };
    if let Ok(fds) = s.fds.try_clone() {
        shared
            .handover
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .attach(fds);
    }
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
    Ok(Incarnation {
        proc: Proc::Child(s.child),
        channel: s.channel,
        greeting: Greeting::Hello(key),
    })
}

enum Ended {
    Stop(oneshot::Sender<()>),
    Release(oneshot::Sender<()>),
    Exited(String),
}

/// Forgets a companion that is gone for good: its records, its uid (reused once nothing else
/// has it) and its cgroup. Its containers' sockets go with their directories.
async fn forget(ctx: &Ctx, inode: u64, pid: i32, shared: &Shared) {
    ctx.companions.remove_if_pid(inode, pid);
    ctx.uids.release(shared.uid);
    shared.cgroup.remove().await;
}

#[allow(clippy::too_many_arguments)]
async fn run(
    ctx: Arc<Ctx>,
    identity: Arc<Identity>,
    netns: NetNs,
    mut inc: Incarnation,
    pid: Arc<AtomicI32>,
    ready_tx: oneshot::Sender<()>,
    mut ctl_rx: oneshot::Receiver<Control>,
    mut events_rx: mpsc::UnboundedReceiver<Event>,
    last_stderr: Arc<Mutex<String>>,
    shared: Shared,
) {
    let mut ready_tx = Some(ready_tx);
    let mut backoff = MIN_BACKOFF;
    let inode = netns.inode;
    loop {
        let started_at = tokio::time::Instant::now();
        let ended = channel::serve(
            &ctx,
            &identity,
            shared.aws_token.as_deref(),
            &mut inc,
            &mut ready_tx,
            &mut ctl_rx,
            &mut events_rx,
        )
        .await;
        match ended {
            Ended::Stop(done) => {
                inc.proc.terminate().await;
                forget(&ctx, inode, pid.load(Ordering::Relaxed), &shared).await;
                let _ = done.send(());
                return;
            }
            Ended::Release(done) => {
                // Our end of the channel closes as `inc` drops; the process, its sockets and
                // records stay for the next nhid.
                shared
                    .handover
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .release();
                tracing::info!(spiffe_id = %identity.spiffe_id, pid = inc.proc.pid(), "companion left running for the next nhid to re-adopt");
                let _ = done.send(());
                return;
            }
            Ended::Exited(why) => {
                // It may still run (closed its channel, sent garbage, stopped reading): make sure
                // it is gone before a new one binds the same port.
                inc.proc.terminate().await;
                if let Some(tx) = ready_tx.take() {
                    // Never became ready: report to the caller at once (dropping the sender: it
                    // then shows the companion's last log line), no restart.
                    drop(tx);
                    tracing::warn!(spiffe_id = %identity.spiffe_id, "companion failed at startup: {why}");
                    forget(&ctx, inode, pid.load(Ordering::Relaxed), &shared).await;
                    wait_for_control(ctl_rx).await;
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
                c = &mut ctl_rx => {
                    match c {
                        Ok(Control::Stop(done)) => {
                            forget(&ctx, inode, pid.load(Ordering::Relaxed), &shared).await;
                            let _ = done.send(());
                        }
                        Ok(Control::Release(done)) => {
                            // Nothing runs: nothing to leave behind.
                            forget(&ctx, inode, pid.load(Ordering::Relaxed), &shared).await;
                            let _ = done.send(());
                        }
                        Err(_) => forget(&ctx, inode, pid.load(Ordering::Relaxed), &shared).await,
                    }
                    return;
                }
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            // The uid is this companion's for its life, but a new incarnation never shares it
            // with anything the old one may have left: wait until no process has it.
            if crate::uids::has_processes(shared.uid) {
                tracing::error!(spiffe_id = %identity.spiffe_id, uid = shared.uid, "companion uid still has processes; not restarting until they are gone");
                continue;
            }
            match spawn(&ctx, &identity, &netns, &last_stderr, &shared) {
                Ok(i) => {
                    inc = i;
                    pid.store(inc.proc.pid(), Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    tracing::error!(spiffe_id = %identity.spiffe_id, "restarting companion: {e}")
                }
            }
        }
    }
}

async fn wait_for_control(ctl_rx: oneshot::Receiver<Control>) {
    if let Ok(Control::Stop(done) | Control::Release(done)) = ctl_rx.await {
        let _ = done.send(());
    }
}
