//! Plaintext HTTP/1 through the edge proxy, one decision per request: denied requests get a 403
//! with a JSON body naming the rule and never reach the destination; allowed ones are forwarded
//! on one upstream connection per workload connection (opened at the first allowed request),
//! with the rule's brokered credential injected.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::header::{
    HeaderMap, HeaderName, HeaderValue, CONNECTION, CONTENT_LENGTH, CONTENT_TYPE, HOST, UPGRADE,
};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use nhi_core::audit::{AuditKind, Decision, Destination};
use nhi_core::policy::{Action, Facts, HttpFacts, Policy};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

use super::mtls::PEER_HEADER;
use super::{event, finish, Edge, CONNECT_TIMEOUT};
use crate::limits::{Conn, Refusal};
use nhi_core::config::CompanionLimits;

pub(crate) type Body = BoxBody<Bytes, hyper::Error>;

pub(crate) fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(v.to_string()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn content_length(h: &hyper::HeaderMap) -> u64 {
    h.get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A TCP connection being opened in the background.
pub(crate) type Connecting = tokio::task::JoinHandle<std::io::Result<TcpStream>>;

/// Opens a connection to `addr` in the background (within [`CONNECT_TIMEOUT`]).
pub(crate) fn connect_early(addr: SocketAddr) -> Connecting {
    tokio::spawn(async move {
        let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))??;
        let _ = s.set_nodelay(true);
        Ok(s)
    })
}

/// One upstream connection (HTTP/1, or HTTP/2 with prior knowledge), opened on first use (or
/// taken from a connection opened early) and reopened if it closed.
pub(crate) struct Upstream {
    addr: SocketAddr,
    http2: bool,
    conn: Mutex<Option<Sender>>,
    early: std::sync::Mutex<Option<Early>>,
}

/// An upstream connection begun before the first request.
pub(crate) enum Early {
    Connecting(Connecting),
    Ready(TcpStream),
}

enum Sender {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }
}

impl Upstream {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Upstream {
            addr,
            http2: false,
            conn: Mutex::new(None),
            early: std::sync::Mutex::new(None),
        }
    }

    /// An upstream whose first connection is `early`, already on its way (or made); `http2`: spoken
    /// with prior knowledge (h2c), its requests multiplexed on that one connection.
    pub(crate) fn with_early(addr: SocketAddr, early: Option<Early>, http2: bool) -> Self {
        Upstream {
            addr,
            http2,
            conn: Mutex::new(None),
            early: std::sync::Mutex::new(early),
        }
    }

    pub(crate) async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, String> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(Sender::is_closed) {
            let early = self.early.lock().unwrap_or_else(|p| p.into_inner()).take();
            let s = match early {
                Some(Early::Ready(s)) => s,
                Some(Early::Connecting(c)) => c
                    .await
                    .map_err(|e| format!("connect: {e}"))?
                    .map_err(|e| format!("connect: {e}"))?,
                None => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
                    .await
                    .map_err(|_| "connect: timed out".to_string())?
                    .map_err(|e| format!("connect: {e}"))?,
            };
            let _ = s.set_nodelay(true);
            *conn = Some(if self.http2 {
                let (send, c) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(H2_STREAM_WINDOW)
                    .initial_connection_window_size(H2_CONNECTION_WINDOW)
                    .max_send_buf_size(H2_SEND_BUFFER)
                    .handshake(TokioIo::new(s))
                    .await
                    .map_err(|e| format!("upstream handshake: {e}"))?;
                tokio::spawn(c);
                Sender::H2(send)
            } else {
                let (send, c) = http1::handshake(TokioIo::new(s))
                    .await
                    .map_err(|e| format!("upstream handshake: {e}"))?;
                // An answer `101 Switching Protocols` hands the connection over (see
                // `relay_upgrade`); nothing else is sent on it after that.
                tokio::spawn(c.with_upgrades());
                Sender::H1(send)
            });
        }
        match conn.as_mut().expect("just set") {
            // One request at a time on an HTTP/1 connection: the lock is held until its answer.
            Sender::H1(send) => {
                send.ready().await.map_err(|e| format!("upstream: {e}"))?;
                send.send_request(req)
                    .await
                    .map_err(|e| format!("upstream: {e}"))
            }
            // HTTP/2 streams run side by side (a long gRPC stream must not hold up the rest).
            Sender::H2(send) => {
                let mut send = send.clone();
                drop(conn);
                send.ready().await.map_err(|e| format!("upstream: {e}"))?;
                send.send_request(req)
                    .await
                    .map_err(|e| format!("upstream: {e}"))
            }
        }
    }
}

/// Largest request head read from the workload (hyper's buffer; as Envoy's default).
const MAX_HEAD: usize = 64 * 1024;

/// Serves one redirected workload connection that speaks HTTP/1, each request one of `conn`'s
/// (see `crate::limits`).
pub async fn serve(
    edge: Arc<Edge>,
    client: TcpStream,
    peer: SocketAddr,
    dest: SocketAddr,
    policy: Arc<Policy>,
    conn: Arc<Conn>,
    limits: CompanionLimits,
) {
    let upstream = Arc::new(Upstream::new(dest));
    let c = conn.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (edge, upstream, policy, conn) =
            (edge.clone(), upstream.clone(), policy.clone(), c.clone());
        async move {
            let refused = |why| {
                let mut ev = event(AuditKind::HttpRequest, peer, Destination::default());
                refusal(&edge, &mut ev, why)
            };
            let answer = request(&edge, &upstream, peer, dest, &policy, req, &conn);
            Ok::<_, Infallible>(
                conn.request(answer, limits.proxy_idle_timeout, refused)
                    .await,
            )
        }
    });
    serve_http1(client, svc, &conn, &limits).await;
}

/// Serves `svc` on `stream` as HTTP/1 until the client is done or the limits close it.
pub(crate) async fn serve_http1<IO, S>(stream: IO, svc: S, conn: &Conn, limits: &CompanionLimits)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD);
    let served = http
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::select! {
        _ = served => {}
        () = conn.slot().killed() => {}
    }
}

/// Removes every spelling of [`PEER_HEADER`] an application could read as it: any case (header
/// maps compare names case-insensitively) and with `_` for `-` (CGI-style servers fold them).
pub(crate) fn strip_peer_header(h: &mut HeaderMap) {
    let spelled = |n: &HeaderName| {
        let n = n.as_str().as_bytes();
        n.len() == PEER_HEADER.len()
            && n.iter()
                .zip(PEER_HEADER.as_bytes())
                .all(|(&a, &b)| a == b || (a == b'_' && b == b'-'))
    };
    let names: Vec<HeaderName> = h.keys().filter(|n| spelled(n)).cloned().collect();
    for n in names {
        h.remove(n);
    }
    // Nor may `Connection` name it: a proxy in front of the application would drop the
    // verified value as hop-by-hop.
    let named = |t: &str| HeaderName::from_bytes(t.trim().as_bytes()).is_ok_and(|n| spelled(&n));
    let listed = h
        .get_all(CONNECTION)
        .iter()
        .any(|v| v.to_str().map_or(true, |v| v.split(',').any(named)));
    if listed {
        let kept: Vec<String> = h
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter(|t| !t.trim().is_empty() && !named(t))
            .map(|t| t.trim().to_string())
            .collect();
        h.remove(CONNECTION);
        if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
            if !kept.is_empty() {
                h.insert(CONNECTION, v);
            }
        }
    }
}

/// A request body whose trailers lose [`PEER_HEADER`] too.
pub(crate) fn without_peer_trailers(body: Incoming) -> Body {
    body.map_frame(|mut f| {
        if let Some(t) = f.trailers_mut() {
            strip_peer_header(t);
        }
        f
    })
    .boxed()
}

/// Whether every `Upgrade` value names WebSocket.
fn asks_websocket(h: &HeaderMap) -> bool {
    let mut any = false;
    for v in h.get_all(UPGRADE) {
        any = true;
        if !v
            .to_str()
            .is_ok_and(|s| s.trim().eq_ignore_ascii_case("websocket"))
        {
            return false;
        }
    }
    any
}

/// Keeps a request's upgrade only when it asks for a WebSocket. Any other (`h2c`, say) would
/// turn the connection into bytes the companion no longer reads as requests (an HTTP/2
/// connection after `Upgrade: h2c` would carry every later request past the checks), so it is
/// taken out and the request goes on as a plain one.
pub(crate) fn websocket_upgrades_only<B>(req: &mut Request<B>) {
    let h = req.headers_mut();
    if !h.contains_key(UPGRADE) || asks_websocket(h) {
        return;
    }
    h.remove(UPGRADE);
    h.remove("http2-settings");
    let kept: Vec<String> = h
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case("upgrade")
                && !t.eq_ignore_ascii_case("http2-settings")
        })
        .map(str::to_string)
        .collect();
    h.remove(CONNECTION);
    if let Ok(v) = HeaderValue::from_str(&kept.join(", ")) {
        if !kept.is_empty() {
            h.insert(CONNECTION, v);
        }
    }
}

/// When `resp` (to a request whose upgrade is `client`) switches to WebSocket (`101`), relays
/// the two upgraded connections byte for byte in the background, touching `conn`'s idle clock
/// and ending with its limits, then calls `done` with the bytes relayed each way (client to
/// application, application to client) or why it ended. A switch to anything else is refused
/// (`Err`): see [`websocket_upgrades_only`]. Without a switch `done` is not called.
pub(crate) fn relay_upgrade(
    client: hyper::upgrade::OnUpgrade,
    resp: &mut Response<Incoming>,
    conn: Arc<Conn>,
    done: impl FnOnce(std::io::Result<(u64, u64)>) + Send + 'static,
) -> Result<(), String> {
    if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(());
    }
    if !asks_websocket(resp.headers()) {
        return Err(
            "the application switched to a protocol other than WebSocket, which the companion does not relay"
                .into(),
        );
    }
    let upstream = hyper::upgrade::on(resp);
    tokio::spawn(async move {
        let (client, upstream) = match tokio::join!(client, upstream) {
            (Ok(c), Ok(u)) => (c, u),
            (Err(e), _) | (_, Err(e)) => return done(Err(std::io::Error::other(e))),
        };
        let (cr, cw) = tokio::io::split(TokioIo::new(client));
        let (ur, uw) = tokio::io::split(TokioIo::new(upstream));
        let both = async {
            tokio::try_join!(
                super::mtls::relay::pump(cr, uw, &conn),
                super::mtls::relay::pump(ur, cw, &conn)
            )
        };
        done(tokio::select! {
            r = both => r,
            () = conn.slot().killed() => Err(std::io::Error::other(super::LIMITS_CLOSED)),
        });
    });
    Ok(())
}

/// Streams an HTTP/2 connection may have open at once (gRPC's usual default).
pub(crate) const H2_MAX_STREAMS: u32 = 100;
/// Bytes a peer may send on one HTTP/2 stream, and on the whole connection, before this side
/// reads them (flow-control windows): what a connection can make the companion buffer.
const H2_STREAM_WINDOW: u32 = 256 * 1024;
const H2_CONNECTION_WINDOW: u32 = 1024 * 1024;
/// Largest header list of an HTTP/2 request (as for the Workload API).
const H2_MAX_HEADERS: u32 = 16 * 1024;
/// Bytes queued per stream towards a peer that does not read (hyper's default is 400 KiB:
/// 100 streams of a caller that never reads would hold 40 MiB).
const H2_SEND_BUFFER: usize = 64 * 1024;

/// Serves `svc` on `stream` as HTTP/2 with prior knowledge (h2c) until the client is done or
/// the limits close it; each stream's memory bounded by the windows above.
pub(crate) async fn serve_http2<IO, S>(stream: IO, svc: S, conn: &Conn)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    http.timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .initial_stream_window_size(H2_STREAM_WINDOW)
        .initial_connection_window_size(H2_CONNECTION_WINDOW)
        .max_header_list_size(H2_MAX_HEADERS)
        .max_send_buf_size(H2_SEND_BUFFER)
        // A caller gone silently (its host lost) is noticed, as on the Workload API.
        .keep_alive_interval(Some(std::time::Duration::from_secs(30)))
        .keep_alive_timeout(std::time::Duration::from_secs(10));
    let served = http.serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        _ = served => {}
        () = conn.slot().killed() => {}
    }
}

/// The answer to a request the limits refused, audited.
pub(crate) fn refusal(
    edge: &Edge,
    ev: &mut nhi_core::audit::AuditEvent,
    why: Refusal,
) -> Response<Body> {
    ev.decision = Decision::Error;
    let message = match why {
        Refusal::Busy => "refused: too many requests are waiting in the companion",
        Refusal::TimedOut => "no answer within the proxy's idle timeout",
    };
    ev.detail = Some(message.into());
    finish(edge, std::mem::take(ev), Instant::now());
    json(
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({"error": "busy", "message": message}),
    )
}

/// What the proxy compares and forwards of a request: its host (from `Host`, or the
/// absolute-form target when there is none) and its normalized path, with the request's target
/// rewritten to origin form with that path. Refuses what upstreams would read differently.
fn canonical_target<B>(
    req: &mut Request<B>,
    slashes: nhi_core::http_path::EscapedSlashes,
) -> Result<(Option<String>, String), String> {
    let hosts: Vec<&HeaderValue> = req.headers().get_all(HOST).iter().collect();
    if hosts.len() > 1 {
        return Err("more than one Host header".into());
    }
    let header = match hosts.first() {
        Some(h) => Some(
            h.to_str()
                .map_err(|_| "a Host header that is not text".to_string())?
                .to_string(),
        ),
        None => None,
    };
    let authority = req.uri().authority().map(|a| a.as_str().to_string());
    let host = match (header, authority) {
        (Some(h), Some(a)) if !h.eq_ignore_ascii_case(&a) => {
            return Err(format!(
                "the request target names {a:?} but the Host header {h:?}"
            ))
        }
        (Some(h), _) => Some(h),
        (None, Some(a)) => {
            let v = HeaderValue::from_str(&a).map_err(|_| "bad authority".to_string())?;
            req.headers_mut().insert(HOST, v);
            Some(a)
        }
        (None, None) => None,
    };
    let raw = req.uri().path();
    let path =
        nhi_core::http_path::normalize(raw, slashes).map_err(|e| format!("path {raw:?}: {e}"))?;
    let target = match req.uri().query() {
        Some(q) => format!("{path}?{q}"),
        None => path.clone(),
    };
    *req.uri_mut() = target.parse().map_err(|e| format!("path {raw:?}: {e}"))?;
    Ok((host, path))
}

async fn request(
    edge: &Arc<Edge>,
    upstream: &Upstream,
    peer: SocketAddr,
    dest: SocketAddr,
    policy: &Policy,
    mut req: Request<Incoming>,
    conn: &Arc<Conn>,
) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let raw_path = req.uri().path().to_string();
    let mut ev = event(
        AuditKind::HttpRequest,
        peer,
        Destination {
            addr: Some(dest.to_string()),
            method: Some(method.clone()),
            path: Some(raw_path.clone()),
            ..Default::default()
        },
    );
    let (host, path) = match canonical_target(&mut req, policy.path_escaped_slashes) {
        Ok(t) => t,
        Err(why) => {
            // Ambiguous: refused before any rule, never forwarded.
            ev.decision = Decision::Deny;
            ev.detail = Some(format!("refused: {why}"));
            finish(edge, ev, started);
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({
                    "error": "ambiguous_request",
                    "policy": policy.id,
                    "message": format!("{method} refused by the edge proxy: {why}"),
                }),
            );
        }
    };
    if let Some(d) = ev.destination.as_mut() {
        d.host = host.clone();
        d.path = Some(path.clone());
    }
    if path != raw_path {
        ev.detail = Some(format!("path as sent: {raw_path}"));
    }
    let d = edge
        .decide(
            policy,
            &Facts {
                dest: Some(dest),
                sni: None,
                http: Some(HttpFacts {
                    host: host.as_deref(),
                    method: &method,
                    path: &path,
                }),
            },
        )
        .await;
    if let Some(note) = &d.note {
        ev.detail = Some(match ev.detail.take() {
            Some(prev) => format!("{prev}; {note}"),
            None => note.clone(),
        });
    }
    ev.rule = d.rule.clone();
    if d.action == Action::Deny {
        ev.decision = Decision::Deny;
        finish(edge, ev, started);
        let mut message = match &d.rule {
            Some(r) => format!("{method} {path} denied by edge policy rule {r:?}"),
            None => format!(
                "{method} {path} denied by the default of edge policy {:?}",
                policy.id
            ),
        };
        if let Some(note) = &d.note {
            message.push_str(&format!(" ({note})"));
        }
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({
                "error": "forbidden",
                "rule": d.rule,
                "policy": policy.id,
                "message": message,
            }),
        );
    }
    if let (Some(b), Some(rule)) = (&d.broker, d.rule.as_deref()) {
        match edge.credential(rule, b).await {
            Ok((value, cred)) => {
                let name = HeaderName::from_bytes(b.header.as_bytes());
                let value = HeaderValue::from_str(&value);
                match (name, value) {
                    (Ok(n), Ok(mut val)) => {
                        val.set_sensitive(true);
                        req.headers_mut().insert(n, val);
                    }
                    _ => {
                        ev.decision = Decision::Error;
                        ev.detail = Some("brokered credential is not a header value".into());
                        finish(edge, ev, started);
                        return json(
                            StatusCode::BAD_GATEWAY,
                            serde_json::json!({"error": "broker_failed", "rule": rule}),
                        );
                    }
                }
                ev.credential = Some(cred);
            }
            Err(e) => {
                ev.decision = Decision::Error;
                ev.detail = Some(format!("broker: {e}"));
                finish(edge, ev, started);
                return json(
                    StatusCode::BAD_GATEWAY,
                    serde_json::json!({"error": "broker_failed", "rule": rule, "message": e}),
                );
            }
        }
    }
    ev.bytes_out = content_length(req.headers());
    // A WebSocket this request was allowed to ask for goes on byte for byte; no other upgrade.
    websocket_upgrades_only(&mut req);
    let upgrade = hyper::upgrade::on(&mut req);
    let failed = |mut ev: nhi_core::audit::AuditEvent, e: String| {
        ev.decision = Decision::Error;
        ev.detail = Some(e.clone());
        finish(edge, ev, started);
        json(
            StatusCode::BAD_GATEWAY,
            serde_json::json!({"error": "upstream_failed", "message": e}),
        )
    };
    match upstream.send(req.map(|b| b.boxed())).await {
        Ok(mut resp) => {
            ev.bytes_in = content_length(resp.headers());
            if resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                finish(edge, ev, started);
                return resp.map(|b| b.boxed());
            }
            // A WebSocket: recorded when it ends, with what it carried.
            let switched = "switched to WebSocket: relayed as bytes";
            ev.detail = Some(match ev.detail.take() {
                Some(prev) => format!("{prev}; {switched}"),
                None => switched.into(),
            });
            let (record, e2) = (ev.clone(), edge.clone());
            let done = move |r: std::io::Result<(u64, u64)>| {
                let mut ev = record;
                match r {
                    Ok((out, inn)) => (ev.bytes_out, ev.bytes_in) = (out, inn),
                    Err(e) => {
                        let d = ev.detail.take().unwrap_or_default();
                        ev.detail = Some(format!("{d}; ended: {e}"));
                    }
                }
                finish(&e2, ev, started);
            };
            if let Err(e) = relay_upgrade(upgrade, &mut resp, conn.clone(), done) {
                return failed(ev, e);
            }
            resp.map(|b| b.boxed())
        }
        Err(e) => failed(ev, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nhi_core::http_path::EscapedSlashes;

    fn req(target: &str, hosts: &[&str]) -> Request<()> {
        let mut b = Request::builder().uri(target);
        for h in hosts {
            b = b.header(HOST, *h);
        }
        b.body(()).unwrap()
    }

    #[test]
    fn targets_are_rewritten_to_the_normalized_origin_form() {
        let mut r = req("/x/../%61dmin//users?q=%2e", &["api.example.com"]);
        let (host, path) = canonical_target(&mut r, EscapedSlashes::Reject).unwrap();
        assert_eq!(
            (host.as_deref(), path.as_str()),
            (Some("api.example.com"), "/admin/users")
        );
        assert_eq!(
            r.uri().to_string(),
            "/admin/users?q=%2e",
            "the query is left alone"
        );
        // Absolute form: its authority becomes the Host, the upstream sees origin form.
        let mut r = req("http://api.example.com/a/./b", &[]);
        let (host, path) = canonical_target(&mut r, EscapedSlashes::Reject).unwrap();
        assert_eq!(
            (host.as_deref(), path.as_str()),
            (Some("api.example.com"), "/a/b")
        );
        assert_eq!(r.uri().to_string(), "/a/b");
        assert_eq!(r.headers()[HOST], "api.example.com");
    }

    #[test]
    fn ambiguous_requests_are_refused() {
        let e = canonical_target(
            &mut req("/a", &["a.example", "b.example"]),
            EscapedSlashes::Reject,
        )
        .unwrap_err();
        assert!(e.contains("more than one Host"), "{e}");
        let e = canonical_target(
            &mut req("http://a.example/x", &["b.example"]),
            EscapedSlashes::Reject,
        )
        .unwrap_err();
        assert!(e.contains("Host header"), "{e}");
        let e =
            canonical_target(&mut req("/%2Fadmin", &["a"]), EscapedSlashes::Reject).unwrap_err();
        assert!(e.contains("encoded '/'"), "{e}");
        assert!(canonical_target(&mut req("/%2Fadmin", &["a"]), EscapedSlashes::Keep).is_ok());
    }
}
