//! `nhi.toml`: one file read by `nhid`, `nhi-hook` and `nhictl`. Validated as a whole at load so
//! a typo or an identity template that can't produce a valid SPIFFE ID stops startup with a
//! message that names it, instead of failing later on a container start.
//!
//! Size: one file on purpose, the whole schema and its validation in one place (the reference
//! to read beside `config/nhi.toml`); about a quarter of it is unit tests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::grant::Grant;
use crate::openbao_config::OpenBaoConfig;
use crate::select::Match;
use crate::spiffe::validate_trust_domain;
use crate::template::Template;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/nhi/nhi.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nhi";
pub const DEFAULT_SOCKET: &str = "/run/nhi/nhid.sock";
pub const DEFAULT_COMPANION_BINARY: &str = "/usr/libexec/nhi/nhi-companion";
/// Uids companions run as, one per companion: 65,536 ids from 0x70000000, above systemd's
/// container range (524288-1879048191) and far from the ranges `useradd` hands out as
/// subordinate ids (100000-600100000). The packages reserve it in /etc/subuid and /etc/subgid
/// for the `nhi-companion` user.
pub const DEFAULT_COMPANION_UID_RANGE: &str = "1879048192-1879113727";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:15100";
pub const DEFAULT_WORKLOAD_API_LISTEN: &str = "127.0.0.1:15101";
pub const DEFAULT_CONTAINERS_DIR: &str = "/run/nhi/containers";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    trust_domain: String,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_socket")]
    socket: PathBuf,
    #[serde(default)]
    issuer: IssuerConfig,
    #[serde(default)]
    companion: CompanionConfig,
    #[serde(default)]
    hook: HookConfig,
    #[serde(default)]
    runtime: RuntimeConfig,
    #[serde(default)]
    kubernetes: KubernetesConfig,
    #[serde(default)]
    nomad: crate::nomad::NomadConfig,
    #[serde(default)]
    store: StoreConfig,
    #[serde(default)]
    openbao: Option<OpenBaoConfig>,
    #[serde(default)]
    audit: AuditConfig,
    #[serde(default)]
    metrics: MetricsConfig,
    /// This node's name in the cluster store (its JWT key) and in node-scoped identities
    /// (`{node.name}`); with OpenBao, also its AppRole role's name. Default: the host name.
    #[serde(default)]
    node_name: Option<String>,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
    #[serde(default, rename = "grant")]
    grants: Vec<Grant>,
    #[serde(default)]
    egress: crate::policy::EgressConfig,
    #[serde(default, rename = "policy")]
    policies: Vec<crate::policy::Policy>,
}

fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}

/// Which backend an issuer or a store uses (`kind = "embedded"` or `"openbao"`); any other
/// word is a config error that names it and the supported ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// On this node: sealed files in the state dir.
    #[default]
    Embedded,
    /// OpenBao (or Vault) through the `[openbao]` section.
    OpenBao,
}

impl Backend {
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Embedded => "embedded",
            Backend::OpenBao => "openbao",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The issuer's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuerConfig {
    /// `embedded` (a root CA on this node) or `openbao` (OpenBao's PKI signs every X.509-SVID
    /// against the workload's proof).
    pub kind: Backend,
    /// File holding the 32-byte key that seals the issuer keys at rest. Default `<state_dir>/master.key`.
    pub key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub jwt_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub x509_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub ca_ttl: Duration,
    /// Cluster mode: how often a node makes a new JWT-SVID signing key (published before it
    /// signs, the old one kept until its last token expired). Bounds how long a key copied off
    /// a node stays useful.
    #[serde(with = "humantime_serde")]
    pub jwt_key_rotation: Duration,
}

impl Default for IssuerConfig {
    fn default() -> Self {
        IssuerConfig {
            kind: Backend::Embedded,
            key_file: None,
            jwt_ttl: Duration::from_secs(5 * 60),
            x509_ttl: Duration::from_secs(60 * 60),
            ca_ttl: Duration::from_secs(365 * 24 * 60 * 60),
            jwt_key_rotation: Duration::from_secs(24 * 60 * 60),
        }
    }
}

/// Where secrets and revocations live and how they reach workloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `embedded` (sealed files in the state dir) or `openbao` (KV v2 on OpenBao/Vault).
    pub kind: Backend,
    /// How long a companion may serve a secret it fetched without hearing from `nhid` again:
    /// the bound on serving a stale value while the store is unreachable.
    #[serde(with = "humantime_serde")]
    pub secret_ttl: Duration,
    /// Host directory with one subdirectory per container that `nhi-runc` bind-mounts read-only
    /// at `/run/nhi` in the container; `nhid` keeps `secrets/<name>` files in it.
    pub containers_dir: PathBuf,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: Backend::Embedded,
            secret_ttl: Duration::from_secs(10 * 60),
            containers_dir: DEFAULT_CONTAINERS_DIR.into(),
        }
    }
}

/// When the audit log is flushed to stable storage.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// Left to the kernel (a crash of the node, not of nhid, may lose the last seconds).
    Never,
    /// After each batch the writer takes from its queue (default).
    #[default]
    Batch,
    /// After every record.
    Always,
}

/// The append-only, hash-chained audit log `nhid` writes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Log directory. Default `<state_dir>/audit`.
    pub dir: Option<PathBuf>,
    /// A segment is closed and the next begun before it would grow past this.
    pub max_file_bytes: u64,
    /// Segments kept; the oldest are removed beyond it. 0 keeps all.
    pub max_files: u64,
    pub fsync: Fsync,
    /// Events waiting for the writer; beyond it they are dropped, counted and the loss is
    /// itself written to the log.
    pub queue: usize,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            dir: None,
            max_file_bytes: 64 * 1024 * 1024,
            max_files: 0,
            fsync: Fsync::Batch,
            queue: 64 * 1024,
        }
    }
}

/// The Prometheus endpoint of `nhid` (host side only).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `ip:port` to serve `GET /metrics` on; empty disables it.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_METRICS_LISTEN.into(),
        }
    }
}

/// A block of uids (each also used as a gid) reserved for companions: `"FIRST-LAST"`, inclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct UidRange {
    pub first: u32,
    pub last: u32,
}

impl UidRange {
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "companion.uid_range {s:?}: expected \"FIRST-LAST\" (e.g. {DEFAULT_COMPANION_UID_RANGE:?})"
            )
        };
        let (a, b) = s.split_once('-').ok_or_else(bad)?;
        let first: u32 = a.trim().parse().map_err(|_| bad())?;
        let last: u32 = b.trim().parse().map_err(|_| bad())?;
        if first > last {
            return Err(format!("companion.uid_range {s:?}: FIRST is above LAST"));
        }
        let r = UidRange { first, last };
        for (id, what) in [
            (0, "root"),
            (65534, "nobody"),
            (65535, "the 16-bit -1"),
            (u32::MAX, "the invalid id -1"),
        ] {
            if r.contains(id) {
                return Err(format!(
                    "companion.uid_range {s:?} contains {id} ({what}); companions need ids of their own"
                ));
            }
        }
        Ok(r)
    }

    pub fn contains(&self, id: u32) -> bool {
        (self.first..=self.last).contains(&id)
    }

    /// How many ids the range holds.
    pub fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    /// Never: FIRST <= LAST.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl TryFrom<String> for UidRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        UidRange::parse(&s)
    }
}

impl std::fmt::Display for UidRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// Whether a companion may start without one of its sandbox layers (seccomp, Landlock).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// The companion refuses to start when the layer cannot be applied (default).
    #[default]
    Required,
    /// Applied when the kernel supports it; otherwise the companion starts and logs a warning.
    /// An explicit opt-out for kernels without the feature.
    IfAvailable,
}

impl Enforcement {
    pub fn name(self) -> &'static str {
        match self {
            Enforcement::Required => "required",
            Enforcement::IfAvailable => "if_available",
        }
    }
}

impl std::str::FromStr for Enforcement {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [Enforcement::Required, Enforcement::IfAvailable]
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| format!("{s:?}: expected \"required\" or \"if_available\""))
    }
}

/// How companions are started.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompanionConfig {
    /// Path of the `nhi-companion` binary. Must not be readable by companion uids (root-owned,
    /// mode 0711 as the packages install it): the kernel then starts each companion
    /// non-dumpable, so no process can ptrace it from its first instruction.
    pub binary: PathBuf,
    /// Uids companions run as, one of its own per companion (also its gid).
    pub uid_range: UidRange,
    /// Replaced by `uid_range`; only read to say so.
    #[doc(hidden)]
    pub user: Option<String>,
    /// Serve the HTTP API (`listen`). `false`: only the SPIFFE Workload API (and the edge proxy).
    pub http_api: bool,
    /// The companion's seccomp allowlist.
    pub seccomp: Enforcement,
    /// The companion's Landlock ruleset (no file access after start).
    pub landlock: Enforcement,
    /// HTTP listen address inside the workload's network namespace.
    pub listen: String,
    /// How long `nhid` waits for a new companion to be ready before the attach fails.
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// Most JWT-SVID audiences a companion keeps cached at once.
    pub max_cached_audiences: usize,
    /// SPIFFE Workload API (gRPC) listen address inside the workload's network namespace.
    pub workload_api_listen: String,
    /// `[companion.limits]`: what one process in a pod can make its companion hold.
    pub limits: CompanionLimits,
    /// The cgroup each companion runs in (its bounds, and what exempts its own traffic from
    /// the edge policy's interception).
    pub cgroup: CompanionCgroupConfig,
    /// How long a companion whose `nhid` went away (crash, restart, upgrade) keeps serving
    /// what it has cached while it waits to be re-adopted by the next `nhid`; then it exits.
    #[serde(with = "humantime_serde")]
    pub orphan_timeout: Duration,
}

/// Bounds on every companion listener (see `companion/src/limits.rs` and ARCHITECTURE's
/// "Companion limits"). A full listener closes its quietest connection for a new one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompanionLimits {
    /// HTTP API: most connections at once.
    pub api_connections: usize,
    /// Workload API: most connections at once, on TCP and on the unix socket each.
    pub workload_api_connections: usize,
    /// Edge proxy: most connections at once, outbound and inbound each.
    pub proxy_connections: usize,
    /// A new connection must start its first request within this, an HTTP/1 request head must
    /// arrive within it, and an idle HTTP/1 keep-alive connection is closed after it.
    #[serde(with = "humantime_serde")]
    pub header_timeout: Duration,
    /// A Workload API connection with no request in progress and no open stream is closed
    /// after this.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A proxied connection that moved no byte either way is closed after this.
    #[serde(with = "humantime_serde")]
    pub proxy_idle_timeout: Duration,
    /// Longest wait for an answer from the HTTP API or a Workload API call (then 503 /
    /// `DEADLINE_EXCEEDED`); server streams are not bounded by it.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// HTTP and Workload API connections older than this are closed once idle (HTTP/2 gets a
    /// GOAWAY first); clients reconnect.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
}

impl Default for CompanionLimits {
    fn default() -> Self {
        CompanionLimits {
            api_connections: 512,
            workload_api_connections: 256,
            proxy_connections: 1024,
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(5 * 60),
            proxy_idle_timeout: Duration::from_secs(60 * 60),
            request_timeout: Duration::from_secs(30),
            max_connection_age: Duration::from_secs(60 * 60),
        }
    }
}

/// `[companion.cgroup]`: every companion gets a cgroup of its own, `<parent>/c-<netns inode>`,
/// joined before it execs, with these bounds (on cgroup v2, or on the v1 memory and pids
/// hierarchies of a hybrid host).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct CompanionCgroupConfig {
    /// Absolute cgroup path (the same in every hierarchy used) under which companions' cgroups
    /// are made. Its ancestors must hold no processes on cgroup v2 (the root may).
    pub parent: String,
    /// `memory.max` (v2) / `memory.limit_in_bytes` (v1) of each companion: bytes, or a string
    /// with a `K`/`M`/`G` (KiB/MiB/GiB) suffix.
    #[serde(deserialize_with = "bytes_or_suffixed")]
    pub memory_max: u64,
    /// `pids.max` of each companion (processes and threads).
    pub pids_max: u64,
}

impl Default for CompanionCgroupConfig {
    fn default() -> Self {
        CompanionCgroupConfig {
            parent: DEFAULT_CGROUP_PARENT.into(),
            memory_max: 128 << 20,
            pids_max: 64,
        }
    }
}

impl CompanionLimits {
    /// Sockets a listener capped at `max_connections` holds at most: its slots plus the
    /// connections it evicted whose tasks have not closed them yet.
    pub fn ceiling(max_connections: usize) -> usize {
        max_connections + max_connections / 4 + 1
    }

    /// File descriptors a companion needs at most: every listener's ceiling (the Workload API
    /// twice: TCP and unix), six per outbound proxied connection (two sockets, two splice
    /// pipes), two per inbound one, the idle mutual TLS connections kept handshaken ahead
    /// (at most 8 for each of 64 destinations), plus 64 for everything else.
    pub fn fd_budget(&self) -> u64 {
        let c = |n: usize| Self::ceiling(n) as u64;
        let warm = crate::policy::MAX_MTLS_WARM * crate::policy::MAX_MTLS_WARM_DESTINATIONS;
        64 + c(self.api_connections)
            + 2 * c(self.workload_api_connections)
            + 6 * c(self.proxy_connections)
            + 2 * c(self.proxy_connections)
            + warm as u64
    }

    pub fn validate(&self) -> Result<(), String> {
        for (name, n) in [
            ("api_connections", self.api_connections),
            ("workload_api_connections", self.workload_api_connections),
            ("proxy_connections", self.proxy_connections),
        ] {
            if !(8..=65536).contains(&n) {
                return Err(format!(
                    "companion.limits.{name} must be between 8 and 65536 (got {n})"
                ));
            }
        }
        for (name, d) in [
            ("header_timeout", self.header_timeout),
            ("idle_timeout", self.idle_timeout),
            ("proxy_idle_timeout", self.proxy_idle_timeout),
            ("request_timeout", self.request_timeout),
            ("max_connection_age", self.max_connection_age),
        ] {
            if d < Duration::from_millis(100) {
                return Err(format!(
                    "companion.limits.{name} must be at least 100ms (got {d:?})"
                ));
            }
        }
        Ok(())
    }
}

pub const DEFAULT_CGROUP_PARENT: &str = "/nhi";

/// `1048576`, `"1048576"`, `"512K"`, `"128M"`, `"1G"` (also `KiB`, `MiB`, `GiB`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number of bytes, optionally with K, M or G"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" | "k" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        u => return Err(format!("{s:?}: unknown unit {u:?} (use K, M or G)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn bytes_or_suffixed<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum V {
        N(u64),
        S(String),
    }
    match V::deserialize(d)? {
        V::N(n) => Ok(n),
        V::S(s) => parse_bytes(&s).map_err(serde::de::Error::custom),
    }
}

impl Default for CompanionConfig {
    fn default() -> Self {
        CompanionConfig {
            binary: DEFAULT_COMPANION_BINARY.into(),
            uid_range: UidRange::parse(DEFAULT_COMPANION_UID_RANGE).expect("default range"),
            user: None,
            http_api: true,
            seccomp: Enforcement::Required,
            landlock: Enforcement::Required,
            listen: DEFAULT_LISTEN.into(),
            ready_timeout: Duration::from_secs(5),
            max_cached_audiences: 64,
            workload_api_listen: DEFAULT_WORKLOAD_API_LISTEN.into(),
            limits: CompanionLimits::default(),
            cgroup: CompanionCgroupConfig::default(),
            orphan_timeout: Duration::from_secs(10 * 60),
        }
    }
}

/// The hook's own settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HookConfig {
    /// Upper bound for one call to `nhid` (connect + attach) from the hook.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Largest bundle `config.json` the hook reads; a bigger one is refused (and, as any
    /// FIFO, device or link there, never read).
    pub max_spec_bytes: u64,
}

/// Default [`HookConfig::max_spec_bytes`]: far above real specs (tens of KiB with a seccomp
/// profile), far below what would make the hook a memory hog.
pub const DEFAULT_MAX_SPEC_BYTES: u64 = 4 << 20;

impl Default for HookConfig {
    fn default() -> Self {
        HookConfig {
            timeout: Duration::from_secs(10),
            max_spec_bytes: DEFAULT_MAX_SPEC_BYTES,
        }
    }
}

/// How `nhi-runc` and `containerd-shim-nhi-v2` reach the real runtime and the hook.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// The OCI runtime `nhi-runc` hands over to: a path, or a name looked up in `PATH`
    /// (skipping `nhi-runc` itself).
    pub runtime: String,
    /// The hook binary `nhi-runc` injects. Default: `nhi-hook` next to `nhi-runc`.
    pub hook: Option<PathBuf>,
    /// The stock containerd runc shim `containerd-shim-nhi-v2` delegates to.
    pub runc_shim: String,
    /// Directory where `containerd-shim-nhi-v2` keeps a `runc` link to `nhi-runc`, put first on
    /// the delegated shim's `PATH`.
    pub shim_bin_dir: PathBuf,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            runtime: "runc".into(),
            hook: None,
            runc_shim: "containerd-shim-runc-v2".into(),
            shim_bin_dir: "/run/nhi/runtime-bin".into(),
        }
    }
}

/// Kubernetes node facts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// kubelet's root directory: service-account tokens are only believed from its projected
    /// volumes of the container's own pod.
    pub kubelet_root: PathBuf,
    /// The cluster's service-account signing keys (JWKS, e.g. saved from
    /// `kubectl get --raw /openid/v1/jwks`). When set, service-account tokens must carry a
    /// valid signature by one of them and must not be expired.
    pub service_account_jwks: Option<PathBuf>,
    /// With `service_account_jwks` or `service_account_discovery`: the `iss` the tokens must
    /// carry.
    pub service_account_issuer: Option<String>,
    /// Keep the cluster's keys current from the issuer's OIDC discovery
    /// (`<service_account_issuer>/.well-known/openid-configuration` → `jwks_uri`, HTTPS):
    /// `nhid` then checks each pod's token at attach, refetching on an unknown `kid`.
    pub service_account_discovery: bool,
    /// CA certificates (PEM) trusted for discovery; default: the system's.
    pub service_account_ca_file: Option<PathBuf>,
    /// How often discovered keys are fetched again.
    #[serde(with = "humantime_serde")]
    pub service_account_jwks_refresh: Duration,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubelet_root: crate::k8s::DEFAULT_KUBELET_ROOT.into(),
            service_account_jwks: None,
            service_account_issuer: None,
            service_account_discovery: false,
            service_account_ca_file: None,
            service_account_jwks_refresh: Duration::from_secs(600),
        }
    }
}

impl KubernetesConfig {
    fn validate(&self) -> Result<(), String> {
        if !self.service_account_discovery {
            return Ok(());
        }
        if self.service_account_jwks.is_some() {
            return Err("kubernetes: set service_account_jwks (a file, checked by the hook) or service_account_discovery (fetched by nhid), not both".into());
        }
        match &self.service_account_issuer {
            Some(i) if i.starts_with("https://") => {}
            _ => {
                return Err("kubernetes.service_account_discovery needs service_account_issuer, an https:// URL (the API server's issuer, e.g. https://kubernetes.default.svc.cluster.local)".into())
            }
        }
        if self.service_account_jwks_refresh < Duration::from_secs(10) {
            return Err("kubernetes.service_account_jwks_refresh must be at least 10s".into());
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    spiffe_id: String,
    #[serde(default)]
    fail_open: bool,
    #[serde(default, rename = "match")]
    matcher: Match,
    #[serde(default)]
    aws_credentials: Option<AwsCredentials>,
    #[serde(default)]
    selectable: bool,
    #[serde(default)]
    sources: Option<Vec<String>>,
}

/// Where a rule's workloads get AWS credentials from, served by the companion as the AWS
/// container-credential provider (`GET /v1/aws/credentials`).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AwsCredentials {
    /// A secret (granted to the rule's identities) holding session credentials as JSON:
    /// `{"AccessKeyId", "SecretAccessKey", "Token", "Expiration"}`.
    pub secret: String,
}

/// A selection rule: which containers it selects and what identity they get.
#[derive(Debug, Clone)]
pub struct Rule {
    pub name: String,
    /// Template of the SPIFFE ID path (after the trust domain).
    pub spiffe_id: Template,
    /// Let a selected container start without a companion when attaching fails.
    pub fail_open: bool,
    pub matcher: Match,
    /// The AWS container-credential source of this rule's workloads, if any.
    pub aws_credentials: Option<AwsCredentials>,
    /// Whether a workload may pick this rule with the `nhi.dev/rule` annotation. Off by
    /// default: whoever writes the annotation (e.g. a pod's author) must not choose the rule,
    /// and so the identity, the operator did not offer.
    pub selectable: bool,
    /// The sources this rule may select (default: all).
    pub sources: Vec<crate::workload::Source>,
}

impl Rule {
    /// Whether the rule may select workloads of `source`.
    pub fn accepts(&self, source: crate::workload::Source) -> bool {
        self.sources.contains(&source)
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub trust_domain: String,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub issuer: IssuerConfig,
    pub companion: CompanionConfig,
    pub hook: HookConfig,
    pub runtime: RuntimeConfig,
    pub kubernetes: KubernetesConfig,
    /// `[nomad]`: where a task's `nomad.*` metadata comes from (its signed workload identity).
    pub nomad: crate::nomad::NomadConfig,
    pub store: StoreConfig,
    pub openbao: Option<OpenBaoConfig>,
    pub audit: AuditConfig,
    pub metrics: MetricsConfig,
    pub node_name: String,
    pub rules: Vec<Rule>,
    pub grants: Vec<Grant>,
    /// `[egress]`: the companion's proxy ports.
    pub egress: crate::policy::EgressConfig,
    /// `[[policy]]`: edge policies (reloaded by `nhid` on SIGHUP).
    pub policies: Vec<crate::policy::Policy>,
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        validate_trust_domain(&raw.trust_domain).map_err(|e| invalid(e.to_string()))?;
        for (what, kind) in [
            ("issuer.kind", raw.issuer.kind),
            ("store.kind", raw.store.kind),
        ] {
            if kind == Backend::OpenBao && raw.openbao.is_none() {
                return Err(invalid(format!(
                    "{what} = \"openbao\" needs an [openbao] section (addresses, auth)"
                )));
            }
        }
        if let Some(ob) = &raw.openbao {
            ob.validate().map_err(invalid)?;
        }
        raw.nomad.validate().map_err(invalid)?;
        raw.kubernetes.validate().map_err(invalid)?;
        let node_name = match raw.node_name.clone() {
            Some(n) => n,
            None => hostname(),
        };
        if !crate::grant::valid_secret_name(&node_name) {
            return Err(invalid(format!(
                "node_name {node_name:?}: use ASCII letters, digits, '.', '-', '_' (set node_name explicitly)"
            )));
        }
        for (what, d) in [
            ("issuer.jwt_ttl", raw.issuer.jwt_ttl),
            ("issuer.x509_ttl", raw.issuer.x509_ttl),
            ("issuer.ca_ttl", raw.issuer.ca_ttl),
            ("issuer.jwt_key_rotation", raw.issuer.jwt_key_rotation),
        ] {
            if d < Duration::from_secs(10) {
                return Err(invalid(format!("{what} must be at least 10s")));
            }
        }
        if raw.issuer.x509_ttl >= raw.issuer.ca_ttl {
            return Err(invalid(
                "issuer.x509_ttl must be shorter than issuer.ca_ttl".into(),
            ));
        }
        if let Some(user) = &raw.companion.user {
            return Err(invalid(format!(
                "companion.user ({user:?}) was replaced by companion.uid_range: every companion runs as a uid of its own from that range (default {DEFAULT_COMPANION_UID_RANGE:?}); remove companion.user"
            )));
        }
        raw.companion
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| invalid(format!("companion.listen {:?}: {e}", raw.companion.listen)))?;
        validate_workload_api_listen(&raw.companion).map_err(invalid)?;
        validate_cgroup(&raw.companion.cgroup).map_err(invalid)?;
        if raw.runtime.runtime.is_empty() || raw.runtime.runc_shim.is_empty() {
            return Err(invalid(
                "runtime.runtime and runtime.runc_shim must not be empty".into(),
            ));
        }
        if raw.companion.orphan_timeout < Duration::from_secs(1) {
            return Err(invalid(
                "companion.orphan_timeout must be at least 1s".into(),
            ));
        }
        if raw.companion.max_cached_audiences == 0 {
            return Err(invalid(
                "companion.max_cached_audiences must be at least 1".into(),
            ));
        }
        raw.companion.limits.validate().map_err(invalid)?;
        if raw.hook.max_spec_bytes < 4096 {
            return Err(invalid(
                "hook.max_spec_bytes must be at least 4096 (a config.json is rarely under 2 KiB)"
                    .into(),
            ));
        }
        let mut seen = BTreeMap::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for r in raw.rules {
            if r.name.is_empty() {
                return Err(invalid("every [[rule]] needs a non-empty name".into()));
            }
            if seen.insert(r.name.clone(), ()).is_some() {
                return Err(invalid(format!("rule name {:?} is used twice", r.name)));
            }
            let spiffe_id = Template::parse(&r.spiffe_id, &raw.trust_domain)
                .map_err(|e| invalid(format!("rule {:?}: {e}", r.name)))?;
            r.matcher
                .validate()
                .map_err(|e| invalid(format!("rule {:?}: {e}", r.name)))?;
            let uses_nomad = spiffe_id.vars().any(|v| v.starts_with("nomad."))
                || !r.matcher.nomad_jobs.is_empty()
                || !r.matcher.nomad_namespaces.is_empty();
            if uses_nomad && !raw.nomad.enabled() {
                return Err(invalid(format!(
                    "rule {:?} uses Nomad metadata, but nothing proves it: set nomad.jwks (the cluster's workload-identity keys, e.g. from `nomad operator api /.well-known/jwks.json`; tasks need `identity {{ file = true }}`), or nomad.trust_env = true knowing that job authors can then set any NOMAD_* value",
                    r.name
                )));
            }
            if let Some(aws) = &r.aws_credentials {
                if !crate::grant::valid_secret_name(&aws.secret) {
                    return Err(invalid(format!(
                        "rule {:?}: aws_credentials.secret {:?} is not a valid secret name",
                        r.name, aws.secret
                    )));
                }
                if !raw.companion.http_api {
                    return Err(invalid(format!(
                        "rule {:?}: aws_credentials needs the companion's HTTP API, which companion.http_api = false turns off",
                        r.name
                    )));
                }
            }
            let sources = parse_sources(r.sources.as_deref())
                .map_err(|e| invalid(format!("rule {:?}: {e}", r.name)))?;
            rules.push(Rule {
                name: r.name,
                spiffe_id,
                fail_open: r.fail_open,
                matcher: r.matcher,
                aws_credentials: r.aws_credentials,
                selectable: r.selectable,
                sources,
            });
        }
        if raw.store.secret_ttl < Duration::from_secs(5) {
            return Err(invalid("store.secret_ttl must be at least 5s".into()));
        }
        if !raw.store.containers_dir.is_absolute() {
            return Err(invalid(
                "store.containers_dir must be an absolute path".into(),
            ));
        }
        if raw.audit.max_file_bytes < 4096 {
            return Err(invalid("audit.max_file_bytes must be at least 4096".into()));
        }
        if raw.audit.queue == 0 {
            return Err(invalid("audit.queue must be at least 1".into()));
        }
        if !raw.metrics.listen.is_empty() {
            raw.metrics
                .listen
                .parse::<std::net::SocketAddr>()
                .map_err(|e| invalid(format!("metrics.listen {:?}: {e}", raw.metrics.listen)))?;
        }
        for (i, g) in raw.grants.iter().enumerate() {
            g.validate(&raw.trust_domain, |r| seen.contains_key(r))
                .map_err(|e| invalid(format!("grant #{}: {e}", i + 1)))?;
        }
        validate_policies(&raw.trust_domain, &raw.egress, &raw.policies, &seen).map_err(invalid)?;
        Ok(Config {
            path: path.to_path_buf(),
            trust_domain: raw.trust_domain,
            state_dir: raw.state_dir,
            socket: raw.socket,
            issuer: raw.issuer,
            companion: raw.companion,
            hook: raw.hook,
            runtime: raw.runtime,
            kubernetes: raw.kubernetes,
            nomad: raw.nomad,
            store: raw.store,
            openbao: raw.openbao,
            audit: raw.audit,
            metrics: raw.metrics,
            node_name,
            rules,
            grants: raw.grants,
            egress: raw.egress,
            policies: raw.policies,
        })
    }

    pub fn key_file(&self) -> PathBuf {
        self.issuer
            .key_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("master.key"))
    }

    /// Where the audit log lives: `audit.dir`, else `<state_dir>/audit`.
    pub fn audit_dir(&self) -> PathBuf {
        self.audit
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit"))
    }

    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
}

/// A rule's `sources`: absent means every source; given, a non-empty list of known names.
fn parse_sources(names: Option<&[String]>) -> Result<Vec<crate::workload::Source>, String> {
    use crate::workload::Source;
    let Some(names) = names else {
        return Ok(Source::ALL.to_vec());
    };
    if names.is_empty() {
        return Err("sources is empty: such a rule could never select anything (omit sources for every source)".into());
    }
    let mut out = Vec::new();
    for n in names {
        let s = Source::ALL
            .into_iter()
            .find(|s| s.name() == n)
            .ok_or_else(|| {
                format!("unknown source {n:?} (known: \"kubernetes\", \"nomad\", \"container\")")
            })?;
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// `[companion.cgroup]`: an absolute path of plain names, bounds a companion can live in.
fn validate_cgroup(c: &CompanionCgroupConfig) -> Result<(), String> {
    let p = &c.parent;
    let ok = p.starts_with('/')
        && p.len() > 1
        && p[1..].split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && !seg.starts_with("cgroup.")
                && seg
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'))
        });
    if !ok {
        return Err(format!(
            "companion.cgroup.parent {p:?}: an absolute cgroup path below the root, e.g. \"/nhi\""
        ));
    }
    if c.memory_max < 16 << 20 {
        return Err(format!(
            "companion.cgroup.memory_max {}: at least 16M (a companion needs a few MiB to start)",
            c.memory_max
        ));
    }
    if c.pids_max < 8 {
        return Err(format!(
            "companion.cgroup.pids_max {}: at least 8 (the companion's threads count)",
            c.pids_max
        ));
    }
    Ok(())
}

/// `[egress]` and `[[policy]]` checks: distinct ports, unique ids, each policy valid.
fn validate_policies(
    trust_domain: &str,
    e: &crate::policy::EgressConfig,
    policies: &[crate::policy::Policy],
    rules: &BTreeMap<String, ()>,
) -> Result<(), String> {
    if e.proxy_port == 0 || e.inbound_port == 0 || e.proxy_port == e.inbound_port {
        return Err("egress.proxy_port and egress.inbound_port must be two different ports".into());
    }
    if e.dns_port == 0 {
        return Err("egress.dns_port must be a port (1-65535)".into());
    }
    if e.mtls_warm > crate::policy::MAX_MTLS_WARM {
        return Err(format!(
            "egress.mtls_warm: at most {} warm connections per destination",
            crate::policy::MAX_MTLS_WARM
        ));
    }
    let mut ids = std::collections::BTreeSet::new();
    for p in policies {
        if !ids.insert(p.id.as_str()) {
            return Err(format!("policy id {:?} is used twice", p.id));
        }
        p.validate(trust_domain, e, |r| rules.contains_key(r))?;
    }
    Ok(())
}

/// The host name (kernel's nodename), for `node_name`'s default.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_default()
}

/// `companion.workload_api_listen` must be an address other than the HTTP API's.
fn validate_workload_api_listen(c: &CompanionConfig) -> Result<(), String> {
    let addr: std::net::SocketAddr = c.workload_api_listen.parse().map_err(|e| {
        format!(
            "companion.workload_api_listen {:?}: {e}",
            c.workload_api_listen
        )
    })?;
    if c.listen.parse::<std::net::SocketAddr>().ok() == Some(addr) {
        return Err("companion.workload_api_listen must differ from companion.listen".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("test.toml"), s)
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse("trust_domain = \"example.org\"\n").unwrap();
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.issuer.jwt_ttl, Duration::from_secs(300));
        assert_eq!(c.issuer.x509_ttl, Duration::from_secs(3600));
        assert_eq!(c.companion.listen, "127.0.0.1:15100");
        assert_eq!(c.companion.orphan_timeout, Duration::from_secs(600));
        assert_eq!(c.key_file(), PathBuf::from("/var/lib/nhi/master.key"));
        assert_eq!(c.audit_dir(), PathBuf::from("/var/lib/nhi/audit"));
        assert_eq!(c.audit.fsync, Fsync::Batch);
        assert_eq!(c.metrics.listen, "127.0.0.1:9464");
        assert!(c.rules.is_empty());
    }

    #[test]
    fn service_account_discovery_needs_an_https_issuer_and_no_jwks_file() {
        let base = "trust_domain = \"td\"\n[kubernetes]\nservice_account_discovery = true\n";
        let e = parse(base).unwrap_err().to_string();
        assert!(e.contains("needs service_account_issuer"), "{e}");
        let e = parse(&format!("{base}service_account_issuer = \"http://k8s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("https://"), "{e}");
        let e = parse(&format!(
            "{base}service_account_issuer = \"https://k8s\"\nservice_account_jwks = \"/j\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("not both"), "{e}");
        let c = parse(&format!(
            "{base}service_account_issuer = \"https://k8s\"\nservice_account_ca_file = \"/ca.pem\"\nservice_account_jwks_refresh = \"2m\"\n"
        ))
        .unwrap();
        assert!(c.kubernetes.service_account_discovery);
        assert_eq!(
            c.kubernetes.service_account_jwks_refresh,
            Duration::from_secs(120)
        );
        assert_eq!(
            parse("trust_domain = \"td\"\n")
                .unwrap()
                .issuer
                .jwt_key_rotation,
            Duration::from_secs(86400)
        );
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"
trust_domain = "example.org"
state_dir = "/tmp/s"
socket = "/tmp/s/nhid.sock"
[issuer]
jwt_ttl = "2m"
[companion]
uid_range = "200000-200999"
[audit]
dir = "/tmp/a"
max_file_bytes = 1048576
max_files = 3
fsync = "always"
[metrics]
listen = ""
[[rule]]
name = "k8s"
spiffe_id = "ns/{k8s.namespace}/pod/{k8s.pod}"
fail_open = true
[rule.match]
k8s_namespaces = ["prod", "stage-*"]
annotations = { "nhi.dev/inject" = "true" }
"#,
        )
        .unwrap();
        assert_eq!(c.issuer.jwt_ttl, Duration::from_secs(120));
        assert_eq!(c.audit_dir(), PathBuf::from("/tmp/a"));
        assert_eq!((c.audit.max_file_bytes, c.audit.max_files), (1 << 20, 3));
        assert_eq!(c.audit.fsync, Fsync::Always);
        assert!(c.metrics.listen.is_empty());
        assert_eq!(c.rules.len(), 1);
        assert!(c.rules[0].fail_open);
        assert_eq!(
            c.rule("k8s").unwrap().spiffe_id.source(),
            "ns/{k8s.namespace}/pod/{k8s.pod}"
        );
    }

    #[test]
    fn the_example_config_parses() {
        let c = parse(include_str!("../../config/nhi.toml")).unwrap();
        assert_eq!(c.audit.max_file_bytes, 64 * 1024 * 1024);
        // A pod can never land on the name-derived rule.
        let annotated = c.rule("annotated").unwrap();
        assert!(!annotated.selectable);
        assert_eq!(annotated.sources, vec![crate::workload::Source::Container]);
    }

    #[test]
    fn backends_are_named_words_and_an_unknown_one_is_named_back() {
        let c = parse("trust_domain = \"td\"\n").unwrap();
        assert_eq!(
            (c.issuer.kind, c.store.kind),
            (Backend::Embedded, Backend::Embedded)
        );
        let e = parse("trust_domain = \"td\"\n[store]\nkind = \"vault\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("vault") && e.contains("embedded") && e.contains("openbao"),
            "{e}"
        );
        let e = parse("trust_domain = \"td\"\n[issuer]\nkind = \"openbao\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("issuer.kind = \"openbao\" needs an [openbao] section"),
            "{e}"
        );
    }

    #[test]
    fn the_packages_reserve_the_default_companion_range() {
        let r = UidRange::parse(DEFAULT_COMPANION_UID_RANGE).unwrap();
        let line = format!("nhi-companion:{}:{}", r.first, r.len());
        for (file, text) in [
            (
                "packaging/debian/postinst",
                include_str!("../../packaging/debian/postinst"),
            ),
            (
                "packaging/rpm/nhi.spec.in",
                include_str!("../../packaging/rpm/nhi.spec.in"),
            ),
        ] {
            assert!(text.contains(&line), "{file} does not reserve {line}");
        }
    }

    #[test]
    fn companion_cgroup_bounds() {
        let c = parse("trust_domain = \"td\"\n").unwrap();
        assert_eq!(c.companion.cgroup.parent, "/nhi");
        assert_eq!(c.companion.cgroup.memory_max, 128 << 20);
        assert_eq!(c.companion.cgroup.pids_max, 64);
        let c = parse("trust_domain = \"td\"\n[companion.cgroup]\nparent = \"/system.slice/nhi-c\"\nmemory_max = \"64M\"\npids_max = 32\n").unwrap();
        assert_eq!(c.companion.cgroup.parent, "/system.slice/nhi-c");
        assert_eq!(c.companion.cgroup.memory_max, 64 << 20);
        assert_eq!(c.companion.cgroup.pids_max, 32);
        let c =
            parse("trust_domain = \"td\"\n[companion.cgroup]\nmemory_max = 33554432\n").unwrap();
        assert_eq!(c.companion.cgroup.memory_max, 32 << 20);
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("7"), Ok(7));
        assert!(parse_bytes("M").is_err());
        assert!(parse_bytes("99999999999999999999G").is_err());
    }

    #[test]
    fn errors_name_the_problem() {
        let e =
            parse("trust_domain = \"td\"\n[[rule]]\nname = \"a\"\nspiffe_id = \"x/{k8s.bogus}\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("rule \"a\"") && e.contains("k8s.bogus"), "{e}");
        let e =
            parse("trust_domain = \"td\"\n[[rule]]\nname = \"a\"\nspiffe_id = \"x//{k8s.pod}\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("cannot produce a valid SPIFFE ID"), "{e}");
        let e = parse("trust_domain = \"TD\"\n").unwrap_err().to_string();
        assert!(e.contains("trust domain"), "{e}");
        let e = parse("trust_domain = \"td\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = parse("trust_domain = \"td\"\n[companion]\nuser = \"nhi-companion\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("replaced by companion.uid_range"), "{e}");
        let e = parse("trust_domain = \"td\"\n[[policy]]\nid = \"p\"\nspiffe_ids = [\"spiffe://td/a\"]\n[[policy.egress]]\nid = \"r\"\ncidr = [\"10.0.0.0/40\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefix"), "{e}");
        let e = parse("trust_domain = \"td\"\n[egress]\nproxy_port = 1\ninbound_port = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("two different ports"), "{e}");
        let e = parse("trust_domain = \"td\"\n[egress]\nmtls_warm = 9\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("egress.mtls_warm: at most 8"), "{e}");
        parse("trust_domain = \"td\"\n[egress]\nmtls_warm = 0\n").unwrap();
        for (cg, want) in [
            ("parent = \"nhi\"", "absolute cgroup path"),
            ("parent = \"/\"", "absolute cgroup path"),
            ("parent = \"/a/../b\"", "absolute cgroup path"),
            ("parent = \"/a/cgroup.procs\"", "absolute cgroup path"),
            ("memory_max = \"1M\"", "at least 16M"),
            ("memory_max = \"12X\"", "unknown unit"),
            ("pids_max = 2", "at least 8"),
        ] {
            let e = parse(&format!(
                "trust_domain = \"td\"\n[companion.cgroup]\n{cg}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(want), "{cg}: {e}");
        }
        let dup = "trust_domain = \"td\"\n[[rule]]\nname = \"a\"\nspiffe_id = \"x\"\n[[rule]]\nname = \"a\"\nspiffe_id = \"y\"\n";
        assert!(parse(dup).unwrap_err().to_string().contains("used twice"));
    }

    #[test]
    fn companion_uid_range_and_sandbox() {
        let c = parse("trust_domain = \"td\"\n").unwrap();
        assert_eq!(
            c.companion.uid_range,
            UidRange {
                first: 1879048192,
                last: 1879113727
            }
        );
        assert_eq!(c.companion.uid_range.len(), 65536);
        assert!(c.companion.http_api);
        assert_eq!(c.companion.seccomp, Enforcement::Required);
        assert_eq!(c.companion.landlock, Enforcement::Required);
        let c = parse("trust_domain = \"td\"\n[companion]\nuid_range = \"70000 - 70009\"\nlandlock = \"if_available\"\nhttp_api = false\n").unwrap();
        assert_eq!(c.companion.uid_range.to_string(), "70000-70009");
        assert_eq!(c.companion.uid_range.len(), 10);
        assert!(c.companion.uid_range.contains(70009) && !c.companion.uid_range.contains(70010));
        assert_eq!(c.companion.landlock, Enforcement::IfAvailable);
        assert!(!c.companion.http_api);
        for (range, why) in [
            ("5-1", "above"),
            ("0-10", "root"),
            ("60000-70000", "nobody"),
            ("1000", "FIRST-LAST"),
            ("a-b", "FIRST-LAST"),
        ] {
            let e = parse(&format!(
                "trust_domain = \"td\"\n[companion]\nuid_range = \"{range}\"\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(why) && e.contains("uid_range"), "{range}: {e}");
        }
        let e = parse("trust_domain = \"td\"\n[companion]\nseccomp = \"off\"\n").unwrap_err();
        assert!(e.to_string().contains("seccomp"), "{e}");
        let aws = "trust_domain = \"td\"\n[companion]\nhttp_api = false\n[[rule]]\nname = \"a\"\nspiffe_id = \"x\"\naws_credentials = { secret = \"s\" }\n";
        let e = parse(aws).unwrap_err().to_string();
        assert!(e.contains("rule \"a\"") && e.contains("http_api"), "{e}");
    }

    #[test]
    fn rule_selectable_and_sources() {
        use crate::workload::Source;
        let base = "trust_domain = \"td\"\n[[rule]]\nname = \"a\"\nspiffe_id = \"x\"\n";
        let c = parse(base).unwrap();
        assert!(!c.rules[0].selectable, "not selectable unless marked");
        assert_eq!(c.rules[0].sources, Source::ALL.to_vec());
        let c = parse(&format!(
            "{base}selectable = true\nsources = [\"container\", \"nomad\", \"container\"]\n"
        ))
        .unwrap();
        assert!(c.rules[0].selectable);
        assert_eq!(c.rules[0].sources, vec![Source::Container, Source::Nomad]);
        assert!(c.rules[0].accepts(Source::Nomad) && !c.rules[0].accepts(Source::Kubernetes));
        let e = parse(&format!("{base}sources = [\"k8s\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rule \"a\"") && e.contains("unknown source \"k8s\""),
            "{e}"
        );
        let e = parse(&format!("{base}sources = []\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rule \"a\"") && e.contains("empty"), "{e}");
    }

    #[test]
    fn workload_api_and_aws_credentials() {
        let base = "trust_domain = \"td\"\n[[rule]]\nname = \"a\"\nspiffe_id = \"x\"\n";
        let c = parse(base).unwrap();
        assert_eq!(c.companion.workload_api_listen, "127.0.0.1:15101");
        assert_eq!(c.rules[0].aws_credentials, None);
        let c = parse(&format!(
            "{base}aws_credentials = {{ secret = \"aws-dev\" }}\n"
        ))
        .unwrap();
        assert_eq!(
            c.rules[0].aws_credentials.as_ref().unwrap().secret,
            "aws-dev"
        );
        assert!(parse(&format!("{base}aws_credentials = {{ secret = \"a/b\" }}\n")).is_err());
        assert!(parse(&format!("{base}aws_credentials = {{ role = \"r\" }}\n")).is_err());
        let same =
            "trust_domain = \"td\"\n[companion]\nworkload_api_listen = \"127.0.0.1:15100\"\n";
        assert!(parse(same).unwrap_err().to_string().contains("differ"));
        let bad = "trust_domain = \"td\"\n[companion]\nworkload_api_listen = \"nope\"\n";
        assert!(parse(bad).is_err());
    }

    #[test]
    fn companion_limits_and_hook_bounds() {
        let c = parse("trust_domain = \"td\"\n").unwrap();
        assert_eq!(c.companion.limits, CompanionLimits::default());
        assert_eq!(c.hook.max_spec_bytes, DEFAULT_MAX_SPEC_BYTES);
        let c = parse(
            "trust_domain = \"td\"\n[companion.limits]\napi_connections = 64\nheader_timeout = \"3s\"\n",
        )
        .unwrap();
        assert_eq!(c.companion.limits.api_connections, 64);
        assert_eq!(c.companion.limits.header_timeout, Duration::from_secs(3));
        assert_eq!(c.companion.limits.proxy_connections, 1024);
        for (bad, why) in [
            ("api_connections = 4", "api_connections must be between 8"),
            (
                "request_timeout = \"0s\"",
                "request_timeout must be at least",
            ),
            ("max_connections = 9", "unknown field"),
        ] {
            let e = parse(&format!(
                "trust_domain = \"td\"\n[companion.limits]\n{bad}\n"
            ))
            .unwrap_err()
            .to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
        let e = parse("trust_domain = \"td\"\n[hook]\nmax_spec_bytes = 100\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("hook.max_spec_bytes"), "{e}");
        // The budget covers every listener at its ceiling.
        assert_eq!(CompanionLimits::default().fd_budget(), 12_107);
    }
}
