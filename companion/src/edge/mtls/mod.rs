//! Mutual TLS between workloads (issue 18). The caller's companion
//! originates TLS 1.3 with its workload's X.509-SVID, the callee's companion terminates it and
//! requires one: each side checks the other's certificate the SPIFFE way (path validation up
//! to the trust bundle, exactly one `spiffe://` URI SAN in the trust domain, no host names) and
//! learns the peer's SPIFFE ID, which the edge then matches against its rules.
//!
//! What changes under live connections is read at each handshake, never baked into a config:
//! the workload's current SVID ([`Material::set_svid`], after each renewal) and the trust bundle
//! ([`Material::set_bundle`], after a CA rotation or a node cut off). Connections already
//! established keep the keys they negotiated.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Instant;

use nhi_core::audit::{AuditEvent, AuditKind, Decision, Destination, MtlsAudit, MtlsRole};
use nhi_core::config::CompanionLimits;
use nhi_core::policy::{AppProtocol, InboundRule, MtlsMode};
use tokio::net::TcpStream;

use super::{event, fail, finish, reset, Edge};
use crate::limits::Conn;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls13_signature, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

pub mod frame;
pub mod pool;
pub mod relay;
use relay::Buffered;

/// The ALPN protocol both companions speak, so a TLS connection from anything else (an app's
/// own TLS) is told apart from a companion's.
pub const ALPN: &[u8] = b"nhi-mtls/2";
/// The first version (no preface, no frames: one application connection per TLS connection),
/// still spoken with companions not yet upgraded, so a rolling upgrade never breaks a call.
pub const ALPN_V1: &[u8] = b"nhi-mtls/1";

/// ring's TLS 1.3 suites with AES-128-GCM first (ring lists AES-256 first): the records of
/// a bulk transfer are a large part of the companions' CPU, and AES-128 takes 10 rounds
/// where AES-256 takes 14 (Go's crypto/tls makes the same choice on hardware with AES).
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// The trust anchors of one bundle.
struct Anchors {
    pem: String,
    anchors: Vec<rustls_pki_types::TrustAnchor<'static>>,
}

/// What the TLS layer uses and what changes under it: the workload's SVID and the bundle.
pub struct Material {
    trust_domain: String,
    svid: RwLock<Option<(String, Arc<CertifiedKey>)>>,
    bundle: RwLock<Arc<Anchors>>,
    /// Peers refused whatever their certificate (revoked identities, nodes cut off).
    denied: RwLock<Arc<Vec<String>>>,
    algs: WebPkiSupportedAlgorithms,
    /// Bumped by every change above: a connection handshaken under an older generation is
    /// checked again (callee) or not used (caller's warm connections) before it carries bytes.
    generation: AtomicU64,
}

impl std::fmt::Debug for Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Material")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn pem_ders(pem: &str, label: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .filter_map(Result::ok)
        .filter(|p| p.label == label)
        .map(|p| p.contents)
        .collect()
}

/// The one `spiffe://` URI SAN of a certificate.
pub fn spiffe_id_of(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("certificate: {e}"))?;
    spiffe_id_in(&cert)
}

fn spiffe_id_in(cert: &x509_parser::certificate::X509Certificate<'_>) -> Result<String, String> {
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| format!("SAN: {e}"))?
        .ok_or("no SAN")?;
    let uris: Vec<&str> = sans
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] if one.starts_with("spiffe://") => Ok(one.to_string()),
        _ => Err(format!("not exactly one spiffe:// URI SAN: {uris:?}")),
    }
}

impl Material {
    pub fn new(trust_domain: &str, bundle_pem: &str) -> Arc<Self> {
        let m = Material {
            trust_domain: trust_domain.into(),
            svid: RwLock::new(None),
            bundle: RwLock::new(Arc::new(Anchors {
                pem: String::new(),
                anchors: Vec::new(),
            })),
            denied: RwLock::new(Arc::new(Vec::new())),
            algs: provider().signature_verification_algorithms,
            generation: AtomicU64::new(0),
        };
        m.set_bundle(bundle_pem.as_bytes());
        Arc::new(m)
    }

    /// The peers refused from the next handshake on (SPIFFE IDs or `*` globs).
    pub fn set_denied(&self, peers: Vec<String>) {
        let mut denied = self.denied.write().unwrap_or_else(|p| p.into_inner());
        if **denied != peers {
            *denied = Arc::new(peers);
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Changes with every new SVID, bundle or list of denied peers.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    /// Replaces the trust anchors if `bundle_pem` differs from the current bundle (compared
    /// as bytes, without a copy: this runs for every connection).
    pub fn set_bundle(&self, bundle_pem: &[u8]) {
        if self
            .bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .pem
            .as_bytes()
            == bundle_pem
        {
            return;
        }
        let bundle_pem = String::from_utf8_lossy(bundle_pem);
        let anchors = pem_ders(&bundle_pem, "CERTIFICATE")
            .into_iter()
            .filter_map(|der| {
                webpki::anchor_from_trusted_cert(&CertificateDer::from(der))
                    .ok()
                    .map(|a| a.to_owned())
            })
            .collect();
        *self.bundle.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Anchors {
            pem: bundle_pem.into_owned(),
            anchors,
        });
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Uses this X.509-SVID (chain PEM, PKCS#8 key PEM) from now on, unless `serial` is the
    /// one already in use.
    pub fn set_svid(&self, serial: &str, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        if self
            .svid
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|(s, _)| s == serial)
        {
            return Ok(());
        }
        let chain: Vec<CertificateDer<'static>> = pem_ders(chain_pem, "CERTIFICATE")
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        if chain.is_empty() {
            return Err("the SVID has no certificate".into());
        }
        let key = pem_ders(key_pem, "PRIVATE KEY")
            .into_iter()
            .next()
            .ok_or("the SVID's key is not PKCS#8 PEM")?;
        let key = PrivateKeyDer::Pkcs8(key.into());
        let ck = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| e.to_string())?;
        *self.svid.write().unwrap_or_else(|p| p.into_inner()) =
            Some((serial.to_string(), Arc::new(ck)));
        self.generation.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        self.svid
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, k)| k.clone())
    }

    /// A caller's certificate chain from an earlier handshake checked again, now, against the
    /// current bundle and denied peers: its SPIFFE ID, or why it no longer stands.
    pub fn recheck_client(&self, chain: &[CertificateDer<'_>]) -> Result<String, String> {
        let (ee, rest) = chain.split_first().ok_or("no certificate")?;
        self.check(ee, rest, UnixTime::now(), webpki::KeyUsage::client_auth())
            .map_err(|e| e.to_string())
    }

    /// Path validation of `end_entity` (+ `intermediates`) up to the current bundle for `usage`,
    /// and its SPIFFE ID, which must be in this trust domain.
    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: webpki::KeyUsage,
    ) -> Result<String, Error> {
        let bad = |why: String| Error::General(why);
        let bundle = self
            .bundle
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let ee = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| bad(format!("peer certificate: {e}")))?;
        ee.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &bundle.anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(|e| {
            bad(format!(
                "peer certificate not valid under the trust bundle: {e}"
            ))
        })?;
        let id = spiffe_id_of(end_entity).map_err(bad)?;
        let td = id
            .strip_prefix("spiffe://")
            .and_then(|r| r.split('/').next())
            .unwrap_or_default();
        if td != self.trust_domain {
            return Err(bad(format!(
                "peer {id} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let denied = self
            .denied
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if denied.iter().any(|p| nhi_core::select::glob_match(p, &id)) {
            return Err(bad(format!(
                "peer {id} is revoked (or its node is cut off)"
            )));
        }
        Ok(id)
    }
}

/// Checks the peer's certificate the SPIFFE way on either side, and presents the workload's
/// current SVID.
#[derive(Debug)]
struct Spiffe(Arc<Material>);

/// The signature checks both rustls verifier traits ask for, the same on either side: TLS 1.2
/// refused (never offered), TLS 1.3 signatures by ring's algorithms.
macro_rules! signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            Err(Error::General("TLS 1.2 is not offered".into()))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            verify_tls13_signature(message, cert, dss, &self.0.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.algs.supported_schemes()
        }
    };
}

impl ServerCertVerifier for Spiffe {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.0
            .check(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::server_auth(),
            )
            .map(|_| ServerCertVerified::assertion())
    }

    signature_checks!();
}

impl ClientCertVerifier for Spiffe {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.0
            .check(
                end_entity,
                intermediates,
                now,
                webpki::KeyUsage::client_auth(),
            )
            .map(|_| ClientCertVerified::assertion())
    }

    signature_checks!();
}

impl rustls::server::ResolvesServerCert for Spiffe {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }
}

impl rustls::client::ResolvesClientCert for Spiffe {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.current()
    }

    fn has_certs(&self) -> bool {
        self.0.current().is_some()
    }
}

/// The caller's side: TLS 1.3 only, the workload's SVID as client certificate, the server
/// checked the SPIFFE way (no host name).
pub fn client_config(m: &Arc<Material>) -> Result<Arc<rustls::ClientConfig>, String> {
    let s = Arc::new(Spiffe(m.clone()));
    let mut c = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(s.clone())
        .with_client_cert_resolver(s);
    c.alpn_protocols = vec![ALPN.to_vec(), ALPN_V1.to_vec()];
    // Every connection is a full handshake: a resumed session would skip the check against
    // the current bundle (a CA rotation, a node cut off).
    c.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(c))
}

/// The callee's side: TLS 1.3 only, a client certificate required and checked the SPIFFE way.
pub fn server_config(m: &Arc<Material>) -> Result<Arc<rustls::ServerConfig>, String> {
    let s = Arc::new(Spiffe(m.clone()));
    let mut c = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_client_cert_verifier(s.clone())
        .with_cert_resolver(s);
    c.alpn_protocols = vec![ALPN.to_vec(), ALPN_V1.to_vec()];
    c.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    c.send_tls13_tickets = 0;
    Ok(Arc::new(c))
}

/// The SPIFFE ID the peer proved in a finished handshake.
pub fn peer_id(certs: Option<&[CertificateDer<'_>]>) -> Option<String> {
    certs
        .and_then(|c| c.first())
        .and_then(|c| spiffe_id_of(c).ok())
}

/// The SPIFFE ID the peer proved in a finished handshake (empty if none) and until when (Unix
/// seconds) its certificate is valid: a connection carries no new application connection after
/// that. One parse of the certificate.
pub fn peer_facts(certs: Option<&[CertificateDer<'_>]>) -> (String, i64) {
    certs
        .and_then(|c| c.first())
        .and_then(|c| x509_parser::parse_x509_certificate(c).ok())
        .map(|(_, c)| {
            (
                spiffe_id_in(&c).unwrap_or_default(),
                c.validity().not_after.timestamp(),
            )
        })
        .unwrap_or_default()
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The server name a client sends: never checked (SPIFFE peers are identified by their URI
/// SAN), but TLS wants one.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("nhi.invalid").expect("a valid DNS name")
}

/// The header an HTTP application behind an mTLS inbound rule finds the caller's verified
/// SPIFFE ID in; removed from every request that arrives carrying it.
pub const PEER_HEADER: &str = "x-nhi-peer-spiffe-id";

/// A stream whose first bytes were already read (`prefix`) and are served again first.
struct Prefixed<S> {
    prefix: Vec<u8>,
    at: usize,
    inner: S,
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, data)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// [`deliver`] to the application on loopback `port`, its outcome written into `ev`: the bytes
/// relayed, or why it ended after what `ev`'s detail says already.
#[allow(clippy::too_many_arguments)]
async fn deliver_into<S>(
    ev: &mut AuditEvent,
    stream: S,
    port: u16,
    declared: AppProtocol,
    peer_id: Option<String>,
    conn: Arc<Conn>,
    limits: &CompanionLimits,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let app_addr = SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), port);
    match deliver(stream, app_addr, declared, peer_id, conn, limits).await {
        Ok(Some((inn, out))) => (ev.bytes_in, ev.bytes_out) = (inn, out),
        Ok(None) => {}
        Err(e) => {
            let said = ev.detail.take().unwrap_or_default();
            ev.detail = Some(format!("{said}; {e}"));
        }
    }
}

/// Hands a caller's connection (`stream`: decrypted TLS, or plaintext under a permissive
/// rule) to the application at `app_addr`. HTTP/1 is served request by request: any
/// [`PEER_HEADER`] the caller sent is removed and, when the handshake proved one, the
/// verified `peer_id` set. Anything else is relayed byte for byte. Returns (bytes in, bytes
/// out) for the audit record, `None` when served as HTTP.
async fn deliver<S>(
    mut stream: S,
    app_addr: SocketAddr,
    declared: AppProtocol,
    peer_id: Option<String>,
    conn: Arc<Conn>,
    limits: &CompanionLimits,
) -> Result<Option<(u64, u64)>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use super::sniff::{sniff, Sniffed, MAX_LINE};
    use tokio::io::AsyncReadExt;
    // Read until the first bytes say whether this is HTTP: a request split over several
    // writes must not pass as "something else" and reach the application with a caller-set
    // `PEER_HEADER`. Bytes that could still begin an HTTP/1 request line when the wait ends
    // are served as HTTP/1 (hyper refuses them if they are not); no byte at all is a protocol
    // where the server speaks first, relayed as it is. HTTP/2 with prior knowledge (h2c, as
    // gRPC without TLS speaks) is served stream by stream like HTTP/1 request by request.
    // The application's connection opens while the first bytes are read (the caller has
    // claimed this connection: it is for the application either way). An application that
    // speaks first (a MySQL, SMTP or FTP server greets its client) ends the wait at once: its
    // client is waiting for that greeting, not sending. Not an HTTP/2 server's SETTINGS
    // (sent unasked): its client must still be served stream by stream (see `greeting`).
    let mut early = Some(super::http::connect_early(app_addr));
    let mut app: Option<Result<TcpStream, String>> = None;
    let mut watch_app = true;
    let mut short_greeting = false;
    let mut first = Vec::with_capacity(MAX_LINE);
    let opened = tokio::time::Instant::now();
    let mut deadline = opened + super::SNIFF_TIMEOUT;
    // Declared HTTP: never bytes, and an application's first bytes are no greeting.
    let http_only = declared == AppProtocol::Http;
    if http_only {
        watch_app = false;
    }
    let speaks = loop {
        if declared == AppProtocol::Tcp {
            break None;
        }
        match sniff(&first) {
            Sniffed::Http => break Some(false),
            Sniffed::Http2 => break Some(true),
            Sniffed::NeedMore if first.len() < MAX_LINE => {}
            // Still plausible after a whole line's worth: HTTP (hyper refuses it if it is not).
            Sniffed::NeedMore => break Some(false),
            _ if http_only => break Some(false),
            _ => break None,
        }
        let mut chunk = [0u8; MAX_LINE];
        let want = MAX_LINE - first.len();
        let greeted = async {
            match &app {
                Some(Ok(a)) => {
                    let mut b = [0u8; 9];
                    match a.peek(&mut b).await {
                        Ok(n) => greeting(&b[..n]),
                        // Closed or failed: nothing for the caller to wait for either.
                        Err(_) => Some(true),
                    }
                }
                _ => std::future::pending().await,
            }
        };
        let n = tokio::select! {
            r = tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])) => match r {
                Ok(Ok(n)) => n,
                Ok(Err(e)) => {
                    abort(early);
                    return Err(format!("caller: {e}"));
                }
                // Nothing from either side yet: wait on for whoever speaks first (a caller
                // that waits before its request must not get a raw relay that would carry its
                // own header to the application), up to the first-request timeout.
                Err(_) if first.is_empty() && short_greeting => break None,
                Err(_) if first.is_empty() && !http_only => {
                    let silent = opened + limits.header_timeout;
                    if deadline >= silent {
                        abort(early);
                        return Err("neither the caller nor the application spoke".into());
                    }
                    deadline = silent;
                    continue;
                }
                // Bytes that could still begin a request line, split by a caller that waits:
                // HTTP, never a raw relay that would carry its own header to the application.
                Err(_) => break Some(false),
            },
            c = async { early.as_mut().expect("guarded").await }, if early.is_some() => {
                early = None;
                app = Some(match c {
                    Ok(r) => r.map_err(|e| format!("application: {e}")),
                    Err(e) => Err(format!("application: {e}")),
                });
                continue;
            }
            g = greeted, if watch_app && first.is_empty() => match g {
                Some(true) => break None,
                // An HTTP/2 server (its SETTINGS frame comes whole), or too little to tell yet:
                // wait for the caller; a greeting still that short when the wait ends is none.
                g => {
                    short_greeting = g.is_none();
                    watch_app = false;
                    continue;
                }
            },
            () = conn.slot().killed() => {
                abort(early);
                return Err(super::LIMITS_CLOSED.into());
            }
        };
        if n == 0 {
            // The caller is done sending: nothing of its own can reach the application as a
            // request any more (declared HTTP stays HTTP).
            break http_only.then_some(false);
        }
        first.extend_from_slice(&chunk[..n]);
    };
    let stream = Prefixed {
        prefix: first,
        at: 0,
        inner: stream,
    };
    if let Some(http2) = speaks {
        let early = match (app, early) {
            (Some(Ok(s)), _) => Some(super::http::Early::Ready(s)),
            (_, Some(c)) => Some(super::http::Early::Connecting(c)),
            // (A failed connect is tried again by the first request.)
            _ => None,
        };
        let app = Arc::new(super::http::Upstream::with_early(app_addr, early, http2));
        let c = conn.clone();
        let svc =
            hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                let (app, peer_id, conn) = (app.clone(), peer_id.clone(), c.clone());
                async move {
                    super::http::strip_peer_header(req.headers_mut());
                    if let Some(id) = peer_id.as_deref().and_then(|i| i.parse().ok()) {
                        req.headers_mut().insert(PEER_HEADER, id);
                    }
                    // A WebSocket the application accepts goes on byte for byte, under the
                    // identity this request was delivered with; no other upgrade (see
                    // `websocket_upgrades_only`).
                    super::http::websocket_upgrades_only(&mut req);
                    let upgrade = hyper::upgrade::on(&mut req);
                    let req = req.map(super::http::without_peer_trailers);
                    // Each request (an HTTP/2 stream) is one of the connection's while it waits
                    // for its answer (not evicted), and its answer an open stream until sent
                    // (no idle timeout). No waiting limit: the request is the application's
                    // once sent, and a refusal after that could have it run twice.
                    let answer = async {
                        let sent = app.send(req).await.and_then(|mut resp| {
                            super::http::relay_upgrade(upgrade, &mut resp, conn.clone(), |_| {})
                                .map(|()| resp)
                        });
                        match sent {
                            Ok(resp) => {
                                resp.map(|b| http_body_util::BodyExt::boxed(conn.streaming(b)))
                            }
                            Err(e) => super::http::json(
                                hyper::StatusCode::BAD_GATEWAY,
                                serde_json::json!({"error": "app_unreachable", "message": e}),
                            ),
                        }
                    };
                    Ok::<_, std::convert::Infallible>(conn.answering(answer).await)
                }
            });
        conn.established();
        if http2 {
            super::http::serve_http2(stream, svc, &conn).await;
        } else {
            super::http::serve_http1(stream, svc, &conn, limits).await;
        }
        return Ok(None);
    }
    let app = match (app, early) {
        (Some(a), _) => a?,
        (None, Some(c)) => c
            .await
            .map_err(|e| format!("application: {e}"))?
            .map_err(|e| format!("application: {e}"))?,
        (None, None) => unreachable!("the connect is either pending or done"),
    };
    conn.established();
    relay(app, stream, &conn)
        .await
        .map(|(out, inn)| Some((inn, out)))
        .map_err(|e| format!("closed: {e}"))
}

/// Whether the first bytes an application sent unasked (`b`, up to 9, from a peek) are the
/// greeting of a protocol whose server speaks first: `Some(true)`; an HTTP/2 server's
/// connection preface (a SETTINGS frame on stream 0: its client is an h2c client, which sends
/// first too and must be served as HTTP/2): `Some(false)`; `None`: too few bytes to tell.
/// Nothing at all (the application closed) counts as a greeting: there is nothing to wait for.
fn greeting(b: &[u8]) -> Option<bool> {
    const SETTINGS: u8 = 0x4;
    match b.len() {
        0 => Some(true),
        1..=3 => None,
        4..=8 if b[3] == SETTINGS => None,
        4..=8 => Some(true),
        _ => Some(!(b[3] == SETTINGS && b[5..9] == [0, 0, 0, 0])),
    }
}

/// Stops a connect to the application no longer wanted.
fn abort(early: Option<super::http::Connecting>) {
    if let Some(c) = early {
        c.abort();
    }
}

/// Longest a handshake may take before the connection is given up.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Relays a plaintext local connection and a TLS one both ways until both ends are done or the
/// limits close it: (bytes plain → TLS, bytes TLS → plain).
async fn relay<S>(plain: TcpStream, tls: S, conn: &Conn) -> std::io::Result<(u64, u64)>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (pr, pw) = plain.into_split();
    let (tr, tw) = tokio::io::split(tls);
    let both = async { tokio::try_join!(relay::pump(pr, tw, conn), relay::pump(tr, pw, conn)) };
    tokio::select! {
        r = both => r,
        () = conn.slot().killed() => Err(std::io::Error::other(super::LIMITS_CLOSED)),
    }
}

/// What the caller's companion sends first on a connection once it carries an application's
/// connection (right after the handshake, or when a warm one is claimed): the callee connects
/// to its application only then. Versioned with [`ALPN`].
pub const PREFACE: &[u8; 4] = b"NHI1";

/// Why no mutual TLS connection to a destination could be made.
pub(crate) enum Unmade {
    /// The destination's companion proved an identity (`peer`) the rule does not expect.
    WrongPeer { peer: String, why: String },
    /// Anything else: connect, handshake, no SVID.
    Failed(String),
}

/// A new TCP connection to `dest` and a mutual TLS handshake over it, whose peer must prove a
/// SPIFFE ID matching `peer_pattern`: the stream and that ID.
/// The caller has brought the TLS material up to date (`Edge::tls_material`).
pub(crate) async fn connect(
    edge: &Edge,
    dest: SocketAddr,
    peer_pattern: &str,
) -> Result<pool::Warm, Unmade> {
    // Read before the handshake: a change during it makes the connection stale at once.
    let generation = edge.tls.generation();
    let tcp = match tokio::time::timeout(super::CONNECT_TIMEOUT, TcpStream::connect(dest)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => return Err(Unmade::Failed(format!("connect: {e}"))),
        Err(_) => return Err(Unmade::Failed("connect: timed out".into())),
    };
    let _ = tcp.set_nodelay(true);
    let handshake = tokio_rustls::TlsConnector::from(edge.tls_client.clone())
        .connect(server_name(), Buffered::new(tcp));
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            return Err(Unmade::Failed(format!(
                "mtls handshake with the destination's companion: {e}"
            )))
        }
        Err(_) => {
            return Err(Unmade::Failed(
                "mtls handshake with the destination's companion: timed out".into(),
            ))
        }
    };
    tls.get_mut().1.set_buffer_limit(Some(relay::MAX));
    let (peer_id, not_after) = peer_facts(tls.get_ref().1.peer_certificates());
    if !nhi_core::select::glob_match(peer_pattern, &peer_id) {
        return Err(Unmade::WrongPeer {
            why: format!(
                "mtls: the destination proved {peer_id}, the policy expects {peer_pattern}"
            ),
            peer: peer_id,
        });
    }
    Ok(pool::Warm::new(tls, peer_id, not_after, generation))
}

/// The caller's side: the policy allowed `client`'s connection to `dest`, an nhi workload
/// (`m`). A warm connection to it (see [`pool`]) or a new one: mutual TLS with the
/// destination's companion, whose SPIFFE ID must match the rule's `peer`; then the bytes are
/// relayed, encrypted on the wire. Fail-closed: any problem resets the workload's connection,
/// nothing is sent in plaintext.
pub(crate) async fn originate(
    edge: &Arc<Edge>,
    mut ev: AuditEvent,
    started: Instant,
    client: TcpStream,
    dest: SocketAddr,
    m: &nhi_core::policy::EgressMtls,
    conn: &Conn,
) {
    let want = m.warm.unwrap_or(edge.mtls_warm);
    if let Err(e) = edge.tls_material().await {
        return fail(edge, ev, started, client, format!("mtls: {e}"));
    }
    let (warm, demand, _using) = edge.pool.take(dest, &m.peer, edge.tls.generation());
    let was_warm = warm.is_some();
    let made = match warm {
        Some(w) => Ok(w),
        None => {
            tokio::select! {
                r = connect(edge, dest, &m.peer) => r,
                () = conn.slot().killed() => Err(Unmade::Failed(super::LIMITS_CLOSED.into())),
            }
        }
    };
    // The next connection finds one ready: this one, given back when it ends cleanly; more
    // made now in a burst (see `pool`), otherwise once this connection is done (a handshake
    // now would compete with its first exchange) and only if it went well (a callee that
    // refuses this caller is not asked again and again).
    if demand == pool::Demand::Now {
        edge.pool.refill(edge, dest, &m.peer, want);
    }
    let facts = |peer: &str| {
        Some(MtlsAudit {
            role: MtlsRole::Caller,
            peer: peer.into(),
            warm: was_warm,
        })
    };
    let mut warm = match made {
        Ok(w) => w,
        Err(Unmade::WrongPeer { peer, why }) => {
            ev.decision = Decision::Deny;
            ev.detail = Some(why);
            ev.mtls = facts(&peer);
            finish(edge, ev, started);
            reset(client);
            return;
        }
        Err(Unmade::Failed(why)) => {
            ev.mtls = facts("");
            return fail(edge, ev, started, client, why);
        }
    };
    ev.mtls = facts(&warm.peer_id);
    let peer_id = warm.peer_id.clone();
    if warm.legacy {
        // A companion not yet upgraded: the first protocol, bytes as they are.
        conn.established();
        match relay(client, warm.tls, conn).await {
            Ok((out, inn)) => {
                ev.bytes_out = out;
                ev.bytes_in = inn;
                ev.detail = Some(format!("mtls peer={peer_id} (nhi-mtls/1)"));
            }
            Err(e) => ev.detail = Some(format!("mtls peer={peer_id} (nhi-mtls/1); closed: {e}")),
        }
        return finish(edge, ev, started);
    }
    // The preface goes out with whatever the application has sent already, in one record
    // (framed: see `frame`).
    let mut first = vec![0u8; PREFACE.len() + 4 + 4096];
    first[..PREFACE.len()].copy_from_slice(PREFACE);
    let n = client
        .try_read(&mut first[PREFACE.len() + 4..])
        .unwrap_or(0);
    first.truncate(PREFACE.len() + if n > 0 { 4 + n } else { 0 });
    if n > 0 {
        first[PREFACE.len()..PREFACE.len() + 4].copy_from_slice(&frame::header(n));
    }
    use tokio::io::AsyncWriteExt;
    let claimed = async {
        warm.tls.write_all(&first).await?;
        warm.tls.flush().await
    };
    if let Err(e) = claimed.await {
        return fail(edge, ev, started, client, format!("mtls: {e}"));
    }
    conn.established();
    let how = if was_warm { "; warm" } else { "" };
    let (back, mut returned) = tokio::sync::oneshot::channel();
    let (tls, keep) = warm.lend();
    let framed = frame::Framed::new(tls, back);
    let went_well = match relay(client, framed, conn).await {
        Ok((out, inn)) => {
            ev.bytes_out = out + n as u64;
            ev.bytes_in = inn;
            ev.detail = Some(format!("mtls peer={peer_id}{how}"));
            true
        }
        Err(e) => {
            ev.detail = Some(format!("mtls peer={peer_id}{how}; closed: {e}"));
            false
        }
    };
    let reused = match returned.try_recv() {
        Ok(tls) => edge.pool.give_back(dest, &m.peer, keep.with(tls), want),
        Err(_) => false,
    };
    if went_well && (demand == pool::Demand::Later || (demand == pool::Demand::None && !reused)) {
        edge.pool.refill(edge, dest, &m.peer, want);
    }
    finish(edge, ev, started);
}

/// The callee's side, for a port whose inbound rule takes mutual TLS: a companion's TLS is
/// terminated and its SPIFFE ID checked against the rule's `allow`; plaintext is refused
/// (strict) or let through and audited as unauthenticated (permissive). The application on
/// loopback at the dialed port gets the bytes.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn terminate(
    edge: Arc<Edge>,
    stream: TcpStream,
    peer: SocketAddr,
    dest: SocketAddr,
    rule: &InboundRule,
    mode: MtlsMode,
    conn: Arc<Conn>,
    limits: &CompanionLimits,
) {
    let started = Instant::now();
    let mut ev = inbound_event(peer, dest, rule);
    let mut first = [0u8; 1];
    let peeked = tokio::select! {
        r = tokio::time::timeout(limits.header_timeout, stream.peek(&mut first)) => r,
        () = conn.slot().killed() => return fail(&edge, ev, started, stream, super::LIMITS_CLOSED.into()),
    };
    let tls = matches!(peeked, Ok(Ok(1))) && first[0] == 0x16;
    if !tls {
        if mode == MtlsMode::Strict {
            ev.decision = Decision::Deny;
            ev.detail = Some(
                "plaintext refused: this port takes mutual TLS from nhi workloads only (strict)"
                    .into(),
            );
            finish(&edge, ev, started);
            reset(stream);
            return;
        }
        ev.detail = Some("unauthenticated plaintext (permissive mTLS)".into());
        let port = dest.port();
        deliver_into(&mut ev, stream, port, rule.app_protocol, None, conn, limits).await;
        finish(&edge, ev, started);
        return;
    }
    if let Err(e) = edge.tls_material().await {
        return fail(&edge, ev, started, stream, format!("mtls: {e}"));
    }
    // Read before the handshake: a deny list or bundle that changes while the caller's
    // certificate is being checked makes the first claim check it again.
    let generation = edge.tls.generation();
    let accepted = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_rustls::TlsAcceptor::from(edge.tls_server.clone()).accept(Buffered::new(stream)),
    )
    .await;
    let mut tls = match accepted {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            ev.decision = Decision::Deny;
            ev.detail = Some(format!("mtls handshake refused: {e}"));
            ev.mtls = callee("", false);
            finish(&edge, ev, started);
            return;
        }
        Err(_) => {
            ev.decision = Decision::Deny;
            ev.detail = Some("mtls handshake: timed out".into());
            ev.mtls = callee("", false);
            finish(&edge, ev, started);
            return;
        }
    };
    tls.get_mut().1.set_buffer_limit(Some(relay::MAX));
    let (peer_id, not_after) = peer_facts(tls.get_ref().1.peer_certificates());
    if !rule.allows(&peer_id) {
        ev.decision = Decision::Deny;
        ev.detail = Some(format!("mtls peer {peer_id} is not allowed by this rule"));
        ev.mtls = callee(&peer_id, false);
        finish(&edge, ev, started);
        return;
    }
    if tls.get_ref().1.alpn_protocol() != Some(ALPN) {
        // A caller's companion not yet upgraded (nhi-mtls/1): one application connection, no
        // preface, no frames.
        ev.detail = Some(format!("mtls peer={peer_id} (nhi-mtls/1)"));
        ev.mtls = callee(&peer_id, false);
        let (port, id) = (dest.port(), Some(peer_id.clone()));
        deliver_into(&mut ev, tls, port, rule.app_protocol, id, conn, limits).await;
        return finish(&edge, ev, started);
    }
    // One application connection after another (see `pool` and `frame`), each audited.
    let mut first = Some(ev);
    loop {
        let warm = first.is_none();
        let mut ev = first
            .take()
            .unwrap_or_else(|| inbound_event(peer, dest, rule));
        ev.mtls = callee(&peer_id, warm);
        let Some(back) = claim(
            &edge, tls, ev, &peer_id, not_after, generation, dest, &conn, limits,
        )
        .await
        else {
            return;
        };
        tls = back;
    }
}

/// Waits until the caller claims `tls` for an application connection, decides on it again
/// under what holds now, and delivers it. Returns the stream when the application connection
/// ended cleanly and the caller may send another.
#[allow(clippy::too_many_arguments)]
async fn claim(
    edge: &Arc<Edge>,
    mut tls: ServerTls,
    mut ev: AuditEvent,
    peer_id: &str,
    not_after: i64,
    generation: u64,
    dest: SocketAddr,
    conn: &Arc<Conn>,
    limits: &CompanionLimits,
) -> Option<ServerTls> {
    // The caller may have made this connection ahead of need (see `pool`): nothing reaches the
    // application before it claims it. An unused one that its caller closes, or the limits end
    // (it counts as a connection without a first request), carried nothing and is not audited.
    let mut preface = [0u8; PREFACE.len()];
    let claimed = tokio::select! {
        r = tokio::io::AsyncReadExt::read_exact(&mut tls, &mut preface) => r.is_ok(),
        () = conn.slot().killed() => false,
    };
    if !claimed {
        return None;
    }
    let started = Instant::now();
    let deny = |mut ev: AuditEvent, why: String| {
        ev.decision = Decision::Deny;
        ev.detail = Some(why);
        finish(edge, ev, started);
        None
    };
    if preface != *PREFACE {
        return deny(
            ev,
            format!(
                "mtls peer {peer_id}: not the nhi companion protocol ({})",
                String::from_utf8_lossy(ALPN)
            ),
        );
    }
    // Decided on what holds now: the caller's certificate still valid, the trust material (a
    // revocation, a CA leaving the bundle since the handshake) and the policy (a reload).
    if unix_now() >= not_after {
        return deny(
            ev,
            format!("mtls peer {peer_id}: its certificate has expired since the handshake"),
        );
    }
    if edge.tls.generation() != generation {
        let chain = tls.get_ref().1.peer_certificates().unwrap_or_default();
        if let Err(why) = edge.tls.recheck_client(chain) {
            return deny(ev, format!("mtls peer {peer_id} no longer stands: {why}"));
        }
    }
    let policy = edge.policy();
    let speaks = match policy
        .as_deref()
        .and_then(|p| p.inbound_for_port(dest.port()))
    {
        Some(r) if r.mtls.is_some() && r.allows(peer_id) => {
            ev.rule = Some(r.id.clone());
            r.app_protocol
        }
        _ => {
            return deny(
                ev,
                format!(
                "mtls peer {peer_id} is not allowed by this port's inbound rule (policy changed)"
            ),
            )
        }
    };
    ev.detail = Some(format!("mtls peer={peer_id}"));
    let (back, returned) = tokio::sync::oneshot::channel();
    let framed = frame::Framed::new(tls, back);
    let (port, id) = (dest.port(), Some(peer_id.to_string()));
    deliver_into(&mut ev, framed, port, speaks, id, conn.clone(), limits).await;
    finish(edge, ev, started);
    tokio::time::timeout(frame::LINGER * 2, returned)
        .await
        .ok()?
        .ok()
}

/// The audit record of one connection from `peer` to `dest` under inbound `rule`.
fn inbound_event(peer: SocketAddr, dest: SocketAddr, rule: &InboundRule) -> AuditEvent {
    let mut ev = event(
        AuditKind::Inbound,
        peer,
        Destination {
            addr: Some(dest.to_string()),
            ..Default::default()
        },
    );
    ev.rule = Some(rule.id.clone());
    ev
}

/// The audit facts of a connection this workload's companion terminated.
fn callee(peer: &str, warm: bool) -> Option<MtlsAudit> {
    Some(MtlsAudit {
        role: MtlsRole::Callee,
        peer: peer.into(),
        warm,
    })
}

/// The callee's side of a companion-to-companion connection.
type ServerTls = tokio_rustls::server::TlsStream<Buffered<TcpStream>>;

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Ca {
        issuer: Issuer<'static, KeyPair>,
        pem: String,
    }

    fn ca(td: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().unwrap())];
        let cert = p.self_signed(&key).unwrap();
        Ca {
            pem: cert.pem(),
            issuer: Issuer::new(p, key),
        }
    }

    /// An X.509-SVID for `id` from `ca`: (serial, chain PEM, key PEM).
    fn svid(ca: &Ca, id: &str, days_valid: i64) -> (String, String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(id.try_into().unwrap())];
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = time::OffsetDateTime::now_utc();
        p.not_before = now - time::Duration::days(2);
        p.not_after = now + time::Duration::days(days_valid);
        let cert = p.signed_by(&key, &ca.issuer).unwrap();
        let serial = format!("{:x}", rand_u64());
        (serial, cert.pem(), key.serialize_pem())
    }

    fn rand_u64() -> u64 {
        use std::time::{SystemTime, UNIX_EPOCH};
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64
            ^ (std::process::id() as u64) << 32
    }

    fn material(td: &str, bundle: &str, s: &(String, String, String)) -> Arc<Material> {
        let m = Material::new(td, bundle);
        m.set_svid(&s.0, &s.1, &s.2).unwrap();
        m
    }

    /// One handshake over an in-memory pipe and a byte each way: the IDs each side saw, or
    /// the error.
    async fn handshake(
        client: &Arc<Material>,
        server: &Arc<Material>,
    ) -> Result<(String, String), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let cc = client_config(client)?;
        let sc = server_config(server)?;
        let srv = tokio::spawn(async move {
            let mut tls = tokio_rustls::TlsAcceptor::from(sc)
                .accept(b)
                .await
                .map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            tls.write_all(&buf).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())?;
            let (_, conn) = tls.get_ref();
            assert_eq!(
                conn.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            Ok::<_, String>(peer_id(conn.peer_certificates()).unwrap_or_default())
        });
        let cli = async {
            let mut tls = tokio_rustls::TlsConnector::from(cc)
                .connect(server_name(), a)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut buf = [0u8; 1];
            tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
            let (_, conn) = tls.get_ref();
            Ok::<_, String>(peer_id(conn.peer_certificates()).unwrap_or_default())
        };
        let (c, s) = tokio::join!(cli, srv);
        let s = s.map_err(|e| e.to_string())?;
        match (c, s) {
            (Ok(c), Ok(s)) => Ok((c, s)),
            (Err(e), _) | (_, Err(e)) => Err(e),
        }
    }

    const WEB: &str = "spiffe://td/ns/prod/sa/web";
    const DB: &str = "spiffe://td/ns/prod/sa/db";

    #[tokio::test]
    async fn both_sides_learn_the_others_spiffe_id_over_tls13() {
        let ca = ca("td");
        let web = material("td", &ca.pem, &svid(&ca, WEB, 1));
        let db = material("td", &ca.pem, &svid(&ca, DB, 1));
        let (client_saw, server_saw) = handshake(&web, &db).await.unwrap();
        assert_eq!((client_saw.as_str(), server_saw.as_str()), (DB, WEB));
    }

    #[tokio::test]
    async fn another_trust_domain_an_expired_svid_and_no_svid_are_refused() {
        let ca = ca("td");
        let db = material("td", &ca.pem, &svid(&ca, DB, 1));
        // Another trust domain, even with its CA in the bundle: the ID decides.
        let other = self::ca("other.org");
        let both = format!("{}{}", ca.pem, other.pem);
        let db_both = material("td", &both, &svid(&ca, DB, 1));
        let evil = material("td", &both, &svid(&other, "spiffe://other.org/x", 1));
        let e = handshake(&evil, &db_both).await.unwrap_err();
        assert!(!e.is_empty());
        // A CA not in the bundle.
        let stranger = material("td", &other.pem, &svid(&other, WEB, 1));
        assert!(handshake(&stranger, &db).await.is_err());
        // Expired.
        let expired = material("td", &ca.pem, &svid(&ca, WEB, -1));
        assert!(handshake(&expired, &db).await.is_err());
        // No client certificate at all.
        let none = Material::new("td", &ca.pem);
        assert!(handshake(&none, &db).await.is_err());
        // And the client refuses a server from another CA.
        let web = material("td", &ca.pem, &svid(&ca, WEB, 1));
        let rogue = material("td", &other.pem, &svid(&other, DB, 1));
        assert!(handshake(&web, &rogue).await.is_err());
    }

    #[tokio::test]
    async fn denied_peers_are_refused_at_the_next_handshake() {
        let ca = ca("td");
        let node_web = "spiffe://td/node/n1/container/web";
        let web = material("td", &ca.pem, &svid(&ca, node_web, 1));
        let db = material("td", &ca.pem, &svid(&ca, DB, 1));
        handshake(&web, &db).await.unwrap();
        // The node n1 is cut off: every identity under its path is refused by the callee...
        db.set_denied(vec!["spiffe://td/node/n1/*".into()]);
        let e = handshake(&web, &db).await.unwrap_err();
        assert!(!e.is_empty());
        // ...and a revoked callee by the caller.
        db.set_denied(vec![]);
        web.set_denied(vec![DB.into()]);
        assert!(handshake(&web, &db).await.is_err());
        web.set_denied(vec![]);
        handshake(&web, &db).await.unwrap();
    }

    #[tokio::test]
    async fn a_renewed_svid_and_a_rotated_bundle_apply_to_the_next_handshake() {
        let ca1 = ca("td");
        let web = material("td", &ca1.pem, &svid(&ca1, WEB, 1));
        let db = material("td", &ca1.pem, &svid(&ca1, DB, 1));
        handshake(&web, &db).await.unwrap();
        // CA rotation: the new CA enters both bundles, then web's SVID is renewed under it.
        let ca2 = ca("td");
        let both = format!("{}{}", ca1.pem, ca2.pem);
        web.set_bundle(both.as_bytes());
        db.set_bundle(both.as_bytes());
        let s = svid(&ca2, WEB, 1);
        web.set_svid(&s.0, &s.1, &s.2).unwrap();
        assert_eq!(handshake(&web, &db).await.unwrap().1, WEB);
        // The old CA leaves db's bundle: db's own (old) SVID no longer verifies for web once
        // web drops it too, until db renews.
        web.set_bundle(ca2.pem.as_bytes());
        assert!(handshake(&web, &db).await.is_err());
        let s = svid(&ca2, DB, 1);
        db.set_svid(&s.0, &s.1, &s.2).unwrap();
        assert_eq!(handshake(&web, &db).await.unwrap().0, DB);
    }

    #[test]
    fn greetings_of_server_first_protocols_are_told_from_an_http2_server_preface() {
        assert_eq!(greeting(b"220 smtp.example ESMTP"), Some(true));
        // MySQL: 3-byte length, sequence id 0, protocol version 10.
        assert_eq!(
            greeting(&[0x4a, 0, 0, 0, 10, b'8', b'.', b'0', b'.']),
            Some(true)
        );
        assert_eq!(greeting(b"SSH-2.0-OpenSSH_9"), Some(true));
        assert_eq!(greeting(b""), Some(true), "closed: nothing to wait for");
        // An HTTP/2 server's SETTINGS frame (length 6, type 4, flags 0, stream 0) first.
        let settings = [0, 0, 6, 4, 0, 0, 0, 0, 0];
        assert_eq!(greeting(&settings), Some(false));
        assert_eq!(greeting(&settings[..5]), None, "could still be SETTINGS");
        assert_eq!(greeting(b"22"), None);
        // Type 4 on a stream is no connection preface.
        assert_eq!(greeting(&[0, 0, 6, 4, 0, 0, 0, 0, 1]), Some(true));
    }
}
