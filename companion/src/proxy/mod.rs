//! The edge proxy: `nhid`'s nftables rules in the workload's network namespace redirect its
//! outbound TCP here (and inbound TCP to ports with inbound rules to [`inbound`]). For each
//! connection the companion recovers the original destination (`SO_ORIGINAL_DST`), looks at the
//! first bytes without consuming them when the policy needs to (TLS ClientHello → SNI; HTTP →
//! per-request decisions), and then either resets the connection before a byte reaches the
//! destination, splices it through, or serves it request by request (403 for denied requests,
//! brokered credentials injected into allowed ones). Every decision is an audit event.

pub mod http;
pub mod inbound;
pub mod sniff;
pub mod splice;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use nhi_core::audit::{now_ms, AuditEvent, AuditKind, CredentialRef, Decision, Destination};
use nhi_core::policy::{Action, Broker, Facts, Policy};
use nhi_core::wire::{CompanionRequest, CompanionResponse, SecretValue};
use tokio::net::{TcpListener, TcpStream};

use crate::audit::Recorder;
use crate::cache::{now_unix, Creds};
use crate::channel::Channel;
use sniff::{sniff, Sniffed, MAX_HELLO};

/// How long the first bytes of a connection are waited for when the policy needs them; a
/// protocol where the server speaks first is decided by address and port after this.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(500);
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most connections proxied at once (each direction); more wait in the accept queue.
const MAX_CONNECTIONS: usize = 4096;

/// The companion's edge state: the current policy (swapped on reload) and what brokering needs.
pub struct Edge {
    policy: RwLock<Option<Arc<Policy>>>,
    pub recorder: Recorder,
    channel: Channel,
    pub creds: Arc<Creds>,
    /// Brokered secrets by egress rule id, until nhid's lease on them ends.
    brokered: Mutex<HashMap<String, Arc<SecretValue>>>,
}

impl Edge {
    pub fn new(
        policy: Option<Policy>,
        recorder: Recorder,
        channel: Channel,
        creds: Arc<Creds>,
    ) -> Arc<Self> {
        Arc::new(Edge {
            policy: RwLock::new(policy.map(Arc::new)),
            recorder,
            channel,
            creds,
            brokered: Mutex::new(HashMap::new()),
        })
    }

    pub fn policy(&self) -> Option<Arc<Policy>> {
        self.policy
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Takes the events that concern the edge (a new policy; a secret changed, a revocation:
    /// drop brokered values). Returns the event for the credential cache to apply too.
    pub fn apply(&self, event: &CompanionResponse) {
        match event {
            CompanionResponse::Policy { policy } => {
                self.set_policy(policy.as_deref().cloned());
            }
            // Re-adopted by a restarted nhid: its current policy applies from now on.
            CompanionResponse::Init(init) => self.set_policy(init.policy.clone()),
            CompanionResponse::SecretChanged { .. } | CompanionResponse::Revoked { .. } => {
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
                let resp = self
                    .channel
                    .call(CompanionRequest::BrokeredSecret {
                        rule_id: rule_id.into(),
                    })
                    .await?;
                let s = match resp {
                    CompanionResponse::Secret(s) => Arc::new(s),
                    CompanionResponse::Denied { message }
                    | CompanionResponse::NotFound { message }
                    | CompanionResponse::Error { message }
                    | CompanionResponse::Busy { message } => return Err(message),
                    other => return Err(format!("unexpected answer: {other:?}")),
                };
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

/// Accepts redirected outbound connections until the listener fails.
pub async fn serve_outbound(listener: TcpListener, edge: Arc<Edge>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = slots.clone().acquire_owned().await.expect("never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                crate::log!("proxy accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let edge = edge.clone();
        tokio::spawn(async move {
            outbound(edge, stream, peer).await;
            drop(permit);
        });
    }
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

async fn outbound(edge: Arc<Edge>, client: TcpStream, peer: SocketAddr) {
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
    let mut sni = None;
    let mut is_http = false;
    if let Some(p) = &policy {
        if p.needs_inspection(dest) {
            match peek_first(&client).await {
                Sniffed::Tls(s) => sni = s,
                Sniffed::Http => is_http = true,
                _ => {}
            }
        }
    }
    if is_http {
        let policy = policy.expect("inspected only with a policy");
        http::serve(edge, client, peer, dest, policy).await;
        return;
    }
    dst.sni = sni.clone();
    let mut ev = event(AuditKind::Connection, peer, dst);
    let verdict = policy.as_ref().map(|p| {
        let v = p.decide(&Facts {
            dest: Some(dest),
            sni: sni.as_deref(),
            http: None,
        });
        (v.action, v.rule.map(str::to_string))
    });
    let (action, rule) = verdict.unwrap_or((Action::Allow, None));
    ev.rule = rule;
    if action == Action::Deny {
        ev.decision = Decision::Deny;
        finish(&edge, ev, started);
        reset(client);
        return;
    }
    let upstream = match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(dest)).await {
        Ok(Ok(u)) => u,
        Ok(Err(e)) => return fail(&edge, ev, started, client, format!("connect: {e}")),
        Err(_) => return fail(&edge, ev, started, client, "connect: timed out".into()),
    };
    let _ = upstream.set_nodelay(true);
    let res = splice::relay(&client, &upstream).await;
    match res {
        Ok((out, inn)) => {
            ev.bytes_out = out;
            ev.bytes_in = inn;
        }
        Err(e) => ev.detail = Some(format!("closed: {e}")),
    }
    finish(&edge, ev, started);
}

fn fail(edge: &Edge, mut ev: AuditEvent, started: Instant, client: TcpStream, why: String) {
    ev.decision = Decision::Error;
    ev.detail = Some(why);
    finish(edge, ev, started);
    reset(client);
}

/// Peeks until the first bytes say what the connection is, or [`SNIFF_TIMEOUT`] passes.
async fn peek_first(s: &TcpStream) -> Sniffed {
    let mut buf = vec![0u8; MAX_HELLO];
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    let mut last = 0;
    loop {
        let n = match tokio::time::timeout_at(deadline, s.peek(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => return Sniffed::Other,
        };
        if n == 0 {
            return Sniffed::Other;
        }
        match sniff(&buf[..n]) {
            Sniffed::NeedMore if n < buf.len() => {
                if n == last {
                    // Peek returns at once while the data is unchanged: wait for more.
                    if tokio::time::timeout_at(deadline, s.readable())
                        .await
                        .is_err()
                    {
                        return Sniffed::Other;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                last = n;
            }
            Sniffed::NeedMore => return Sniffed::Other,
            other => return other,
        }
    }
}
