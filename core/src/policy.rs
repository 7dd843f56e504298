//! Edge policy: what a workload's outbound traffic may reach and who may call it. One
//! `[[policy]]` applies to the identities it names (SPIFFE ID patterns and/or selection rules,
//! like a grant); its `[[policy.egress]]` rules are tried in order and the first that matches
//! decides, else the policy's `default`. `[[policy.inbound]]` rules make listed ports require a
//! JWT-SVID from allowed identities.
//!
//! TCP rules are decided by the companion, which calls [`Policy::decide_from`] per connection
//! (L4, TLS by SNI) or per plaintext HTTP request; UDP and ICMP rules (`protocol`) and the
//! default for every protocol but TCP are compiled by `nhid` into the kernel's rules of the
//! workload's network namespace. An allow rule that names its destination (`sni`, `host`) holds
//! only for the addresses that name resolves to ([`EgressRule::binds_name`]): the companion
//! checks the original destination against the DNS answers it relayed (or resolves the name
//! itself) before it applies the rule.
//!
//! Pure types and decisions only: `nhid` validates and ships a policy to the companion.
//!
//! Size: about 680 lines of code; the rest are the unit tests of every rule shape.

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::http_path::EscapedSlashes;
use crate::subjects::Subjects;

pub const DEFAULT_PROXY_PORT: u16 = 15001;
pub const DEFAULT_INBOUND_PORT: u16 = 15006;
pub const DEFAULT_DNS_PORT: u16 = 15053;

/// `[egress]`: the ports the companion listens on inside the workload's network namespace.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// Outbound TCP of the workload is redirected here.
    pub proxy_port: u16,
    /// Inbound TCP to ports with an inbound rule is redirected here.
    pub inbound_port: u16,
    /// DNS queries (UDP) to a policy's `dns` resolvers are redirected here; the companion
    /// relays them and remembers the answers.
    pub dns_port: u16,
    /// An answer binds its name to its addresses for its TTL, but never for less than this
    /// (answers with TTL 0 would otherwise be useless by the time the client connects).
    #[serde(with = "humantime_serde")]
    pub dns_min_ttl: Duration,
    /// Mutual TLS connections (issue 18) a companion keeps handshaken ahead of need for each
    /// destination it calls, so a new connection does not wait for a handshake (at most
    /// [`MAX_MTLS_WARM`]; 0 turns it off). An egress rule's `mtls.warm` overrides it.
    pub mtls_warm: usize,
}

/// The most warm mutual TLS connections kept for one destination.
pub const MAX_MTLS_WARM: usize = 8;
/// The most destinations a companion keeps warm mutual TLS connections for (the least
/// recently used one is dropped for a new one).
pub const MAX_MTLS_WARM_DESTINATIONS: usize = 64;

impl Default for EgressConfig {
    fn default() -> Self {
        EgressConfig {
            proxy_port: DEFAULT_PROXY_PORT,
            inbound_port: DEFAULT_INBOUND_PORT,
            dns_port: DEFAULT_DNS_PORT,
            dns_min_ttl: Duration::from_secs(5),
            mtls_warm: 2,
        }
    }
}

/// The transport an egress rule is about.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// Decided by the companion (redirected to its proxy): L4, TLS SNI, HTTP.
    #[default]
    Tcp,
    /// Decided in the kernel by destination and port.
    Udp,
    /// ICMP and ICMPv6, decided in the kernel by destination.
    Icmp,
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
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
    /// DNS resolvers the workload may query (port 53). Queries over UDP and TCP are relayed by
    /// the companion, which remembers every answer: what binds the names of `sni`/`host`
    /// allow rules to addresses. Needed by any policy with such a rule.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
    /// What plaintext HTTP requests with `%2F`/`%5C` in their path get: refused (default), or
    /// kept encoded as data for upstreams that never decode them.
    #[serde(default, skip_serializing_if = "is_default")]
    pub path_escaped_slashes: EscapedSlashes,
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
    /// `tcp` (default), `udp` or `icmp`.
    #[serde(default, skip_serializing_if = "is_default")]
    pub protocol: Protocol,
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
    /// Compared with the request's normalized path ([`crate::http_path::normalize`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Compare `path_prefix` ASCII case-insensitively (for upstreams that serve `/Admin` as
    /// `/admin`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub path_ignore_case: bool,
    /// Credential the companion injects into matching plaintext HTTP requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker: Option<Broker>,
    /// The destination is an nhi workload: connections this (allow) rule matches are carried
    /// over mutual TLS to its companion, whose X.509-SVID must name an identity matching
    /// `peer`. Fail-closed: never plaintext instead (issue 18).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<EgressMtls>,
}

/// `mtls = { peer = "spiffe://td/ns/prod/sa/db" }` on an egress rule.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EgressMtls {
    /// SPIFFE ID or `*` glob the destination's companion must prove in the handshake.
    pub peer: String,
    /// Connections kept handshaken ahead of need for each address and port of this rule once
    /// in use (default `[egress] mtls_warm`; 0: every connection handshakes when it opens).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm: Option<usize>,
}

/// How an inbound rule takes plaintext next to mutual TLS.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MtlsMode {
    /// Only mutual TLS from a companion; plaintext is refused (and audited).
    #[default]
    Strict,
    /// Mutual TLS is checked when offered; plaintext is let through and audited as
    /// unauthenticated (for migrating callers).
    Permissive,
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

/// One `[[policy.inbound]]` rule: calls to `ports` from an identity matching `allow`, proven
/// either by `Authorization: Bearer <JWT-SVID>` for `audience` (HTTP), or by the caller's
/// companion in a mutual TLS handshake (`mtls`, any TCP protocol; issue 18).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InboundRule {
    pub id: String,
    pub ports: Vec<u16>,
    /// SPIFFE IDs or `*` globs allowed to call.
    pub allow: Vec<String>,
    /// The audience callers' JWT-SVIDs carry (the JWT check); not with `mtls`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub audience: String,
    /// Callers prove themselves in a mutual TLS handshake instead of a JWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,
    /// What the application on these ports speaks (with `mtls`): see [`AppProtocol`].
    #[serde(default, skip_serializing_if = "AppProtocol::is_auto")]
    pub app_protocol: AppProtocol,
}

/// What an mTLS callee's application speaks, as Kubernetes' `appProtocol` and Istio's port
/// names declare it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AppProtocol {
    /// Told from the first bytes: HTTP/1 and h2c are served request by request with the
    /// verified caller in a header, anything else is relayed as bytes. Bytes that could still
    /// begin an HTTP request when the 500 ms wait ends are taken for HTTP (never relayed with
    /// a caller-set header), so a client that sends a bare word and waits needs `tcp`.
    #[default]
    Auto,
    /// Always HTTP (HTTP/1 or h2c): nothing is ever relayed as bytes.
    Http,
    /// Always bytes, relayed at once (no wait, no header: the application must not read
    /// the caller from one).
    Tcp,
}

impl AppProtocol {
    pub fn is_auto(&self) -> bool {
        *self == AppProtocol::Auto
    }
}

impl InboundRule {
    /// Whether `spiffe_id` may call under this rule.
    pub fn allows(&self, spiffe_id: &str) -> bool {
        self.allow
            .iter()
            .any(|p| crate::select::glob_match(p, spiffe_id))
    }
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
    /// The deciding rule's destination is an nhi workload reached over mutual TLS.
    pub mtls: Option<&'p EgressMtls>,
    /// Position of the deciding rule in `egress` (`None`: the default).
    pub index: Option<usize>,
    /// The name (SNI, or HTTP host without port) the original destination must resolve to for
    /// this verdict to stand; when it does not, evaluation goes on after `index`.
    pub bind: Option<&'p str>,
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

/// Whether `ip` is the literal address `name` spells (an IP in an `sni`/`host` needs no DNS):
/// `Some(equal)`, or `None` when `name` is not an IP address.
pub fn literal_binding(name: &str, ip: IpAddr) -> Option<bool> {
    let addr: IpAddr = name.parse().ok()?;
    Some(canonical_ip(addr) == canonical_ip(ip))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is; others unchanged.
pub fn canonical_ip(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
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

    /// An allow rule that names its destination (`sni`, `host`): it holds only for the
    /// addresses the name resolves to, never for wherever the workload sent it.
    pub fn binds_name(&self) -> bool {
        self.action == Action::Allow && (self.sni.is_some() || self.host.is_some())
    }

    /// Whether the rule needs DNS to bind its name (an IP literal binds itself).
    pub fn binds_by_dns(&self) -> bool {
        self.binds_name()
            && [&self.sni, &self.host]
                .into_iter()
                .flatten()
                .any(|p| p.parse::<IpAddr>().is_err())
    }

    /// Destination address and port conditions.
    pub fn matches_l4(&self, dest: Option<SocketAddr>) -> bool {
        let ip_ok = self.cidr.is_empty()
            || dest.is_some_and(|d| self.cidr.iter().any(|c| c.contains(d.ip())));
        let port_ok = self.ports.is_empty() || dest.is_some_and(|d| self.ports.contains(&d.port()));
        ip_ok && port_ok
    }

    /// Whether the rule decides this TCP connection or request (UDP and ICMP rules never do:
    /// the kernel applies them).
    pub fn matches(&self, f: &Facts) -> bool {
        if self.protocol != Protocol::Tcp || !self.matches_l4(f.dest) {
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
                if !crate::http_path::has_prefix(h.path, p, self.path_ignore_case) {
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
        self.subjects().covers(spiffe_id, rule)
    }

    /// Whom the policy covers.
    pub fn subjects(&self) -> Subjects<'_> {
        Subjects {
            spiffe_ids: &self.spiffe_ids,
            rules: &self.rules,
        }
    }

    /// The first egress rule that matches decides; otherwise the default. A verdict with
    /// `bind` set stands only if the destination is an address of that name: see
    /// [`Policy::decide_from`].
    pub fn decide<'f>(&'f self, f: &Facts<'f>) -> Verdict<'f> {
        self.decide_from(0, f)
    }

    /// [`Policy::decide`] starting at egress rule `start`: when a verdict's name does not bind
    /// to the destination, the caller goes on with `decide_from(index + 1, ..)`.
    pub fn decide_from<'f>(&'f self, start: usize, f: &Facts<'f>) -> Verdict<'f> {
        for (i, r) in self.egress.iter().enumerate().skip(start) {
            if r.matches(f) {
                let bind = if r.binds_name() {
                    if r.sni.is_some() {
                        f.sni
                    } else {
                        f.http.and_then(|h| h.host).map(host_without_port)
                    }
                } else {
                    None
                };
                return Verdict {
                    action: r.action,
                    rule: Some(&r.id),
                    broker: r.broker.as_ref(),
                    mtls: r.mtls.as_ref(),
                    index: Some(i),
                    bind,
                };
            }
        }
        Verdict {
            action: self.default,
            rule: None,
            broker: None,
            mtls: None,
            index: None,
            bind: None,
        }
    }

    /// Whether a connection to `dest` must be looked into (ClientHello, HTTP request) before
    /// deciding: some rule that could apply to it depends on SNI or HTTP.
    pub fn needs_inspection(&self, dest: SocketAddr) -> bool {
        self.egress.iter().any(|r| {
            r.protocol == Protocol::Tcp
                && (r.needs_tls() || r.needs_http())
                && r.matches_l4(Some(dest))
        })
    }

    /// Whether `dest` is one of the policy's DNS resolvers on port 53 (relayed by the
    /// companion, whatever the rules say).
    pub fn is_resolver(&self, dest: SocketAddr) -> bool {
        dest.port() == 53
            && self
                .dns
                .iter()
                .any(|r| canonical_ip(*r) == canonical_ip(dest.ip()))
    }

    /// The UDP and ICMP rules, in order: what `nhid` compiles into the kernel's rules.
    pub fn packet_rules(&self) -> impl Iterator<Item = &EgressRule> {
        self.egress.iter().filter(|r| r.protocol != Protocol::Tcp)
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
        self.subjects()
            .validate(trust_domain, rule_exists)
            .map_err(ctx)?;
        let mut seen = std::collections::BTreeSet::new();
        for d in &self.dns {
            if d.is_loopback() || d.is_unspecified() || d.is_multicast() {
                return Err(ctx(format!(
                    "dns {d}: a resolver outside the workload's own namespace, e.g. the cluster DNS service"
                )));
            }
            if !seen.insert(*d) {
                return Err(ctx(format!("dns {d} is listed twice")));
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for r in &self.egress {
            if !ids.insert(r.id.as_str()) {
                return Err(ctx(format!("rule id {:?} is used twice", r.id)));
            }
            r.validate()
                .map_err(|e| ctx(format!("egress {:?}: {e}", r.id)))?;
            if r.binds_by_dns() && self.dns.is_empty() {
                let what = r
                    .sni
                    .as_ref()
                    .map(|s| format!("sni {s:?}"))
                    .or_else(|| r.host.as_ref().map(|h| format!("host {h:?}")))
                    .unwrap_or_default();
                return Err(ctx(format!(
                    "egress {:?} allows by name ({what}); a name holds only for the addresses it resolves to, so the policy needs `dns` (the resolvers the workload uses, e.g. dns = [\"10.96.0.10\"])",
                    r.id
                )));
            }
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
            match (r.mtls, r.audience.is_empty()) {
                (None, true) => {
                    return Err(c(
                        "needs an `audience` the callers' tokens carry, or `mtls`".into(),
                    ))
                }
                (Some(_), false) => {
                    return Err(c(
                        "`mtls` and `audience` exclude each other: the caller proves itself in the handshake".into(),
                    ))
                }
                (None, false) if !r.app_protocol.is_auto() => {
                    return Err(c(
                        "`app_protocol` is for `mtls` rules (a JWT-checked rule is HTTP)".into(),
                    ))
                }
                _ => {}
            }
        }
        for r in &self.egress {
            let Some(m) = &r.mtls else { continue };
            let c = |m: String| ctx(format!("egress {:?}: {m}", r.id));
            if r.action != Action::Allow {
                return Err(c("`mtls` is for allow rules".into()));
            }
            if r.protocol != Protocol::Tcp {
                return Err(c("`mtls` carries TCP only".into()));
            }
            if !m.peer.starts_with("spiffe://") {
                return Err(c(format!(
                    "mtls peer {:?} must start with spiffe://",
                    m.peer
                )));
            }
            if m.warm.is_some_and(|w| w > MAX_MTLS_WARM) {
                return Err(c(format!("mtls warm: at most {MAX_MTLS_WARM}")));
            }
            if r.cidr.is_empty() {
                return Err(c(
                    "`mtls` needs the destination's addresses (`cidr`): which workload is it?"
                        .into(),
                ));
            }
            if r.broker.is_some()
                || !r.methods.is_empty()
                || r.path_prefix.is_some()
                || r.sni.is_some()
                || r.host.is_some()
            {
                return Err(c(
                    "`mtls` carries the connection as it is: no sni, host, broker, methods or path (the callee's inbound rule decides)".into(),
                ));
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
        if self.protocol != Protocol::Tcp {
            if self.needs_tls() || self.needs_http() || self.path_ignore_case {
                return Err(format!(
                    "sni, host, methods, path_prefix and broker are TCP conditions; a {:?} rule matches by cidr{} only",
                    self.protocol,
                    if self.protocol == Protocol::Udp { " and ports" } else { "" }
                ));
            }
            if self.protocol == Protocol::Icmp && !self.ports.is_empty() {
                return Err("ICMP has no ports; match it by cidr".into());
            }
        }
        if self.path_ignore_case && self.path_prefix.is_none() {
            return Err("path_ignore_case needs a path_prefix".into());
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
            // Requests are compared in normal form: a prefix in any other form never matches.
            match crate::http_path::normalize(p, EscapedSlashes::Keep) {
                Ok(n) if n == *p => {}
                Ok(n) => {
                    return Err(format!(
                        "path_prefix {p:?}: requests are compared in normal form, write {n:?}"
                    ))
                }
                Err(e) => return Err(format!("path_prefix {p:?}: {e}")),
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

    #[test]
    fn mtls_rules_name_their_peers_and_exclude_jwt_checks() {
        let check = |body: &str| {
            policy(&format!(
                "[[policy]]\nid = \"p\"\nspiffe_ids = [\"spiffe://td/a\"]\n{body}"
            ))
            .validate("td", &EgressConfig::default(), |_| true)
        };
        let ok_in = "[[policy.inbound]]\nid = \"i\"\nports = [7000]\nallow = [\"spiffe://td/b\"]\nmtls = \"strict\"\n";
        check(ok_in).unwrap();
        let p = policy(&format!(
            "[[policy]]\nid = \"p\"\nspiffe_ids = [\"spiffe://td/a\"]\n{ok_in}"
        ));
        let r = p.inbound_for_port(7000).unwrap();
        assert_eq!(r.mtls, Some(MtlsMode::Strict));
        assert!(r.allows("spiffe://td/b") && !r.allows("spiffe://td/c"));
        let e = check(&format!("{ok_in}audience = \"x\"\n")).unwrap_err();
        assert!(e.contains("exclude each other"), "{e}");
        assert_eq!(r.app_protocol, AppProtocol::Auto);
        let p = policy(&format!(
            "[[policy]]\nid = \"p\"\nspiffe_ids = [\"spiffe://td/a\"]\n{ok_in}app_protocol = \"tcp\"\n"
        ));
        assert_eq!(
            p.inbound_for_port(7000).unwrap().app_protocol,
            AppProtocol::Tcp
        );
        check(&format!("{ok_in}app_protocol = \"http\"\n")).unwrap();
        let e = check("[[policy.inbound]]\nid = \"i\"\nports = [7000]\nallow = [\"spiffe://td/b\"]\naudience = \"x\"\napp_protocol = \"tcp\"\n").unwrap_err();
        assert!(e.contains("`app_protocol` is for `mtls`"), "{e}");
        let e =
            check("[[policy.inbound]]\nid = \"i\"\nports = [7000]\nallow = [\"spiffe://td/b\"]\n")
                .unwrap_err();
        assert!(e.contains("or `mtls`"), "{e}");
        let out = |extra: &str| {
            check(&format!(
                "[[policy.egress]]\nid = \"e\"\ncidr = [\"10.0.0.2/32\"]\nports = [7000]\nmtls = {{ peer = \"spiffe://td/b\" }}\n{extra}"
            ))
        };
        out("").unwrap();
        let p = policy(
            "[[policy]]\nid = \"p\"\nspiffe_ids = [\"spiffe://td/a\"]\n[[policy.egress]]\nid = \"e\"\ncidr = [\"10.0.0.2/32\"]\nmtls = { peer = \"spiffe://td/b\" }\n",
        );
        let v = p.decide(&Facts {
            dest: Some("10.0.0.2:7000".parse().unwrap()),
            ..Default::default()
        });
        assert_eq!(v.mtls.map(|m| m.peer.as_str()), Some("spiffe://td/b"));
        assert!(out("action = \"deny\"\n")
            .unwrap_err()
            .contains("allow rules"));
        assert!(out("methods = [\"GET\"]\n")
            .unwrap_err()
            .contains("as it is"));
        assert!(out("sni = \"x.example\"\n").is_err());
        let e = check(
            "[[policy.egress]]\nid = \"e\"\nports = [7000]\nmtls = { peer = \"spiffe://td/b\" }\n",
        )
        .unwrap_err();
        assert!(e.contains("`cidr`"), "{e}");
        // How many connections a rule keeps handshaken ahead: 0..=MAX_MTLS_WARM.
        let warm = |n: usize| {
            check(&format!(
                "[[policy.egress]]\nid = \"e\"\ncidr = [\"10.0.0.2/32\"]\nmtls = {{ peer = \"spiffe://td/b\", warm = {n} }}\n"
            ))
        };
        warm(0).unwrap();
        warm(MAX_MTLS_WARM).unwrap();
        let e = warm(MAX_MTLS_WARM + 1).unwrap_err();
        assert!(e.contains("mtls warm: at most 8"), "{e}");
        assert_eq!(EgressConfig::default().mtls_warm, 2);
    }

    fn sample() -> Policy {
        policy(
            r#"
[[policy]]
id = "web"
spiffe_ids = ["spiffe://td/container/*"]
default = "deny"
dns = ["10.0.0.53"]
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
    fn name_allows_carry_the_name_to_bind_and_evaluation_can_go_on() {
        let p = sample();
        let tls = Facts {
            dest: dest("192.0.2.1:443"),
            sni: Some("api.example.com"),
            http: None,
        };
        let v = p.decide(&tls);
        assert_eq!(
            (v.action, v.rule, v.bind),
            (Action::Allow, Some("tls"), Some("api.example.com"))
        );
        // When the name does not resolve to 192.0.2.1 the caller goes on after the rule: here
        // the default (deny) decides.
        let next = p.decide_from(v.index.unwrap() + 1, &tls);
        assert_eq!(
            (next.action, next.rule, next.bind),
            (Action::Deny, None, None)
        );
        // HTTP host rules bind the Host header's name, without its port.
        let http = Facts {
            dest: dest("10.1.0.9:80"),
            sni: None,
            http: Some(HttpFacts {
                host: Some("api.example.com:80"),
                method: "GET",
                path: "/v1",
            }),
        };
        assert_eq!(p.decide(&http).bind, Some("api.example.com"));
        // Address-only rules and deny rules bind nothing.
        let l4 = Facts {
            dest: dest("10.2.0.5:5432"),
            ..Default::default()
        };
        assert_eq!(p.decide(&l4).bind, None);
        assert!(!p.egress_rule("no-admin").unwrap().binds_name());
        assert_eq!(
            literal_binding("10.0.0.1", "10.0.0.1".parse().unwrap()),
            Some(true)
        );
        assert_eq!(
            literal_binding("10.0.0.1", "::ffff:10.0.0.1".parse().unwrap()),
            Some(true)
        );
        assert_eq!(
            literal_binding("10.0.0.1", "10.0.0.2".parse().unwrap()),
            Some(false)
        );
        assert_eq!(
            literal_binding("a.example", "10.0.0.2".parse().unwrap()),
            None
        );
        assert!(p.is_resolver("10.0.0.53:53".parse().unwrap()));
        assert!(!p.is_resolver("10.0.0.53:5353".parse().unwrap()));
        assert!(!p.is_resolver("10.0.0.54:53".parse().unwrap()));
    }

    #[test]
    fn name_allows_need_resolvers_and_literals_do_not() {
        let base = "[[policy]]\nid = \"p\"\nspiffe_ids = [\"spiffe://td/x\"]\n";
        let v = |extra: &str| {
            policy(&format!("{base}{extra}")).validate("td", &EgressConfig::default(), |_| true)
        };
        let e = v("[[policy.egress]]\nid = \"a\"\nsni = \"*.github.com\"\n").unwrap_err();
        assert!(e.contains("needs `dns`"), "{e}");
        let e = v("[[policy.egress]]\nid = \"a\"\nhost = \"api.example.com\"\n").unwrap_err();
        assert!(e.contains("needs `dns`"), "{e}");
        assert!(v("[[policy.egress]]\nid = \"a\"\nhost = \"10.1.2.3\"\n").is_ok());
        assert!(
            v("[[policy.egress]]\nid = \"a\"\naction = \"deny\"\nsni = \"*.evil.com\"\n").is_ok()
        );
        assert!(v(
            "dns = [\"10.96.0.10\"]\n[[policy.egress]]\nid = \"a\"\nsni = \"*.github.com\"\n"
        )
        .is_ok());
        let e = v("dns = [\"127.0.0.53\"]\n").unwrap_err();
        assert!(e.contains("outside the workload"), "{e}");
        let e = v("dns = [\"10.0.0.1\", \"10.0.0.1\"]\n").unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn udp_and_icmp_rules_are_for_the_kernel_and_take_only_addresses() {
        let p = policy(
            r#"
[[policy]]
id = "p"
spiffe_ids = ["spiffe://td/x"]
default = "deny"
[[policy.egress]]
id = "ntp"
protocol = "udp"
cidr = ["10.0.0.0/8"]
ports = [123]
[[policy.egress]]
id = "ping"
protocol = "icmp"
cidr = ["10.0.0.1"]
[[policy.egress]]
id = "web"
ports = [123]
"#,
        );
        assert!(p.validate("td", &EgressConfig::default(), |_| true).is_ok());
        let ids: Vec<&str> = p.packet_rules().map(|r| r.id.as_str()).collect();
        assert_eq!(ids, ["ntp", "ping"]);
        // A TCP connection to 10.0.0.1:123 is decided by the TCP rule, never the UDP one.
        let v = p.decide(&Facts {
            dest: dest("10.0.0.1:123"),
            ..Default::default()
        });
        assert_eq!(v.rule, Some("web"));
        assert!(!p.needs_inspection("10.0.0.1:123".parse().unwrap()));
        let base = "[[policy]]\nid = \"p\"\nspiffe_ids = [\"spiffe://td/x\"]\n[[policy.egress]]\nid = \"a\"\n";
        let e = |extra: &str| {
            policy(&format!("{base}{extra}"))
                .validate("td", &EgressConfig::default(), |_| true)
                .unwrap_err()
        };
        assert!(e("protocol = \"udp\"\nsni = \"a.b\"\n").contains("TCP conditions"));
        assert!(e("protocol = \"udp\"\npath_prefix = \"/a\"\n").contains("TCP conditions"));
        assert!(e("protocol = \"icmp\"\nports = [1]\n").contains("no ports"));
        assert!(e("path_ignore_case = true\n").contains("needs a path_prefix"));
        assert!(e("path_prefix = \"/a/../admin\"\n").contains("normal form"));
        assert!(e("path_prefix = \"//admin\"\n").contains("\"/admin\""));
        assert!(toml::from_str::<EgressRule>("id = \"a\"\nprotocol = \"sctp\"\n").is_err());
    }

    #[test]
    fn path_rules_compare_normalized_paths_optionally_ignoring_case() {
        let p = policy(
            r#"
[[policy]]
id = "p"
spiffe_ids = ["spiffe://td/x"]
[[policy.egress]]
id = "no-admin"
action = "deny"
path_prefix = "/admin"
path_ignore_case = true
[[policy.egress]]
id = "no-secret"
action = "deny"
path_prefix = "/secret"
"#,
        );
        let f = |path| Facts {
            dest: dest("10.0.0.1:80"),
            sni: None,
            http: Some(HttpFacts {
                host: None,
                method: "GET",
                path,
            }),
        };
        assert_eq!(p.decide(&f("/ADMIN/x")).rule, Some("no-admin"));
        assert_eq!(
            p.decide(&f("/Secret")).rule,
            None,
            "case-sensitive by default"
        );
        assert_eq!(p.decide(&f("/secret/x")).rule, Some("no-secret"));
    }

    #[test]
    fn policies_round_trip_as_json() {
        let p = sample();
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<Policy>(&s).unwrap(), p);
    }
}
