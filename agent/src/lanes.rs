//! Fair scheduling of one companion's requests on its channel: requests that need the secret
//! store (which may be slow or unreachable: an OpenBao outage costs `request_timeout` per
//! address) never delay requests `nhid` answers by itself (JWT-/X.509-SVIDs, token validation).
//!
//! Each class has its own lane: a budget of requests answered at once and a bounded number of
//! requests waiting for a slot, each for a bounded time. The channel's reader never waits for a
//! slot: it admits the request to its lane (or refuses it at once when the lane's queue is
//! full) and goes on reading, so a full store lane cannot hold up a token. A request that
//! cannot start within its lane's `max_wait` is refused with a message saying why; the
//! companion answers it 503 (`busy`) instead of hanging.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nhi_core::wire::Call;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The two classes of companion requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Answered by `nhid` itself: signing JWT-/X.509-SVIDs, validating tokens.
    Issue,
    /// Needs the secret store: granted and brokered secrets.
    Store,
}

impl Lane {
    pub fn of(req: &Call) -> Lane {
        match req {
            Call::Secret { .. } | Call::BrokeredSecret { .. } => Lane::Store,
            Call::Jwt { .. } | Call::X509 | Call::Validate { .. } => Lane::Issue,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Lane::Issue => "credential",
            Lane::Store => "secret-store",
        }
    }
}

/// One lane's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Requests answered at once.
    pub in_flight: usize,
    /// Requests waiting for a slot; beyond it a request is refused at once.
    pub queued: usize,
    /// Longest a request waits for a slot before it is refused.
    pub max_wait: Duration,
}

/// Per companion. Signing takes microseconds to milliseconds; a store read up to
/// `request_timeout` × addresses during an outage, hence as many slots but no effect on the other
/// lane.
pub const ISSUE_LIMITS: Limits = Limits {
    in_flight: 16,
    queued: 256,
    max_wait: Duration::from_secs(5),
};
pub const STORE_LIMITS: Limits = Limits {
    in_flight: 16,
    queued: 256,
    max_wait: Duration::from_secs(5),
};

/// Why a request was not started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The lane's queue is full.
    Full { lane: Lane, limits: Limits },
    /// No slot freed up within `max_wait`.
    Timeout { lane: Lane, limits: Limits },
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Full { lane, limits } => write!(
                f,
                "nhid is busy: {} {} requests of this workload are in flight and {} more wait; retry later",
                limits.in_flight,
                lane.what(),
                limits.queued
            ),
            Refused::Timeout { lane, limits } => write!(
                f,
                "nhid is busy: no {} slot freed up within {:?} (all {} in flight{}); retry later",
                lane.what(),
                limits.max_wait,
                limits.in_flight,
                if *lane == Lane::Store {
                    ": the secret store is slow or unreachable"
                } else {
                    ""
                }
            ),
        }
    }
}

struct State {
    limits: Limits,
    slots: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
}

impl State {
    fn new(limits: Limits) -> Self {
        State {
            limits,
            slots: Arc::new(Semaphore::new(limits.in_flight)),
            waiting: Arc::new(AtomicUsize::new(0)),
        }
    }
}

/// The lanes of one companion's channel.
pub struct Lanes {
    issue: State,
    store: State,
}

impl Default for Lanes {
    fn default() -> Self {
        Self::new(ISSUE_LIMITS, STORE_LIMITS)
    }
}

impl Lanes {
    pub fn new(issue: Limits, store: Limits) -> Self {
        Lanes {
            issue: State::new(issue),
            store: State::new(store),
        }
    }

    fn state(&self, lane: Lane) -> &State {
        match lane {
            Lane::Issue => &self.issue,
            Lane::Store => &self.store,
        }
    }

    /// Admits a request to `lane` without waiting: a ticket to wait for a slot with, or
    /// [`Refused::Full`] when the lane already has `queued` requests waiting.
    pub fn admit(&self, lane: Lane) -> Result<Ticket, Refused> {
        let s = self.state(lane);
        // A free slot is taken at once: the common case never counts as waiting.
        if let Ok(permit) = s.slots.clone().try_acquire_owned() {
            return Ok(Ticket {
                lane,
                limits: s.limits,
                inner: TicketInner::Ready(permit),
            });
        }
        let prev = s.waiting.fetch_add(1, Ordering::SeqCst);
        if prev >= s.limits.queued {
            s.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full {
                lane,
                limits: s.limits,
            });
        }
        Ok(Ticket {
            lane,
            limits: s.limits,
            inner: TicketInner::Waiting {
                slots: s.slots.clone(),
                waiting: WaitGuard(s.waiting.clone()),
            },
        })
    }
}

/// A request admitted to a lane.
pub struct Ticket {
    lane: Lane,
    limits: Limits,
    inner: TicketInner,
}

enum TicketInner {
    Ready(OwnedSemaphorePermit),
    Waiting {
        slots: Arc<Semaphore>,
        waiting: WaitGuard,
    },
}

/// Counts a waiting request out of its lane's queue however its wait ends.
struct WaitGuard(Arc<AtomicUsize>);

impl Drop for WaitGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Ticket {
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// Waits (at most the lane's `max_wait`) for a slot; hold the permit while answering.
    pub async fn start(self) -> Result<OwnedSemaphorePermit, Refused> {
        match self.inner {
            TicketInner::Ready(p) => Ok(p),
            TicketInner::Waiting { slots, waiting } => {
                let got = tokio::time::timeout(self.limits.max_wait, slots.acquire_owned()).await;
                drop(waiting);
                match got {
                    Ok(Ok(p)) => Ok(p),
                    // The semaphore is never closed; treat it like a timeout if it were.
                    Ok(Err(_)) | Err(_) => Err(Refused::Timeout {
                        lane: self.lane,
                        limits: self.limits,
                    }),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: Limits = Limits {
        in_flight: 2,
        queued: 3,
        max_wait: Duration::from_secs(5),
    };

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap()
    }

    #[test]
    fn requests_are_classified_by_what_they_need() {
        let secret = Call::Secret { name: "a".into() };
        let brokered = Call::BrokeredSecret {
            rule_id: "r".into(),
        };
        assert_eq!(Lane::of(&secret), Lane::Store);
        assert_eq!(Lane::of(&brokered), Lane::Store);
        for r in [
            Call::Jwt {
                audience: vec!["a".into()],
            },
            Call::X509,
            Call::Validate {
                token: "t".into(),
                audience: "a".into(),
            },
        ] {
            assert_eq!(Lane::of(&r), Lane::Issue, "{r:?}");
        }
    }

    /// The issue's scenario without processes: the store lane full of requests that never end
    /// (an OpenBao outage), its queue full too; a token request still starts at once, and what
    /// the store lane cannot take is refused at once or after `max_wait`, never left hanging.
    #[test]
    fn a_stuck_store_lane_never_delays_the_issue_lane_and_waits_are_bounded() {
        rt().block_on(async {
            let lanes = Arc::new(Lanes::new(SMALL, SMALL));
            let mut held = Vec::new();
            for _ in 0..SMALL.in_flight {
                held.push(lanes.admit(Lane::Store).unwrap().start().await.unwrap());
            }
            // Three wait for a slot (started now, refused after max_wait)...
            let t0 = tokio::time::Instant::now();
            let waiters: Vec<_> = (0..SMALL.queued)
                .map(|_| {
                    let t = lanes.admit(Lane::Store).unwrap();
                    tokio::spawn(async move { (t.start().await, t0.elapsed()) })
                })
                .collect();
            tokio::task::yield_now().await;
            // ...the fourth is refused on the spot.
            match lanes.admit(Lane::Store) {
                Err(r @ Refused::Full { .. }) => {
                    assert!(r.to_string().contains("busy"), "{r}")
                }
                other => panic!("expected Full, got {:?}", other.map(|_| ())),
            }
            // The other lane: every slot available, no waiting at all.
            let t1 = tokio::time::Instant::now();
            let a = lanes.admit(Lane::Issue).unwrap().start().await.unwrap();
            let b = lanes.admit(Lane::Issue).unwrap().start().await.unwrap();
            assert_eq!(t1.elapsed(), Duration::ZERO);
            drop((a, b));
            for w in waiters {
                let (res, waited) = w.await.unwrap();
                let r = res.map(|_| ()).unwrap_err();
                assert!(matches!(
                    r,
                    Refused::Timeout {
                        lane: Lane::Store,
                        ..
                    }
                ));
                assert!(r.to_string().contains("secret store"), "{r}");
                assert_eq!(waited, SMALL.max_wait);
            }
            // Timed-out waiters left the queue: room for new ones again.
            let again = lanes.admit(Lane::Store).unwrap();
            drop(held.pop());
            assert!(
                again.start().await.is_ok(),
                "a freed slot goes to the waiter"
            );
        });
    }

    #[test]
    fn a_waiter_gets_the_first_slot_that_frees_up() {
        rt().block_on(async {
            let lanes = Lanes::new(SMALL, SMALL);
            let first = lanes.admit(Lane::Issue).unwrap().start().await.unwrap();
            let _second = lanes.admit(Lane::Issue).unwrap().start().await.unwrap();
            let waiting = lanes.admit(Lane::Issue).unwrap();
            let t0 = tokio::time::Instant::now();
            let h = tokio::spawn(async move { waiting.start().await.map(|_| t0.elapsed()) });
            tokio::time::sleep(Duration::from_millis(300)).await;
            drop(first);
            assert_eq!(h.await.unwrap().unwrap(), Duration::from_millis(300));
        });
    }
}
