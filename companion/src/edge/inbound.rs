//! Inbound rules: `nhid`'s rules redirect calls to listed ports here. Each HTTP request needs
//! `Authorization: Bearer <JWT-SVID>` for the rule's audience from an allowed SPIFFE ID,
//! validated by `nhid` (trust bundle, expiry, revocation list); only then is it forwarded to the
//! application on loopback at the port the caller dialed. Otherwise 401/403, and the application
//! never sees the request.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::body::Incoming;
use hyper::header::AUTHORIZATION;
use hyper::{Request, Response, StatusCode};
use nhi_core::audit::{AuditKind, Decision, Destination};
use nhi_core::policy::InboundRule;
use tokio::net::{TcpListener, TcpStream};

use super::http::{json, Body, Upstream};
use super::{event, finish, original_dst, reset, Edge};
use crate::cache::CredError;
use crate::limits::Conn;
use nhi_core::config::CompanionLimits;

/// Accepts redirected inbound connections until the listener fails, within `limits` (see
/// `crate::limits`).
pub async fn serve(listener: TcpListener, edge: Arc<Edge>, limits: CompanionLimits) {
    let gov = super::governor(
        format!("inbound proxy {}", crate::http::local(&listener)),
        &limits,
    );
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                crate::log!("inbound accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Some(conn) = gov.admit_fairly(None).await else {
            super::refuse(&edge, AuditKind::Inbound, peer, stream);
            continue;
        };
        tokio::spawn(connection(
            edge.clone(),
            stream,
            peer,
            Arc::new(conn),
            limits,
        ));
    }
}

async fn connection(
    edge: Arc<Edge>,
    stream: TcpStream,
    peer: SocketAddr,
    conn: Arc<Conn>,
    limits: CompanionLimits,
) {
    let started = Instant::now();
    let _ = stream.set_nodelay(true);
    let dest = original_dst(&stream).ok();
    let rule = match (dest, edge.policy()) {
        (Some(d), Some(p)) => p.inbound_for_port(d.port()).cloned(),
        _ => None,
    };
    let (Some(dest), Some(rule)) = (dest, rule) else {
        let mut ev = event(
            AuditKind::Inbound,
            peer,
            Destination {
                addr: dest.map(|d| d.to_string()),
                ..Default::default()
            },
        );
        ev.decision = Decision::Deny;
        ev.detail = Some("no inbound rule for this port".into());
        finish(&edge, ev, started);
        reset(stream);
        return;
    };
    if let Some(mode) = rule.mtls {
        super::mtls::terminate(edge, stream, peer, dest, &rule, mode, conn, &limits).await;
        return;
    }
    let app = Arc::new(Upstream::new(SocketAddr::new(
        Ipv4Addr::LOCALHOST.into(),
        dest.port(),
    )));
    let rule = Arc::new(rule);
    let c = conn.clone();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let (edge, app, rule, conn) = (edge.clone(), app.clone(), rule.clone(), c.clone());
        async move {
            let refused = |why| {
                let mut ev = event(AuditKind::Inbound, peer, Destination::default());
                ev.rule = Some(rule.id.clone());
                super::http::refusal(&edge, &mut ev, why)
            };
            let answer = request(&edge, &app, &rule, peer, dest, req, &conn);
            Ok::<_, Infallible>(
                conn.request(answer, limits.proxy_idle_timeout, refused)
                    .await,
            )
        }
    });
    super::http::serve_http1(stream, svc, &conn, &limits).await;
}

async fn request(
    edge: &Edge,
    app: &Upstream,
    rule: &InboundRule,
    peer: SocketAddr,
    dest: SocketAddr,
    req: Request<Incoming>,
    conn: &Arc<crate::limits::Conn>,
) -> Response<Body> {
    let started = Instant::now();
    let mut ev = event(
        AuditKind::Inbound,
        peer,
        Destination {
            addr: Some(dest.to_string()),
            method: Some(req.method().as_str().into()),
            path: Some(req.uri().path().into()),
            ..Default::default()
        },
    );
    ev.rule = Some(rule.id.clone());
    let token = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .map(str::to_string);
    let deny = |mut ev: nhi_core::audit::AuditEvent, status: StatusCode, why: String| {
        ev.decision = Decision::Deny;
        ev.detail = Some(why.clone());
        finish(edge, ev, started);
        json(
            status,
            serde_json::json!({"error": if status == StatusCode::UNAUTHORIZED {"unauthorized"} else {"forbidden"}, "rule": rule.id, "message": why}),
        )
    };
    let Some(token) = token else {
        return deny(
            ev,
            StatusCode::UNAUTHORIZED,
            "a JWT-SVID is required: Authorization: Bearer <token>".into(),
        );
    };
    let caller = match edge.creds.validate(&token, &rule.audience).await {
        Ok(v) => v.spiffe_id,
        Err(CredError::Denied(m)) => return deny(ev, StatusCode::FORBIDDEN, m),
        Err(e) => {
            let why = format!("{e:?}");
            return deny(ev, StatusCode::FORBIDDEN, why);
        }
    };
    if !rule
        .allow
        .iter()
        .any(|p| nhi_core::select::glob_match(p, &caller))
    {
        return deny(
            ev,
            StatusCode::FORBIDDEN,
            format!("{caller} is not allowed by inbound rule {:?}", rule.id),
        );
    }
    ev.detail = Some(format!("caller {caller}"));
    let mut req = req;
    // Only a companion that verified a caller in a handshake says who it is.
    super::http::strip_peer_header(req.headers_mut());
    // A WebSocket the caller was allowed to open goes on byte for byte; no other upgrade.
    super::http::websocket_upgrades_only(&mut req);
    let upgrade = hyper::upgrade::on(&mut req);
    let sent = app
        .send(req.map(super::http::without_peer_trailers))
        .await
        .and_then(|mut resp| {
            super::http::relay_upgrade(upgrade, &mut resp, conn.clone(), |_| {}).map(|()| resp)
        });
    match sent {
        Ok(resp) => {
            finish(edge, ev, started);
            resp.map(http_body_util::BodyExt::boxed)
        }
        Err(e) => {
            ev.decision = Decision::Error;
            ev.detail = Some(format!("caller {caller}; app: {e}"));
            finish(edge, ev, started);
            json(
                StatusCode::BAD_GATEWAY,
                serde_json::json!({"error": "app_unreachable", "message": e}),
            )
        }
    }
}
