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

//!
//! The client is split by concern: [`transport`] sends a request and fails over between
//! addresses, [`session`] logs in and keeps the token renewed, [`kv`] builds KV v2 paths.

mod kv;
mod operator;
mod session;
#[cfg(test)]
mod tests;
mod transport;
mod workload;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nhi_core::openbao_config::{OpenBaoAuth, OpenBaoConfig};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use serde_json::{Map, Value};
use zeroize::Zeroizing;

use kv::*;
pub use operator::{NodeEntity, OperatorToken};
use session::*;
use transport::*;
pub use workload::{SignedLeaf, WorkloadToken};

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

/// What the PKI mount answers to a signing request.
#[derive(Deserialize)]
struct Signed {
    certificate: String,
    issuing_ca: String,
    #[serde(default)]
    ca_chain: Vec<String>,
    #[serde(default)]
    serial_number: String,
    expiration: u64,
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
        let Some(ans) = self.inner.found(Method::GET, &api, "").await? else {
            return Ok(None);
        };
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
        let Some(ans) = self.inner.found(Method::GET, &api, "").await? else {
            return Ok(None);
        };
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
        let Some(ans) = self.inner.found(Method::GET, &api, "?list=true").await? else {
            return Ok(Vec::new());
        };
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
        self.inner.found(Method::DELETE, &api, "").await.map(|_| ())
    }

    /// Every issuer of the PKI mount (PEM, in the order OpenBao lists them): the trust bundle.
    /// A CA rotation in OpenBao (`pki/root/rotate/internal`, then `pki/root/replace`) thus
    /// reaches every bundle before the new issuer signs, and a deleted issuer leaves it. A
    /// mount without issuers to list answers with its one CA (`ca/pem`).
    pub async fn pki_bundle_pem(&self) -> Result<String, BaoError> {
        let api = format!("{}/issuers", self.inner.pki_mount);
        let Some(ans) = self.inner.found(Method::GET, &api, "?list=true").await? else {
            return self.pki_root_ca_pem().await;
        };
        #[derive(Deserialize)]
        struct List {
            #[serde(default)]
            keys: Vec<String>,
        }
        let ids = decode_data::<List>(&ans, &api)?.keys;
        if ids.is_empty() {
            return self.pki_root_ca_pem().await;
        }
        #[derive(Deserialize)]
        struct Issuer {
            certificate: String,
        }
        let mut pem = String::new();
        for id in ids {
            if id.contains('/') || id.contains("..") {
                continue;
            }
            let api = format!("{}/issuer/{id}/json", self.inner.pki_mount);
            let Some(ans) = self.inner.found(Method::GET, &api, "").await? else {
                continue; // deleted between the list and the read
            };
            let c = decode_data::<Issuer>(&ans, &api)?.certificate;
            if !pem.contains(c.trim()) {
                pem.push_str(c.trim());
                pem.push('\n');
            }
        }
        Ok(pem)
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
}
