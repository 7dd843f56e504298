//! The companion's link to `nhid`: first the socketpair `nhid` handed it at spawn (its only
//! way to credentials), later, if that `nhid` went away, a connection a restarted `nhid` opens
//! to the companion's re-adoption socket.
//!
//! Requests are multiplexed by id and each waits at most [`CALL_TIMEOUT`] for its answer.
//! While there is no `nhid` (it crashed, restarts or is upgraded) the companion keeps serving
//! what it has cached; a request that needs `nhid` fails at once with [`DOWN`] (HTTP 503), never
//! hangs. It waits up to `orphan_timeout` to be re-adopted: a connection on the re-adoption
//! listener (a unix socket `nhid` bound in its root-only state directory and handed over at
//! spawn, so no path, no new socket and no `connect` are needed here), from root, that answers
//! the companion's `reattach` (the key it got at spawn) with the identity this companion
//! already serves. Anything else is refused and the wait goes on. Past `orphan_timeout` the
//! companion exits, as it does at once when it has no re-adoption listener.
//!
//! For a sandbox (seccomp, Landlock): re-adoption needs `listen(2)` once at start (lib.rs),
//! then `accept4(2)` and `getsockopt(SO_PEERCRED)` on that inherited fd; no `socket(2)`, no
//! `connect(2)`, no path.
//!
//! Size: about 570 lines of code; the rest are tests that play `nhid` on a real socket.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::time::Duration;

use futures_util::StreamExt;
use nhi_core::wire::{
    Call, ChannelRequest, ChannelResponse, Event, FromCompanion, Init, JwtSvid, Notice, Redacted,
    Refusal, Reply, SecretValue, ToCompanion, Validated, X509Svid, EVENT_ID, MAX_LINE,
};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{FramedRead, LinesCodec};

/// Where the reply to one call goes.
type Waiter = oneshot::Sender<Result<Reply, String>>;
pub type Events = mpsc::UnboundedReceiver<Pushed>;

/// What reaches the companion from `nhid` without being asked for.
#[derive(Debug, Clone)]
pub enum Pushed {
    /// An event `nhid` pushed (rotation, revocation, policy, trust).
    Event(Event),
    /// A restarted `nhid` re-adopted the companion: its view of revocation, trust and policy
    /// as it is now.
    Readopted(Box<Init>),
}

/// Why a call got no credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// No answer: `nhid` is away, the link broke, or the answer took too long.
    Unavailable(String),
    /// `nhid` answered with a refusal.
    Refused(Refusal),
    /// `nhid` answered with a reply of another kind than the call's (a protocol mismatch).
    Unexpected {
        call: &'static str,
        reply: &'static str,
    },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unavailable(m) => f.write_str(m),
            CallError::Refused(r) => write!(f, "{r}"),
            CallError::Unexpected { call, reply } => {
                write!(f, "unexpected answer from nhid: {reply} to a {call} call")
            }
        }
    }
}

/// Longest a request waits for `nhid`'s answer (`nhid` bounds its own waits well below).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a re-adoption handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most requests waiting for an answer at once.
const MAX_PENDING: usize = 1024;
/// Notifications (audit batches) waiting for a connection.
const NOTES: usize = 64;

/// Why a request that needs `nhid` fails while it is away.
pub const DOWN: &str =
    "no connection to nhid (restarting or unreachable): only credentials already cached are served";

/// A handle on the link; cheap to clone.
#[derive(Clone)]
pub struct Channel {
    calls: mpsc::Sender<(Call, Waiter)>,
    notes: mpsc::Sender<Notice>,
    up: watch::Receiver<bool>,
}

/// Where a restarted `nhid` finds this companion, and how long it waits for one.
pub struct Adoption {
    /// Listening socket `nhid` bound (in a directory only root can enter) and handed over.
    pub listener: UnixListener,
    pub orphan_timeout: Duration,
    /// Where the fd channel a re-adopting `nhid` hands over goes (the Workload API sockets).
    pub listeners: crate::listeners::Listeners,
}

/// What the companion proves itself with and checks a re-adoption against.
struct Ident {
    spiffe_id: String,
    key: Redacted,
}

/// One connection to `nhid`.
struct Conn {
    lines: FramedRead<OwnedReadHalf, LinesCodec>,
    wr: OwnedWriteHalf,
}

impl Conn {
    fn new(stream: UnixStream) -> Self {
        let (rd, wr) = stream.into_split();
        Conn {
            lines: FramedRead::new(rd, LinesCodec::new_with_max_length(MAX_LINE)),
            wr,
        }
    }

    async fn send(&mut self, id: u64, body: FromCompanion) -> std::io::Result<()> {
        let mut line =
            serde_json::to_vec(&ChannelRequest { id, body }).expect("request serializes");
        line.push(b'\n');
        let res = self.wr.write_all(&line).await;
        // A reattach carries the companion's key.
        zeroize::Zeroize::zeroize(&mut line);
        res
    }

    /// Reads until the answer to the opening message `id`; events that come first go to
    /// `events`.
    async fn opened(
        &mut self,
        id: u64,
        events: &mpsc::UnboundedSender<Pushed>,
    ) -> Result<Box<Init>, String> {
        loop {
            let line = match self.lines.next().await {
                Some(Ok(l)) => l,
                Some(Err(e)) => return Err(format!("reading from nhid: {e}")),
                None => return Err("nhid closed the connection".into()),
            };
            match serde_json::from_str::<ChannelResponse>(&line) {
                Ok(ChannelResponse {
                    body: ToCompanion::Event(e),
                    ..
                }) => {
                    let _ = events.send(Pushed::Event(e));
                }
                Ok(r) if r.id != id => {}
                Ok(ChannelResponse {
                    body: ToCompanion::Init(init),
                    ..
                }) => return Ok(init),
                Ok(ChannelResponse {
                    body: ToCompanion::Reply(r),
                    ..
                }) => {
                    return Err(match r.refused() {
                        Err(refusal) => format!("nhid refused: {refusal}"),
                        Ok(other) => format!("unexpected answer: {}", other.kind()),
                    })
                }
                Err(e) => return Err(format!("bad message from nhid: {e}")),
            }
        }
    }
}

impl Channel {
    /// Says hello on the channel `nhid` handed over at spawn (`fd`) and starts the link.
    /// Returns the companion's identity; what `nhid` pushes (events, and the identity anew after
    /// each re-adoption: [`Pushed`]) arrives on the receiver. `on_exit` runs
    /// when the link ends for good (no `nhid` within `orphan_timeout`, or no re-adoption
    /// listener): the companion then exits.
    pub async fn open(
        fd: OwnedFd,
        adoption: Option<Adoption>,
        on_exit: impl FnOnce() + Send + 'static,
    ) -> Result<(Self, Box<Init>, Events), String> {
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream
            .set_nonblocking(true)
            .map_err(|e| format!("channel: {e}"))?;
        let stream = UnixStream::from_std(std_stream).map_err(|e| format!("channel: {e}"))?;
        let mut conn = Conn::new(stream);
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        conn.send(1, FromCompanion::Hello)
            .await
            .map_err(|e| format!("channel: {e}"))?;
        let init = match tokio::time::timeout(CALL_TIMEOUT, conn.opened(1, &events_tx)).await {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(format!("nhid did not answer hello within {CALL_TIMEOUT:?}")),
        };
        let ident = init.adopt_key.clone().map(|key| Ident {
            spiffe_id: init.spiffe_id.clone(),
            key,
        });
        // Without a key nhid could not tell us from an impostor: no re-adoption then.
        let adoption = adoption.zip(ident);
        let (calls_tx, calls_rx) = mpsc::channel(64);
        let (notes_tx, notes_rx) = mpsc::channel(NOTES);
        let (up_tx, up_rx) = watch::channel(true);
        let link = Link {
            calls: calls_rx,
            notes: notes_rx,
            logs: crate::log::channel_queue(),
            events: events_tx,
            up: up_tx,
            next_id: 2,
        };
        tokio::spawn(async move {
            link.run(conn, adoption).await;
            on_exit();
        });
        Ok((
            Channel {
                calls: calls_tx,
                notes: notes_tx,
                up: up_rx,
            },
            init,
            events_rx,
        ))
    }

    /// Whether `nhid` is connected now.
    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// Returns once `nhid` is connected (at once if it is).
    pub async fn wait_up(&self) {
        let mut up = self.up.clone();
        let _ = up.wait_for(|u| *u).await;
    }

    /// A call to `nhid`: fails at once while it is away, and after [`CALL_TIMEOUT`].
    async fn call(&self, call: Call) -> Result<Reply, String> {
        if !self.is_up() {
            return Err(DOWN.into());
        }
        let (waiter, rx) = oneshot::channel();
        self.calls
            .send((call, waiter))
            .await
            .map_err(|_| "the companion is shutting down".to_string())?;
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the connection to nhid was lost before it answered".into()),
            Err(_) => Err(format!("nhid did not answer within {CALL_TIMEOUT:?}")),
        }
    }

    /// A call whose one good reply `pick` takes; every other reply is an error.
    async fn ask<T>(
        &self,
        call: Call,
        what: &'static str,
        pick: impl FnOnce(Reply) -> Result<T, Reply>,
    ) -> Result<T, CallError> {
        let reply = self.call(call).await.map_err(CallError::Unavailable)?;
        let reply = reply.refused().map_err(CallError::Refused)?;
        pick(reply).map_err(|other| CallError::Unexpected {
            call: what,
            reply: other.kind(),
        })
    }

    pub async fn jwt(&self, audience: Vec<String>) -> Result<JwtSvid, CallError> {
        self.ask(Call::Jwt { audience }, "jwt", |r| match r {
            Reply::Jwt(j) => Ok(j),
            other => Err(other),
        })
        .await
    }

    pub async fn x509(&self) -> Result<X509Svid, CallError> {
        self.ask(Call::X509, "x509", |r| match r {
            Reply::X509(x) => Ok(*x),
            other => Err(other),
        })
        .await
    }

    /// A secret granted to this identity.
    pub async fn secret(&self, name: &str) -> Result<SecretValue, CallError> {
        let call = Call::Secret { name: name.into() };
        self.ask(call, "secret", |r| match r {
            Reply::Secret(s) => Ok(s),
            other => Err(other),
        })
        .await
    }

    /// The secret the identity's edge policy brokers in egress rule `rule_id`.
    pub async fn brokered_secret(&self, rule_id: &str) -> Result<SecretValue, CallError> {
        let call = Call::BrokeredSecret {
            rule_id: rule_id.into(),
        };
        self.ask(call, "brokered_secret", |r| match r {
            Reply::Secret(s) => Ok(s),
            other => Err(other),
        })
        .await
    }

    /// A token checked by `nhid` (signature, audience, expiry, deny list).
    pub async fn validate(&self, token: &str, audience: &str) -> Result<Validated, CallError> {
        let call = Call::Validate {
            token: token.into(),
            audience: audience.into(),
        };
        self.ask(call, "validate", |r| match r {
            Reply::Validated(v) => Ok(v),
            other => Err(other),
        })
        .await
    }

    /// Sends a notice `nhid` does not answer (audit events). Waits for room in the queue,
    /// which only drains while `nhid` is connected: the caller's own bounded queue (and its
    /// drop count) absorbs an absence.
    pub async fn notify(&self, notice: Notice) -> Result<(), String> {
        self.notes
            .send(notice)
            .await
            .map_err(|_| "the companion is shutting down".to_string())
    }
}

/// The link task's state.
struct Link {
    calls: mpsc::Receiver<(Call, Waiter)>,
    notes: mpsc::Receiver<Notice>,
    logs: Option<mpsc::Receiver<String>>,
    events: mpsc::UnboundedSender<Pushed>,
    up: watch::Sender<bool>,
    /// Request ids stay unique across connections.
    next_id: u64,
}

impl Link {
    async fn run(mut self, mut conn: Conn, adoption: Option<(Adoption, Ident)>) {
        loop {
            let _ = self.up.send(true);
            let why = self.connected(&mut conn).await;
            let _ = self.up.send(false);
            let Some((a, ident)) = &adoption else {
                crate::log!("nhi-companion: channel to nhid closed ({why}); exiting");
                return;
            };
            crate::log!(
                "nhi-companion: lost the channel to nhid ({why}); serving cached credentials, waiting up to {:?} to be re-adopted",
                a.orphan_timeout
            );
            match self.orphaned(a, ident).await {
                Some((c, init)) => {
                    conn = c;
                    crate::log!("nhi-companion: re-adopted by nhid");
                    // Revocation, trust and policy as they are now, before serving through nhid.
                    let _ = self.events.send(Pushed::Readopted(init));
                }
                None => {
                    crate::log!(
                        "nhi-companion: no nhid re-adopted this companion within {:?}; exiting",
                        a.orphan_timeout
                    );
                    return;
                }
            }
        }
    }

    /// Serves one connection until it ends; returns why it ended.
    async fn connected(&mut self, conn: &mut Conn) -> String {
        let Link {
            calls,
            notes,
            logs,
            events,
            next_id,
            ..
        } = self;
        let mut pending: HashMap<u64, Waiter> = HashMap::new();
        loop {
            let has_logs = logs.is_some();
            tokio::select! {
                c = calls.recv() => {
                    let Some((call, waiter)) = c else { return "the companion is shutting down".into() };
                    if pending.len() >= MAX_PENDING {
                        pending.retain(|_, w| !w.is_closed());
                    }
                    if pending.len() >= MAX_PENDING {
                        let _ = waiter.send(Err(format!("{MAX_PENDING} requests already wait for nhid")));
                        continue;
                    }
                    let id = *next_id;
                    *next_id += 1;
                    if let Err(e) = conn.send(id, FromCompanion::Call(call)).await {
                        let _ = waiter.send(Err(format!("writing to nhid: {e}")));
                        return format!("writing: {e}");
                    }
                    pending.insert(id, waiter);
                }
                n = notes.recv() => {
                    let Some(notice) = n else { return "the companion is shutting down".into() };
                    if let Err(e) = conn.send(EVENT_ID, FromCompanion::Notice(notice)).await {
                        return format!("writing: {e}");
                    }
                }
                l = async { logs.as_mut().expect("checked").recv().await }, if has_logs => {
                    match l {
                        Some(line) => {
                            let notice = FromCompanion::Notice(Notice::Log { line });
                            if let Err(e) = conn.send(EVENT_ID, notice).await {
                                return format!("writing: {e}");
                            }
                        }
                        None => *logs = None,
                    }
                }
                line = conn.lines.next() => {
                    let line = match line {
                        Some(Ok(l)) => l,
                        Some(Err(e)) => return format!("reading: {e}"),
                        None => return "nhid closed it".into(),
                    };
                    match serde_json::from_str::<ChannelResponse>(&line) {
                        Ok(ChannelResponse { body: ToCompanion::Event(e), .. }) => {
                            let _ = events.send(Pushed::Event(e));
                        }
                        Ok(ChannelResponse { id, body: ToCompanion::Reply(r) }) => {
                            match pending.remove(&id) {
                                Some(waiter) => {
                                    let _ = waiter.send(Ok(r));
                                }
                                // nhid could not read a line of ours (it answers with id 0).
                                None if id == EVENT_ID => match r.refused() {
                                    Err(refusal) => crate::log!("nhi-companion: nhid: {refusal}"),
                                    Ok(r) => crate::log!("nhi-companion: nhid sent an unasked {} reply", r.kind()),
                                },
                                None => {}
                            }
                        }
                        Ok(ChannelResponse { body: ToCompanion::Init(_), .. }) => {
                            crate::log!("nhi-companion: nhid sent an identity on an open channel; ignored");
                        }
                        Err(e) => crate::log!("nhi-companion: bad message from nhid: {e}"),
                    }
                }
            }
        }
    }

    /// No `nhid`: refuses what needs it and waits (bounded) for one to re-adopt us.
    async fn orphaned(&mut self, a: &Adoption, ident: &Ident) -> Option<(Conn, Box<Init>)> {
        let deadline = tokio::time::Instant::now() + a.orphan_timeout;
        loop {
            tokio::select! {
                c = self.calls.recv() => match c {
                    Some((_, waiter)) => {
                        let _ = waiter.send(Err(DOWN.into()));
                    }
                    None => return None,
                },
                acc = a.listener.accept() => match acc {
                    Ok((stream, _)) => {
                        let id = self.next_id;
                        self.next_id += 1;
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, reattach(stream, ident, id, &self.events, &a.listeners)).await {
                            Ok(Ok(adopted)) => return Some(adopted),
                            Ok(Err(e)) => crate::log!("nhi-companion: re-adoption refused: {e}"),
                            Err(_) => crate::log!("nhi-companion: re-adoption refused: no answer within {HANDSHAKE_TIMEOUT:?}"),
                        }
                    }
                    Err(e) => {
                        crate::log!("nhi-companion: re-adoption socket: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }
}

/// The companion's half of a re-adoption: the peer must be root (only root can reach the
/// socket's directory anyway), must accept the companion's key and must offer exactly the
/// identity this companion already serves.
async fn reattach(
    stream: UnixStream,
    ident: &Ident,
    id: u64,
    events: &mpsc::UnboundedSender<Pushed>,
    listeners: &crate::listeners::Listeners,
) -> Result<(Conn, Box<Init>), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("peer credentials: {e}"))?;
    if cred.uid() != 0 {
        return Err(format!(
            "the peer runs as uid {}, not root: only nhid re-adopts companions",
            cred.uid()
        ));
    }
    // nhid's first byte carries the new fd channel; it is used only once nhid accepted us.
    let fd_channel = receive_fd_channel(&stream).await?;
    let mut conn = Conn::new(stream);
    conn.send(
        id,
        FromCompanion::Reattach {
            key: ident.key.clone(),
        },
    )
    .await
    .map_err(|e| format!("writing: {e}"))?;
    let init = conn.opened(id, events).await?;
    if init.spiffe_id != ident.spiffe_id {
        return Err(format!(
            "nhid offered identity {} but this companion serves {}",
            init.spiffe_id, ident.spiffe_id
        ));
    }
    listeners
        .attach(fd_channel)
        .map_err(|e| format!("fd channel: {e}"))?;
    Ok((conn, init))
}

/// Reads the one byte a re-adopting `nhid` sends first (`nhi_core::wire::FD_CHANNEL_BYTE`) and the fd channel it
/// carries (`SCM_RIGHTS`), before anything is read as lines: ancillary data read by a plain
/// `read` would be lost.
async fn receive_fd_channel(stream: &UnixStream) -> Result<OwnedFd, String> {
    use std::os::fd::AsRawFd;
    loop {
        stream
            .readable()
            .await
            .map_err(|e| format!("reading the fd channel: {e}"))?;
        match stream.try_io(tokio::io::Interest::READABLE, || {
            receive_one_fd(stream.as_raw_fd())
        }) {
            Ok(fd) => return fd,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("reading the fd channel: {e}")),
        }
    }
}

fn receive_one_fd(fd: std::os::fd::RawFd) -> std::io::Result<Result<OwnedFd, String>> {
    let mut byte = [0u8; 1];
    let (n, mut fds) = crate::listeners::recv_with_fds(fd, &mut byte)?;
    Ok(match (n, byte[0], fds.len()) {
        (0, _, _) => Err("nhid closed the connection".into()),
        (1, nhi_core::wire::FD_CHANNEL_BYTE, 1) => Ok(fds.pop().expect("one fd")),
        _ => Err("nhid's first message is not the fd channel".into()),
    })
}

/// Test helpers: a channel whose `nhid` end is a plain socket the test drives.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// A minimal identity for tests.
    pub fn init(spiffe_id: &str, adopt_key: Option<&str>) -> Init {
        Init {
            spiffe_id: spiffe_id.into(),
            trust_domain: "td".into(),
            rule: "r".into(),
            workload: Default::default(),
            bundle_pem: String::new(),
            jwks: serde_json::json!({"keys": []}),
            bundle_spiffe: serde_json::Value::Null,
            revoked: false,
            policy: None,
            egress: Default::default(),
            aws: None,
            limits: Default::default(),
            denied_peers: Vec::new(),
            adopt_key: adopt_key.map(|k| Redacted(k.into())),
        }
    }

    pub type NhidEnd = FramedRead<tokio::net::UnixStream, LinesCodec>;

    /// Answers the hello on `nhid`'s end of a socketpair.
    pub async fn answer_hello(nhid: tokio::net::UnixStream, init: Init) -> NhidEnd {
        let mut lines = FramedRead::new(nhid, LinesCodec::new());
        let hello: ChannelRequest =
            serde_json::from_str(&lines.next().await.unwrap().unwrap()).unwrap();
        assert!(matches!(hello.body, FromCompanion::Hello));
        let mut out = serde_json::to_vec(&ChannelResponse {
            id: hello.id,
            body: ToCompanion::Init(Box::new(init)),
        })
        .unwrap();
        out.push(b'\n');
        lines.get_mut().write_all(&out).await.unwrap();
        lines
    }

    /// A connected channel (no re-adoption) and the test's end as `nhid`.
    pub async fn pair() -> (Channel, Events, NhidEnd) {
        let (ours, nhid) = std::os::unix::net::UnixStream::pair().unwrap();
        nhid.set_nonblocking(true).unwrap();
        let nhid = tokio::net::UnixStream::from_std(nhid).unwrap();
        let serve = tokio::spawn(answer_hello(nhid, init("spiffe://td/a", None)));
        let (c, _, events) = Channel::open(ours.into(), None, || {}).await.unwrap();
        (c, events, serve.await.unwrap())
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "these tests play nhid, which runs as root (the companion refuses other peers)"
        );
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    async fn reply(end: &mut NhidEnd, id: u64, body: impl Into<ToCompanion>) {
        let body = body.into();
        let mut out = serde_json::to_vec(&ChannelResponse { id, body }).unwrap();
        out.push(b'\n');
        end.get_mut().write_all(&out).await.unwrap();
    }

    async fn next_req(end: &mut NhidEnd) -> ChannelRequest {
        serde_json::from_str(&end.next().await.unwrap().unwrap()).unwrap()
    }

    /// Connects to the companion's re-adoption socket as a restarted nhid would (the test runs
    /// as root, like nhid) and answers its reattach with `answer(key)`.
    /// What nhid sends first on a re-adoption: the byte carrying a new fd channel.
    fn send_fd_channel(s: &tokio::net::UnixStream) {
        use nix::sys::socket::{
            sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
        };
        use std::os::fd::AsRawFd;
        let (_ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let fds = [theirs.as_raw_fd()];
        let iov = [std::io::IoSlice::new(&[nhi_core::wire::FD_CHANNEL_BYTE])];
        sendmsg::<()>(
            s.as_raw_fd(),
            &iov,
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .unwrap();
    }

    async fn adopt(path: &std::path::Path, answer: impl FnOnce(&str) -> ToCompanion) -> NhidEnd {
        let s = tokio::net::UnixStream::connect(path).await.unwrap();
        send_fd_channel(&s);
        let mut end = FramedRead::new(s, LinesCodec::new());
        let req = next_req(&mut end).await;
        let FromCompanion::Reattach { key } = req.body else {
            panic!("expected reattach, got {:?}", req.body)
        };
        reply(&mut end, req.id, answer(&key.0)).await;
        end
    }

    #[test]
    fn answers_are_matched_by_id_and_requests_fail_fast_while_nhid_is_away() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("adopt.sock");
            let listener = UnixListener::bind(&path).unwrap();
            let (ours, nhid) = std::os::unix::net::UnixStream::pair().unwrap();
            nhid.set_nonblocking(true).unwrap();
            let nhid = tokio::net::UnixStream::from_std(nhid).unwrap();
            let serve = tokio::spawn(answer_hello(nhid, init("spiffe://td/a", Some("the-key"))));
            let (exit_tx, mut exit_rx) = oneshot::channel();
            let adoption = Adoption {
                listener,
                orphan_timeout: Duration::from_secs(30),
                listeners: crate::listeners::Listeners::new().0,
            };
            let (c, init0, mut events) = Channel::open(ours.into(), Some(adoption), move || {
                let _ = exit_tx.send(());
            })
            .await
            .unwrap();
            assert_eq!(init0.spiffe_id, "spiffe://td/a");
            let mut end = serve.await.unwrap();

            // Two requests in flight, answered out of order.
            let (c1, c2) = (c.clone(), c.clone());
            let a = tokio::spawn(async move { c1.call(Call::X509).await });
            let r1 = next_req(&mut end).await;
            let b = tokio::spawn(async move { c2.call(Call::Secret { name: "s".into() }).await });
            let r2 = next_req(&mut end).await;
            reply(
                &mut end,
                r2.id,
                Reply::NotFound {
                    message: "no".into(),
                },
            )
            .await;
            reply(
                &mut end,
                r1.id,
                Reply::Busy {
                    message: "busy".into(),
                },
            )
            .await;
            assert!(matches!(b.await.unwrap(), Ok(Reply::NotFound { .. })));
            assert!(matches!(a.await.unwrap(), Ok(Reply::Busy { .. })));

            // nhid dies with a request in flight: that request fails, the next fails at once.
            let c1 = c.clone();
            let pending = tokio::spawn(async move { c1.call(Call::X509).await });
            next_req(&mut end).await;
            drop(end);
            let e = pending.await.unwrap().unwrap_err();
            assert!(e.contains("lost before it answered"), "{e}");
            tokio::time::timeout(Duration::from_secs(5), c.up.clone().wait_for(|u| !*u))
                .await
                .unwrap()
                .unwrap();
            let t = tokio::time::Instant::now();
            let e = c.call(Call::X509).await.unwrap_err();
            assert_eq!(e, DOWN);
            assert!(t.elapsed() < Duration::from_millis(100));

            // An nhid offering another identity is refused; the companion keeps waiting.
            let refused = adopt(&path, |_| {
                ToCompanion::Init(Box::new(init("spiffe://td/other", None)))
            })
            .await;
            drop(refused);
            assert!(!c.is_up());
            // The right one re-adopts it: same key, same identity; its Init arrives as an event.
            let mut end = adopt(&path, |key| {
                assert_eq!(key, "the-key");
                let mut i = init("spiffe://td/a", None);
                i.revoked = true;
                ToCompanion::Init(Box::new(i))
            })
            .await;
            tokio::time::timeout(Duration::from_secs(5), c.wait_up())
                .await
                .unwrap();
            match events.recv().await.unwrap() {
                Pushed::Readopted(i) => assert!(i.revoked),
                other => panic!("{other:?}"),
            }
            let c1 = c.clone();
            let again = tokio::spawn(async move { c1.call(Call::X509).await });
            let r = next_req(&mut end).await;
            assert!(r.id > r2.id, "ids stay unique across connections");
            reply(
                &mut end,
                r.id,
                Reply::Error {
                    message: "x".into(),
                },
            )
            .await;
            assert!(matches!(again.await.unwrap(), Ok(Reply::Error { .. })));
            assert!(exit_rx.try_recv().is_err(), "still running");
        });
    }

    #[test]
    fn without_nhid_the_companion_exits_after_orphan_timeout() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let listener = UnixListener::bind(dir.path().join("a.sock")).unwrap();
            let (ours, nhid) = std::os::unix::net::UnixStream::pair().unwrap();
            nhid.set_nonblocking(true).unwrap();
            let nhid = tokio::net::UnixStream::from_std(nhid).unwrap();
            let serve = tokio::spawn(answer_hello(nhid, init("spiffe://td/a", Some("k"))));
            let (exit_tx, exit_rx) = oneshot::channel();
            let adoption = Adoption {
                listener,
                orphan_timeout: Duration::from_millis(300),
                listeners: crate::listeners::Listeners::new().0,
            };
            let (_c, _, _events) = Channel::open(ours.into(), Some(adoption), move || {
                let _ = exit_tx.send(());
            })
            .await
            .unwrap();
            let t = tokio::time::Instant::now();
            drop(serve.await.unwrap());
            tokio::time::timeout(Duration::from_secs(5), exit_rx)
                .await
                .expect("exits after orphan_timeout")
                .unwrap();
            assert!(t.elapsed() >= Duration::from_millis(300));
        });
    }
}
