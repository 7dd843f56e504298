//! Bounds on every companion listener (HTTP API, Workload API on TCP and on the unix socket,
//! edge proxy outbound and inbound), so that one process in the pod can neither deny the others
//! service nor make the companion grow without bound.
//!
//! Each listener has a [`Governor`]:
//! - **Always accept.** A full listener never stops accepting (a kernel accept queue that fills
//!   up would stall every client, legitimate ones first). Instead, at `max_connections`, the
//!   connection that has been quiet longest (no request for the longest time; one with a request
//!   being answered is never chosen) is closed to make room: a flood of idle, slow-loris or
//!   keep-alive-holding connections only ever evicts itself, and a client that connects and asks
//!   right away is served. A connection only counts as active when it starts a request, never
//!   for trickling bytes.
//! - **Reserve.** Requests that cannot be answered at once (they wait for `nhid`) may hold at
//!   most 7/8 of the slots: beyond that they are refused at once (HTTP 503, gRPC UNAVAILABLE),
//!   so there are always connections to evict and cached answers (`/healthz`, `/v1/identity`,
//!   cached tokens) keep flowing. A waiting request is bounded by the request timeout.
//! - **Timeouts** (swept every fraction of a second by one task per listener): a connection
//!   must start its first request within the header timeout (slow loris, half-open TLS or HTTP/2
//!   preface); one with nothing in progress is closed after the idle timeout; none outlives the
//!   maximum age once idle.
//! - **A hard ceiling** on open sockets (connections evicted but not yet closed by their task
//!   count too), so the file descriptors a listener can hold are bounded (see
//!   `CompanionLimits::fd_budget`; the soft `RLIMIT_NOFILE` is raised to the hard limit before the sandbox, `nhi_core::fd_limit::raise_to_hard`, and
//!   the caps are scaled down if the budget does not fit under it).
//!
//! Per-peer fairness beyond this is not possible on loopback TCP: every process of the pod is
//! `127.0.0.1`. Eviction by least recent request is what keeps a flooding process from holding
//! slots against the others.
//!
//! Size: about 680 lines of code; the rest are the governor's unit tests.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// The bounds of one listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    pub max_connections: usize,
    /// The first request must start within this.
    pub first_request: Duration,
    /// A connection with no request in progress (and no open stream) for this long is closed.
    pub idle: Duration,
    /// A connection older than this is closed once nothing is in progress.
    pub max_age: Option<Duration>,
}

/// Counters of one listener, for its log line and for tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    /// Closed to make room for a new connection.
    pub evicted: AtomicU64,
    /// Closed at once: every slot had a request in progress, or the ceiling was reached.
    pub refused: AtomicU64,
    /// Closed by a timeout (first request, idle, age).
    pub timed_out: AtomicU64,
    /// Requests refused because too many were already waiting.
    pub shed: AtomicU64,
}

pub struct Governor {
    name: String,
    bounds: Bounds,
    epoch: Instant,
    inner: Mutex<Inner>,
    /// Requests waiting for an answer, across the listener's connections.
    waiting: AtomicUsize,
    pub stats: Stats,
}

struct Inner {
    /// Connections that hold a slot.
    live: HashMap<u64, Arc<Slot>>,
    next_id: u64,
    /// Sockets still open: the live ones and the evicted ones their task has not dropped yet.
    open: usize,
}

/// One connection's state, shared by its task and its listener's governor.
pub struct Slot {
    id: u64,
    /// Who connected, when the transport says (the peer's pid on the unix socket).
    peer: Option<u32>,
    accepted_ms: u64,
    /// When a request last started or ended (or the connection was accepted), in ms since the
    /// governor's epoch.
    last_ms: AtomicU64,
    /// Requests in progress.
    in_request: AtomicU32,
    /// Responses still streaming (gRPC server streams).
    streams: AtomicU32,
    requests: AtomicU64,
    killed: AtomicBool,
    waker: AtomicWaker,
    notify: tokio::sync::Notify,
}

impl Slot {
    fn kill(&self) {
        self.killed.store(true, Ordering::Release);
        self.waker.wake();
        self.notify.notify_one();
    }

    pub fn is_killed(&self) -> bool {
        self.killed.load(Ordering::Acquire)
    }

    /// Resolves once the governor closed this connection (eviction, timeout).
    pub async fn killed(&self) {
        while !self.is_killed() {
            self.notify.notified().await;
        }
    }
}

/// Why a request was not answered by its handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Too many requests are already waiting on this listener.
    Busy,
    /// The answer took longer than the request timeout.
    TimedOut,
}

impl Governor {
    pub fn new(name: impl Into<String>, bounds: Bounds) -> Arc<Governor> {
        Arc::new(Governor {
            name: name.into(),
            bounds,
            epoch: Instant::now(),
            inner: Mutex::new(Inner {
                live: HashMap::new(),
                next_id: 0,
                open: 0,
            }),
            waiting: AtomicUsize::new(0),
            stats: Stats::default(),
        })
    }

    pub fn bounds(&self) -> Bounds {
        self.bounds
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Most sockets open at once: the slots plus those evicted and still closing.
    pub fn ceiling(&self) -> usize {
        nhi_core::config::CompanionLimits::ceiling(self.bounds.max_connections)
    }

    /// Most requests waiting at once: 7/8 of the slots, so some are always evictable.
    pub fn waiting_limit(&self) -> usize {
        (self.bounds.max_connections - self.bounds.max_connections / 8).max(1)
    }

    /// [`Governor::admit`] for an accept loop. Without a peer identity (loopback TCP: every
    /// process of the pod is `127.0.0.1`), when the listener is full the loop then yields, so
    /// the connections already admitted (a legitimate one among them, with its request on the
    /// way) get their turn before the next newcomer can evict them: a flood is let in at the
    /// pace the companion serves, not at the pace it can accept, and the kernel's accept queue
    /// arbitrates the rest. With one (the unix socket: the peer's pid), a full listener evicts
    /// from the peer holding the most connections, so a flooding process only ever evicts
    /// itself and the queue is drained at full speed. Either way, evicted connections are
    /// given a turn to close before the ceiling would refuse a newcomer.
    pub async fn admit_fairly(self: &Arc<Self>, peer: Option<u32>) -> Option<Conn> {
        for _ in 0..8 {
            if self.lock().open < self.ceiling() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let full = self.lock().live.len() >= self.bounds.max_connections;
        let conn = self.admit_from(peer);
        if full && peer.is_none() {
            tokio::task::yield_now().await;
        }
        conn
    }

    /// A slot for a connection just accepted, evicting the quietest one when full; `None`:
    /// close it at once.
    pub fn admit(self: &Arc<Self>) -> Option<Conn> {
        self.admit_from(None)
    }

    /// [`Governor::admit`] for a connection from `peer` (see [`Governor::admit_fairly`]).
    pub fn admit_from(self: &Arc<Self>, peer: Option<u32>) -> Option<Conn> {
        let now = self.now_ms();
        let mut inner = self.lock();
        self.stats.accepted.fetch_add(1, Ordering::Relaxed);
        if inner.live.len() >= self.bounds.max_connections {
            let evictable = || {
                inner
                    .live
                    .values()
                    .filter(|s| s.in_request.load(Ordering::Acquire) == 0)
            };
            // With peers known: only the peer holding the most slots loses one.
            let hog = peer.and_then(|_| {
                let mut held: HashMap<Option<u32>, usize> = HashMap::new();
                for s in evictable() {
                    *held.entry(s.peer).or_default() += 1;
                }
                held.into_iter().max_by_key(|(_, n)| *n).map(|(p, _)| p)
            });
            let victim = evictable()
                .filter(|s| hog.is_none_or(|h| s.peer == h))
                .min_by_key(|s| (s.last_ms.load(Ordering::Relaxed), s.id))
                .cloned();
            match victim {
                Some(v) => {
                    inner.live.remove(&v.id);
                    v.kill();
                    self.stats.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.stats.refused.fetch_add(1, Ordering::Relaxed);
                    return None;
                }
            }
        }
        if inner.open >= self.ceiling() {
            self.stats.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let slot = Arc::new(Slot {
            id,
            peer,
            accepted_ms: now,
            last_ms: AtomicU64::new(now),
            in_request: AtomicU32::new(0),
            streams: AtomicU32::new(0),
            requests: AtomicU64::new(0),
            killed: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            notify: tokio::sync::Notify::new(),
        });
        inner.live.insert(id, slot.clone());
        inner.open += 1;
        Some(Conn {
            gov: self.clone(),
            slot,
        })
    }

    fn release(&self, id: u64) {
        let mut inner = self.lock();
        inner.live.remove(&id);
        inner.open -= 1;
    }

    /// (connections holding a slot, sockets open).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.live.len(), inner.open)
    }

    /// Closes the connections whose time is up. Returns how many.
    pub fn sweep(&self) -> usize {
        let now = self.now_ms();
        let b = self.bounds;
        let ms = |d: Duration| d.as_millis() as u64;
        let mut inner = self.lock();
        let before = inner.live.len();
        inner.live.retain(|_, s| {
            if s.in_request.load(Ordering::Acquire) > 0 {
                return true;
            }
            let age = now.saturating_sub(s.accepted_ms);
            let quiet = now.saturating_sub(s.last_ms.load(Ordering::Relaxed));
            let expired = (s.requests.load(Ordering::Relaxed) == 0 && age > ms(b.first_request))
                || (s.streams.load(Ordering::Acquire) == 0 && quiet > ms(b.idle))
                || b.max_age.is_some_and(|m| age > ms(m));
            if expired {
                s.kill();
            }
            !expired
        });
        let n = before - inner.live.len();
        self.stats.timed_out.fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Sweeps until the runtime ends, and logs a line when the listener had to evict, refuse or
    /// shed (at most once a minute).
    pub async fn watch(self: Arc<Self>) {
        let b = self.bounds;
        let tick = (b.first_request.min(b.idle) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        let mut logged = (0, 0, 0);
        let mut last_log: Option<Instant> = None;
        loop {
            tokio::time::sleep(tick).await;
            self.sweep();
            let now = (
                self.stats.evicted.load(Ordering::Relaxed),
                self.stats.refused.load(Ordering::Relaxed),
                self.stats.shed.load(Ordering::Relaxed),
            );
            if now != logged && last_log.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                crate::log!(
                    "nhi-companion: {}: at its limit of {} connections: {} evicted (quietest first), {} refused, {} requests shed so far",
                    self.name, b.max_connections, now.0, now.1, now.2
                );
                logged = now;
                last_log = Some(Instant::now());
            }
        }
    }
}

/// A connection's hold on its slot; dropping it frees the slot.
pub struct Conn {
    gov: Arc<Governor>,
    slot: Arc<Slot>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.gov.release(self.slot.id);
    }
}

/// Marks a request in progress on its slot until dropped.
struct InRequest(Arc<Slot>, u64);

impl Drop for InRequest {
    fn drop(&mut self) {
        self.0.in_request.fetch_sub(1, Ordering::AcqRel);
        self.0.last_ms.store(self.1, Ordering::Relaxed);
    }
}

/// One waiting request counted against the listener's limit until dropped.
struct Waiting(Arc<Governor>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Conn {
    pub fn slot(&self) -> &Arc<Slot> {
        &self.slot
    }

    pub fn governor(&self) -> &Arc<Governor> {
        &self.gov
    }

    /// Whether the connection outlived the listener's maximum age (an HTTP/1 response then
    /// says `Connection: close`).
    pub fn too_old(&self) -> bool {
        let age = self.gov.now_ms().saturating_sub(self.slot.accepted_ms);
        self.gov
            .bounds
            .max_age
            .is_some_and(|m| age > m.as_millis() as u64)
    }

    /// The connection is past its opening (a proxied one decided and connected): the first
    /// request timeout no longer applies.
    pub fn established(&self) {
        self.slot.requests.fetch_add(1, Ordering::Relaxed);
        self.touch();
    }

    /// Activity that is not a request (bytes relayed by the proxy): postpones the idle timeout
    /// and eviction.
    pub fn touch(&self) {
        touch(&self.gov, &self.slot);
    }

    /// Runs `answer` as one request of this connection (never evicted while in progress),
    /// without the listener's waiting limit or a timeout: for a proxy that has handed the
    /// request on already. The connection's other bounds still end it.
    pub async fn answering<T>(&self, answer: impl Future<Output = T>) -> T {
        let _in = start_request(&self.gov, &self.slot);
        answer.await
    }

    /// Marks `body` (an answer being streamed back) as an open stream of this connection until
    /// it ends or is dropped: the connection neither idles out nor counts as quiet meanwhile.
    pub fn streaming<B>(self: &Arc<Self>, body: B) -> StreamBody<B> {
        self.slot.streams.fetch_add(1, Ordering::AcqRel);
        StreamBody {
            inner: body,
            open: Some(OpenStream(self.clone())),
        }
    }

    /// Runs `answer` as one request of this connection: never evicted while in progress; if it
    /// is not ready at once it counts against the listener's waiting limit (beyond which
    /// `refuse(Busy)` answers instead) and gets at most `timeout` (else `refuse(TimedOut)`).
    pub async fn request<T>(
        &self,
        answer: impl Future<Output = T>,
        timeout: Duration,
        refuse: impl FnOnce(Refusal) -> T,
    ) -> T {
        request(&self.gov, &self.slot, answer, timeout, refuse).await
    }
}

fn touch(gov: &Governor, slot: &Slot) {
    slot.last_ms.store(gov.now_ms(), Ordering::Relaxed);
}

fn start_request(gov: &Governor, slot: &Arc<Slot>) -> InRequest {
    slot.in_request.fetch_add(1, Ordering::AcqRel);
    slot.requests.fetch_add(1, Ordering::Relaxed);
    touch(gov, slot);
    InRequest(slot.clone(), gov.now_ms())
}

async fn request<T>(
    gov: &Arc<Governor>,
    slot: &Arc<Slot>,
    answer: impl Future<Output = T>,
    timeout: Duration,
    refuse: impl FnOnce(Refusal) -> T,
) -> T {
    let guard = start_request(gov, slot);
    let mut answer = std::pin::pin!(answer);
    let first = std::future::poll_fn(|cx| Poll::Ready(answer.as_mut().poll(cx))).await;
    let out = match first {
        Poll::Ready(v) => v,
        Poll::Pending => {
            if gov.waiting.fetch_add(1, Ordering::AcqRel) >= gov.waiting_limit() {
                gov.waiting.fetch_sub(1, Ordering::AcqRel);
                gov.stats.shed.fetch_add(1, Ordering::Relaxed);
                return refuse(Refusal::Busy);
            }
            let _waiting = Waiting(gov.clone());
            match tokio::time::timeout(timeout, answer).await {
                Ok(v) => v,
                Err(_) => refuse(Refusal::TimedOut),
            }
        }
    };
    drop(guard);
    out
}

/// A connection's stream with the governor's say: once its slot is killed, reads and writes
/// fail (`ConnectionAborted`), so whichever protocol stack drives it (hyper, h2 under tonic)
/// drops the connection. Carries the slot to the request layer ([`ConnInfo`]).
pub struct Guarded<T> {
    inner: T,
    conn: Arc<Conn>,
}

impl<T> Guarded<T> {
    pub fn new(inner: T, conn: Conn) -> Self {
        Guarded {
            inner,
            conn: Arc::new(conn),
        }
    }

    fn aborted(&self, cx: &mut Context<'_>) -> bool {
        self.conn.slot.waker.register(cx.waker());
        self.conn.slot.is_killed()
    }
}

fn aborted_error() -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::ConnectionAborted,
        "closed by the companion's connection limits",
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for Guarded<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.aborted(cx) {
            return Poll::Ready(Err(aborted_error()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Guarded<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.aborted(cx) {
            return Poll::Ready(Err(aborted_error()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        if self.aborted(cx) {
            return Poll::Ready(Err(aborted_error()));
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// What tonic puts in each request's extensions for a [`Guarded`] connection: its slot, for
/// [`RequestLayer`].
#[derive(Clone)]
pub struct ConnInfo {
    conn: Arc<Conn>,
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected for Guarded<T> {
    type ConnectInfo = ConnInfo;
    fn connect_info(&self) -> ConnInfo {
        ConnInfo {
            conn: self.conn.clone(),
        }
    }
}

/// Applies [`Conn::request`] to gRPC calls (tonic's `Server::layer`): each call is a request of
/// its connection, and a server stream keeps the connection from idling out while it is open.
#[derive(Clone, Copy)]
pub struct RequestLayer {
    pub timeout: Duration,
}

impl<S> tower::Layer<S> for RequestLayer {
    type Service = RequestService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        RequestService {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
pub struct RequestService<S> {
    inner: S,
    timeout: Duration,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, ResB> tower::Service<http::Request<B>> for RequestService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
    ResB: http_body::Body + Default + Unpin + Send + 'static,
{
    type Response = http::Response<StreamBody<ResB>>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let conn = req.extensions().get::<ConnInfo>().map(|c| c.conn.clone());
        let fut = self.inner.call(req);
        let timeout = self.timeout;
        Box::pin(async move {
            let Some(conn) = conn else {
                return fut.await.map(|r| {
                    r.map(|b| StreamBody {
                        inner: b,
                        open: None,
                    })
                });
            };
            let answered = conn.request(async { Ok(fut.await) }, timeout, Err).await;
            let why = match answered {
                Ok(Ok(r)) => {
                    conn.slot.streams.fetch_add(1, Ordering::AcqRel);
                    let open = Some(OpenStream(conn));
                    return Ok(r.map(|b| StreamBody { inner: b, open }));
                }
                Ok(Err(e)) => return Err(e),
                Err(why) => why,
            };
            let status = match why {
                Refusal::Busy => {
                    tonic::Status::unavailable("the companion has too many requests waiting; retry")
                }
                Refusal::TimedOut => {
                    tonic::Status::deadline_exceeded("no answer within the request timeout")
                }
            };
            Ok(status.into_http::<ResB>().map(|b| StreamBody {
                inner: b,
                open: None,
            }))
        })
    }
}

/// Counts an open response body (a server stream) on its connection until dropped.
struct OpenStream(Arc<Conn>);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.slot.streams.fetch_sub(1, Ordering::AcqRel);
        self.0.touch();
    }
}

/// A response body that keeps its connection marked as streaming.
pub struct StreamBody<B> {
    inner: B,
    open: Option<OpenStream>,
}

impl<B: http_body::Body + Unpin> http_body::Body for StreamBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            self.open = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(max: usize) -> Bounds {
        Bounds {
            max_connections: max,
            first_request: Duration::from_secs(10),
            idle: Duration::from_secs(60),
            max_age: Some(Duration::from_secs(3600)),
        }
    }

    async fn advance(ms: u64) {
        tokio::time::advance(Duration::from_millis(ms)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_listener_evicts_the_quietest_connection_never_one_being_answered() {
        let gov = Governor::new("t", bounds(4));
        let mut conns = Vec::new();
        for _ in 0..4 {
            conns.push(gov.admit().unwrap());
            advance(10).await;
        }
        // conns[0] asks something now: it becomes the most recent; conns[1] is the quietest.
        conns[0]
            .request(async {}, Duration::from_secs(1), |_| ())
            .await;
        let fifth = gov.admit().unwrap();
        assert!(conns[1].slot().is_killed(), "the quietest goes");
        assert!(!conns[0].slot().is_killed() && !conns[2].slot().is_killed());
        assert_eq!(gov.stats.evicted.load(Ordering::Relaxed), 1);
        // A connection whose request is waiting is never evicted.
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let waiting = tokio::spawn({
            let gov = gov.clone();
            let slot = conns[2].slot().clone();
            async move {
                request(
                    &gov,
                    &slot,
                    async { rx.await.ok() },
                    Duration::from_secs(30),
                    |_| None,
                )
                .await
            }
        });
        tokio::task::yield_now().await;
        let _sixth = gov.admit().unwrap();
        assert!(!conns[2].slot().is_killed(), "busy: kept");
        assert!(conns[3].slot().is_killed() || conns[0].slot().is_killed());
        tx.send(()).unwrap();
        assert_eq!(waiting.await.unwrap(), Some(()));
        drop(fifth);
        // Open sockets are bounded even while evicted ones are still closing.
        let (live, open) = gov.counts();
        assert!(live <= 4 && open <= gov.ceiling(), "{live} {open}");
    }

    #[tokio::test(start_paused = true)]
    async fn with_peers_known_a_flooding_peer_only_ever_evicts_itself() {
        let gov = Governor::new("t", bounds(8));
        let honest = gov.admit_from(Some(1)).unwrap();
        advance(10).await;
        let mut flood = Vec::new();
        for _ in 0..100 {
            flood.push(gov.admit_from(Some(2)).unwrap());
            // Their tasks close the evicted ones.
            flood.retain(|c| !c.slot().is_killed());
            advance(1).await;
        }
        assert!(!honest.slot().is_killed(), "the quietest, but not the hog");
        // Another honest newcomer takes a slot from the hog too.
        let other = gov.admit_from(Some(3)).unwrap();
        assert!(!honest.slot().is_killed() && !other.slot().is_killed());
        assert_eq!(gov.counts().0, 8);
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_connection_is_being_answered_new_ones_are_refused_and_the_ceiling_holds() {
        let gov = Governor::new("t", bounds(8));
        let mut conns: Vec<Conn> = (0..8).map(|_| gov.admit().unwrap()).collect();
        for c in &conns {
            c.slot().in_request.fetch_add(1, Ordering::AcqRel);
        }
        assert!(gov.admit().is_none());
        assert_eq!(gov.stats.refused.load(Ordering::Relaxed), 1);
        for c in &conns {
            c.slot().in_request.fetch_sub(1, Ordering::AcqRel);
        }
        // Evicted connections whose tasks have not closed them yet still count: at most
        // `ceiling` sockets, whatever the churn.
        let mut kept = Vec::new();
        for _ in 0..100 {
            if let Some(c) = gov.admit() {
                kept.push(c);
            }
        }
        assert!(gov.counts().1 <= gov.ceiling());
        assert!(gov.stats.refused.load(Ordering::Relaxed) > 1);
        conns.clear();
        kept.clear();
        assert_eq!(gov.counts(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn timeouts_close_silent_idle_and_old_connections_but_not_open_streams() {
        let gov = Governor::new("t", bounds(16));
        let silent = gov.admit().unwrap();
        let asked = gov.admit().unwrap();
        asked
            .request(async {}, Duration::from_secs(1), |_| ())
            .await;
        let streaming = gov.admit().unwrap();
        streaming.established();
        streaming.slot().streams.fetch_add(1, Ordering::AcqRel);
        advance(10_500).await;
        assert_eq!(gov.sweep(), 1);
        assert!(silent.slot().is_killed(), "no first request within 10 s");
        assert!(!asked.slot().is_killed());
        advance(50_000).await;
        assert_eq!(gov.sweep(), 1);
        assert!(asked.slot().is_killed(), "idle for 60 s");
        assert!(!streaming.slot().is_killed(), "an open stream is not idle");
        advance(3_600_000).await;
        assert_eq!(gov.sweep(), 1);
        assert!(streaming.slot().is_killed(), "past the maximum age");
        assert_eq!(gov.stats.timed_out.load(Ordering::Relaxed), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn only_requests_that_wait_count_and_at_most_seven_eighths_of_the_slots_wait() {
        let gov = Governor::new("t", bounds(8));
        assert_eq!(gov.waiting_limit(), 7);
        let conns: Vec<Conn> = (0..8).map(|_| gov.admit().unwrap()).collect();
        // Answered at once: never counted as waiting, whatever is waiting already.
        let mut waiters = Vec::new();
        for c in &conns[..7] {
            let (gov, slot) = (gov.clone(), c.slot().clone());
            waiters.push(tokio::spawn(async move {
                request(
                    &gov,
                    &slot,
                    std::future::pending::<u8>(),
                    Duration::from_secs(5),
                    |w| match w {
                        Refusal::TimedOut => 2,
                        Refusal::Busy => 1,
                    },
                )
                .await
            }));
        }
        tokio::task::yield_now().await;
        assert_eq!(gov.waiting.load(Ordering::Acquire), 7);
        let at_once = conns[7]
            .request(async { 0u8 }, Duration::from_secs(5), |_| 9)
            .await;
        assert_eq!(at_once, 0, "a cached answer is served even now");
        let shed = conns[7]
            .request(
                std::future::pending::<u8>(),
                Duration::from_secs(5),
                |w| match w {
                    Refusal::Busy => 1,
                    Refusal::TimedOut => 2,
                },
            )
            .await;
        assert_eq!(shed, 1, "the eighth waiter is refused at once");
        advance(5_001).await;
        for w in waiters {
            assert_eq!(w.await.unwrap(), 2, "bounded by the request timeout");
        }
        assert_eq!(gov.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_killed_connection_fails_its_reads_and_writes() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let gov = Governor::new("t", bounds(1));
        let (a, mut b) = tokio::io::duplex(64);
        let mut g = Guarded::new(a, gov.admit().unwrap());
        b.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 1];
        g.read_exact(&mut buf).await.unwrap();
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 1];
            let e = g.read(&mut buf).await.unwrap_err();
            (e.kind(), g.write(b"y").await.is_err())
        });
        tokio::task::yield_now().await;
        let _next = gov.admit().unwrap(); // evicts the idle one, waking its pending read
        assert_eq!(
            reader.await.unwrap(),
            (std::io::ErrorKind::ConnectionAborted, true)
        );
    }

    #[test]
    fn the_fd_budget_covers_every_listener() {
        let l = nhi_core::config::CompanionLimits::default();
        // 641 + 2 * 321 + 8 * 1281 + 8 * 64 (warm mTLS) + 64
        assert_eq!(l.fd_budget(), 641 + 642 + 10248 + 512 + 64);
    }
}
