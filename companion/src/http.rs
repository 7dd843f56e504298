//! The companion's HTTP API on loopback inside the workload's network namespace.
//! Every error is a 4xx/5xx with a JSON body `{"error": code, "message": text}`.
//!
//! Credential-bearing endpoints (`/v1/token`, `/v1/x509`, `/v1/secrets/*`, `/v1/validate`)
//! answer only requests carrying [`PROOF_HEADER`]`: true`, like cloud metadata services
//! (GKE's `Metadata-Flavor: Google`, IMDSv2's token obtained with a `PUT`): a server-side
//! request forgery usually controls only a URL, and a browser cannot add a custom header to a
//! cross-origin request without a CORS preflight, which the companion never answers. The AWS
//! endpoint keeps its own token instead (AWS SDKs cannot add headers). A second `Host` header
//! or an absolute-form request target (`GET http://host/...`, what a proxy receives) is
//! refused before anything else.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use nhi_core::config::CompanionLimits;
use nhi_core::wire::Init;
use tokio::net::TcpListener;

use base64::Engine;
use http_body_util::BodyExt;

use crate::cache::{CredError, Creds};
use crate::limits::{Bounds, Conn, Governor, Refusal};

const MAX_AUDIENCES: usize = 8;
const MAX_AUDIENCE_LEN: usize = 256;

pub struct Api {
    creds: Arc<Creds>,
    aws: Option<nhi_core::wire::AwsProvider>,
    /// Where refusals of the AWS endpoint are audited (nhid attributes them to the workload).
    recorder: crate::audit::Recorder,
    identity: Bytes,
    health: Bytes,
}

type Resp = Response<Full<Bytes>>;

impl Api {
    pub fn new(init: &Init, creds: Arc<Creds>, recorder: crate::audit::Recorder) -> Self {
        let identity = serde_json::json!({
            "spiffe_id": init.spiffe_id,
            "trust_domain": init.trust_domain,
            "rule": init.rule,
            "workload": init.workload,
        });
        Api {
            creds,
            aws: init.aws.clone(),
            recorder,
            identity: json_bytes(&identity),
            health: json_bytes(&serde_json::json!({"status": "ok", "spiffe_id": init.spiffe_id})),
        }
    }

    pub async fn route(&self, req: Request<Incoming>) -> Resp {
        if let Err(why) = origin_form(&req) {
            return error(StatusCode::BAD_REQUEST, "bad_request", why);
        }
        if let Err(why) = local_request(req.headers()) {
            return error(StatusCode::FORBIDDEN, "not_local", why);
        }
        let path = req.uri().path().to_string();
        let (allowed, known) = match path.as_str() {
            "/healthz" | "/v1/identity" | "/v1/token" | "/v1/x509" | "/v1/bundle" | "/v1/jwks"
            | SPIFFE_BUNDLE_PATH => (Method::GET, true),
            "/v1/validate" => (Method::POST, true),
            AWS_PATH => (Method::GET, true),
            p => (Method::GET, p.starts_with("/v1/secrets/")),
        };
        if !known {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                &format!("no such endpoint: {path}"),
            );
        }
        if req.method() != allowed {
            let mut r = error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                &format!("{path} only answers {allowed}"),
            );
            r.headers_mut().insert(
                ALLOW,
                HeaderValue::from_str(allowed.as_str()).expect("method is a header value"),
            );
            return r;
        }
        if needs_proof(&path) && !has_proof(req.headers()) {
            return error(
                StatusCode::FORBIDDEN,
                "proof_required",
                &format!(
                    "{path} hands out credentials only to requests with the header \"{PROOF_HEADER_NAME}: true\" (a forged server-side request or a web page cannot add it); see docs/USING.md"
                ),
            );
        }
        match path.as_str() {
            "/healthz" => ok(self.health.clone(), "application/json"),
            "/v1/identity" => ok(self.identity.clone(), "application/json"),
            "/v1/bundle" => ok(self.creds.trust().bundle.clone(), "application/x-pem-file"),
            "/v1/jwks" => ok(self.creds.trust().jwks.clone(), "application/json"),
            SPIFFE_BUNDLE_PATH => match self.creds.trust().spiffe.clone() {
                b if b.is_empty() => error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "issuer_unavailable",
                    "nhid sent no SPIFFE bundle (an older nhid?)",
                ),
                b => ok(b, "application/json"),
            },
            "/v1/token" => self.token(req.uri().query().unwrap_or("")).await,
            "/v1/x509" => match self.creds.x509().await {
                Ok(x) => {
                    let mut pem = String::with_capacity(x.cert_chain_pem.len() + x.key_pem.len());
                    pem.push_str(&x.cert_chain_pem);
                    pem.push_str(&x.key_pem);
                    secret(ok(Bytes::from(pem), "application/x-pem-file"))
                }
                Err(e) => cred_error(e),
            },
            "/v1/validate" => self.validate(req).await,
            AWS_PATH => self.aws_credentials(req.headers()).await,
            p => self.secret(&p["/v1/secrets/".len()..]).await,
        }
    }

    /// The AWS container-credential provider: session credentials from the rule's secret,
    /// for callers presenting the workload's token.
    async fn aws_credentials(&self, headers: &hyper::HeaderMap) -> Resp {
        let Some(p) = &self.aws else {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no AWS credential source (aws_credentials) for this workload",
            );
        };
        let auth = headers
            .get(hyper::header::AUTHORIZATION)
            .map(|v| v.as_bytes());
        if !crate::aws::authorized(p, auth) {
            return error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authorization must be the workload's token (AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE)",
            );
        }
        let mut fresh = false;
        loop {
            let s = match self.creds.secret(&p.secret).await {
                Ok(s) => s,
                Err(e) => return cred_error(e),
            };
            // A secret the SDKs cannot all read is refused, never passed through: 502 with the
            // reason (it names fields, never their values), and an audit record.
            let refuse = |status: StatusCode, code: &str, why: String| {
                self.recorder.record(nhi_core::audit::AuditEvent {
                    ts_ms: nhi_core::audit::now_ms(),
                    kind: nhi_core::audit::AuditKind::Credential,
                    decision: nhi_core::audit::Decision::Error,
                    credential: Some(nhi_core::audit::CredentialRef {
                        name: format!("aws:{}", p.secret),
                        version: Some(s.version.to_string()),
                    }),
                    detail: Some(why.clone()),
                    ..Default::default()
                });
                crate::log!(
                    "nhi-companion: refused AWS credentials from secret {:?} version {}: {why}",
                    p.secret,
                    s.version
                );
                error(status, code, &why)
            };
            let raw = match base64::engine::general_purpose::STANDARD.decode(&s.value_b64) {
                Ok(r) => zeroize::Zeroizing::new(r),
                Err(_) => {
                    return refuse(
                        StatusCode::BAD_GATEWAY,
                        "bad_secret",
                        "undecodable value".into(),
                    )
                }
            };
            let (c, exp) = match crate::aws::SessionCredentials::parse(&raw) {
                Ok(c) => c,
                Err(m) => {
                    return refuse(
                        StatusCode::BAD_GATEWAY,
                        "bad_secret",
                        format!("secret {:?}: {m}", p.secret),
                    )
                }
            };
            let now = crate::cache::now_unix();
            if exp <= now + crate::aws::REFRESH_MARGIN && !fresh {
                // Close to expiry: ask nhid for what the store holds now.
                self.creds.forget_secret(&p.secret);
                fresh = true;
                continue;
            }
            if exp <= now {
                return refuse(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "expired",
                    format!(
                        "the AWS credentials in secret {:?} expired at {}",
                        p.secret, c.expiration
                    ),
                );
            }
            let body = serde_json::to_vec(&c).expect("credentials serialize");
            return secret(ok(Bytes::from(body), "application/json"));
        }
    }

    async fn secret(&self, name: &str) -> Resp {
        if !nhi_core::grant::valid_secret_name(name) {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "secret names use ASCII letters, digits, '.', '-', '_'",
            );
        }
        match self.creds.secret(name).await {
            Ok(s) => {
                let raw = match base64::engine::general_purpose::STANDARD.decode(&s.value_b64) {
                    Ok(r) => zeroize::Zeroizing::new(r),
                    Err(_) => {
                        return error(StatusCode::BAD_GATEWAY, "bad_secret", "undecodable value")
                    }
                };
                let mut body = serde_json::json!({
                    "name": s.name,
                    "version": s.version,
                    "expires_at": s.expires_at,
                });
                match std::str::from_utf8(&raw) {
                    Ok(text) => body["value"] = text.into(),
                    Err(_) => body["value_base64"] = s.value_b64.clone().into(),
                }
                let resp = secret(ok(json_bytes(&body), "application/json"));
                zeroize_json(body);
                resp
            }
            Err(e) => cred_error(e),
        }
    }

    async fn validate(&self, req: Request<Incoming>) -> Resp {
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Body {
            token: String,
            audience: String,
        }
        let limited = http_body_util::Limited::new(req.into_body(), MAX_VALIDATE_BODY);
        let bytes = match limited.collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "bad_request",
                    &format!("body: {e}"),
                )
            }
        };
        let body: Body = match serde_json::from_slice(&bytes) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("expected {{\"token\": ..., \"audience\": ...}}: {e}"),
                )
            }
        };
        match self.creds.validate(&body.token, &body.audience).await {
            Ok(v) => ok(
                json_bytes(&serde_json::json!({
                    "valid": true,
                    "spiffe_id": v.spiffe_id,
                    "claims": v.claims,
                })),
                "application/json",
            ),
            Err(CredError::Denied(m)) => error(StatusCode::FORBIDDEN, "invalid_token", &m),
            Err(e) => cred_error(e),
        }
    }

    async fn token(&self, query: &str) -> Resp {
        let audience = match parse_audience(query) {
            Ok(a) => a,
            Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", &e),
        };
        match self.creds.jwt(audience).await {
            Ok(j) => {
                let body = serde_json::json!({
                    "token": j.token,
                    "spiffe_id": j.spiffe_id,
                    "audience": j.audience,
                    "issued_at": j.issued_at,
                    "expires_at": j.expires_at,
                });
                secret(ok(json_bytes(&body), "application/json"))
            }
            Err(e) => cred_error(e),
        }
    }
}

const MAX_VALIDATE_BODY: usize = 64 * 1024;
/// The trust bundle in the SPIFFE bundle format (JWK Set with `x509-svid` and `jwt-svid` keys).
pub const SPIFFE_BUNDLE_PATH: &str = "/v1/bundle.spiffe";
/// The AWS container-credential endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`).
pub const AWS_PATH: &str = "/v1/aws/credentials";

/// Wipes the string values of a JSON body that held a secret.
fn zeroize_json(v: serde_json::Value) {
    if let serde_json::Value::Object(map) = v {
        for (_, v) in map {
            if let serde_json::Value::String(s) = v {
                zeroize::Zeroize::zeroize(&mut s.into_bytes());
            }
        }
    }
}

fn cred_error(e: CredError) -> Resp {
    match e {
        CredError::Denied(m) => error(StatusCode::FORBIDDEN, "forbidden", &m),
        CredError::NotFound(m) => error(StatusCode::NOT_FOUND, "not_found", &m),
        CredError::Unavailable(m) => {
            error(StatusCode::SERVICE_UNAVAILABLE, "issuer_unavailable", &m)
        }
        CredError::Busy(m) => {
            let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "busy", &m);
            r.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            r
        }
    }
}

/// The request header credential endpoints require, with the value `true`.
pub const PROOF_HEADER: &str = "nhi-request";
/// How the docs and error messages spell it.
pub const PROOF_HEADER_NAME: &str = "Nhi-Request";

/// Endpoints that hand out credentials or use them (and so need [`PROOF_HEADER`]).
pub fn needs_proof(path: &str) -> bool {
    matches!(path, "/v1/token" | "/v1/x509" | "/v1/validate") || path.starts_with("/v1/secrets/")
}

/// Exactly one `Nhi-Request: true`.
pub fn has_proof(headers: &hyper::HeaderMap) -> bool {
    let mut all = headers.get_all(PROOF_HEADER).iter();
    matches!((all.next(), all.next()), (Some(v), None) if v.as_bytes() == b"true")
}

/// A request the workload made to the companion itself: an origin-form target (`/path`), not
/// the absolute form a proxy receives (`GET http://host/path`) or an authority (`CONNECT`).
pub fn origin_form<B>(req: &Request<B>) -> Result<(), &'static str> {
    if req.uri().scheme().is_some() || req.uri().authority().is_some() {
        return Err("absolute-form request targets are refused: send GET /path to the companion itself, not through a proxy");
    }
    Ok(())
}

/// Only the workload's own processes talk to the companion, by a loopback address. Browsers
/// and proxies give themselves away: a `Host` other than loopback means a rebound DNS name or a
/// forwarded request (SSRF through a proxy in the workload); `Origin` and `Sec-Fetch-*` mean a
/// web page; `Forwarded`/`X-Forwarded-For` mean a proxy relayed someone else's request.
pub fn local_request(headers: &hyper::HeaderMap) -> Result<(), &'static str> {
    for h in [
        "origin",
        "sec-fetch-site",
        "sec-fetch-mode",
        "forwarded",
        "x-forwarded-for",
    ] {
        if headers.contains_key(h) {
            return Err("browser or proxied requests are refused: the companion serves only the workload's own processes");
        }
    }
    let mut hosts = headers.get_all(hyper::header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        if headers.contains_key(hyper::header::HOST) {
            return Err("more than one Host header");
        }
        return Ok(()); // HTTP/1.0 clients; the listener is loopback-only anyway.
    };
    let host = host.to_str().map_err(|_| "malformed Host header")?;
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err("the Host header must be a loopback address or localhost")
    }
}

/// `audience=A` (repeatable). Nothing else is accepted, so a typo'd parameter isn't ignored.
pub fn parse_audience(query: &str) -> Result<Vec<String>, String> {
    let mut aud = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        if k != "audience" {
            return Err(format!("unknown query parameter {k:?} (only \"audience\")"));
        }
        if v.is_empty() || v.len() > MAX_AUDIENCE_LEN || v.chars().any(char::is_control) {
            return Err(format!(
                "audience must be 1 to {MAX_AUDIENCE_LEN} bytes without control characters"
            ));
        }
        if !aud.iter().any(|a| a == &v) {
            aud.push(v.into_owned());
        }
    }
    if aud.is_empty() {
        return Err("missing required query parameter audience".into());
    }
    if aud.len() > MAX_AUDIENCES {
        return Err(format!("at most {MAX_AUDIENCES} audiences"));
    }
    Ok(aud)
}

fn json_bytes(v: &serde_json::Value) -> Bytes {
    let mut b = serde_json::to_vec(v).expect("json serializes");
    b.push(b'\n');
    Bytes::from(b)
}

fn ok(body: Bytes, content_type: &'static str) -> Resp {
    let mut r = Response::new(Full::new(body));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Credentials must not end up in shared caches.
fn secret(mut r: Resp) -> Resp {
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Resp {
    let mut r = ok(
        json_bytes(&serde_json::json!({"error": code, "message": message})),
        "application/json",
    );
    *r.status_mut() = status;
    r
}

/// Largest HTTP/1 request head read (hyper's buffer; it stops reading there).
const MAX_HEAD: usize = 16 * 1024;

/// Serves the API on `listener` within `limits` (see `crate::limits`).
pub async fn serve(listener: TcpListener, api: Arc<Api>, limits: CompanionLimits) {
    let gov = Governor::new(
        format!("HTTP API {}", local(&listener)),
        Bounds {
            max_connections: limits.api_connections,
            first_request: limits.header_timeout,
            idle: limits.header_timeout,
            max_age: Some(limits.max_connection_age),
        },
    );
    tokio::spawn(gov.clone().watch());
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                crate::log!("nhi-companion: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(conn) = gov.admit_fairly(None).await else {
            // Every slot has a request waiting: say so, without waiting to read anything.
            let _ = stream.try_write(BUSY_RESPONSE);
            continue;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(connection(api.clone(), stream, conn, limits));
    }
}

pub(crate) fn local(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

const BUSY_RESPONSE: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: 83\r\nconnection: close\r\n\r\n{\"error\":\"busy\",\"message\":\"every connection has a request waiting; retry shortly\"}\n";

async fn connection(
    api: Arc<Api>,
    stream: tokio::net::TcpStream,
    conn: Conn,
    limits: CompanionLimits,
) {
    let conn = Arc::new(conn);
    let c = conn.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (api, conn) = (api.clone(), c.clone());
        async move {
            let close = conn.too_old();
            let mut resp = conn
                .request(api.route(req), limits.request_timeout, refused)
                .await;
            if close {
                resp.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
            }
            Ok::<_, Infallible>(resp)
        }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(MAX_HEAD);
    let served = http.serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
    tokio::select! {
        _ = served => {}
        _ = conn.slot().killed() => {}
    }
}

fn refused(why: Refusal) -> Resp {
    match why {
        Refusal::Busy => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "busy",
            "too many requests are waiting for nhid; retry shortly",
        ),
        Refusal::TimedOut => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "timeout",
            "no answer within the request timeout",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_requests() {
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = hyper::HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            local_request(&m)
        };
        for host in [
            "127.0.0.1:15100",
            "localhost",
            "LOCALHOST:1",
            "[::1]:15100",
            "127.0.0.53",
        ] {
            assert!(h(&[("host", host)]).is_ok(), "{host}");
        }
        assert!(h(&[]).is_ok());
        for host in [
            "evil.example.com",
            "evil.example.com:15100",
            "10.0.0.1:15100",
            "[fe80::1]",
        ] {
            assert!(h(&[("host", host)]).is_err(), "{host}");
        }
        assert!(h(&[("host", "127.0.0.1"), ("origin", "http://x")]).is_err());
        assert!(h(&[("host", "127.0.0.1"), ("sec-fetch-mode", "cors")]).is_err());
        assert!(h(&[("host", "127.0.0.1"), ("x-forwarded-for", "1.2.3.4")]).is_err());
        let mut two = hyper::HeaderMap::new();
        two.append("host", HeaderValue::from_static("127.0.0.1"));
        two.append("host", HeaderValue::from_static("evil.example.com"));
        assert_eq!(local_request(&two), Err("more than one Host header"));
    }

    #[test]
    fn credential_endpoints_need_the_proof_header() {
        for p in ["/v1/token", "/v1/x509", "/v1/validate", "/v1/secrets/db"] {
            assert!(needs_proof(p), "{p}");
        }
        for p in [
            "/healthz",
            "/v1/identity",
            "/v1/bundle",
            "/v1/jwks",
            AWS_PATH,
        ] {
            assert!(!needs_proof(p), "{p}");
        }
        let with = |vals: &[&'static str]| {
            let mut m = hyper::HeaderMap::new();
            for v in vals {
                m.append(PROOF_HEADER, HeaderValue::from_static(v));
            }
            has_proof(&m)
        };
        assert!(with(&["true"]));
        assert!(!with(&[]));
        assert!(!with(&["1"]));
        assert!(!with(&["TRUE "]));
        assert!(!with(&["true", "true"]));
    }

    #[test]
    fn absolute_form_targets_are_refused() {
        let req = |uri: &str| Request::get(uri).body(()).unwrap();
        assert!(origin_form(&req("/v1/token?audience=a")).is_ok());
        assert!(origin_form(&req("http://evil.example/v1/token")).is_err());
        assert!(origin_form(&req("http://127.0.0.1:15100/v1/token")).is_err());
    }

    #[test]
    fn the_busy_answer_is_well_formed() {
        let text = std::str::from_utf8(BUSY_RESPONSE).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        serde_json::from_str::<serde_json::Value>(body).unwrap();
    }

    #[test]
    fn audience_parsing() {
        assert_eq!(parse_audience("audience=a").unwrap(), vec!["a"]);
        assert_eq!(
            parse_audience("audience=a&audience=b%20c&audience=a").unwrap(),
            vec!["a", "b c"]
        );
        assert!(parse_audience("").is_err());
        assert!(parse_audience("audience=").is_err());
        assert!(parse_audience("aud=a").is_err());
        assert!(parse_audience("audience=a%0Ab").is_err());
        assert!(parse_audience(&format!("audience={}", "x".repeat(300))).is_err());
        let many: Vec<String> = (0..9).map(|i| format!("audience={i}")).collect();
        assert!(parse_audience(&many.join("&")).is_err());
    }
}
