//! Mutual TLS connections to other workloads' companions, handshaken ahead of need.
//!
//! A full mutual TLS 1.3 handshake costs both companions about 0.45 ms of CPU (two ECDSA
//! signatures, four verifications, two key exchanges) plus a round trip; made when the
//! application connects, it is the larger part of what mTLS adds to a new connection. So once a
//! workload has called a destination, its companion keeps a few connections to it handshaken
//! and idle ("warm"), and hands one to each new connection the application opens, refilling in
//! the background — the way Envoy's `preconnect_policy` does. Handshakes ahead are for repeat
//! traffic only (two calls within [`MAX_AGE`]): a destination called once in a while keeps
//! just the connection its last call gave back. A refill is itself a handshake on both
//! companions' CPU: it happens after the connection that took one has ended, so it does not
//! compete with that connection's first exchange; only a burst (the last one taken while other
//! connections to the destination are going on) refills at once. Each warm connection still carries
//! exactly one application connection (no multiplexing: the bytes are relayed as they are, and
//! both sides keep one audit record and one policy decision per connection).
//!
//! What keeps this as strict as a handshake made on the spot:
//! - a warm connection is used only under the trust material it was made with (SVID, bundle,
//!   denied peers: [`super::Material::generation`]); any change drops the pool;
//! - it is used within [`MAX_AGE`] (below the callee's default first-request timeout), and not
//!   if its peer closed it or sent anything meanwhile;
//! - the callee decides nothing until the caller claims the connection (a short preface, see
//!   [`super::PREFACE`]), and then checks the caller again if its trust material changed since
//!   the handshake;
//! - the pool is bounded: at most [`MAX_WARM`] per destination and [`MAX_DESTINATIONS`]
//!   destinations (least recently used ones dropped); destinations unused for [`MAX_AGE`] are
//!   not refilled; a failed handshake pauses refilling that destination for [`RETRY_AFTER`].

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;

use super::relay::Buffered;
use crate::edge::Edge;

/// The caller's side of a companion-to-companion connection.
pub(crate) type ClientTls = tokio_rustls::client::TlsStream<Buffered<TcpStream>>;

/// The most warm connections kept for one destination.
pub const MAX_WARM: usize = nhi_core::policy::MAX_MTLS_WARM;
/// The most destinations with warm connections (counted in the companion's fd budget).
pub const MAX_DESTINATIONS: usize = nhi_core::policy::MAX_MTLS_WARM_DESTINATIONS;
/// A warm connection not used within this is closed; a destination not used within this is
/// not refilled.
pub const MAX_AGE: Duration = Duration::from_secs(5);
/// A connection carries application connections one after another for at most this long
/// after its handshake; then a new handshake.
pub const MAX_LIFE: Duration = Duration::from_secs(10 * 60);
/// After a failed handshake, refilling that destination waits this long.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// A handshaken connection waiting to be claimed.
pub(crate) struct Warm {
    pub tls: ClientTls,
    pub peer_id: String,
    /// The peer speaks only `nhi-mtls/1` (no preface, no frames): one application connection,
    /// never kept.
    pub legacy: bool,
    keep: Keep,
}

/// What a warm connection is known by while an application connection uses its stream.
pub(crate) struct Keep {
    peer_id: String,
    /// Until when the peer's certificate is valid (Unix seconds).
    not_after: i64,
    /// The handshake, and when it was last left idle.
    born: Instant,
    idle_since: Instant,
    generation: u64,
}

impl Keep {
    /// The connection again, with its stream back from an application connection that ended
    /// cleanly.
    pub(crate) fn with(self, tls: ClientTls) -> Warm {
        Warm {
            tls,
            legacy: false,
            peer_id: self.peer_id.clone(),
            keep: Keep {
                idle_since: Instant::now(),
                ..self
            },
        }
    }
}

impl Warm {
    pub(crate) fn new(tls: ClientTls, peer_id: String, not_after: i64, generation: u64) -> Self {
        let now = Instant::now();
        let legacy = tls.get_ref().1.alpn_protocol() != Some(super::ALPN);
        Warm {
            tls,
            legacy,
            keep: Keep {
                peer_id: peer_id.clone(),
                not_after,
                born: now,
                idle_since: now,
                generation,
            },
            peer_id,
        }
    }

    /// The stream, for one application connection, and what to put it back with.
    pub(crate) fn lend(self) -> (ClientTls, Keep) {
        (self.tls, self.keep)
    }

    /// Still usable: made under the current trust material, young enough, its peer's
    /// certificate valid, and the peer neither closed it nor sent anything (a callee sends
    /// nothing before the caller's first bytes; an alert means it refused).
    fn usable(&self, generation: u64) -> bool {
        let k = &self.keep;
        k.generation == generation
            && k.idle_since.elapsed() < MAX_AGE
            && k.born.elapsed() < MAX_LIFE
            && super::unix_now() < k.not_after
            && quiet(&self.tls)
    }
}

fn quiet(tls: &ClientTls) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    let (io, session) = tls.get_ref();
    if io.held() > 0 || session.wants_write() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(
        recv(
            io.get_ref().as_raw_fd(),
            &mut b,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Err(nix::errno::Errno::EAGAIN)
    )
}

#[derive(Hash, PartialEq, Eq, Clone, Debug)]
struct Key {
    dest: SocketAddr,
    peer: String,
}

struct Entry {
    /// Tells this entry from one made again for the same key after it was dropped.
    epoch: u64,
    ready: VecDeque<Warm>,
    filling: usize,
    /// Application connections to this destination going on now.
    in_use: usize,
    /// How many to keep (the rule's `warm`, or `[egress] mtls_warm`).
    want: usize,
    used: Instant,
    /// The use before the last: repeat traffic (two within [`MAX_AGE`]) is what earns
    /// handshakes ahead of need.
    used_before: Option<Instant>,
    failed: Option<Instant>,
}

impl Entry {
    fn repeat(&self) -> bool {
        self.used_before.is_some_and(|t| t.elapsed() < MAX_AGE)
    }
}

/// What a [`Pool::take`] says about the connections a destination needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Demand {
    /// Enough: the connection taken (or made) comes back when it ends.
    None,
    /// The last one was taken while other connections to the destination are going on (a
    /// burst): refill at once.
    Now,
    /// None was ready while others are going on (calls overlapping, or one following another
    /// before the last came back): refill when this connection ends.
    Later,
}

/// The warm connections of one companion.
#[derive(Default)]
pub struct Pool {
    entries: Mutex<HashMap<Key, Entry>>,
    epochs: std::sync::atomic::AtomicU64,
    sweeping: AtomicBool,
}

/// One application connection to a destination going on (see [`Pool::take`]); ends when
/// dropped.
pub(crate) struct InUse {
    pool: Arc<Pool>,
    key: Key,
    epoch: u64,
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Some(e) = self.pool.lock().get_mut(&self.key) {
            if e.epoch == self.epoch {
                e.in_use = e.in_use.saturating_sub(1);
            }
        }
    }
}

impl Pool {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The entry of `key`, made if need be (dropping the least recently used destination
    /// beyond [`MAX_DESTINATIONS`]).
    fn entry<'a>(&self, entries: &'a mut HashMap<Key, Entry>, key: &Key) -> &'a mut Entry {
        if !entries.contains_key(key) && entries.len() >= MAX_DESTINATIONS {
            let oldest = entries
                .iter()
                .filter(|(_, e)| e.in_use == 0)
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                entries.remove(&k);
            }
        }
        entries.entry(key.clone()).or_insert_with(|| Entry {
            epoch: self.epochs.fetch_add(1, Ordering::Relaxed),
            ready: VecDeque::new(),
            filling: 0,
            in_use: 0,
            want: 0,
            used: Instant::now(),
            used_before: None,
            failed: None,
        })
    }

    /// For a new application connection to `dest` (whose companion must prove an ID matching
    /// `peer`): a warm connection made under trust material `generation`, if one is ready
    /// (stale ones met on the way are dropped); whether more are needed than the pool holds
    /// (see [`Demand`]); and the token of this use.
    pub(crate) fn take(
        self: &Arc<Self>,
        dest: SocketAddr,
        peer: &str,
        generation: u64,
    ) -> (Option<Warm>, Demand, InUse) {
        let key = Key {
            dest,
            peer: peer.into(),
        };
        let mut entries = self.lock();
        let e = self.entry(&mut entries, &key);
        e.used_before = Some(e.used);
        e.used = Instant::now();
        let busy = e.in_use > 0;
        e.in_use += 1;
        let using = InUse {
            pool: self.clone(),
            key,
            epoch: e.epoch,
        };
        let spare = |e: &Entry| !e.ready.is_empty() || e.filling > 0;
        while let Some(w) = e.ready.pop_front() {
            if w.usable(generation) {
                let demand = if busy && !spare(e) {
                    Demand::Now
                } else {
                    Demand::None
                };
                return (Some(w), demand, using);
            }
        }
        let demand = if busy && !spare(e) {
            Demand::Later
        } else {
            Demand::None
        };
        (None, demand, using)
    }

    /// Puts back a connection whose application connection ended cleanly, if its
    /// destination has fewer than `want` ready: whether it was kept.
    pub(crate) fn give_back(&self, dest: SocketAddr, peer: &str, warm: Warm, want: usize) -> bool {
        let key = Key {
            dest,
            peer: peer.into(),
        };
        let mut entries = self.lock();
        let e = self.entry(&mut entries, &key);
        e.want = want.min(MAX_WARM);
        if e.ready.len() >= e.want || warm.keep.born.elapsed() >= MAX_LIFE {
            return false;
        }
        e.ready.push_back(warm);
        true
    }

    /// Warm connections ready or being made, for tests and status.
    pub fn count(&self) -> usize {
        self.lock()
            .values()
            .map(|e| e.ready.len() + e.filling)
            .sum()
    }

    /// Starts handshakes until `want` connections to `dest` (peer `peer`) are ready or on
    /// their way — for repeat traffic only: a destination called once in a while keeps at
    /// most the connection its last call gave back, and costs no handshake ahead.
    pub(crate) fn refill(
        self: &Arc<Self>,
        edge: &Arc<Edge>,
        dest: SocketAddr,
        peer: &str,
        want: usize,
    ) {
        let want = want.min(MAX_WARM);
        if want == 0 {
            return;
        }
        let key = Key {
            dest,
            peer: peer.into(),
        };
        let (missing, epoch) = {
            let mut entries = self.lock();
            let e = self.entry(&mut entries, &key);
            e.want = want;
            if !e.repeat() || e.failed.is_some_and(|t| t.elapsed() < RETRY_AFTER) {
                return;
            }
            let missing = want.saturating_sub(e.ready.len() + e.filling);
            e.filling += missing;
            (missing, e.epoch)
        };
        for _ in 0..missing {
            tokio::spawn(fill(Arc::downgrade(self), edge.clone(), key.clone(), epoch));
        }
        if missing > 0 && !self.sweeping.swap(true, Ordering::SeqCst) {
            tokio::spawn(sweep(Arc::downgrade(self)));
        }
    }
}

/// One background handshake for `key`'s destination (entry `epoch`).
async fn fill(pool: Weak<Pool>, edge: Arc<Edge>, key: Key, epoch: u64) {
    let made = match edge.tls_material().await {
        Ok(()) => super::connect(&edge, key.dest, &key.peer).await,
        Err(e) => Err(super::Unmade::Failed(e)),
    };
    let Some(pool) = pool.upgrade() else { return };
    let mut entries = pool.lock();
    let Some(e) = entries.get_mut(&key).filter(|e| e.epoch == epoch) else {
        return;
    };
    e.filling = e.filling.saturating_sub(1);
    match made {
        Ok(w) if !w.legacy => {
            e.failed = None;
            if e.used.elapsed() < MAX_AGE && e.ready.len() < e.want {
                e.ready.push_back(w);
            }
        }
        // A refusal, a failure, or a peer that only speaks the first protocol (nothing to
        // keep: its connections carry one application connection).
        _ => e.failed = Some(Instant::now()),
    }
}

/// Closes warm connections past their age and forgets destinations no longer used, every
/// second, while the pool lives.
async fn sweep(pool: Weak<Pool>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(pool) = pool.upgrade() else { return };
        let mut entries = pool.lock();
        for e in entries.values_mut() {
            e.ready.retain(|w| w.keep.idle_since.elapsed() < MAX_AGE);
        }
        entries.retain(|_, e| {
            !e.ready.is_empty() || e.filling > 0 || e.in_use > 0 || e.used.elapsed() < MAX_AGE
        });
    }
}
