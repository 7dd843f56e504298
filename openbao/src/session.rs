//! The OpenBao session: login (AppRole or a token file), renewal at 2/3 of the TTL in the
//! background, re-login when renewal cannot help, and what login answers say.

use super::*;

impl Inner {
    pub(crate) fn token(&self) -> Result<(Zeroizing<String>, u64), BaoError> {
        match &*self.session_read() {
            Some(s) => Ok((s.token.clone(), s.generation)),
            None => Err(BaoError::NotLoggedIn(
                self.status
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .last_error
                    .clone()
                    .unwrap_or_else(|| "no session".into()),
            )),
        }
    }

    /// After a 403 seen with token `generation`: true if the caller should retry because a new
    /// token is in place (someone else logged in, or the old token was dead and we logged in).
    pub(crate) async fn recover_token(&self, generation: u64) -> bool {
        let _guard = self.login_lock.lock().await;
        let current = self.session_read().as_ref().map(|s| s.generation);
        if current != Some(generation) {
            return true;
        }
        let Ok((token, _)) = self.token() else {
            return false;
        };
        match self
            .request(Method::GET, "auth/token/lookup-self", None, Some(&token))
            .await
        {
            Ok(a) if a.status == StatusCode::FORBIDDEN => {
                tracing::info!("OpenBao token no longer valid: logging in again");
                match self.login_locked().await {
                    Ok(()) => true,
                    Err(e) => {
                        self.set_error(&e);
                        false
                    }
                }
            }
            // The token is fine: the 403 is the policy's answer.
            _ => false,
        }
    }

    pub(crate) async fn login(&self) -> Result<(), BaoError> {
        let _guard = self.login_lock.lock().await;
        self.login_locked().await
    }

    /// Logs in and installs the new token. Caller holds `login_lock`.
    pub(crate) async fn login_locked(&self) -> Result<(), BaoError> {
        let (token, times, expires_at) = match &self.auth {
            OpenBaoAuth::AppRole {
                role_id,
                secret_id_file,
                mount,
            } => {
                let secret_id = read_secret_file(secret_id_file)?;
                let api = format!("auth/{}/login", mount.trim_matches('/'));
                let body = Zeroizing::new(
                    serde_json::to_vec(&serde_json::json!({
                        "role_id": role_id,
                        "secret_id": &*secret_id,
                    }))
                    .expect("JSON value serializes"),
                );
                let ans = check(
                    self.request(Method::POST, &api, Some(&body), None).await?,
                    &api,
                )?;
                parse_auth(&ans, &api, Instant::now())?
            }
            OpenBaoAuth::Token { token_file } => {
                let token = read_secret_file(token_file)?;
                let api = "auth/token/lookup-self";
                let ans = check(
                    self.request(Method::GET, api, None, Some(&token)).await?,
                    api,
                )?;
                let (times, expires_at) = parse_lookup(&ans, api, Instant::now())?;
                (token, times, expires_at)
            }
        };
        let mut s = self.session.write().unwrap_or_else(|e| e.into_inner());
        let generation = s.as_ref().map_or(1, |s| s.generation + 1);
        *s = Some(Session {
            token,
            generation,
            times,
            first_lease: times.lease,
            expires_at,
        });
        drop(s);
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.logins += 1;
        st.last_error = None;
        tracing::info!(
            address = %self.addresses[self.current_index()],
            ttl_s = times.lease.as_secs(),
            renewable = times.renewable,
            "logged in to OpenBao"
        );
        Ok(())
    }

    pub(crate) async fn renew(&self) -> Result<(), BaoError> {
        let _guard = self.login_lock.lock().await;
        let (token, generation) = self.token()?;
        let api = "auth/token/renew-self";
        let ans = check(
            self.request(Method::POST, api, Some(b"{}"), Some(&token))
                .await?,
            api,
        )?;
        let (_, renewed, expires_at) = parse_auth(&ans, api, Instant::now())?;
        let mut s = self.session.write().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = s.as_mut().filter(|s| s.generation == generation) {
            s.times = LeaseTimes {
                capped: is_capped(s.first_lease, renewed.lease),
                ..renewed
            };
            s.expires_at = expires_at;
        }
        drop(s);
        let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
        st.renewals += 1;
        st.last_error = None;
        tracing::debug!(ttl_s = renewed.lease.as_secs(), "OpenBao token renewed");
        Ok(())
    }

    /// Whether a token is in place and not expired.
    pub(crate) fn has_live_session(&self) -> bool {
        self.session_read().as_ref().is_some_and(|s| {
            s.times.lease.is_zero() || Instant::now() < s.times.obtained + s.times.lease
        })
    }

    /// What to do next and when; with no session at all, log in now.
    pub(crate) fn next_step(&self, now: Instant) -> Option<(Action, Instant)> {
        match &*self.session_read() {
            Some(s) => plan(&s.times, now),
            None => Some((Action::Relogin, now)),
        }
    }

    pub(crate) fn set_error(&self, e: &BaoError) {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = Some(e.to_string());
    }
}

/// Renews the token at 2/3 of its TTL, logs in again when it cannot be renewed (not renewable,
/// max TTL reached, revoked, expired); retries failures with exponential backoff and jitter.
/// Holds only a weak reference so that dropping the last [`Bao`] ends it.
pub(crate) async fn renew_loop(weak: Weak<Inner>) {
    let mut failures = 0u32;
    loop {
        let step = match weak.upgrade() {
            Some(inner) => inner.next_step(Instant::now()),
            None => return,
        };
        let Some((action, at)) = step else {
            // The token never expires: nothing to renew.
            return;
        };
        tokio::time::sleep_until(at.into()).await;
        let Some(inner) = weak.upgrade() else { return };
        let result = match action {
            Action::Renew => match inner.renew().await {
                // A renewal refused outright means the token is gone: log in right away.
                Err(BaoError::Denied { .. }) => inner.login().await,
                other => other,
            },
            Action::Relogin => inner.login().await,
        };
        match result {
            Ok(()) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(error = %e, attempt = failures, "OpenBao token renewal/login failed");
                inner.set_error(&e);
                let mut pause = backoff(failures, rand::random::<f64>());
                if !inner.has_live_session() {
                    pause = pause.min(BACKOFF_MAX_LOGGED_OUT);
                }
                drop(inner);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// When and how to act on the token next. `None`: it never expires.
pub(crate) fn plan(t: &LeaseTimes, now: Instant) -> Option<(Action, Instant)> {
    if t.lease.is_zero() {
        return None;
    }
    let expires = t.obtained + t.lease;
    if now >= expires {
        return Some((Action::Relogin, now));
    }
    let at = (t.obtained + t.lease * 2 / 3).max(t.obtained + MIN_STEP.min(t.lease / 2));
    let action = if t.renewable && !t.capped {
        Action::Renew
    } else {
        Action::Relogin
    };
    Some((action, at))
}

/// A renewal that granted noticeably less than the TTL first granted hit the max TTL.
pub(crate) fn is_capped(first: Duration, renewed: Duration) -> bool {
    renewed + Duration::from_secs(1) < first
}

/// Exponential backoff for attempt `n` (1-based) with jitter: a uniform pick in [50 %, 100 %]
/// of `BACKOFF_BASE * 2^(n-1)`, capped at `BACKOFF_MAX`. `r` is a random number in [0, 1).
pub(crate) fn backoff(n: u32, r: f64) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << n.saturating_sub(1).min(16));
    let full = exp.min(BACKOFF_MAX);
    full.mul_f64(0.5 + 0.5 * r.clamp(0.0, 1.0))
}

/// The `auth` block of a login or renew-self answer.
pub(crate) fn parse_auth(
    ans: &Answer,
    api: &str,
    now: Instant,
) -> Result<(Zeroizing<String>, LeaseTimes, Option<u64>), BaoError> {
    #[derive(Deserialize)]
    struct Envelope {
        auth: Option<Auth>,
    }
    #[derive(Deserialize)]
    struct Auth {
        client_token: String,
        lease_duration: u64,
        #[serde(default)]
        renewable: bool,
    }
    let Some(a) = decode::<Envelope>(ans, api)?.auth else {
        return Err(BaoError::Decode {
            address: ans.address.clone(),
            path: api.to_string(),
            reason: "no auth block in the answer".into(),
        });
    };
    let lease = Duration::from_secs(a.lease_duration);
    Ok((
        Zeroizing::new(a.client_token),
        LeaseTimes {
            obtained: now,
            lease,
            renewable: a.renewable,
            capped: false,
        },
        expiry_unix(lease),
    ))
}

/// A `lookup-self` answer (token login): remaining TTL and renewability.
pub(crate) fn parse_lookup(
    ans: &Answer,
    api: &str,
    now: Instant,
) -> Result<(LeaseTimes, Option<u64>), BaoError> {
    #[derive(Deserialize)]
    struct Data {
        #[serde(default)]
        ttl: u64,
        #[serde(default)]
        renewable: bool,
    }
    let d: Data = decode_data(ans, api)?;
    let lease = Duration::from_secs(d.ttl);
    Ok((
        LeaseTimes {
            obtained: now,
            lease,
            renewable: d.renewable,
            capped: false,
        },
        expiry_unix(lease),
    ))
}

pub(crate) fn expiry_unix(lease: Duration) -> Option<u64> {
    if lease.is_zero() {
        return None;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Some((now + lease).as_secs())
}

/// Reads a secret_id or token file: trimmed, never empty, wiped from memory when dropped.
pub(crate) fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, BaoError> {
    let raw = Zeroizing::new(std::fs::read(path).map_err(|source| BaoError::Io {
        path: path.to_path_buf(),
        source,
    })?);
    let text = std::str::from_utf8(&raw).map_err(|_| BaoError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not UTF-8"),
    })?;
    let t = text.trim();
    if t.is_empty() {
        return Err(BaoError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "file is empty"),
        });
    }
    Ok(Zeroizing::new(t.to_string()))
}
