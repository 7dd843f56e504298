//! `nhi.toml`: one file read by `nhid`, `nhi-hook` and `nhictl`. Validated as a whole at load so
//! a typo or an identity template that can't produce a valid SPIFFE ID stops startup with a
//! message that names it, instead of failing later on a container start.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::grant::Grant;
use crate::openbao::OpenBaoConfig;
use crate::select::Match;
use crate::spiffe::validate_trust_domain;
use crate::template::Template;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/nhi/nhi.toml";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/nhi";
pub const DEFAULT_SOCKET: &str = "/run/nhi/nhid.sock";
pub const DEFAULT_COMPANION_BINARY: &str = "/usr/libexec/nhi/nhi-companion";
pub const DEFAULT_COMPANION_USER: &str = "nhi-companion";
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
    store: StoreConfig,
    #[serde(default)]
    openbao: Option<OpenBaoConfig>,
    #[serde(default)]
    audit: AuditConfig,
    #[serde(default)]
    metrics: MetricsConfig,
    /// This node's name in the cluster store (its JWT key, its intermediate CA). Default: the
    /// host name.
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

/// The embedded issuer's settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IssuerConfig {
    /// Only `embedded` today; `openbao` arrives with the central store.
    pub kind: String,
    /// File holding the 32-byte key that seals the issuer keys at rest. Default `<state_dir>/master.key`.
    pub key_file: Option<PathBuf>,
    #[serde(with = "humantime_serde")]
    pub jwt_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub x509_ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub ca_ttl: Duration,
}

impl Default for IssuerConfig {
    fn default() -> Self {
        IssuerConfig {
            kind: "embedded".into(),
            key_file: None,
            jwt_ttl: Duration::from_secs(5 * 60),
            x509_ttl: Duration::from_secs(60 * 60),
            ca_ttl: Duration::from_secs(365 * 24 * 60 * 60),
        }
    }
}

/// Where secrets and revocations live and how they reach workloads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `embedded` (sealed files in the state dir) or `openbao` (KV v2 on OpenBao/Vault).
    pub kind: String,
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
            kind: "embedded".into(),
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

/// How companions are started.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CompanionConfig {
    /// Path of the `nhi-companion` binary.
    pub binary: PathBuf,
    /// User the companion runs as: a name from the passwd database or a numeric uid. Never root.
    pub user: String,
    /// HTTP listen address inside the workload's network namespace.
    pub listen: String,
    /// How long `nhid` waits for a new companion to be ready before the attach fails.
    #[serde(with = "humantime_serde")]
    pub ready_timeout: Duration,
    /// Most JWT-SVID audiences a companion keeps cached at once.
    pub max_cached_audiences: usize,
    /// SPIFFE Workload API (gRPC) listen address inside the workload's network namespace.
    pub workload_api_listen: String,
    /// How long a companion whose `nhid` went away (crash, restart, upgrade) keeps serving
    /// what it has cached while it waits to be re-adopted by the next `nhid`; then it exits.
    #[serde(with = "humantime_serde")]
    pub orphan_timeout: Duration,
}

impl Default for CompanionConfig {
    fn default() -> Self {
        CompanionConfig {
            binary: DEFAULT_COMPANION_BINARY.into(),
            user: DEFAULT_COMPANION_USER.into(),
            listen: DEFAULT_LISTEN.into(),
            ready_timeout: Duration::from_secs(5),
            max_cached_audiences: 64,
            workload_api_listen: DEFAULT_WORKLOAD_API_LISTEN.into(),
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
}

impl Default for HookConfig {
    fn default() -> Self {
        HookConfig {
            timeout: Duration::from_secs(10),
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
    /// With `service_account_jwks`: the `iss` the tokens must carry.
    pub service_account_issuer: Option<String>,
}

impl Default for KubernetesConfig {
    fn default() -> Self {
        KubernetesConfig {
            kubelet_root: crate::k8s::DEFAULT_KUBELET_ROOT.into(),
            service_account_jwks: None,
            service_account_issuer: None,
        }
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
            ("issuer.kind", &raw.issuer.kind),
            ("store.kind", &raw.store.kind),
        ] {
            match kind.as_str() {
                "embedded" => {}
                "openbao" if raw.openbao.is_none() => {
                    return Err(invalid(format!(
                        "{what} = \"openbao\" needs an [openbao] section (addresses, auth)"
                    )))
                }
                "openbao" => {}
                other => {
                    return Err(invalid(format!(
                        "{what} {other:?} is not supported (supported: \"embedded\", \"openbao\")"
                    )))
                }
            }
        }
        if let Some(ob) = &raw.openbao {
            ob.validate().map_err(invalid)?;
        }
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
        if raw.companion.user.is_empty()
            || raw.companion.user == "root"
            || raw.companion.user == "0"
        {
            return Err(invalid(
                "companion.user must name an unprivileged user, never root".into(),
            ));
        }
        raw.companion
            .listen
            .parse::<std::net::SocketAddr>()
            .map_err(|e| invalid(format!("companion.listen {:?}: {e}", raw.companion.listen)))?;
        validate_workload_api_listen(&raw.companion).map_err(invalid)?;
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
            if let Some(aws) = &r.aws_credentials {
                if !crate::grant::valid_secret_name(&aws.secret) {
                    return Err(invalid(format!(
                        "rule {:?}: aws_credentials.secret {:?} is not a valid secret name",
                        r.name, aws.secret
                    )));
                }
            }
            rules.push(Rule {
                name: r.name,
                spiffe_id,
                fail_open: r.fail_open,
                matcher: r.matcher,
                aws_credentials: r.aws_credentials,
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
    fn full_config() {
        let c = parse(
            r#"
trust_domain = "example.org"
state_dir = "/tmp/s"
socket = "/tmp/s/nhid.sock"
[issuer]
jwt_ttl = "2m"
[companion]
user = "65534"
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
        let e = parse("trust_domain = \"td\"\n[companion]\nuser = \"root\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("never root"), "{e}");
        let e = parse("trust_domain = \"td\"\n[[policy]]\nid = \"p\"\nspiffe_ids = [\"spiffe://td/a\"]\n[[policy.egress]]\nid = \"r\"\ncidr = [\"10.0.0.0/40\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("prefix"), "{e}");
        let e = parse("trust_domain = \"td\"\n[egress]\nproxy_port = 1\ninbound_port = 1\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("two different ports"), "{e}");
        let dup = "trust_domain = \"td\"\n[[rule]]\nname = \"a\"\nspiffe_id = \"x\"\n[[rule]]\nname = \"a\"\nspiffe_id = \"y\"\n";
        assert!(parse(dup).unwrap_err().to_string().contains("used twice"));
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
}
