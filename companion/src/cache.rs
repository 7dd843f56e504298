//! Credential cache. Each credential is refreshed in the background at half its lifetime (minus
//! up to 10% jitter so companions started together don't ask together); requests are served
//! from the cache while a credential is valid and only wait for `nhid` when there is none.
//! JWT-SVIDs are cached per audience set, a bounded number of them, and dropped when unused for
//! a whole lifetime.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nhi_core::wire::{CompanionRequest, CompanionResponse, JwtSvid, X509Svid};
use tokio::sync::Notify;

use crate::channel::Channel;

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

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

#[derive(Default)]
struct Inner {
    x509: Option<Entry<X509Svid>>,
    jwt: HashMap<Vec<String>, Entry<JwtSvid>>,
}

pub struct Creds {
    channel: Channel,
    inner: Mutex<Inner>,
    changed: Notify,
    max_audiences: usize,
}

impl Creds {
    pub fn new(channel: Channel, max_audiences: usize) -> Arc<Self> {
        let c = Arc::new(Creds {
            channel,
            inner: Mutex::new(Inner::default()),
            changed: Notify::new(),
            max_audiences,
        });
        tokio::spawn(refresher(c.clone()));
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn jwt(&self, audience: Vec<String>) -> Result<Arc<JwtSvid>, String> {
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

    pub async fn x509(&self) -> Result<Arc<X509Svid>, String> {
        let now = now_unix();
        if let Some(e) = self.lock().x509.as_mut().filter(|e| e.valid(now)) {
            e.last_used = Instant::now();
            return Ok(e.svid.clone());
        }
        let e = self.fetch_x509().await?;
        let s = e.svid.clone();
        self.lock().x509 = Some(e);
        self.changed.notify_one();
        Ok(s)
    }

    async fn fetch_jwt(&self, audience: Vec<String>) -> Result<Entry<JwtSvid>, String> {
        match self
            .channel
            .call(CompanionRequest::Jwt { audience })
            .await?
        {
            CompanionResponse::Jwt(j) => {
                let (i, e) = (j.issued_at, j.expires_at);
                Ok(Entry::new(j, i, e))
            }
            CompanionResponse::Error { message } => Err(message),
            other => Err(format!("unexpected answer from nhid: {other:?}")),
        }
    }

    async fn fetch_x509(&self) -> Result<Entry<X509Svid>, String> {
        match self.channel.call(CompanionRequest::X509).await? {
            CompanionResponse::X509(x) => {
                let (i, e) = (x.issued_at, x.expires_at);
                Ok(Entry::new(*x, i, e))
            }
            CompanionResponse::Error { message } => Err(message),
            _ => Err("unexpected answer from nhid".into()),
        }
    }
}

enum Due {
    X509,
    Jwt(Vec<String>),
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
        // `next` only covers entries that were not due: after refreshing, look again.
        let refreshed = !due.is_empty();
        for d in due {
            match d {
                Due::X509 => match c.fetch_x509().await {
                    Ok(e) => c.lock().x509 = Some(e),
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

fn retry_soon<T>(entry: Option<&mut Entry<T>>, why: &str) {
    eprintln!("nhi-companion: refresh failed, retrying in 1s: {why}");
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
