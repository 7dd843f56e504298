//! `[openbao]` in `nhi.toml`: where nhid finds the central OpenBao (or Vault) cluster, how it
//! logs in and which mounts it uses. Only settings live here; the client is
//! `nhi_openbao`. No secret is ever part of the config itself: AppRole's secret_id and a
//! static token are read from files named here.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenBaoConfig {
    /// API addresses of the cluster's nodes, e.g. `["https://bao-1:8200", "https://bao-2:8200"]`.
    /// Tried in order; a request moves to the next on connection errors, timeouts, 5xx, 429 and
    /// standby/sealed answers, and the one that worked is used first afterwards.
    pub addresses: Vec<String>,
    /// PEM file with the CA(s) that sign the servers' TLS certificates. When set, only these are
    /// trusted; otherwise the system's trust store is.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// OpenBao namespace (`X-Vault-Namespace`), if the mounts live in one.
    #[serde(default)]
    pub namespace: Option<String>,
    pub auth: OpenBaoAuth,
    /// Mount of the KV version 2 engine.
    #[serde(default = "default_kv_mount")]
    pub kv_mount: String,
    /// Prefix under the KV mount that nhi owns (`<kv_mount>/data/<kv_prefix>/...`).
    #[serde(default = "default_kv_prefix")]
    pub kv_prefix: String,
    /// Mount of the PKI engine holding the trust domain's root CA.
    #[serde(default = "default_pki_mount")]
    pub pki_mount: String,
    /// No longer used: nodes hold no intermediate CA since OpenBao signs every X.509-SVID
    /// (issue 17). Still accepted so older configs load; nhid warns when it is set.
    #[serde(default, with = "humantime_serde")]
    pub intermediate_ttl: Option<Duration>,
    /// Mount of the JWT auth method that checks Kubernetes service-account tokens: a pod's
    /// token logs it in, and only that login may have its X.509-SVID signed.
    #[serde(default = "default_workload_auth_mount")]
    pub workload_auth_mount: String,
    /// Role of that auth method nhid logs workloads in with.
    #[serde(default = "default_workload_role")]
    pub workload_auth_role: String,
    /// PKI role that signs for a workload's own token; its URI SAN template derives the SPIFFE
    /// ID from the token's claims.
    #[serde(default = "default_workload_role")]
    pub workload_pki_role: String,
    /// PKI role the node's own token signs with, for workloads that proved nothing to OpenBao
    /// (plain containers, Nomad): its template admits only the node's path.
    #[serde(default = "default_node_pki_role")]
    pub node_pki_role: String,
    /// How often shared state (revocations, secrets' versions) is polled.
    #[serde(default = "default_poll_interval", with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Longest a single request may take against one address before the next is tried.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
}

/// How nhid logs in. Tagged by `method`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "method", rename_all = "lowercase", deny_unknown_fields)]
pub enum OpenBaoAuth {
    /// AppRole: the role id is not secret and lives in the config; the secret_id is read from
    /// a root-only file at each login.
    AppRole {
        role_id: String,
        secret_id_file: PathBuf,
        #[serde(default = "default_approle_mount")]
        mount: String,
    },
    /// A token read from a file (e.g. written by an OpenBao agent); re-read at each re-login.
    Token { token_file: PathBuf },
}

pub const DEFAULT_KV_MOUNT: &str = "secret";
pub const DEFAULT_KV_PREFIX: &str = "nhi";
pub const DEFAULT_PKI_MOUNT: &str = "pki";
pub const DEFAULT_APPROLE_MOUNT: &str = "approle";

fn default_kv_mount() -> String {
    DEFAULT_KV_MOUNT.into()
}
fn default_kv_prefix() -> String {
    DEFAULT_KV_PREFIX.into()
}
fn default_pki_mount() -> String {
    DEFAULT_PKI_MOUNT.into()
}
fn default_approle_mount() -> String {
    DEFAULT_APPROLE_MOUNT.into()
}
pub const DEFAULT_WORKLOAD_AUTH_MOUNT: &str = "nhi-k8s";
pub const DEFAULT_WORKLOAD_ROLE: &str = "nhi-workload";
pub const DEFAULT_NODE_PKI_ROLE: &str = "nhi-node";

fn default_workload_auth_mount() -> String {
    DEFAULT_WORKLOAD_AUTH_MOUNT.into()
}
fn default_workload_role() -> String {
    DEFAULT_WORKLOAD_ROLE.into()
}
fn default_node_pki_role() -> String {
    DEFAULT_NODE_PKI_ROLE.into()
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(5)
}

impl OpenBaoConfig {
    /// Checks what serde cannot: at least one address, each an `http(s)://host[:port]` base URL
    /// without path, query or credentials; mount names and the prefix are plain path segments;
    /// durations are non-zero.
    pub fn validate(&self) -> Result<(), String> {
        if self.addresses.is_empty() {
            return Err("openbao.addresses is empty: name at least one OpenBao node".into());
        }
        for a in &self.addresses {
            validate_address(a).map_err(|e| format!("openbao.addresses: {a:?}: {e}"))?;
        }
        let mut seen = std::collections::HashSet::new();
        for a in &self.addresses {
            if !seen.insert(a.trim_end_matches('/')) {
                return Err(format!("openbao.addresses: {a:?} is listed twice"));
            }
        }
        check_path("openbao.kv_mount", &self.kv_mount)?;
        check_path("openbao.kv_prefix", &self.kv_prefix)?;
        check_path("openbao.pki_mount", &self.pki_mount)?;
        check_path("openbao.workload_auth_mount", &self.workload_auth_mount)?;
        for (name, role) in [
            ("workload_auth_role", &self.workload_auth_role),
            ("workload_pki_role", &self.workload_pki_role),
            ("node_pki_role", &self.node_pki_role),
        ] {
            if role.is_empty() || role.contains('/') {
                return Err(format!("openbao.{name} {role:?}: a role name, without '/'"));
            }
        }
        if let Some(ns) = &self.namespace {
            check_path("openbao.namespace", ns)?;
        }
        match &self.auth {
            OpenBaoAuth::AppRole {
                role_id,
                secret_id_file,
                mount,
            } => {
                if role_id.trim().is_empty() {
                    return Err("openbao.auth.role_id is empty".into());
                }
                if secret_id_file.as_os_str().is_empty() {
                    return Err("openbao.auth.secret_id_file is empty".into());
                }
                check_path("openbao.auth.mount", mount)?;
            }
            OpenBaoAuth::Token { token_file } => {
                if token_file.as_os_str().is_empty() {
                    return Err("openbao.auth.token_file is empty".into());
                }
            }
        }
        for (name, d) in [
            ("poll_interval", self.poll_interval),
            ("request_timeout", self.request_timeout),
        ] {
            if d.is_zero() {
                return Err(format!("openbao.{name} must be greater than zero"));
            }
        }
        Ok(())
    }
}

/// `http(s)://host[:port]` with an optional trailing `/`; nothing else.
fn validate_address(a: &str) -> Result<(), String> {
    let rest = a
        .strip_prefix("https://")
        .or_else(|| a.strip_prefix("http://"))
        .ok_or("must start with https:// or http://")?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() {
        return Err("has no host".into());
    }
    if authority.contains(['/', '?', '#']) {
        return Err("must be a base URL without path, query or fragment (the API path /v1/ is added by nhid)".into());
    }
    if authority.contains('@') {
        return Err("must not carry credentials".into());
    }
    if authority
        .chars()
        .any(|c| c.is_whitespace() || c.is_control())
    {
        return Err("contains whitespace".into());
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or("unbalanced [ in IPv6 address")?;
        if !after.is_empty() {
            let port = after.strip_prefix(':').ok_or("junk after IPv6 address")?;
            check_port(port)?;
        }
        host
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => {
                check_port(port)?;
                host
            }
            None => authority,
        }
    };
    if host.is_empty() {
        return Err("has no host".into());
    }
    Ok(())
}

fn check_port(port: &str) -> Result<(), String> {
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("bad port {port:?}")),
    }
}

/// A mount or prefix: `/`-separated non-empty segments of URL-safe characters, no `.`/`..`.
fn check_path(name: &str, v: &str) -> Result<(), String> {
    let v = v.trim_matches('/');
    if v.is_empty() {
        return Err(format!("{name} is empty"));
    }
    for seg in v.split('/') {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(format!("{name} {v:?} has an empty, . or .. segment"));
        }
        if !seg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(format!(
                "{name} {v:?} may only contain letters, digits, '-', '_', '.' and '/'"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct Wrap {
        openbao: OpenBaoConfig,
    }

    fn parse(s: &str) -> Result<OpenBaoConfig, String> {
        toml::from_str::<Wrap>(s)
            .map(|w| w.openbao)
            .map_err(|e| e.to_string())
    }

    const APPROLE: &str = r#"
[openbao]
addresses = ["https://bao-1:8200", "https://bao-2:8200/"]
[openbao.auth]
method = "approle"
role_id = "8f1c"
secret_id_file = "/etc/nhi/bao-secret-id"
"#;

    #[test]
    fn approle_with_defaults() {
        let c = parse(APPROLE).unwrap();
        c.validate().unwrap();
        assert_eq!(c.addresses.len(), 2);
        assert_eq!(c.kv_mount, "secret");
        assert_eq!(c.kv_prefix, "nhi");
        assert_eq!(c.pki_mount, "pki");
        assert_eq!(c.intermediate_ttl, None);
        assert_eq!(c.workload_auth_mount, "nhi-k8s");
        assert_eq!(c.workload_auth_role, "nhi-workload");
        assert_eq!(c.workload_pki_role, "nhi-workload");
        assert_eq!(c.node_pki_role, "nhi-node");
        assert_eq!(c.poll_interval, Duration::from_secs(2));
        assert_eq!(c.request_timeout, Duration::from_secs(5));
        assert!(c.ca_file.is_none() && c.namespace.is_none());
        match c.auth {
            OpenBaoAuth::AppRole {
                role_id,
                secret_id_file,
                mount,
            } => {
                assert_eq!(role_id, "8f1c");
                assert_eq!(secret_id_file, PathBuf::from("/etc/nhi/bao-secret-id"));
                assert_eq!(mount, "approle");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn token_and_every_field() {
        let c = parse(
            r#"
[openbao]
addresses = ["http://127.0.0.1:8200", "https://[::1]:8300"]
ca_file = "/etc/nhi/bao-ca.pem"
namespace = "team-a"
kv_mount = "kv"
kv_prefix = "infra/nhi"
pki_mount = "pki_nhi"
intermediate_ttl = "12h"
workload_auth_mount = "k8s-prod"
workload_auth_role = "pods"
workload_pki_role = "pods"
node_pki_role = "nodes"
poll_interval = "500ms"
request_timeout = "3s"
auth = { method = "token", token_file = "/run/nhi/bao-token" }
"#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.ca_file.as_deref(), Some("/etc/nhi/bao-ca.pem".as_ref()));
        assert_eq!(c.namespace.as_deref(), Some("team-a"));
        assert_eq!(c.kv_prefix, "infra/nhi");
        assert_eq!(c.intermediate_ttl, Some(Duration::from_secs(12 * 3600)));
        assert_eq!(
            (
                c.workload_auth_mount.as_str(),
                c.workload_auth_role.as_str(),
                c.workload_pki_role.as_str(),
                c.node_pki_role.as_str()
            ),
            ("k8s-prod", "pods", "pods", "nodes")
        );
        assert_eq!(c.poll_interval, Duration::from_millis(500));
        assert_eq!(c.request_timeout, Duration::from_secs(3));
        assert!(
            matches!(c.auth, OpenBaoAuth::Token { ref token_file } if token_file == &PathBuf::from("/run/nhi/bao-token"))
        );
    }

    #[test]
    fn unknown_fields_and_methods_are_errors() {
        let typo = APPROLE.replace("addresses", "adresses");
        assert!(parse(&typo).unwrap_err().contains("adresses"));
        let extra = APPROLE.replace(
            "method = \"approle\"",
            "method = \"approle\"\nsecret_id = \"x\"",
        );
        assert!(parse(&extra).unwrap_err().contains("secret_id"));
        let method = APPROLE.replace("\"approle\"", "\"kubernetes\"");
        assert!(parse(&method).unwrap_err().contains("kubernetes"));
        let missing = APPROLE.replace("role_id = \"8f1c\"\n", "");
        assert!(parse(&missing).unwrap_err().contains("role_id"));
        let top = format!("{APPROLE}\n[openbao.extra]\n");
        assert!(parse(&top).is_err());
    }

    #[test]
    fn validate_rejects_bad_addresses() {
        let with = |addrs: &str| {
            parse(&APPROLE.replace(r#"["https://bao-1:8200", "https://bao-2:8200/"]"#, addrs))
                .unwrap()
                .validate()
        };
        assert!(with("[]").unwrap_err().contains("empty"));
        for bad in [
            r#"["bao-1:8200"]"#,
            r#"["ftp://bao-1"]"#,
            r#"["https://"]"#,
            r#"["https://bao-1:8200/v1"]"#,
            r#"["https://bao-1:8200?x=1"]"#,
            r#"["https://user:pw@bao-1:8200"]"#,
            r#"["https://bao-1:port"]"#,
            r#"["https://bao-1:0"]"#,
            r#"["https://bao-1:70000"]"#,
            r#"["https://[::1"]"#,
            r#"["https://bao 1"]"#,
            r#"["https://:8200"]"#,
            r#"["https://a:8200", "https://a:8200/"]"#,
        ] {
            let e = with(bad).expect_err(bad);
            assert!(e.starts_with("openbao.addresses"), "{bad}: {e}");
        }
        with(r#"["https://[fd00::1]", "http://10.0.0.1:8200/", "https://bao.example"]"#).unwrap();
    }

    #[test]
    fn validate_rejects_bad_mounts_and_durations() {
        for (from, to, want) in [
            ("role_id = \"8f1c\"", "role_id = \" \"", "role_id"),
            (
                "secret_id_file = \"/etc/nhi/bao-secret-id\"",
                "secret_id_file = \"/etc/nhi/bao-secret-id\"\nmount = \"../x\"",
                "auth.mount",
            ),
        ] {
            let e = parse(&APPROLE.replace(from, to))
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(e.contains(want), "{e}");
        }
        for (k, v, want) in [
            ("kv_mount", "\"\"", "kv_mount"),
            ("kv_prefix", "\"a//b\"", "kv_prefix"),
            ("pki_mount", "\"pki?x\"", "pki_mount"),
            ("namespace", "\"a/../b\"", "namespace"),
            ("request_timeout", "\"0s\"", "request_timeout"),
            ("poll_interval", "\"0s\"", "poll_interval"),
        ] {
            let s = APPROLE.replace("[openbao.auth]", &format!("{k} = {v}\n[openbao.auth]"));
            let e = parse(&s).unwrap().validate().unwrap_err();
            assert!(e.contains(want), "{k}: {e}");
        }
        assert!(parse(&APPROLE.replace(
            "[openbao.auth]",
            "request_timeout = \"five\"\n[openbao.auth]"
        ))
        .is_err());
    }
}
