//! Audit events reaching `nhid`: from companions (edge traffic) and from its own issuance. Each
//! event is attributed to the workload `nhid` attached (SPIFFE ID, container, pod, Nomad task),
//! never to what the companion claims, and handed to the [`AuditSink`], which chains it into the
//! append-only log (format: `nhi_core::audit_log`).
//!
//! Nothing here waits on the disk: the supervisor's channel loop and issuance only put records
//! on a bounded queue. A full queue drops the record and counts it; the writer then writes the
//! count as a `dropped` record, so a loss is itself on the log.

mod sink;

use std::time::Instant;

use nhi_core::audit::{now_ms, AuditEvent, AuditKind, CredentialRef, Decision};
use nhi_core::audit_log::{Record, WorkloadRef};
use nhi_core::wire::CompanionRequest;

pub use sink::AuditSink;

use crate::supervisor::{Ctx, Identity};

/// The record skeleton for `identity`: its SPIFFE ID and runtime metadata.
fn about(identity: &Identity, event: AuditEvent) -> Record {
    Record {
        spiffe_id: Some(identity.spiffe_id.to_string()),
        workload: Some(WorkloadRef::from(&identity.workload)),
        event,
        ..Default::default()
    }
}

/// Takes a batch a companion sent. Never blocks the companion's channel.
pub fn ingest(ctx: &Ctx, identity: &Identity, events: Vec<AuditEvent>, dropped: u64) {
    let id = identity.spiffe_id.as_str();
    for ev in events {
        if ev.kind == AuditKind::ChainBreak {
            // Only nhid itself says its log broke.
            tracing::warn!(spiffe_id = %id, "companion sent a chain_break event; ignored");
            continue;
        }
        ctx.metrics.event(id, ev.kind, ev.decision);
        ctx.audit.submit(about(identity, ev));
    }
    if dropped > 0 {
        tracing::warn!(spiffe_id = %id, dropped, "companion dropped audit events");
        ctx.metrics.dropped("companion", dropped);
        let mut rec = about(
            identity,
            AuditEvent {
                ts_ms: now_ms(),
                kind: AuditKind::Dropped,
                decision: Decision::Error,
                detail: Some(format!(
                    "the companion's audit queue was full: {dropped} events lost"
                )),
                ..Default::default()
            },
        );
        rec.dropped = Some(dropped);
        ctx.audit.submit(rec);
    }
}

/// What credential a companion request asks for (`None`: not an issuance).
pub fn requested(req: &CompanionRequest) -> Option<CredentialRef> {
    let name = match req {
        CompanionRequest::Jwt { .. } => "jwt-svid".to_string(),
        CompanionRequest::X509 => "x509-svid".to_string(),
        CompanionRequest::Secret { name } => format!("secret:{name}"),
        _ => return None,
    };
    Some(CredentialRef {
        name,
        version: None,
    })
}

/// Audits one issuance outcome of `nhid` for `identity` and counts it: `version` is the JWT's
/// `jti`, the certificate's serial or the secret's version, never a value.
pub fn credential(
    ctx: &Ctx,
    identity: &Identity,
    cred: Option<CredentialRef>,
    version: Option<String>,
    decision: Decision,
    detail: Option<String>,
    started: Instant,
) {
    let Some(mut cred) = cred else { return };
    let elapsed = started.elapsed();
    let kind = cred.name.split(':').next().unwrap_or("").to_string();
    ctx.metrics.issuance(&kind, decision, elapsed);
    ctx.metrics
        .event(identity.spiffe_id.as_str(), AuditKind::Credential, decision);
    cred.version = version;
    ctx.audit.submit(about(
        identity,
        AuditEvent {
            ts_ms: now_ms(),
            kind: AuditKind::Credential,
            decision,
            credential: Some(cred),
            duration_ms: elapsed.as_millis() as u64,
            detail,
            ..Default::default()
        },
    ));
}
