//! Edge policy: what a workload's outbound traffic may reach and who may call it. One
//! `[[policy]]` applies to the identities it names (SPIFFE ID patterns and/or selection rules,
//! like a grant); its `[[policy.egress]]` rules are tried in order and the first that matches
//! decides, else the policy's `default`. `[[policy.inbound]]` rules make listed ports require a
//! JWT-SVID from allowed identities.
//!
//! Pure types and decisions only: `nhid` validates and ships a policy to the companion, which
//! calls [`Policy::decide`] per connection (L4, TLS by SNI) or per plaintext HTTP request.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::select::glob_match;

pub const DEFAULT_PROXY_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// `[egress]`: the ports the companion listens on inside the workload's network namespace.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Outbound TCP of the workload is redirected here.
    pub proxy_port: u16,
    /// Inbound TCP to ports with an inbound rule is redirected here.
    pub inbound_port: u16,
}

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            proxy_port: DEFAULT_PROXY_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

/// One `[[policy]]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub id: String,
    /// Full SPIFFE IDs or `*` globs.
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
    /// Names of `[[rule]]`s whose identities the policy covers.
    #[serde(default)]
    pub rules: Vec<String>,
    /// What happens when no egress rule matches.
    #[serde(default)]
    pub default: Action,
    #[serde(default)]
    pub egress: Vec<EgressRule>,
    #[serde(default)]
    pub inbound: Vec<InboundRule>,
}

/// One `[[policy.egress]]` rule. Every condition given must hold; none given matches all.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    pub id: String,
    #[serde(default)]
    pub action: Action,
    /// Destination networks, e.g. `10.0.0.0/8`, `2001:db8::/32`, `192.0.2.7`.
    #[serde(default)]
    pub cidr: Vec<Cidr>,
    #[serde(default)]
    pub ports: Vec<u16>,
    /// TLS server name: exact, or `*.example.com` (any subdomain).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// Plaintext HTTP `Host` (port ignored): exact or `*.suffix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Plaintext HTTP methods, upper case.
    #[serde(default)]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Credential the companion injects into matching plaintext HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<Broker>,
}

/// A brokered credential: the companion adds `header: format` (with `{value}` replaced by the
/// credential) to each request the rule allows; the application never holds the value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Broker {
    #[serde(default = "default_header")]
    pub header: String,
    /// A secret of the store (needs no grant: `nhid` only hands it to the companion for this
    /// rule, never to the workload's `/v1/secrets`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// A JWT-SVID of the workload's identity for this audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_audience: Option<String>,
    #[serde(default = "default_format")]
    pub format: String,
}

fn default_header() -> String {
    "authorization".into()
}
fn default_format() -> String {
    "Bearer {value}".into()
}

/// One `[[policy.inbound]]` rule: calls to `ports` need `Authorization: Bearer <JWT-SVID>` for
/// `audience` from an identity matching `allow`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InboundRule {
    pub id: String,
    pub ports: Vec<u16>,
    /// SPIFFE IDs or `*` globs allowed to call.
    pub allow: Vec<String>,
    pub audience: String,
}

/// An IP network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("cidr {s:?}: {a:?} is not an IP address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("cidr {s:?}: prefix must be 0..={max}"))?,
        };
        Ok(Cidr { addr, prefix })
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        format!("{}/{}", c.addr, c.prefix)
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// What the companion knows about a connection or request when it decides.
#[derive(Debug, Clone, Default)]
pub struct Facts<'a> {
    /// Original destination; `None` never happens on the data path but keeps tests short.
    pub dest: Option<SocketAddr>,
    /// TLS server name, when the connection began with a ClientHello that carried one.
    pub sni: Option<&'a str>,
    /// Plaintext HTTP request facts.
    pub http: Option<HttpFacts<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct HttpFacts<'a> {
    pub host: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
}

/// A decision: the action, the rule that decided (`None`: the default), and what to inject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict<'p> {
    pub action: Action,
    pub rule: Option<&'p str>,
    pub broker: Option<&'p Broker>,
}

/// `pattern` is `host` exactly or `*.suffix` (any subdomain, not the suffix itself); ASCII
/// case-insensitive.
pub fn host_match(pattern: &str, host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let pattern = pattern.to_ascii_lowercase();
    match pattern.strip_prefix("*.") {
        Some(suffix) => host.len() > suffix.len() + 1 && host.ends_with(&format!(".{suffix}")),
        None => host == pattern,
    }
}

/// The host part of an HTTP `Host` header (`name`, `name:port`, `[v6]:port`).
pub fn host_without_port(h: &str) -> &str {
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match h.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => h,
    }
}

impl EgressRule {
    /// Conditions only a TLS ClientHello answers.
    pub fn needs_tls(&self) -> bool {
        self.sni.is_some()
    }

    /// Conditions (or an injection) only a plaintext HTTP request answers.
    pub fn needs_http(&self) -> bool {
        self.host.is_some()
            || !self.methods.is_empty()
            || self.path_prefix.is_some()
            || self.broker.is_some()
    }

    /// Destination address and port conditions.
    pub fn matches_l4(&self, dest: Option<SocketAddr>) -> bool {
        let ip_ok = self.cidr.is_empty()
            || dest.is_some_and(|d| self.cidr.iter().any(|c| c.contains(d.ip())));
        let port_ok = self.ports.is_empty() || dest.is_some_and(|d| self.ports.contains(&d.port()));
        ip_ok && port_ok
    }

    pub fn matches(&self, f: &Facts) -> bool {
        if !self.matches_l4(f.dest) {
            return false;
        }
        if let Some(p) = &self.sni {
            if !f.sni.is_some_and(|s| host_match(p, s)) {
                return false;
            }
        }
        if self.needs_http() {
            let Some(h) = &f.http else { return false };
            if let Some(p) = &self.host {
                if !h.host.is_some_and(|v| host_match(p, host_without_port(v))) {
                    return false;
                }
            }
            if !self.methods.is_empty() && !self.methods.iter().any(|m| m == h.method) {
                return false;
            }
            if let Some(p) = &self.path_prefix {
                if !h.path.starts_with(p.as_str()) {
                    return false;
                }
            }
        }
        true
    }
}

impl Policy {
    /// Whether this policy covers the identity `spiffe_id` selected by rule `rule`.
    pub fn covers(&self, spiffe_id: &str, rule: &str) -> bool {
        self.rules.iter().any(|r| r == rule)
            || self.spiffe_ids.iter().any(|p| glob_match(p, spiffe_id))
    }

    /// The first egress rule that matches decides; otherwise the default.
    pub fn decide(&self, f: &Facts) -> Verdict<'_> {
        for r in &self.egress {
            if r.matches(f) {
                return Verdict {
                    action: r.action,
                    rule: Some(&r.id),
                    broker: r.broker.as_ref(),
                };
            }
        }
        Verdict {
            action: self.default,
            rule: None,
            broker: None,
        }
    }

    /// Whether a connection to `dest` must be looked into (ClientHello, HTTP request) before
    /// deciding: some rule that could apply to it depends on SNI or HTTP.
    pub fn needs_inspection(&self, dest: SocketAddr) -> bool {
        self.egress
            .iter()
            .any(|r| (r.needs_tls() || r.needs_http()) && r.matches_l4(Some(dest)))
    }

    pub fn inbound_for_port(&self, port: u16) -> Option<&InboundRule> {
        self.inbound.iter().find(|r| r.ports.contains(&port))
    }

    /// Every port with an inbound rule, sorted, without duplicates.
    pub fn inbound_ports(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self.inbound.iter().flat_map(|r| r.ports.clone()).collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    pub fn egress_rule(&self, id: &str) -> Option<&EgressRule> {
        self.egress.iter().find(|r| r.id == id)
    }

    /// The secret egress rule `rule_id` brokers, if it is an allow rule of this policy with a
    /// secret broker: the only way a companion gets a secret value without a grant.
    pub fn brokered_secret(&self, rule_id: &str) -> Option<&str> {
        self.egress_rule(rule_id)
            .filter(|r| r.action == Action::Allow)
            .and_then(|r| r.broker.as_ref())
            .and_then(|b| b.secret.as_deref())
    }

    /// Load-time checks.
    pub fn validate(
        &self,
        trust_domain: &str,
        egress: &EgressConfig,
        rule_exists: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        if !valid_id(&self.id) {
            return Err(format!(
                "policy id {:?}: use ASCII letters, digits, '.', '-', '_'",
                self.id
            ));
        }
        let ctx = |m: String| format!("policy {:?}: {m}", self.id);
        if self.spiffe_ids.is_empty() && self.rules.is_empty() {
            return Err(ctx(
                "needs `spiffe_ids` or `rules`: whom does it cover?".into()
            ));
        }
        let prefix = format!("spiffe://{trust_domain}/");
        for p in &self.spiffe_ids {
            if !p.starts_with(&prefix) {
                return Err(ctx(format!(
                    "spiffe_ids pattern {p:?} must start with {prefix:?}"
                )));
            }
        }
        for r in &self.rules {
            if !rule_exists(r) {
                return Err(ctx(format!("names rule {r:?}, which is not defined")));
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for r in &self.egress {
            if !ids.insert(r.id.as_str()) {
                return Err(ctx(format!("rule id {:?} is used twice", r.id)));
            }
            r.validate()
                .map_err(|e| ctx(format!("egress {:?}: {e}", r.id)))?;
        }
        for r in &self.inbound {
            if !ids.insert(r.id.as_str()) {
                return Err(ctx(format!("rule id {:?} is used twice", r.id)));
            }
            if !valid_id(&r.id) {
                return Err(ctx(format!(
                    "inbound rule id {:?}: use ASCII letters, digits, '.', '-', '_'",
                    r.id
                )));
            }
            let c = |m: String| ctx(format!("inbound {:?}: {m}", r.id));
            if r.ports.is_empty() || r.ports.contains(&0) {
                return Err(c("needs `ports` (1-65535)".into()));
            }
            for p in &r.ports {
                if *p == egress.proxy_port || *p == egress.inbound_port {
                    return Err(c(format!(
                        "port {p} is the companion's own proxy port ([egress])"
                    )));
                }
            }
            if r.allow.is_empty() {
                return Err(c("needs `allow`: which SPIFFE IDs may call?".into()));
            }
            for p in &r.allow {
                if !p.starts_with("spiffe://") {
                    return Err(c(format!("allow pattern {p:?} must start with spiffe://")));
                }
            }
            if r.audience.is_empty() {
                return Err(c("needs an `audience` the callers' tokens carry".into()));
            }
        }
        Ok(())
    }
}

fn valid_id(id: &str) -> bool {
    crate::grant::valid_secret_name(id)
}

fn valid_host_pattern(p: &str) -> bool {
    let name = p.strip_prefix("*.").unwrap_or(p);
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

impl EgressRule {
    fn validate(&self) -> Result<(), String> {
        if !valid_id(&self.id) {
            return Err("rule id: use ASCII letters, digits, '.', '-', '_'".into());
        }
        if self.ports.contains(&0) {
            return Err("port 0 never matches".into());
        }
        if self.needs_tls() && self.needs_http() {
            return Err(
                "`sni` (TLS) and host/methods/path_prefix/broker (plaintext HTTP) never hold for the same connection; use two rules"
                    .into(),
            );
        }
        for (what, p) in [("sni", &self.sni), ("host", &self.host)] {
            if let Some(p) = p {
                if !valid_host_pattern(p) {
                    return Err(format!(
                        "{what} {p:?}: a host name, or `*.` followed by one"
                    ));
                }
            }
        }
        for m in &self.methods {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("method {m:?}: upper-case letters, e.g. GET"));
            }
        }
        if let Some(p) = &self.path_prefix {
            if !p.starts_with('/') {
                return Err(format!("path_prefix {p:?} must start with '/'"));
            }
        }
        if let Some(b) = &self.broker {
            if self.action != Action::Allow {
                return Err("a broker only makes sense on an allow rule".into());
            }
            match (&b.secret, &b.jwt_audience) {
                (Some(s), None) if crate::grant::valid_secret_name(s) => {}
                (Some(s), None) => return Err(format!("broker secret {s:?}: not a secret name")),
                (None, Some(a)) if !a.is_empty() => {}
                _ => return Err("broker needs exactly one of `secret` or `jwt_audience`".into()),
            }
            if b.header.is_empty()
                || !b
                    .header
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
            {
                return Err(format!("broker header {:?}: not a header name", b.header));
            }
            if !b.format.contains("{value}") || b.format.contains(['\r', '\n']) {
                return Err("broker format must contain {value} on one line".into());
            }
        }
        Ok(())
    }
}

/// The policy for an identity: the first `[[policy]]` that covers it.
pub fn policy_for<'p>(policies: &'p [Policy], spiffe_id: &str, rule: &str) -> Option<&'p Policy> {
    policies.iter().find(|p| p.covers(spiffe_id, rule))
}

/// The header value for a brokered credential.
pub fn render_broker(format: &str, value: &str) -> String {
    format.replace("{value}", value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml_text: &str) -> Policy {
        #[derive(Deserialize)]
        struct W {
            policy: Vec<Policy>,
        }
        let w: W = toml::from_str(toml_text).unwrap();
        w.policy.into_iter().next().unwrap()
    }

    fn sample() -> Policy {
        policy(
            r#"
[[policy]]
id = "web"
spiffe_ids = ["spiffe://td/container/*"]
default = "deny"
[[policy.egress]]
id = "no-admin"
action = "deny"
path_prefix = "/admin"
[[policy.egress]]
id = "api"
action = "allow"
cidr = ["10.1.0.0/16"]
ports = [80]
host = "api.example.com"
methods = ["GET", "POST"]
broker = { secret = "api-token" }
[[policy.egress]]
id = "tls"
action = "allow"
ports = [443]
sni = "*.example.com"
[[policy.egress]]
id = "db"
action = "allow"
cidr = ["10.2.0.5"]
ports = [5432]
[[policy.inbound]]
id = "in"
ports = [8080]
allow = ["spiffe://td/container/client"]
audience = "web"
"#,
        )
    }

    fn dest(s: &str) -> Option<SocketAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("10.2.0.1".parse().unwrap()));
        assert!(c.contains("::ffff:10.1.0.1".parse().unwrap()), "v4-mapped");
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        let v6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(v6.contains("2001:db8::1".parse().unwrap()));
        assert!(!v6.contains("10.1.0.1".parse().unwrap()));
        assert_eq!(
            String::from("192.0.2.7".parse::<Cidr>().unwrap()),
            "192.0.2.7/32"
        );
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
    }

    #[test]
    fn hosts() {
        assert!(host_match("api.example.com", "API.example.com"));
        assert!(host_match("*.example.com", "a.b.example.com"));
        assert!(!host_match("*.example.com", "example.com"));
        assert!(!host_match("*.example.com", "badexample.com"));
        assert_eq!(host_without_port("a.b:8080"), "a.b");
        assert_eq!(host_without_port("[::1]:80"), "::1");
        assert_eq!(host_without_port("a.b"), "a.b");
    }

    #[test]
    fn l4_decisions() {
        let p = sample();
        let v = p.decide(&Facts {
            dest: dest("10.2.0.5:5432"),
            ..Default::default()
        });
        assert_eq!((v.action, v.rule), (Action::Allow, Some("db")));
        let v = p.decide(&Facts {
            dest: dest("10.2.0.6:5432"),
            ..Default::default()
        });
        assert_eq!((v.action, v.rule), (Action::Deny, None), "default");
        // `no-admin` (a path rule without address conditions) may apply anywhere: look first.
        assert!(p.needs_inspection("10.2.0.5:5432".parse().unwrap()));
        let mut l4_only = p.clone();
        l4_only.egress.retain(|r| r.id == "db");
        assert!(!l4_only.needs_inspection("10.2.0.5:5432".parse().unwrap()));
    }

    #[test]
    fn sni_decisions() {
        let p = sample();
        let f = |sni| Facts {
            dest: dest("192.0.2.1:443"),
            sni,
            http: None,
        };
        assert_eq!(p.decide(&f(Some("www.example.com"))).rule, Some("tls"));
        assert_eq!(p.decide(&f(Some("www.example.com"))).action, Action::Allow);
        assert_eq!(p.decide(&f(Some("evil.com"))).action, Action::Deny);
        assert_eq!(p.decide(&f(None)).action, Action::Deny, "no SNI, no match");
        assert!(p.needs_inspection("192.0.2.1:443".parse().unwrap()));
    }

    #[test]
    fn http_decisions_and_broker() {
        let p = sample();
        let f = |host, method, path| Facts {
            dest: dest("10.1.0.9:80"),
            sni: None,
            http: Some(HttpFacts {
                host: Some(host),
                method,
                path,
            }),
        };
        let v = p.decide(&f("api.example.com:80", "GET", "/v1/x"));
        assert_eq!((v.action, v.rule), (Action::Allow, Some("api")));
        assert_eq!(v.broker.unwrap().secret.as_deref(), Some("api-token"));
        assert_eq!(v.broker.unwrap().header, "authorization");
        assert_eq!(
            render_broker(&v.broker.unwrap().format, "s3cr3t"),
            "Bearer s3cr3t"
        );
        let v = p.decide(&f("api.example.com", "GET", "/admin/users"));
        assert_eq!((v.action, v.rule), (Action::Deny, Some("no-admin")));
        assert_eq!(
            p.decide(&f("api.example.com", "DELETE", "/x")).action,
            Action::Deny
        );
        assert_eq!(p.decide(&f("other.com", "GET", "/x")).action, Action::Deny);
        // A rule with HTTP conditions never matches a connection seen only at L4.
        let l4 = Facts {
            dest: dest("10.1.0.9:80"),
            ..Default::default()
        };
        assert_eq!(p.decide(&l4).rule, None);
    }

    #[test]
    fn only_a_secret_broker_rule_yields_a_brokered_secret() {
        let p = sample();
        assert_eq!(p.brokered_secret("api"), Some("api-token"));
        assert_eq!(p.brokered_secret("tls"), None, "no broker");
        assert_eq!(p.brokered_secret("no-admin"), None);
        assert_eq!(p.brokered_secret("nope"), None);
        let mut jwt = p.clone();
        jwt.egress[1].broker = Some(Broker {
            header: "authorization".into(),
            secret: None,
            jwt_audience: Some("a".into()),
            format: "Bearer {value}".into(),
        });
        assert_eq!(
            jwt.brokered_secret("api"),
            None,
            "a JWT broker names no secret"
        );
    }

    #[test]
    fn coverage_and_inbound() {
        let p = sample();
        assert!(p.covers("spiffe://td/container/web", "x"));
        assert!(!p.covers("spiffe://td/other", "x"));
        let ps = vec![p.clone()];
        assert!(policy_for(&ps, "spiffe://td/container/a", "r").is_some());
        assert!(policy_for(&ps, "spiffe://td/x", "r").is_none());
        assert_eq!(p.inbound_ports(), vec![8080]);
        assert_eq!(p.inbound_for_port(8080).unwrap().audience, "web");
        assert!(p.inbound_for_port(80).is_none());
        assert!(p
            .validate("td", &EgressConfig::default(), |_| false)
            .is_ok());
    }

    #[test]
    fn validation_names_the_problem() {
        let base = "[[policy]]\nid = \"p\"\nspiffe_ids = [\"spiffe://td/x\"]\n";
        let check = |extra: &str, want: &str| {
            let p = policy(&format!("{base}{extra}"));
            let e = p
                .validate("td", &EgressConfig::default(), |r| r == "k8s")
                .unwrap_err();
            assert!(e.contains(want), "{e} should mention {want}");
        };
        check(
            "[[policy.egress]]\nid = \"a\"\nsni = \"x.com\"\nhost = \"x.com\"\n",
            "never hold",
        );
        check(
            "[[policy.egress]]\nid = \"a\"\n[[policy.egress]]\nid = \"a\"\n",
            "used twice",
        );
        check(
            "[[policy.egress]]\nid = \"a\"\nmethods = [\"get\"]\n",
            "upper-case",
        );
        check(
            "[[policy.egress]]\nid = \"a\"\npath_prefix = \"x\"\n",
            "start with '/'",
        );
        check(
            "[[policy.egress]]\nid = \"a\"\naction = \"deny\"\nbroker = { secret = \"s\" }\n",
            "allow rule",
        );
        check(
            "[[policy.egress]]\nid = \"a\"\nbroker = { secret = \"s\", jwt_audience = \"a\" }\n",
            "exactly one",
        );
        check(
            "[[policy.egress]]\nid = \"a\"\nbroker = { secret = \"s\", format = \"x\" }\n",
            "{value}",
        );
        check(
            "[[policy.egress]]\nid = \"a\"\nsni = \"bad host!\"\n",
            "host name",
        );
        check("[[policy.inbound]]\nid = \"i\"\nports = [15001]\nallow = [\"spiffe://td/a\"]\naudience = \"x\"\n", "proxy port");
        check(
            "[[policy.inbound]]\nid = \"i\"\nports = [80]\nallow = []\naudience = \"x\"\n",
            "allow",
        );
        let p = policy("[[policy]]\nid = \"p\"\n");
        assert!(p
            .validate("td", &EgressConfig::default(), |_| true)
            .unwrap_err()
            .contains("whom"));
        let p = policy("[[policy]]\nid = \"p\"\nrules = [\"nope\"]\n");
        assert!(p
            .validate("td", &EgressConfig::default(), |_| false)
            .unwrap_err()
            .contains("not defined"));
        assert!(toml::from_str::<Policy>("id = \"p\"\nbogus = 1\n").is_err());
    }

    #[test]
    fn policies_round_trip_as_json() {
        let p = sample();
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Policy>(&s).unwrap(), p);
    }
}
