//! The edge proxy: `nhid`'s nftables rules in the workload's network namespace redirect its
//! outbound TCP here (and inbound TCP to ports with inbound rules to [`inbound`]). For each
//! connection the companion recovers the original destination (`SO_ORIGINAL_DST`), looks at the
//! first bytes without consuming them when the policy needs to (TLS ClientHello → SNI; HTTP →
//! per-request decisions), and then either resets the connection before a byte reaches the
//! destination, splices it through, or serves it request by request (403 for denied requests,
//! brokered credentials injected into allowed ones). Every decision is an audit event.

pub mod dns;
pub mod http;
pub mod inbound;
pub mod mtls;
pub mod sniff;
pub mod splice;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use nhi_core::audit::{now_ms, AuditEvent, AuditKind, CredentialRef, Decision, Destination};
use nhi_core::policy::{Action, Broker, EgressConfig, Facts, Policy};
use nhi_core::wire::{Event, SecretValue};
use tokio::net::{TcpListener, TcpStream};

use crate::audit::Recorder;
use crate::cache::{now_unix, Creds};
use crate::channel::{Channel, Pushed};
use crate::limits::{Bounds, Conn, Governor};
use nhi_core::config::CompanionLimits;
use sniff::{sniff, Sniffed, MAX_HELLO};

/// How long the first bytes of a connection are waited for when the policy needs them; a
/// protocol where the server speaks first is decided by address and port after this.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Why a connection the limits closed ends (audited).
pub(crate) const LIMITS_CLOSED: &str =
    "closed by the companion's connection limits (idle, or evicted for a new connection)";

/// The companion's edge state: the current policy (swapped on reload) and what brokering needs.
pub struct Edge {
    policy: RwLock<Option<Arc<Policy>>>,
    pub recorder: Recorder,
    channel: Channel,
    pub creds: Arc<Creds>,
    /// Brokered secrets by egress rule id, until nhid's lease on them ends.
    brokered: Mutex<HashMap<String, Arc<SecretValue>>>,
    /// What names resolved to (DNS answers relayed or asked for): binds `sni`/`host` allows.
    pub(crate) names: dns::Names,
    /// The workload's SVID and the bundle, for mutual TLS with other companions, and the two
    /// TLS configs over them (built once; what changes is read at each handshake).
    tls: Arc<mtls::Material>,
    pub(crate) tls_client: Arc<rustls::ClientConfig>,
    pub(crate) tls_server: Arc<rustls::ServerConfig>,
    /// Mutual TLS connections handshaken ahead of need, and how many to keep per destination
    /// (`[egress] mtls_warm`, a rule's `warm` overriding it).
    pub(crate) pool: Arc<mtls::pool::Pool>,
    pub(crate) mtls_warm: usize,
}

/// A decision after name binding: owned, with why a name rule was passed over.
#[derive(Debug, Clone)]
pub(crate) struct Decided {
    pub(crate) action: Action,
    pub(crate) rule: Option<String>,
    pub(crate) broker: Option<Broker>,
    pub(crate) mtls: Option<nhi_core::policy::EgressMtls>,
    /// Rules that matched by name but not by address, and why.
    pub(crate) note: Option<String>,
}

impl Edge {
    pub fn new(
        policy: Option<Policy>,
        egress: EgressConfig,
        recorder: Recorder,
        channel: Channel,
        creds: Arc<Creds>,
        trust_domain: &str,
        denied_peers: Vec<String>,
    ) -> Arc<Self> {
        let tls = mtls::Material::new(
            trust_domain,
            &String::from_utf8_lossy(&creds.trust().bundle),
        );
        tls.set_denied(denied_peers);
        let tls_client = mtls::client_config(&tls).expect("TLS 1.3 with ring is supported");
        let tls_server = mtls::server_config(&tls).expect("TLS 1.3 with ring is supported");
        Arc::new(Edge {
            tls,
            tls_client,
            tls_server,
            pool: Arc::default(),
            mtls_warm: egress.mtls_warm,
            policy: RwLock::new(policy.map(Arc::new)),
            recorder,
            channel,
            creds,
            brokered: Mutex::new(HashMap::new()),
            names: dns::Names::new(egress.dns_min_ttl),
        })
    }

    /// The policy's verdict for a connection or request. A rule that allows by name stands
    /// only if the original destination is an address of that name; otherwise evaluation goes
    /// on with the next rule (and the passed-over rule is named in `note`).
    pub(crate) async fn decide(&self, policy: &Policy, facts: &Facts<'_>) -> Decided {
        let mut from = 0;
        let mut notes: Vec<String> = Vec::new();
        loop {
            let v = policy.decide_from(from, facts);
            if let (Some(name), Some(dest), Some(i)) = (v.bind, facts.dest, v.index) {
                if let Err(why) = self.name_binds(&policy.dns, name, dest.ip()).await {
                    notes.push(format!(
                        "rule {:?} not applied: {why}",
                        v.rule.unwrap_or("?")
                    ));
                    from = i + 1;
                    continue;
                }
            }
            return Decided {
                action: v.action,
                rule: v.rule.map(str::to_string),
                broker: v.broker.cloned(),
                mtls: v.mtls.cloned(),
                note: (!notes.is_empty()).then(|| notes.join("; ")),
            };
        }
    }

    /// The TLS material, brought up to date: the workload's current X.509-SVID (fetched from
    /// nhid if the cache has none) and the current bundle.
    pub(crate) async fn tls_material(&self) -> Result<(), String> {
        let x = self
            .creds
            .x509()
            .await
            .map_err(|e| format!("this workload's X.509-SVID: {e:?}"))?;
        self.tls
            .set_svid(&x.serial, &x.cert_chain_pem, &x.key_pem)?;
        self.tls.set_bundle(&self.creds.trust().bundle);
        Ok(())
    }

    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes the events that concern the edge (a new policy; a secret changed, a revocation:
    /// drop brokered values). Returns the event for the credential cache to apply too.
    pub fn apply(&self, pushed: &Pushed) {
        match pushed {
            Pushed::Event(Event::Policy { policy }) => {
                self.set_policy(policy.as_deref().cloned());
            }
            // Re-adopted by a restarted nhid: its current policy applies from now on.
            Pushed::Readopted(init) => {
                self.set_policy(init.policy.clone());
                self.tls.set_denied(init.denied_peers.clone());
            }
            Pushed::Event(Event::DeniedPeers { peers }) => self.tls.set_denied(peers.clone()),
            Pushed::Event(Event::SecretChanged { .. } | Event::Revoked { .. }) => {
                self.brokered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clear();
            }
            _ => {}
        }
    }

    fn set_policy(&self, policy: Option<Policy>) {
        let id = policy.as_ref().map(|p| p.id.clone());
        *self.policy.write().unwrap_or_else(|p| p.into_inner()) = policy.map(Arc::new);
        self.brokered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        crate::log!("edge policy now {id:?}");
    }

    /// The header value a broker injects, and what the audit log says about it.
    pub(crate) async fn credential(
        &self,
        rule_id: &str,
        broker: &Broker,
    ) -> Result<(String, CredentialRef), String> {
        if let Some(aud) = &broker.jwt_audience {
            let j = self
                .creds
                .jwt(vec![aud.clone()])
                .await
                .map_err(|e| format!("JWT-SVID for {aud:?}: {e:?}"))?;
            let value = nhi_core::policy::render_broker(&broker.format, &j.token);
            return Ok((
                value,
                CredentialRef {
                    name: "jwt-svid".into(),
                    version: Some(format!("aud={aud}")),
                },
            ));
        }
        let now = now_unix();
        let cached = self
            .brokered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(rule_id)
            .filter(|s| now < s.expires_at)
            .cloned();
        let s = match cached {
            Some(s) => s,
            None => {
                let s = Arc::new(
                    self.channel
                        .brokered_secret(rule_id)
                        .await
                        .map_err(|e| e.to_string())?,
                );
                self.brokered
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(rule_id.into(), s.clone());
                s
            }
        };
        let raw = zeroize::Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(&s.value_b64)
                .map_err(|_| "undecodable secret".to_string())?,
        );
        let text = std::str::from_utf8(&raw).map_err(|_| "brokered secret is not text")?;
        Ok((
            nhi_core::policy::render_broker(&broker.format, text),
            CredentialRef {
                name: format!("secret:{}", s.name),
                version: Some(s.version.to_string()),
            },
        ))
    }
}

/// The destination the workload dialed before nftables redirected it here.
pub fn original_dst(s: &TcpStream) -> std::io::Result<SocketAddr> {
    let mut addr: libc::sockaddr_in = unsafe_zeroed();
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `addr`, a properly sized and aligned
    // sockaddr_in we own; the fd is a live socket borrowed from `s`.
    let r = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_IP,
            libc::SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddr::V4(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    )))
}

fn unsafe_zeroed() -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Resets `s` (RST, no FIN): the workload sees the connection refused mid-way, nothing was
/// ever sent to the destination.
pub(crate) fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}

/// Accepts redirected outbound connections until the listener fails, within `limits` (see
/// `crate::limits`: a full listener closes its quietest connection for a new one).
pub async fn serve_outbound(listener: TcpListener, edge: Arc<Edge>, limits: CompanionLimits) {
    let gov = governor(
        format!("edge proxy {}", crate::http::local(&listener)),
        &limits,
    );
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                crate::log!("proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(conn) = gov.admit_fairly(None).await else {
            refuse(&edge, AuditKind::Connection, peer, stream);
            continue;
        };
        tokio::spawn(outbound(edge.clone(), stream, peer, Arc::new(conn), limits));
    }
}

/// Resets a connection the listener's limits refused (every slot has a request waiting), and
/// audits it.
pub(crate) fn refuse(edge: &Edge, kind: AuditKind, peer: SocketAddr, stream: TcpStream) {
    let mut ev = event(kind, peer, Destination::default());
    ev.decision = Decision::Error;
    ev.detail = Some("refused: every connection of this listener has a request waiting".into());
    finish(edge, ev, Instant::now());
    reset(stream);
}

/// The governor of a proxy listener, its sweeper started.
pub(crate) fn governor(name: String, limits: &CompanionLimits) -> Arc<Governor> {
    let g = Governor::new(
        name,
        Bounds {
            max_connections: limits.proxy_connections,
            first_request: limits.header_timeout,
            idle: limits.proxy_idle_timeout,
            max_age: None,
        },
    );
    tokio::spawn(g.clone().watch());
    g
}

pub(crate) fn event(kind: AuditKind, source: SocketAddr, dest: Destination) -> AuditEvent {
    AuditEvent {
        kind,
        source: Some(source.to_string()),
        destination: Some(dest),
        ..Default::default()
    }
}

pub(crate) fn finish(edge: &Edge, mut ev: AuditEvent, started: Instant) {
    ev.ts_ms = now_ms();
    ev.duration_ms = started.elapsed().as_millis() as u64;
    edge.recorder.record(ev);
}

async fn outbound(
    edge: Arc<Edge>,
    client: TcpStream,
    peer: SocketAddr,
    conn: Arc<Conn>,
    limits: CompanionLimits,
) {
    let started = Instant::now();
    let _ = client.set_nodelay(true);
    let dest = match original_dst(&client) {
        Ok(d) => d,
        Err(e) => {
            // Not redirected by our rules (someone dialed the proxy port directly).
            let mut ev = event(AuditKind::Connection, peer, Destination::default());
            ev.decision = Decision::Deny;
            ev.detail = Some(format!("no original destination: {e}"));
            finish(&edge, ev, started);
            reset(client);
            return;
        }
    };
    let mut dst = Destination {
        addr: Some(dest.to_string()),
        ..Default::default()
    };
    let policy = edge.policy();
    if let Some(p) = &policy {
        if p.is_resolver(dest) {
            // DNS over TCP to one of the policy's resolvers: relayed, answers learned.
            dns::relay_tcp(edge, client, peer, dest).await;
            return;
        }
    }
    let mut sni = None;
    let mut is_http = false;
    if let Some(p) = &policy {
        if p.needs_inspection(dest) {
            // An eviction ends the wait at once (checked below), so a connection closed by the
            // limits never holds its socket for the whole sniff timeout.
            let first = tokio::select! {
                f = peek_first(&client) => f,
                () = conn.slot().killed() => Sniffed::Other,
            };
            match first {
                Sniffed::Tls(s) => sni = s,
                Sniffed::Http => is_http = true,
                _ => {}
            }
        }
    }
    if is_http {
        let policy = policy.expect("inspected only with a policy");
        http::serve(edge, client, peer, dest, policy, conn, limits).await;
        return;
    }
    dst.sni = sni.clone();
    let mut ev = event(AuditKind::Connection, peer, dst);
    if conn.slot().is_killed() {
        // Evicted while its first bytes were awaited.
        return fail(&edge, ev, started, client, LIMITS_CLOSED.into());
    }
    let (action, rule, note, over_mtls) = match &policy {
        Some(p) => {
            let facts = Facts {
                dest: Some(dest),
                sni: sni.as_deref(),
                http: None,
            };
            let d = edge.decide(p, &facts).await;
            (d.action, d.rule, d.note, d.mtls)
        }
        None => (Action::Allow, None, None, None),
    };
    ev.rule = rule;
    ev.detail = note;
    if action == Action::Deny {
        ev.decision = Decision::Deny;
        finish(&edge, ev, started);
        reset(client);
        return;
    }
    if let Some(m) = over_mtls {
        return mtls::originate(&edge, ev, started, client, dest, &m, &conn).await;
    }
    let connect = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dest));
    let upstream = tokio::select! {
        r = connect => match r {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => return fail(&edge, ev, started, client, format!("connect: {e}")),
            Err(_) => return fail(&edge, ev, started, client, "connect: timed out".into()),
        },
        () = conn.slot().killed() => {
            return fail(&edge, ev, started, client, LIMITS_CLOSED.into());
        }
    };
    let _ = upstream.set_nodelay(true);
    // Decided and connected: no longer waiting for a first request; idle now means no byte.
    conn.established();
    let res = splice::relay(&client, &upstream, &|| conn.touch(), conn.slot().killed()).await;
    match res {
        Ok((out, inn)) => {
            ev.bytes_out = out;
            ev.bytes_in = inn;
        }
        Err(e) => ev.detail = Some(format!("closed: {e}")),
    }
    finish(&edge, ev, started);
}

pub(crate) fn fail(
    edge: &Edge,
    mut ev: AuditEvent,
    started: Instant,
    client: TcpStream,
    why: String,
) {
    ev.decision = Decision::Error;
    ev.detail = Some(why);
    finish(edge, ev, started);
    reset(client);
}

/// Peeks until the first bytes say what the connection is, or [`SNIFF_TIMEOUT`] passes.
async fn peek_first(s: &TcpStream) -> Sniffed {
    // Small at first (a flood of half-open connections must not cost 16 KiB each); grown to
    // what the TLS record announces, up to MAX_HELLO.
    let mut buf = vec![0u8; 1024];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut last = 0;
    let mut pause = Duration::from_millis(2);
    loop {
        let n = match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Sniffed::Other,
        };
        if n == 0 {
            return Sniffed::Other;
        }
        match sniff(&buf[..n]) {
            Sniffed::NeedMore if n == buf.len() && buf.len() < MAX_HELLO => {
                let record = if buf[0] == 0x16 && n >= 5 {
                    5 + usize::from(u16::from_be_bytes([buf[3], buf[4]]))
                } else {
                    buf.len() * 2
                };
                buf.resize(record.clamp(buf.len() + 1, MAX_HELLO), 0);
            }
            Sniffed::NeedMore if n < buf.len() => {
                if n == last {
                    // Peek returns at once while the data is unchanged: wait for more, backing
                    // off so a thousand stalled handshakes do not spin the companion.
                    if tokio::time::timeout_at(deadline, s.readable())
                        .await
                        .is_err()
                    {
                        return Sniffed::Other;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(50));
                }
                last = n;
            }
            Sniffed::NeedMore => return Sniffed::Other,
            other => return other,
        }
    }
}
