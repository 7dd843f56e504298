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
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderName, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, HOST};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nhi_core::audit::{AuditKind, Decision, Destination};
use nhi_core::policy::{Action, Facts, HttpFacts, Policy};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

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

/// One upstream HTTP/1 connection, opened on first use and reopened if it closed.
pub(crate) struct Upstream {
    addr: SocketAddr,
    conn: Mutex<Option<SendRequest<Incoming>>>,
}

impl Upstream {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        Upstream {
            addr,
            conn: Mutex::new(None),
        }
    }

    pub(crate) async fn send(&self, req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let mut conn = self.conn.lock().await;
        if conn.as_ref().is_none_or(|c| c.is_closed()) {
            let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
                .await
                .map_err(|_| "connect: timed out".to_string())?
                .map_err(|e| format!("connect: {e}"))?;
            let _ = s.set_nodelay(true);
            let (send, c) = hyper::client::conn::http1::handshake(TokioIo::new(s))
                .await
                .map_err(|e| format!("upstream handshake: {e}"))?;
            tokio::spawn(c);
            *conn = Some(send);
        }
        let send = conn.as_mut().expect("just set");
        send.ready().await.map_err(|e| format!("upstream: {e}"))?;
        send.send_request(req)
            .await
            .map_err(|e| format!("upstream: {e}"))
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
            let answer = request(&edge, &upstream, peer, dest, &policy, req);
            Ok::<_, Infallible>(
                conn.request(answer, limits.proxy_idle_timeout, refused)
                    .await,
            )
        }
    });
    serve_http1(client, svc, &conn, &limits).await;
}

/// Serves `svc` on `stream` as HTTP/1 until the client is done or the limits close it.
pub(crate) async fn serve_http1<S>(stream: TcpStream, svc: S, conn: &Conn, limits: &CompanionLimits)
where
    S: hyper::service::Service<Request<Incoming>, Response = Response<Body>, Error = Infallible>,
    S::Future: Send + 'static,
{
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD);
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

async fn request(
    edge: &Edge,
    upstream: &Upstream,
    peer: SocketAddr,
    dest: SocketAddr,
    policy: &Policy,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let started = Instant::now();
    let host = req
        .headers()
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| req.uri().authority().map(|a| a.to_string()));
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let mut ev = event(
        AuditKind::HttpRequest,
        peer,
        Destination {
            addr: Some(dest.to_string()),
            host: host.clone(),
            method: Some(method.clone()),
            path: Some(path.clone()),
            ..Default::default()
        },
    );
    let v = policy.decide(&Facts {
        dest: Some(dest),
        sni: None,
        http: Some(HttpFacts {
            host: host.as_deref(),
            method: &method,
            path: &path,
        }),
    });
    ev.rule = v.rule.map(str::to_string);
    if v.action == Action::Deny {
        ev.decision = Decision::Deny;
        finish(edge, ev, started);
        return json(
            StatusCode::FORBIDDEN,
            serde_json::json!({
                "error": "forbidden",
                "rule": v.rule,
                "policy": policy.id,
                "message": match v.rule {
                    Some(r) => format!("{method} {path} denied by edge policy rule {r:?}"),
                    None => format!("{method} {path} denied by the default of edge policy {:?}", policy.id),
                },
            }),
        );
    }
    if let (Some(b), Some(rule)) = (v.broker, v.rule) {
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
    match upstream.send(req).await {
        Ok(resp) => {
            ev.bytes_in = content_length(resp.headers());
            finish(edge, ev, started);
            resp.map(|b| b.boxed())
        }
        Err(e) => {
            ev.decision = Decision::Error;
            ev.detail = Some(e.clone());
            finish(edge, ev, started);
            json(
                StatusCode::BAD_GATEWAY,
                serde_json::json!({"error": "upstream_failed", "message": e}),
            )
        }
    }
}
