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
use nhi_core::wire::Call;

pub use sink::AuditSink;

use crate::identity::Identity;
use crate::metrics::Metrics;

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
pub fn ingest(
    sink: &AuditSink,
    metrics: &Metrics,
    identity: &Identity,
    events: Vec<AuditEvent>,
    dropped: u64,
) {
    ingest_into(sink, metrics, identity, events, dropped)
}

fn ingest_into(
    sink: &AuditSink,
    metrics: &Metrics,
    identity: &Identity,
    events: Vec<AuditEvent>,
    dropped: u64,
) {
    let id = identity.spiffe_id.as_str();
    for ev in events {
        if ev.kind.nhid_only() {
            // Only nhid itself says its log broke or a workload ended.
            tracing::warn!(spiffe_id = %id, kind = ?ev.kind, "companion sent an event only nhid writes; ignored");
            continue;
        }
        metrics.event(id, ev.kind, ev.decision);
        if let Some(m) = &ev.mtls {
            metrics.mtls(m, ev.decision);
        }
        sink.submit(about(identity, ev));
    }
    if dropped > 0 {
        tracing::warn!(spiffe_id = %id, dropped, "companion dropped audit events");
        metrics.dropped("companion", dropped);
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
        sink.submit(rec);
    }
}

/// What credential a companion call asks for (`None`: a token check, not an issuance).
pub fn requested(req: &Call) -> Option<CredentialRef> {
    let name = match req {
        Call::Jwt { .. } => "jwt-svid".to_string(),
        Call::X509 => "x509-svid".to_string(),
        Call::Secret { name } => format!("secret:{name}"),
        // Which secret depends on the current policy; `brokered_secret` audits the outcome with
        // the name. This one only shows up when the request is refused before (revoked).
        Call::BrokeredSecret { rule_id } => format!("brokered:{rule_id}"),
        Call::Validate { .. } => return None,
    };
    Some(CredentialRef {
        name,
        version: None,
    })
}

/// Audits one issuance outcome of `nhid` for `identity` and counts it: `version` is the JWT's
/// `jti`, the certificate's serial or the secret's version, never a value.
#[allow(clippy::too_many_arguments)]
pub fn credential(
    sink: &AuditSink,
    metrics: &Metrics,
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
    metrics.issuance(&kind, decision, elapsed);
    metrics.event(identity.spiffe_id.as_str(), AuditKind::Credential, decision);
    cred.version = version;
    sink.submit(about(
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

/// Audits the end of a workload (its last container is gone) with what happened to the
/// credentials it was issued (`detail`).
pub fn workload_ended(
    sink: &AuditSink,
    metrics: &Metrics,
    identity: &Identity,
    decision: Decision,
    detail: String,
) {
    metrics.event(
        identity.spiffe_id.as_str(),
        AuditKind::WorkloadEnded,
        decision,
    );
    sink.submit(about(
        identity,
        AuditEvent {
            ts_ms: now_ms(),
            kind: AuditKind::WorkloadEnded,
            decision,
            detail: Some(detail),
            ..Default::default()
        },
    ));
}

/// Audits a cluster node cut off (`revoked`) or taken back, as this node learnt it (`how`).
pub fn node_revoked(sink: &AuditSink, metrics: &Metrics, node: &str, revoked: bool, how: &str) {
    let decision = if revoked {
        Decision::Deny
    } else {
        Decision::Allow
    };
    metrics.event("", AuditKind::NodeRevoked, decision);
    sink.submit(Record {
        event: AuditEvent {
            ts_ms: now_ms(),
            kind: AuditKind::NodeRevoked,
            decision,
            detail: Some(format!(
                "node {node} {} ({how})",
                if revoked {
                    "cut off the cluster: its JWT keys dropped, OpenBao refuses its tokens"
                } else {
                    "taken back into the cluster"
                }
            )),
            ..Default::default()
        },
        ..Default::default()
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use nhi_core::audit::Destination;
    use nhi_core::audit_log::WriterOptions;
    use nhi_core::config::Fsync;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn companion_events_are_attributed_by_nhid_and_their_drops_recorded() {
        let d = tempfile::tempdir().unwrap();
        let metrics = Arc::new(Metrics::new());
        let opts = WriterOptions {
            max_file_bytes: 1 << 20,
            max_files: 0,
            fsync: Fsync::Never,
        };
        let sink = AuditSink::start(d.path(), opts, 64, metrics.clone()).unwrap();
        let identity = Identity::new(
            nhi_core::SpiffeId::parse("spiffe://td/container/web").unwrap(),
            "r".into(),
            nhi_core::Workload {
                container_id: "c0ffee".into(),
                container_name: Some("web".into()),
                ..Default::default()
            },
        );
        let denied = AuditEvent {
            ts_ms: 5,
            kind: AuditKind::Connection,
            destination: Some(Destination {
                addr: Some("10.0.0.1:443".into()),
                sni: Some("evil.example".into()),
                ..Default::default()
            }),
            decision: Decision::Deny,
            rule: Some("no-evil".into()),
            ..Default::default()
        };
        let forged_break = AuditEvent {
            kind: AuditKind::ChainBreak,
            ..Default::default()
        };
        let forged_end = AuditEvent {
            kind: AuditKind::WorkloadEnded,
            ..Default::default()
        };
        ingest_into(
            &sink,
            &metrics,
            &identity,
            vec![denied.clone(), forged_break, forged_end],
            3,
        );
        assert!(sink.sync(Duration::from_secs(10)));
        let lines = nhi_core::audit_log::tail(d.path(), 100, None).unwrap();
        let recs: Vec<Record> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            recs.len(),
            2,
            "the forged chain_break and workload_ended are not written: {lines:?}"
        );
        assert_eq!(recs[0].event, denied);
        assert_eq!(
            recs[0].spiffe_id.as_deref(),
            Some("spiffe://td/container/web")
        );
        assert_eq!(recs[0].workload.as_ref().unwrap().container_id, "c0ffee");
        assert_eq!(recs[1].event.kind, AuditKind::Dropped);
        assert_eq!(recs[1].dropped, Some(3));
        assert_eq!(
            recs[1].spiffe_id.as_deref(),
            Some("spiffe://td/container/web")
        );
        assert_eq!(metrics.dropped_total("companion"), 3);
        assert!(metrics.render().contains(
            r#"nhi_audit_events_total{spiffe_id="spiffe://td/container/web",kind="connection",decision="deny"} 1"#
        ));
        assert!(nhi_core::audit_log::verify(d.path()).unwrap().ok());
    }
}
