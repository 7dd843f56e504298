//! Client for OpenBao (or HashiCorp Vault) as nhid's central store and issuer: login (AppRole
//! or a token file), token renewal in the background, multi-address failover, KV version 2
//! and the PKI endpoints nhi needs.
//!
//! Secrets never leave this module except as return values: the secret_id, the client token
//! and KV data are kept out of logs, errors and `Debug` output. Response bodies that carry a
//! token are wiped after parsing, and JSON decode errors only say where parsing failed, never
//! what the offending value was.
//!
//! Failover: every request goes to the address that answered last. On a connection error, a
//! timeout (`request_timeout` per address), 5xx, 429, a redirect (a standby that does not
//! forward) or the 400 a KV v2 mount gives while it starts up on a newly elected leader, the
//! addresses are probed in order with `sys/health` and the request goes to the active node
//! (standbys and sealed nodes are skipped: OpenBao standbys answer some reads themselves and
//! may lag, e.g. during an election). Rounds repeat with a short pause until
//! `request_timeout` × number of addresses has gone by, which covers a raft leader election.
//! An HTTP 500 from the node that is active is the answer, not retried. A request that failed ambiguously (timeout, 5xx) may thus be sent
//! twice: writes with `cas` then fail with [`BaoError::CasMismatch`] and a re-read tells.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nhi_core::openbao::{OpenBaoAuth, OpenBaoConfig};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

/// Largest response body accepted (PKI chains and KV secrets are far smaller).
const MAX_BODY: usize = 8 << 20;
/// Bounds of the exponential backoff of the renewal task.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Pause between two full passes over the address list.
const ROUND_PAUSE_BASE: Duration = Duration::from_millis(100);
const ROUND_PAUSE_MAX: Duration = Duration::from_secs(1);
/// The renewal task never acts more often than this, whatever the token's TTL.
const MIN_STEP: Duration = Duration::from_secs(1);
/// Longest pause between logins while there is no session at all (nhid started during an
/// outage): nothing works without one, and a login attempt is one request.
const BACKOFF_MAX_LOGGED_OUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum BaoError {
    /// No address gave a usable answer.
    #[error("OpenBao unreachable for {path}: tried {}", tried.join("; "))]
    Unreachable { path: String, tried: Vec<String> },
    #[error(
        "OpenBao at {address} denied {path} (403 permission denied){}",
        fmt_errors(errors)
    )]
    Denied {
        address: String,
        path: String,
        errors: Vec<String>,
    },
    /// A `cas` write lost the race (the secret's current version is not the one given).
    #[error(
        "OpenBao at {address}: {path}: check-and-set version {cas} is not the current version"
    )]
    CasMismatch {
        address: String,
        path: String,
        cas: u64,
    },
    #[error("OpenBao at {address}: {path}: HTTP {code}{}", fmt_errors(errors))]
    Status {
        address: String,
        path: String,
        code: u16,
        errors: Vec<String>,
    },
    #[error("OpenBao at {address}: {path}: unexpected answer: {reason}")]
    Decode {
        address: String,
        path: String,
        reason: String,
    },
    /// A local file (secret_id, token, CA bundle) could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The configuration or an argument is unusable (bad CA file, KV path with `..`, ...).
    #[error("{0}")]
    Invalid(String),
    /// No session yet (OpenBao was unreachable at every login so far); the login is retried
    /// in the background.
    #[error("not logged in to OpenBao ({0})")]
    NotLoggedIn(String),
}

impl BaoError {
    /// OpenBao could not be reached (down, sealed, partitioned), as opposed to a refusal or a
    /// configuration problem: the cases where serving from the sealed cache makes sense.
    pub fn is_outage(&self) -> bool {
        matches!(
            self,
            BaoError::Unreachable { .. } | BaoError::NotLoggedIn(_)
        )
    }
}

fn fmt_errors(errors: &[String]) -> String {
    if errors.is_empty() {
        String::new()
    } else {
        format!(": {}", errors.join("; "))
    }
}

/// One KV v2 secret version.
#[derive(Clone, PartialEq)]
pub struct KvSecret {
    pub data: Map<String, Value>,
    pub version: u64,
    pub created_time: String,
}

impl fmt::Debug for KvSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The values are the secrets: show which keys there are, never what they hold.
        f.debug_struct("KvSecret")
            .field("keys", &self.data.keys().collect::<Vec<_>>())
            .field("version", &self.version)
            .field("created_time", &self.created_time)
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvMeta {
    pub current_version: u64,
    pub updated_time: String,
}

/// An intermediate CA certificate signed by the PKI mount's root.
#[derive(Debug, Clone)]
pub struct SignedIntermediate {
    pub certificate_pem: String,
    /// The certificate that signed it (the root).
    pub issuing_ca_pem: String,
    /// As OpenBao returns it: the new intermediate first, then its issuers up to the root.
    pub ca_chain_pem: Vec<String>,
    /// `notAfter`, Unix seconds.
    pub expiration: u64,
}

/// The client's state for `nhictl status`. Holds no secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaoHealth {
    /// Address the next request goes to first (the last one that answered).
    pub address: String,
    pub logged_in: bool,
    /// Unix seconds; `None` for a token that never expires.
    pub token_expires_at: Option<u64>,
    /// Last failure of the background login/renewal, cleared by the next success.
    pub last_error: Option<String>,
    /// Logins since `connect` (the first included).
    pub logins: u64,
    /// Successful token renewals since `connect`.
    pub renewals: u64,
}

/// Cheap to clone: all clones share one connection pool, token and renewal task.
#[derive(Clone)]
pub struct Bao {
    inner: Arc<Inner>,
}

struct Inner {
    http: reqwest::Client,
    /// Base URLs without trailing `/`.
    addresses: Vec<String>,
    current: AtomicUsize,
    namespace: Option<String>,
    auth: OpenBaoAuth,
    kv_mount: String,
    kv_prefix: String,
    pki_mount: String,
    request_timeout: Duration,
    session: RwLock<Option<Session>>,
    /// Serializes logins so that many requests failing at once cause one login.
    login_lock: tokio::sync::Mutex<()>,
    status: Mutex<Status>,
    renewer: Mutex<Option<tokio::task::AbortHandle>>,
}

struct Session {
    token: Zeroizing<String>,
    /// Bumped at every login; lets a request that saw a 403 tell whether someone else already
    /// logged in again.
    generation: u64,
    times: LeaseTimes,
    /// TTL granted at login: a renewal that gives less has hit the token's max TTL.
    first_lease: Duration,
    /// Wall-clock expiry for status, Unix seconds.
    expires_at: Option<u64>,
}

/// What the renewal plan needs to know about the current token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LeaseTimes {
    /// When the lease below was granted.
    obtained: Instant,
    /// Remaining TTL at `obtained`; zero means the token never expires.
    lease: Duration,
    renewable: bool,
    /// The last renewal gave less than the TTL first granted: the token's max TTL is near,
    /// renewing further is pointless.
    capped: bool,
}

#[derive(Debug, Default)]
struct Status {
    last_error: Option<String>,
    logins: u64,
    renewals: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Renew,
    Relogin,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(h) = self
            .renewer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            h.abort();
        }
    }
}

impl fmt::Debug for Bao {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.inner;
        let method = match &i.auth {
            OpenBaoAuth::AppRole { mount, .. } => format!("approle (mount {mount})"),
            OpenBaoAuth::Token { token_file } => format!("token file {}", token_file.display()),
        };
        f.debug_struct("Bao")
            .field("addresses", &i.addresses)
            .field("current", &i.addresses[i.current_index()])
            .field("namespace", &i.namespace)
            .field("auth", &method)
            .field("kv", &format!("{}/{}", i.kv_mount, i.kv_prefix))
            .field("pki_mount", &i.pki_mount)
            .field("token", &i.session_read().as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Why one address gave no usable answer, with the answer if there was one.
struct Failure {
    reason: String,
    answer: Option<Answer>,
}

#[derive(Debug, PartialEq, Eq)]
enum Probe {
    /// `sys/health` 200: initialized, unsealed, active.
    Active,
    /// Standby, sealed, uninitialized, or not reachable.
    Unavailable(String),
    /// Something else answered (a proxy that hides `sys/health`?): usable as a last resort.
    Unknown,
}

fn probe_verdict(status: StatusCode) -> Probe {
    match status.as_u16() {
        200 => Probe::Active,
        429 | 472 | 473 => Probe::Unavailable("standby".into()),
        501 => Probe::Unavailable("not initialized".into()),
        503 => Probe::Unavailable("sealed".into()),
        _ => Probe::Unknown,
    }
}

/// One answer from one address.
struct Answer {
    address: String,
    status: StatusCode,
    /// Wiped on drop: login, lookup and renew answers carry the token, KV answers the secrets.
    body: Zeroizing<Vec<u8>>,
}

impl Bao {
    /// Builds the HTTP client, logs in and starts the background renewal. Must be called
    /// inside a tokio runtime.
    pub async fn connect(cfg: &OpenBaoConfig) -> Result<Bao, BaoError> {
        match Self::connect_deferred(cfg).await? {
            (bao, None) => Ok(bao),
            (_, Some(e)) => Err(e),
        }
    }

    /// Like [`connect`](Self::connect), but an outage ([`BaoError::is_outage`]) at login does
    /// not fail it: the client comes back not logged in, with why, and keeps logging in in the
    /// background until OpenBao answers. A refused login or a bad configuration still fails.
    pub async fn connect_deferred(
        cfg: &OpenBaoConfig,
    ) -> Result<(Bao, Option<BaoError>), BaoError> {
        cfg.validate()
            .map_err(|e| BaoError::Invalid(format!("invalid [openbao] config: {e}")))?;
        let mut builder = reqwest::Client::builder()
            // A standby's redirect would carry X-Vault-Token to whatever Location says: treat
            // it as "try the next address" instead.
            .redirect(reqwest::redirect::Policy::none())
            // Never route secrets through a proxy picked up from the environment.
            .no_proxy()
            .connect_timeout(cfg.request_timeout)
            .timeout(cfg.request_timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .user_agent(concat!("nhid/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &cfg.ca_file {
            let pem = std::fs::read(ca).map_err(|source| BaoError::Io {
                path: ca.clone(),
                source,
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| BaoError::Invalid(format!("openbao.ca_file {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(BaoError::Invalid(format!(
                    "openbao.ca_file {}: no PEM certificate in it",
                    ca.display()
                )));
            }
            builder = builder.tls_built_in_root_certs(false);
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| BaoError::Invalid(format!("OpenBao HTTP client: {e}")))?;
        let inner = Arc::new(Inner {
            http,
            addresses: cfg
                .addresses
                .iter()
                .map(|a| a.trim_end_matches('/').to_string())
                .collect(),
            current: AtomicUsize::new(0),
            namespace: cfg
                .namespace
                .as_ref()
                .map(|n| n.trim_matches('/').to_string()),
            auth: cfg.auth.clone(),
            kv_mount: cfg.kv_mount.trim_matches('/').to_string(),
            kv_prefix: cfg.kv_prefix.trim_matches('/').to_string(),
            pki_mount: cfg.pki_mount.trim_matches('/').to_string(),
            request_timeout: cfg.request_timeout,
            session: RwLock::new(None),
            login_lock: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status::default()),
            renewer: Mutex::new(None),
        });
        inner.find_active().await;
        let deferred = match inner.login().await {
            Ok(()) => None,
            Err(e) if e.is_outage() => {
                inner.set_error(&e);
                Some(e)
            }
            Err(e) => return Err(e),
        };
        let task = tokio::spawn(renew_loop(Arc::downgrade(&inner)));
        *inner.renewer.lock().unwrap_or_else(|e| e.into_inner()) = Some(task.abort_handle());
        Ok((Bao { inner }, deferred))
    }

    /// The current version of `<kv_mount>/<kv_prefix>/<path>`; `None` if there is none or it
    /// is deleted or destroyed.
    pub async fn kv_read(&self, path: &str) -> Result<Option<KvSecret>, BaoError> {
        let api = self.inner.kv_path("data", path, false)?;
        let ans = self.inner.authed(Method::GET, &api, None).await?;
        if ans.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let ans = check(ans, &api)?;
        #[derive(Deserialize)]
        struct Data {
            data: Option<Map<String, Value>>,
            metadata: Meta,
        }
        #[derive(Deserialize)]
        struct Meta {
            version: u64,
            created_time: String,
            #[serde(default)]
            deletion_time: String,
            #[serde(default)]
            destroyed: bool,
        }
        let d: Data = decode_data(&ans, &api)?;
        match d.data {
            Some(data) if d.metadata.deletion_time.is_empty() && !d.metadata.destroyed => {
                Ok(Some(KvSecret {
                    data,
                    version: d.metadata.version,
                    created_time: d.metadata.created_time,
                }))
            }
            _ => Ok(None),
        }
    }

    /// Version bookkeeping of a secret without reading its value; `None` if it does not exist.
    pub async fn kv_metadata(&self, path: &str) -> Result<Option<KvMeta>, BaoError> {
        let api = self.inner.kv_path("metadata", path, false)?;
        let ans = self.inner.authed(Method::GET, &api, None).await?;
        if ans.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        let ans = check(ans, &api)?;
        #[derive(Deserialize)]
        struct Data {
            current_version: u64,
            updated_time: String,
        }
        let d: Data = decode_data(&ans, &api)?;
        Ok(Some(KvMeta {
            current_version: d.current_version,
            updated_time: d.updated_time,
        }))
    }

    /// Writes a new version and returns its number. With `cas = Some(v)` the write only
    /// happens if `v` is the current version (`Some(0)`: only if the secret does not exist
    /// yet); otherwise [`BaoError::CasMismatch`].
    pub async fn kv_write(
        &self,
        path: &str,
        data: Map<String, Value>,
        cas: Option<u64>,
    ) -> Result<u64, BaoError> {
        let api = self.inner.kv_path("data", path, false)?;
        let mut body = serde_json::json!({ "data": data });
        if let Some(v) = cas {
            body["options"] = serde_json::json!({ "cas": v });
        }
        let bytes = Zeroizing::new(serde_json::to_vec(&body).expect("JSON value serializes"));
        zeroize_value(&mut body);
        let ans = self.inner.authed(Method::POST, &api, Some(&bytes)).await?;
        if ans.status == StatusCode::BAD_REQUEST {
            if let Some(v) = cas {
                if openbao_errors(&ans.body)
                    .iter()
                    .any(|e| e.contains("check-and-set"))
                {
                    return Err(BaoError::CasMismatch {
                        address: ans.address,
                        path: api,
                        cas: v,
                    });
                }
            }
        }
        let ans = check(ans, &api)?;
        #[derive(Deserialize)]
        struct Data {
            version: u64,
        }
        Ok(decode_data::<Data>(&ans, &api)?.version)
    }

    /// Names directly under `dir` (sub-directories end in `/`); empty if there is nothing.
    pub async fn kv_list(&self, dir: &str) -> Result<Vec<String>, BaoError> {
        let api = self.inner.kv_path("metadata", dir, true)?;
        let ans = self
            .inner
            .authed(Method::GET, &format!("{api}?list=true"), None)
            .await?;
        if ans.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        let ans = check(ans, &api)?;
        #[derive(Deserialize)]
        struct Data {
            #[serde(default)]
            keys: Vec<String>,
        }
        Ok(decode_data::<Data>(&ans, &api)?.keys)
    }

    /// Deletes the secret: its metadata and every version. Deleting a missing secret is fine.
    pub async fn kv_delete(&self, path: &str) -> Result<(), BaoError> {
        let api = self.inner.kv_path("metadata", path, false)?;
        let ans = self.inner.authed(Method::DELETE, &api, None).await?;
        if ans.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        check(ans, &api).map(|_| ())
    }

    /// The PKI mount's root CA certificate (PEM), the trust anchor of the trust domain.
    pub async fn pki_root_ca_pem(&self) -> Result<String, BaoError> {
        let api = format!("{}/ca/pem", self.inner.pki_mount);
        let ans = check(self.inner.authed(Method::GET, &api, None).await?, &api)?;
        let pem = String::from_utf8(ans.body.to_vec()).map_err(|_| BaoError::Decode {
            address: ans.address.clone(),
            path: api.clone(),
            reason: "CA certificate is not UTF-8 PEM".into(),
        })?;
        if !pem.contains("-----BEGIN CERTIFICATE-----") {
            return Err(BaoError::Decode {
                address: ans.address,
                path: api,
                reason: "no CA certificate (has a root been generated on this mount?)".into(),
            });
        }
        Ok(pem)
    }

    /// Has the root sign an intermediate CA for `csr_pem`. Only the key comes from the CSR
    /// (`use_csr_values=false`): subject CN `common_name`, exactly the given URI SANs, no SAN
    /// from the CN, and a path length of 0 (the intermediate signs leaf SVIDs only).
    pub async fn pki_sign_intermediate(
        &self,
        csr_pem: &str,
        common_name: &str,
        ttl: Duration,
        uri_sans: &[String],
    ) -> Result<SignedIntermediate, BaoError> {
        let api = format!("{}/root/sign-intermediate", self.inner.pki_mount);
        let body = serde_json::json!({
            "csr": csr_pem,
            "common_name": common_name,
            "ttl": format!("{}s", ttl.as_secs().max(1)),
            "format": "pem",
            "use_csr_values": false,
            "exclude_cn_from_sans": true,
            "uri_sans": uri_sans,
            "max_path_length": 0,
        });
        let bytes = serde_json::to_vec(&body).expect("JSON value serializes");
        let ans = check(
            self.inner.authed(Method::POST, &api, Some(&bytes)).await?,
            &api,
        )?;
        #[derive(Deserialize)]
        struct Data {
            certificate: String,
            issuing_ca: String,
            #[serde(default)]
            ca_chain: Vec<String>,
            expiration: u64,
        }
        let d: Data = decode_data(&ans, &api)?;
        Ok(SignedIntermediate {
            certificate_pem: d.certificate,
            issuing_ca_pem: d.issuing_ca,
            ca_chain_pem: d.ca_chain,
            expiration: d.expiration,
        })
    }

    pub fn health(&self) -> BaoHealth {
        let i = &self.inner;
        let logged_in = i.has_live_session();
        let token_expires_at = i.session_read().as_ref().and_then(|s| s.expires_at);
        let st = i.status.lock().unwrap_or_else(|e| e.into_inner());
        BaoHealth {
            address: i.addresses[i.current_index()].clone(),
            logged_in,
            token_expires_at,
            last_error: st.last_error.clone(),
            logins: st.logins,
            renewals: st.renewals,
        }
    }
}

impl Inner {
    fn current_index(&self) -> usize {
        self.current.load(Ordering::Relaxed) % self.addresses.len()
    }

    fn session_read(&self) -> std::sync::RwLockReadGuard<'_, Option<Session>> {
        self.session.read().unwrap_or_else(|e| e.into_inner())
    }

    fn kv_path(&self, kind: &str, path: &str, dir: bool) -> Result<String, BaoError> {
        kv_api_path(&self.kv_mount, kind, &self.kv_prefix, path, dir)
    }

    /// Sends one request, failing over between addresses (see the module docs). `api` is the
    /// path after `/v1/`, already encoded. Returns the first answer that is not a reason to
    /// try elsewhere, whatever its status.
    async fn request(
        &self,
        method: Method,
        api: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Result<Answer, BaoError> {
        let n = self.addresses.len();
        let deadline = Instant::now() + self.request_timeout * n as u32;
        let mut round = 0u32;
        loop {
            round += 1;
            let mut tried: Vec<String> = Vec::new();
            let cur = self.current_index();
            let failure = match self.attempt(cur, &method, api, body, token).await? {
                Ok(ans) => return Ok(ans),
                Err(f) => f,
            };
            tracing::debug!(address = %self.addresses[cur], path = %api, reason = %failure.reason, "OpenBao request failed here");
            tried.push(format!("{} ({})", self.addresses[cur], failure.reason));
            // Where is the active node now? A node that did not answer at all is not asked
            // again in this round (a stalled node would cost another request_timeout).
            let first = if failure.answer.is_some() { 0 } else { 1 };
            let mut active = None;
            let mut unknown = None;
            for idx in failover_order(cur, n).skip(first) {
                match self.probe(idx).await {
                    Probe::Active => {
                        active = Some(idx);
                        break;
                    }
                    Probe::Unknown => {
                        unknown = unknown.or(Some(idx));
                    }
                    Probe::Unavailable(reason) => {
                        if idx != cur {
                            tried.push(format!("{} ({reason})", self.addresses[idx]));
                        }
                    }
                }
            }
            match active.or(unknown) {
                Some(idx) if idx == cur => {
                    // The node that answered is the active one: an internal error is its
                    // answer to this request, not a reason to look elsewhere.
                    if let Some(ans) = failure
                        .answer
                        .filter(|a| a.status == StatusCode::INTERNAL_SERVER_ERROR)
                    {
                        return Ok(ans);
                    }
                }
                Some(idx) => match self.attempt(idx, &method, api, body, token).await? {
                    Ok(ans) => {
                        self.current.store(idx, Ordering::Relaxed);
                        tracing::info!(address = %self.addresses[idx], "OpenBao: switched to this address");
                        return Ok(ans);
                    }
                    Err(f) => tried.push(format!("{} ({})", self.addresses[idx], f.reason)),
                },
                None => {}
            }
            let pause = round_pause(round);
            if Instant::now() + pause >= deadline {
                if round > 1 {
                    tried.push(format!("for {round} rounds"));
                }
                return Err(BaoError::Unreachable {
                    path: api.to_string(),
                    tried,
                });
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// One request to one address. The outer `Err` is a local problem (bad token bytes);
    /// the inner `Err` says why this address gave no usable answer.
    async fn attempt(
        &self,
        idx: usize,
        method: &Method,
        api: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Result<Result<Answer, Failure>, BaoError> {
        let address = &self.addresses[idx];
        let mut req = self
            .http
            .request(method.clone(), format!("{address}/v1/{api}"));
        if let Some(t) = token {
            let mut v = reqwest::header::HeaderValue::from_str(t).map_err(|_| {
                BaoError::Invalid("the OpenBao token contains invalid characters".into())
            })?;
            v.set_sensitive(true);
            req = req.header("X-Vault-Token", v);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_vec());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return Ok(Err(Failure {
                    reason: describe_transport(&e, self.request_timeout),
                    answer: None,
                }))
            }
        };
        let status = resp.status();
        let body = match read_body(resp).await {
            Ok(b) => b,
            Err(reason) => {
                return Ok(Err(Failure {
                    reason,
                    answer: None,
                }))
            }
        };
        Ok(match classify(status, &body) {
            Verdict::Final => Ok(Answer {
                address: address.clone(),
                status,
                body,
            }),
            Verdict::TryNext => Err(Failure {
                reason: describe_status(status, &body),
                answer: Some(Answer {
                    address: address.clone(),
                    status,
                    body,
                }),
            }),
        })
    }

    /// `sys/health` of one address: is it the active node?
    async fn probe(&self, idx: usize) -> Probe {
        let url = format!("{}/v1/sys/health", self.addresses[idx]);
        let mut req = self.http.get(url);
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        match req.send().await {
            Ok(r) => probe_verdict(r.status()),
            Err(e) => Probe::Unavailable(describe_transport(&e, self.request_timeout)),
        }
    }

    /// Points `current` at the active node, if one answers (at connect: a standby would
    /// forward, but reads it serves itself may lag the active node).
    async fn find_active(&self) {
        if self.addresses.len() < 2 {
            return;
        }
        for idx in 0..self.addresses.len() {
            if self.probe(idx).await == Probe::Active {
                self.current.store(idx, Ordering::Relaxed);
                return;
            }
        }
    }

    /// A request with the client token. On 403 it checks whether the token itself is still
    /// valid; if not (revoked, expired) it logs in again and retries once.
    async fn authed(
        &self,
        method: Method,
        api: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, BaoError> {
        let mut retried = false;
        loop {
            let (token, generation) = self.token()?;
            let ans = self
                .request(method.clone(), api, body, Some(&token))
                .await?;
            if ans.status != StatusCode::FORBIDDEN || retried {
                return Ok(ans);
            }
            retried = true;
            if !self.recover_token(generation).await {
                return Ok(ans);
            }
        }
    }

    fn token(&self) -> Result<(Zeroizing<String>, u64), BaoError> {
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
    async fn recover_token(&self, generation: u64) -> bool {
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

    async fn login(&self) -> Result<(), BaoError> {
        let _guard = self.login_lock.lock().await;
        self.login_locked().await
    }

    /// Logs in and installs the new token. Caller holds `login_lock`.
    async fn login_locked(&self) -> Result<(), BaoError> {
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

    async fn renew(&self) -> Result<(), BaoError> {
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
    fn has_live_session(&self) -> bool {
        self.session_read().as_ref().is_some_and(|s| {
            s.times.lease.is_zero() || Instant::now() < s.times.obtained + s.times.lease
        })
    }

    /// What to do next and when; with no session at all, log in now.
    fn next_step(&self, now: Instant) -> Option<(Action, Instant)> {
        match &*self.session_read() {
            Some(s) => plan(&s.times, now),
            None => Some((Action::Relogin, now)),
        }
    }

    fn set_error(&self, e: &BaoError) {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .last_error = Some(e.to_string());
    }
}

/// Renews the token at 2/3 of its TTL, logs in again when it cannot be renewed (not renewable,
/// max TTL reached, revoked, expired); retries failures with exponential backoff and jitter.
/// Holds only a weak reference so that dropping the last [`Bao`] ends it.
async fn renew_loop(weak: Weak<Inner>) {
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
fn plan(t: &LeaseTimes, now: Instant) -> Option<(Action, Instant)> {
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
fn is_capped(first: Duration, renewed: Duration) -> bool {
    renewed + Duration::from_secs(1) < first
}

/// Exponential backoff for attempt `n` (1-based) with jitter: a uniform pick in [50 %, 100 %]
/// of `BACKOFF_BASE * 2^(n-1)`, capped at `BACKOFF_MAX`. `r` is a random number in [0, 1).
fn backoff(n: u32, r: f64) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << n.saturating_sub(1).min(16));
    let full = exp.min(BACKOFF_MAX);
    full.mul_f64(0.5 + 0.5 * r.clamp(0.0, 1.0))
}

fn round_pause(round: u32) -> Duration {
    ROUND_PAUSE_BASE
        .saturating_mul(1u32 << round.saturating_sub(1).min(8))
        .min(ROUND_PAUSE_MAX)
}

/// Indices of `n` addresses starting at `start`, wrapping around.
fn failover_order(start: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (start + k) % n)
}

#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    /// This address answered; the status is the answer.
    Final,
    /// Unavailable, sealed, standby or overloaded here: ask the next address.
    TryNext,
}

/// What a KV v2 mount answers (HTTP 400) while it is being set up on a node that just became
/// active, e.g. right after a leader failover: unavailable for a moment, not a bad request.
const KV_UPGRADING: &str = "Waiting for the primary to upgrade";

fn classify(status: StatusCode, body: &[u8]) -> Verdict {
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_redirection()
    {
        return Verdict::TryNext;
    }
    if status == StatusCode::BAD_REQUEST
        && openbao_errors(body)
            .iter()
            .any(|e| e.starts_with(KV_UPGRADING))
    {
        return Verdict::TryNext;
    }
    Verdict::Final
}

fn describe_status(status: StatusCode, body: &[u8]) -> String {
    let errs = openbao_errors(body);
    if errs.is_empty() {
        format!("HTTP {}", status.as_u16())
    } else {
        format!("HTTP {}: {}", status.as_u16(), errs.join("; "))
    }
}

/// A transport error without the URL or anything else from the request.
fn describe_transport(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {timeout:?}");
    }
    let mut msg = if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = src {
        let t = s.to_string();
        if t != last {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        last = t;
        src = s.source();
    }
    msg
}

async fn read_body(mut resp: reqwest::Response) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut body = Zeroizing::new(Vec::new());
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if body.len() + c.len() > MAX_BODY {
                    return Err(format!("answer larger than {MAX_BODY} bytes"));
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => return Err("timed out reading the answer".into()),
            Err(_) => return Err("connection lost while reading the answer".into()),
        }
    }
}

/// The `errors` array of an OpenBao error answer (empty if there is none).
fn openbao_errors(body: &[u8]) -> Vec<String> {
    #[derive(Deserialize)]
    struct E {
        #[serde(default)]
        errors: Vec<String>,
    }
    serde_json::from_slice::<E>(body)
        .map(|e| e.errors)
        .unwrap_or_default()
}

/// Maps a non-2xx status to an error naming address and path.
fn check(ans: Answer, api: &str) -> Result<Answer, BaoError> {
    if ans.status.is_success() {
        return Ok(ans);
    }
    let errors = openbao_errors(&ans.body);
    let path = api.to_string();
    Err(if ans.status == StatusCode::FORBIDDEN {
        BaoError::Denied {
            address: ans.address,
            path,
            errors,
        }
    } else {
        BaoError::Status {
            address: ans.address,
            path,
            code: ans.status.as_u16(),
            errors,
        }
    })
}

/// Where JSON parsing failed, never the offending text (it may be a secret).
fn decode_reason(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "I/O error",
        Category::Syntax => "malformed JSON",
        Category::Data => "JSON of the wrong shape",
        Category::Eof => "truncated JSON",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

fn decode<T: serde::de::DeserializeOwned>(ans: &Answer, api: &str) -> Result<T, BaoError> {
    serde_json::from_slice(&ans.body).map_err(|e| BaoError::Decode {
        address: ans.address.clone(),
        path: api.to_string(),
        reason: decode_reason(&e),
    })
}

/// The `data` object of a standard OpenBao answer.
fn decode_data<T: serde::de::DeserializeOwned>(ans: &Answer, api: &str) -> Result<T, BaoError> {
    #[derive(Deserialize)]
    struct Envelope<T> {
        data: Option<T>,
    }
    decode::<Envelope<T>>(ans, api)?
        .data
        .ok_or_else(|| BaoError::Decode {
            address: ans.address.clone(),
            path: api.to_string(),
            reason: "no data in the answer".into(),
        })
}

/// The `auth` block of a login or renew-self answer.
fn parse_auth(
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
fn parse_lookup(
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

fn expiry_unix(lease: Duration) -> Option<u64> {
    if lease.is_zero() {
        return None;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).ok()?;
    Some((now + lease).as_secs())
}

/// Reads a secret_id or token file: trimmed, never empty, wiped from memory when dropped.
fn read_secret_file(path: &Path) -> Result<Zeroizing<String>, BaoError> {
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

/// Overwrites every string in a JSON value (the request body copy of KV data) before drop.
fn zeroize_value(v: &mut Value) {
    use zeroize::Zeroize;
    match v {
        Value::String(s) => s.zeroize(),
        Value::Array(a) => a.iter_mut().for_each(zeroize_value),
        Value::Object(m) => m.values_mut().for_each(zeroize_value),
        _ => {}
    }
}

/// `<mount>/<kind>/<prefix>/<path>` with every segment of `path` percent-encoded; `dir`
/// adds the trailing `/` a LIST wants and allows an empty path (the prefix itself).
fn kv_api_path(
    mount: &str,
    kind: &str,
    prefix: &str,
    path: &str,
    dir: bool,
) -> Result<String, BaoError> {
    let trimmed = path.trim_matches('/');
    if trimmed.is_empty() && !dir {
        return Err(BaoError::Invalid("empty KV path".into()));
    }
    let mut out = format!("{mount}/{kind}/{prefix}");
    if !trimmed.is_empty() {
        for seg in trimmed.split('/') {
            if seg.is_empty() || seg == "." || seg == ".." {
                return Err(BaoError::Invalid(format!(
                    "KV path {path:?} has an empty, . or .. segment"
                )));
            }
            out.push('/');
            encode_segment(seg, &mut out);
        }
    }
    if dir {
        out.push('/');
    }
    Ok(out)
}

fn encode_segment(seg: &str, out: &mut String) {
    for b in seg.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn answer(code: u16, body: &str) -> Answer {
        Answer {
            address: "https://bao-1:8200".into(),
            status: StatusCode::from_u16(code).unwrap(),
            body: Zeroizing::new(body.as_bytes().to_vec()),
        }
    }

    #[test]
    fn kv_paths() {
        assert_eq!(
            kv_api_path("secret", "data", "nhi", "secrets/db", false).unwrap(),
            "secret/data/nhi/secrets/db"
        );
        assert_eq!(
            kv_api_path("secret", "metadata", "nhi", "/nodes/n-1/", true).unwrap(),
            "secret/metadata/nhi/nodes/n-1/"
        );
        assert_eq!(
            kv_api_path("kv", "metadata", "a/b", "", true).unwrap(),
            "kv/metadata/a/b/"
        );
        assert_eq!(
            kv_api_path("secret", "data", "nhi", "secrets/a b?x=1#y%", false).unwrap(),
            "secret/data/nhi/secrets/a%20b%3Fx%3D1%23y%25"
        );
        for bad in ["", "/", "a//b", "a/../b", "./a", "..", "a/."] {
            assert!(
                matches!(
                    kv_api_path("secret", "data", "nhi", bad, false),
                    Err(BaoError::Invalid(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn failover_starts_at_current_and_wraps() {
        assert_eq!(failover_order(0, 3).collect::<Vec<_>>(), [0, 1, 2]);
        assert_eq!(failover_order(2, 3).collect::<Vec<_>>(), [2, 0, 1]);
        assert_eq!(failover_order(0, 1).collect::<Vec<_>>(), [0]);
    }

    #[test]
    fn which_answers_move_to_the_next_address() {
        for code in [500, 502, 503, 504, 429, 307, 301] {
            assert_eq!(
                classify(StatusCode::from_u16(code).unwrap(), b""),
                Verdict::TryNext,
                "{code}"
            );
        }
        for code in [200, 204, 400, 403, 404, 405, 412] {
            assert_eq!(
                classify(StatusCode::from_u16(code).unwrap(), b"{}"),
                Verdict::Final,
                "{code}"
            );
        }
        let upgrading = br#"{"errors":["Waiting for the primary to upgrade from non-versioned to versioned data. This backend will be unavailable for a brief period and will resume service when the primary is finished."]}"#;
        assert_eq!(
            classify(StatusCode::BAD_REQUEST, upgrading),
            Verdict::TryNext
        );
        assert_eq!(
            classify(
                StatusCode::BAD_REQUEST,
                br#"{"errors":["check-and-set parameter did not match"]}"#
            ),
            Verdict::Final
        );
        assert_eq!(
            describe_status(
                StatusCode::SERVICE_UNAVAILABLE,
                br#"{"errors":["Vault is sealed"]}"#
            ),
            "HTTP 503: Vault is sealed"
        );
        assert_eq!(
            describe_status(StatusCode::TOO_MANY_REQUESTS, b""),
            "HTTP 429"
        );
    }

    #[test]
    fn errors_name_address_path_and_openbao_messages() {
        let e = check(
            answer(403, r#"{"errors":["permission denied"]}"#),
            "secret/data/nhi/x",
        )
        .err()
        .unwrap();
        assert!(matches!(e, BaoError::Denied { .. }));
        assert_eq!(
            e.to_string(),
            "OpenBao at https://bao-1:8200 denied secret/data/nhi/x (403 permission denied): permission denied"
        );
        let e = check(
            answer(400, r#"{"errors":["a","b"]}"#),
            "pki/root/sign-intermediate",
        )
        .err()
        .unwrap();
        assert!(matches!(e, BaoError::Status { code: 400, .. }));
        assert_eq!(
            e.to_string(),
            "OpenBao at https://bao-1:8200: pki/root/sign-intermediate: HTTP 400: a; b"
        );
        let e = check(answer(500, "<html>"), "x").err().unwrap();
        assert_eq!(e.to_string(), "OpenBao at https://bao-1:8200: x: HTTP 500");
        assert!(check(answer(204, ""), "x").is_ok());
        let e = BaoError::Unreachable {
            path: "secret/data/nhi/x".into(),
            tried: vec![
                "http://a (connection failed)".into(),
                "http://b (HTTP 503)".into(),
            ],
        };
        assert_eq!(
            e.to_string(),
            "OpenBao unreachable for secret/data/nhi/x: tried http://a (connection failed); http://b (HTTP 503)"
        );
    }

    #[test]
    fn decode_errors_never_quote_the_body() {
        let secret = "s.VERYSECRETTOKEN";
        let ans = answer(
            200,
            &format!(r#"{{"auth":{{"client_token":"{secret}","lease_duration":"{secret}"}}}}"#),
        );
        let e = parse_auth(&ans, "auth/approle/login", Instant::now())
            .err()
            .unwrap();
        let msg = format!("{e} {e:?}");
        assert!(!msg.contains("VERYSECRET"), "{msg}");
        assert!(msg.contains("wrong shape"), "{msg}");
        let e = decode::<Value>(&answer(200, &format!("{{\"x\": {secret}")), "p")
            .err()
            .unwrap();
        assert!(!e.to_string().contains("VERYSECRET"), "{e}");
    }

    #[test]
    fn auth_and_lookup_answers() {
        let now = Instant::now();
        let (tok, t, exp) = parse_auth(
            &answer(
                200,
                r#"{"auth":{"client_token":"s.abc","lease_duration":30,"renewable":true,"policies":["x"]}}"#,
            ),
            "auth/approle/login",
            now,
        )
        .unwrap();
        assert_eq!(&*tok, "s.abc");
        assert_eq!(t.lease, Duration::from_secs(30));
        assert!(t.renewable && !t.capped);
        assert!(exp.is_some());
        let (t, exp) = parse_lookup(
            &answer(200, r#"{"data":{"id":"root","ttl":0,"renewable":false}}"#),
            "auth/token/lookup-self",
            now,
        )
        .unwrap();
        assert!(t.lease.is_zero() && exp.is_none());
        assert!(parse_auth(&answer(200, r#"{"auth":null}"#), "x", now).is_err());
    }

    #[test]
    fn renewal_plan() {
        let t0 = Instant::now();
        let t = LeaseTimes {
            obtained: t0,
            lease: Duration::from_secs(30),
            renewable: true,
            capped: false,
        };
        assert_eq!(
            plan(&t, t0),
            Some((Action::Renew, t0 + Duration::from_secs(20)))
        );
        let capped = LeaseTimes { capped: true, ..t };
        assert_eq!(
            plan(&capped, t0),
            Some((Action::Relogin, t0 + Duration::from_secs(20)))
        );
        let fixed = LeaseTimes {
            renewable: false,
            ..t
        };
        assert_eq!(plan(&fixed, t0).unwrap().0, Action::Relogin);
        // Expired (e.g. after a suspend): log in now.
        let late = t0 + Duration::from_secs(31);
        assert_eq!(plan(&t, late), Some((Action::Relogin, late)));
        // A token that never expires needs nothing.
        let forever = LeaseTimes {
            lease: Duration::ZERO,
            ..t
        };
        assert_eq!(plan(&forever, t0), None);
        // Tiny TTLs never make the loop spin faster than MIN_STEP (or half the TTL).
        let tiny = LeaseTimes {
            lease: Duration::from_millis(600),
            ..t
        };
        assert_eq!(plan(&tiny, t0).unwrap().1, t0 + Duration::from_millis(400));
        let short = LeaseTimes {
            lease: Duration::from_millis(1200),
            ..t
        };
        assert_eq!(plan(&short, t0).unwrap().1, t0 + Duration::from_millis(800));
        let s3 = LeaseTimes {
            lease: Duration::from_secs(3),
            ..t
        };
        assert_eq!(plan(&s3, t0).unwrap().1, t0 + Duration::from_secs(2));

        let first = Duration::from_secs(30);
        assert!(!is_capped(first, Duration::from_secs(30)));
        assert!(!is_capped(first, Duration::from_millis(29_500)));
        assert!(!is_capped(
            Duration::from_secs(10),
            Duration::from_secs(3600)
        ));
        assert!(is_capped(first, Duration::from_secs(12)));
    }

    #[test]
    fn backoff_grows_with_jitter_and_is_capped() {
        assert_eq!(backoff(1, 0.0), Duration::from_millis(250));
        assert_eq!(backoff(1, 0.999_999).as_millis(), 499);
        assert_eq!(backoff(3, 0.0), Duration::from_secs(1));
        assert_eq!(backoff(30, 0.0), BACKOFF_MAX / 2);
        assert!(backoff(30, 1.0) <= BACKOFF_MAX);
        assert_eq!(round_pause(1), Duration::from_millis(100));
        assert_eq!(round_pause(2), Duration::from_millis(200));
        assert_eq!(round_pause(20), ROUND_PAUSE_MAX);
    }

    #[test]
    fn kv_secret_debug_hides_values() {
        let mut data = Map::new();
        data.insert("password".into(), Value::String("hunter2-secret".into()));
        let s = KvSecret {
            data,
            version: 3,
            created_time: "t".into(),
        };
        let d = format!("{s:?}");
        assert!(d.contains("password") && d.contains('3'), "{d}");
        assert!(!d.contains("hunter2"), "{d}");
    }

    #[test]
    fn secret_files_are_trimmed_and_must_not_be_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sid");
        std::fs::write(&p, "  abc-123\n").unwrap();
        assert_eq!(&*read_secret_file(&p).unwrap(), "abc-123");
        std::fs::write(&p, "\n").unwrap();
        let e = read_secret_file(&p).unwrap_err().to_string();
        assert!(e.contains("empty") && e.contains("sid"), "{e}");
        let e = read_secret_file(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, BaoError::Io { .. }));
    }

    /// A one-shot HTTP server on loopback: answers every request with `status` and `body`,
    /// counting requests.
    async fn fake(status: u16, body: &'static str) -> (String, Arc<AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = format!("http://{}", l.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    return;
                };
                let h = h.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    h.fetch_add(1, Ordering::SeqCst);
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = s.write_all(resp.as_bytes()).await;
                });
            }
        });
        (addr, hits)
    }

    fn closed_port() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let a = format!("http://{}", l.local_addr().unwrap());
        drop(l);
        a
    }

    fn inner_for(addresses: Vec<String>, timeout: Duration) -> Inner {
        Inner {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(timeout)
                .build()
                .unwrap(),
            addresses,
            current: AtomicUsize::new(0),
            namespace: None,
            auth: OpenBaoAuth::AppRole {
                role_id: "role-id-value".into(),
                secret_id_file: "/nonexistent".into(),
                mount: "approle".into(),
            },
            kv_mount: "secret".into(),
            kv_prefix: "nhi".into(),
            pki_mount: "pki".into(),
            request_timeout: timeout,
            session: RwLock::new(Some(Session {
                token: Zeroizing::new("s.TOPSECRETTOKEN".into()),
                generation: 1,
                times: LeaseTimes {
                    obtained: Instant::now(),
                    lease: Duration::from_secs(60),
                    renewable: true,
                    capped: false,
                },
                first_lease: Duration::from_secs(60),
                expires_at: None,
            })),
            login_lock: tokio::sync::Mutex::new(()),
            status: Mutex::new(Status::default()),
            renewer: Mutex::new(None),
        }
    }

    #[tokio::test]
    async fn fails_over_in_order_and_remembers_the_address_that_answered() {
        let down = closed_port();
        let (sealed, sealed_hits) = fake(503, r#"{"errors":["Vault is sealed"]}"#).await;
        let (active, active_hits) = fake(200, r#"{"data":{"keys":["a","b/"]}}"#).await;
        let inner = inner_for(
            vec![down.clone(), sealed.clone(), active.clone()],
            Duration::from_secs(2),
        );
        let bao = Bao {
            inner: Arc::new(inner),
        };
        assert_eq!(bao.kv_list("nodes").await.unwrap(), ["a", "b/"]);
        assert_eq!(sealed_hits.load(Ordering::SeqCst), 1);
        assert_eq!(bao.health().address, active);
        // The next request goes straight to the address that worked.
        bao.kv_list("nodes").await.unwrap();
        assert_eq!(sealed_hits.load(Ordering::SeqCst), 1, "one health probe");
        assert_eq!(active_hits.load(Ordering::SeqCst), 3, "probe + 2 requests");
        let dbg = format!("{bao:?}");
        assert!(
            !dbg.contains("TOPSECRET") && !dbg.contains("role-id-value"),
            "{dbg}"
        );
        assert!(dbg.contains("<redacted>"), "{dbg}");
    }

    #[tokio::test]
    async fn unreachable_lists_every_address_and_reason() {
        let down = closed_port();
        let (sealed, _) = fake(503, r#"{"errors":["Vault is sealed"]}"#).await;
        let bao = Bao {
            inner: Arc::new(inner_for(
                vec![down.clone(), sealed.clone()],
                Duration::from_millis(300),
            )),
        };
        let t = Instant::now();
        let e = bao.kv_read("secrets/x").await.unwrap_err();
        // Bounded by request_timeout × addresses (plus one pass).
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let msg = e.to_string();
        assert!(matches!(e, BaoError::Unreachable { .. }), "{msg}");
        assert!(msg.contains("secret/data/nhi/secrets/x"), "{msg}");
        assert!(msg.contains(&format!("{down} (connection failed")), "{msg}");
        assert!(msg.contains(&format!("{sealed} (sealed)")), "{msg}");
        assert!(!msg.contains("TOPSECRET"), "{msg}");
    }

    #[tokio::test]
    async fn a_stalled_node_costs_at_most_request_timeout() {
        // Accepts connections but never answers, like a SIGSTOPped leader.
        let stalled = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stalled_addr = format!("http://{}", stalled.local_addr().unwrap());
        let (active, _) = fake(200, r#"{"data":{"current_version":4,"updated_time":"t"}}"#).await;
        let bao = Bao {
            inner: Arc::new(inner_for(
                vec![stalled_addr, active.clone()],
                Duration::from_millis(400),
            )),
        };
        let t = Instant::now();
        let m = bao.kv_metadata("secrets/x").await.unwrap().unwrap();
        assert_eq!(m.current_version, 4);
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(bao.health().address, active);
    }
}
