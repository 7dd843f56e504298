//! Credential cache. Each credential is refreshed in the background at half its lifetime (minus
//! up to 10% jitter so companions started together don't ask together); requests are served
//! from the cache while a credential is valid and only wait for `nhid` when there is none.
//! JWT-SVIDs are cached per audience set, a bounded number of them, and dropped when unused for
//! a whole lifetime.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::sync::atomic::{AtomicBool, Ordering};

use nhi_core::wire::{Event, JwtSvid, Refusal, SecretValue, X509Svid};
use tokio::sync::Notify;

use crate::channel::{CallError, Channel, Events, Pushed};

/// Most secrets cached at once.
const MAX_SECRETS: usize = 256;

/// Why a credential could not be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredError {
    /// Not for this workload (revoked, not granted): 403.
    Denied(String),
    /// No such secret: 404.
    NotFound(String),
    /// nhid or the store could not answer: 503.
    Unavailable(String),
    /// nhid could not take the request in time (too many of its class in flight): 503, retry.
    Busy(String),
}

impl std::fmt::Display for CredError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredError::Denied(m)
            | CredError::NotFound(m)
            | CredError::Unavailable(m)
            | CredError::Busy(m) => f.write_str(m),
        }
    }
}

impl From<CallError> for CredError {
    fn from(e: CallError) -> Self {
        match e {
            CallError::Refused(Refusal::Denied(m)) => CredError::Denied(m),
            CallError::Refused(Refusal::NotFound(m)) => CredError::NotFound(m),
            CallError::Refused(Refusal::Busy(m)) => CredError::Busy(m),
            CallError::Refused(Refusal::Error(m)) | CallError::Unavailable(m) => {
                CredError::Unavailable(m)
            }
            unexpected @ CallError::Unexpected { .. } => {
                CredError::Unavailable(unexpected.to_string())
            }
        }
    }
}

pub use nhi_core::clock::now_unix;

/// When to refresh a credential valid from `issued` to `expires`: at half-life, up to 10% early.
pub fn refresh_at(issued: u64, expires: u64, rand: u64) -> u64 {
    let ttl = expires.saturating_sub(issued);
    let jitter = if ttl >= 10 { rand % (ttl / 10 + 1) } else { 0 };
    issued + ttl / 2 - jitter.min(ttl / 2)
}

fn random() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

struct Entry<T> {
    svid: Arc<T>,
    expires_at: u64,
    refresh_at: u64,
    last_used: Instant,
}

impl<T> Entry<T> {
    fn new(svid: T, issued: u64, expires: u64) -> Self {
        Entry {
            svid: Arc::new(svid),
            expires_at: expires,
            refresh_at: refresh_at(issued, expires, random()),
            last_used: Instant::now(),
        }
    }

    /// Usable now: we never hand out a credential in its last second.
    fn valid(&self, now: u64) -> bool {
        now + 1 < self.expires_at
    }
}

/// A secret as nhid served it, until its lease (`expires_at`) ends.
struct CachedSecret {
    value: Arc<SecretValue>,
    /// Fetched from an nhid that has gone since: ask the current one first, and serve this
    /// copy only if it cannot answer (its lease still bounds it).
    revalidate: bool,
}

#[derive(Default)]
struct Inner {
    x509: Option<Entry<X509Svid>>,
    jwt: HashMap<Vec<String>, Entry<JwtSvid>>,
    secrets: HashMap<String, CachedSecret>,
}

/// The trust bundle (PEM), JWKS (JSON) and SPIFFE bundle (JSON; empty if nhid sent none) as
/// served.
pub struct Trust {
    pub bundle: bytes::Bytes,
    pub jwks: bytes::Bytes,
    pub spiffe: bytes::Bytes,
}

impl Trust {
    pub fn new(bundle_pem: &str, jwks: &serde_json::Value, spiffe: &serde_json::Value) -> Self {
        let json = |v: &serde_json::Value| {
            let mut j = serde_json::to_vec(v).expect("JSON serializes");
            j.push(b'\n');
            bytes::Bytes::from(j)
        };
        Trust {
            bundle: bytes::Bytes::from(bundle_pem.to_string()),
            jwks: json(jwks),
            spiffe: if spiffe.is_object() {
                json(spiffe)
            } else {
                bytes::Bytes::new()
            },
        }
    }
}

pub struct Creds {
    channel: Channel,
    trust: std::sync::RwLock<Arc<Trust>>,
    inner: Mutex<Inner>,
    changed: Notify,
    max_audiences: usize,
    revoked: AtomicBool,
    /// Bumped whenever what the Workload API streams (X.509-SVID, bundles, revocation state)
    /// changes, so open streams send the new state.
    generation: tokio::sync::watch::Sender<u64>,
}

impl Creds {
    pub fn new(
        channel: Channel,
        events: Events,
        max_audiences: usize,
        revoked: bool,
        trust: Trust,
    ) -> Arc<Self> {
        let c = Arc::new(Creds {
            channel,
            trust: std::sync::RwLock::new(Arc::new(trust)),
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            max_audiences,
            revoked: AtomicBool::new(revoked),
            generation: tokio::sync::watch::channel(0).0,
        });
        tokio::spawn(refresher(c.clone()));
        tokio::spawn(on_events(c.clone(), events));
        c
    }

    /// A receiver that changes whenever the X.509-SVID, the trust bundle or the revocation
    /// state changes (Workload API streams wait on it).
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    pub fn trust(&self) -> Arc<Trust> {
        self.trust.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn check_revoked(&self) -> Result<(), CredError> {
        if self.revoked.load(Ordering::SeqCst) {
            Err(CredError::Denied(
                "this workload's identity is revoked".into(),
            ))
        } else {
            Ok(())
        }
    }

    /// Applies an event pushed by nhid.
    pub fn apply(&self, pushed: Pushed) {
        match pushed {
            Pushed::Event(Event::Revoked { message }) => {
                self.revoked.store(true, Ordering::SeqCst);
                let mut inner = self.lock();
                inner.x509 = None;
                inner.jwt.clear();
                inner.secrets.clear();
                crate::log!("nhi-companion: {message}; cached credentials dropped");
            }
            Pushed::Event(Event::Restored) => {
                self.revoked.store(false, Ordering::SeqCst);
                crate::log!("nhi-companion: revocation lifted");
            }
            Pushed::Event(Event::SecretChanged { name }) => {
                self.lock().secrets.remove(&name);
            }
            Pushed::Event(Event::Trust {
                bundle_pem,
                jwks,
                bundle_spiffe,
            }) => {
                *self.trust.write().unwrap_or_else(|p| p.into_inner()) =
                    Arc::new(Trust::new(&bundle_pem, &jwks, &bundle_spiffe));
            }
            // Re-adopted by a restarted nhid: its view of revocation and trust wins, and the
            // secrets fetched from its predecessor are checked with it before they are served.
            Pushed::Readopted(init) => {
                let revoked = init.revoked;
                if revoked {
                    self.apply(Pushed::Event(Event::Revoked {
                        message: format!("{} was revoked while nhid was away", init.spiffe_id),
                    }));
                } else if self.revoked.swap(false, Ordering::SeqCst) {
                    crate::log!("nhi-companion: revocation lifted while nhid was away");
                }
                *self.trust.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Trust::new(
                    &init.bundle_pem,
                    &init.jwks,
                    &init.bundle_spiffe,
                ));
                for s in self.lock().secrets.values_mut() {
                    s.revalidate = true;
                }
            }
            // The edge's business only.
            Pushed::Event(Event::Policy { .. } | Event::DeniedPeers { .. }) => return,
        }
        self.bump();
    }

    /// The secret `name`, from the cache while nhid's lease on it runs, else from nhid.
    pub async fn secret(&self, name: &str) -> Result<Arc<SecretValue>, CredError> {
        self.check_revoked()?;
        let now = now_unix();
        let cached = match self.lock().secrets.get(name) {
            Some(s) if now < s.value.expires_at => Some((s.value.clone(), s.revalidate)),
            _ => None,
        };
        let stale = match cached {
            Some((v, false)) => return Ok(v),
            Some((v, true)) => Some(v),
            None => None,
        };
        let s = match self.channel.secret(name).await {
            Ok(s) => Arc::new(s),
            // nhid cannot answer now: the copy from its predecessor, still within its lease.
            Err(
                CallError::Unavailable(_)
                | CallError::Refused(Refusal::Error(_) | Refusal::Busy(_)),
            ) if stale.is_some() => {
                self.check_revoked()?;
                return Ok(stale.expect("checked"));
            }
            Err(CallError::Unavailable(e)) => return Err(CredError::Unavailable(e)),
            Err(e) => {
                self.lock().secrets.remove(name);
                return Err(e.into());
            }
        };
        // A revocation that arrived meanwhile wins.
        self.check_revoked()?;
        let mut inner = self.lock();
        if inner.secrets.len() >= MAX_SECRETS {
            inner.secrets.retain(|_, v| now < v.value.expires_at);
        }
        if inner.secrets.len() < MAX_SECRETS || inner.secrets.contains_key(name) {
            inner.secrets.insert(
                name.into(),
                CachedSecret {
                    value: s.clone(),
                    revalidate: false,
                },
            );
        }
        Ok(s)
    }

    /// Drops the cached copy of secret `name`: the next read asks nhid.
    pub fn forget_secret(&self, name: &str) {
        self.lock().secrets.remove(name);
    }

    /// Asks nhid to validate a JWT-SVID (signature, audience, expiry, deny list).
    pub async fn validate(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<nhi_core::wire::Validated, CredError> {
        Ok(self.channel.validate(token, audience).await?)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn jwt(&self, audience: Vec<String>) -> Result<Arc<JwtSvid>, CredError> {
        self.check_revoked()?;
        let now = now_unix();
        if let Some(e) = self.lock().jwt.get_mut(&audience).filter(|e| e.valid(now)) {
            e.last_used = Instant::now();
            return Ok(e.svid.clone());
        }
        let entry = self.fetch_jwt(audience.clone()).await?;
        let svid = entry.svid.clone();
        let mut inner = self.lock();
        if inner.jwt.len() >= self.max_audiences && !inner.jwt.contains_key(&audience) {
            let lru = inner
                .jwt
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            if let Some(k) = lru {
                inner.jwt.remove(&k);
            }
        }
        inner.jwt.insert(audience, entry);
        drop(inner);
        self.changed.notify_one();
        Ok(svid)
    }

    pub async fn x509(&self) -> Result<Arc<X509Svid>, CredError> {
        self.check_revoked()?;
        let now = now_unix();
        if let Some(e) = self.lock().x509.as_mut().filter(|e| e.valid(now)) {
            e.last_used = Instant::now();
            return Ok(e.svid.clone());
        }
        let e = self.fetch_x509().await?;
        let s = e.svid.clone();
        self.lock().x509 = Some(e);
        self.changed.notify_one();
        self.bump();
        Ok(s)
    }

    async fn fetch_jwt(&self, audience: Vec<String>) -> Result<Entry<JwtSvid>, CredError> {
        let j = self.channel.jwt(audience).await?;
        let (i, e) = (j.issued_at, j.expires_at);
        Ok(Entry::new(j, i, e))
    }

    async fn fetch_x509(&self) -> Result<Entry<X509Svid>, CredError> {
        let x = self.channel.x509().await?;
        let (i, e) = (x.issued_at, x.expires_at);
        Ok(Entry::new(x, i, e))
    }
}

enum Due {
    X509,
    Jwt(Vec<String>),
}

async fn on_events(c: Arc<Creds>, mut events: Events) {
    while let Some(e) = events.recv().await {
        c.apply(e);
        c.changed.notify_one();
    }
}

/// Refreshes whatever is due, then sleeps until the next refresh or a cache change.
async fn refresher(c: Arc<Creds>) {
    loop {
        let now = now_unix();
        let (due, next) = {
            let mut inner = c.lock();
            // Drop JWTs nobody asked for during a whole lifetime, and anything expired.
            inner.jwt.retain(|_, e| {
                let life = e.expires_at.saturating_sub(e.refresh_at) * 2;
                e.valid(now) && e.last_used.elapsed() < Duration::from_secs(life.max(10))
            });
            if inner.x509.as_ref().is_some_and(|e| !e.valid(now)) {
                inner.x509 = None;
            }
            let mut due = Vec::new();
            let mut next = u64::MAX;
            if let Some(e) = &inner.x509 {
                if e.refresh_at <= now {
                    due.push(Due::X509);
                } else {
                    next = next.min(e.refresh_at);
                }
            }
            for (aud, e) in &inner.jwt {
                if e.refresh_at <= now {
                    due.push(Due::Jwt(aud.clone()));
                } else {
                    next = next.min(e.refresh_at);
                }
            }
            (due, next)
        };
        if !due.is_empty() && !c.channel.is_up() {
            // nhid is away: what is cached is served until it expires; refresh once it is back.
            tokio::select! {
                _ = c.channel.wait_up() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        // `next` only covers entries that were not due: after refreshing, look again.
        let refreshed = !due.is_empty();
        for d in due {
            match d {
                Due::X509 => match c.fetch_x509().await {
                    Ok(e) => {
                        c.lock().x509 = Some(e);
                        c.bump();
                    }
                    Err(e) => retry_soon(c.lock().x509.as_mut(), &e),
                },
                Due::Jwt(aud) => match c.fetch_jwt(aud.clone()).await {
                    Ok(mut e) => {
                        let mut inner = c.lock();
                        if let Some(old) = inner.jwt.get(&aud) {
                            e.last_used = old.last_used;
                            inner.jwt.insert(aud, e);
                        }
                    }
                    Err(e) => retry_soon(c.lock().jwt.get_mut(&aud), &e),
                },
            }
        }
        if refreshed {
            continue;
        }
        let now = now_unix();
        let sleep = if next == u64::MAX {
            Duration::from_secs(3600)
        } else {
            Duration::from_secs(next.saturating_sub(now))
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = c.changed.notified() => {}
        }
    }
}

fn retry_soon<T>(entry: Option<&mut Entry<T>>, why: &CredError) {
    crate::log!("nhi-companion: refresh failed, retrying in 1s: {why}");
    if let Some(e) = entry {
        e.refresh_at = now_unix() + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_is_at_half_life_with_bounded_jitter() {
        assert_eq!(refresh_at(1000, 1300, 0), 1150);
        for r in [1u64, 7, 29, 30, 31, 1_000_003] {
            let t = refresh_at(1000, 1300, r);
            assert!((1120..=1150).contains(&t), "{t}");
        }
        assert_eq!(refresh_at(100, 104, 99), 102);
        assert_eq!(refresh_at(100, 100, 5), 100);
    }
}
