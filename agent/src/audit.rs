//! Audit events reaching `nhid`: from companions (edge traffic) and from issuance. Each event is
//! attributed to the workload `nhid` attached, never to what the companion claims.
//!
//! This first cut only traces the events; the append-only, hash-chained log lands with the audit
//! sink (issue 6).

use nhi_core::audit::AuditEvent;

use crate::supervisor::{Ctx, Identity};

/// Takes a batch a companion sent. Never blocks the companion's channel.
pub fn ingest(_ctx: &Ctx, identity: &Identity, events: Vec<AuditEvent>, dropped: u64) {
    for ev in &events {
        tracing::debug!(spiffe_id = %identity.spiffe_id, event = ?ev, "audit");
    }
    if dropped > 0 {
        tracing::warn!(spiffe_id = %identity.spiffe_id, dropped, "companion dropped audit events");
    }
}
