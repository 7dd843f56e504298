//! The identity a companion serves.

use nhi_core::{SpiffeId, Workload};

/// The identity a companion serves, fixed for its life, and what it was issued.
#[derive(Debug)]
pub struct Identity {
    pub spiffe_id: SpiffeId,
    pub rule: String,
    pub workload: Workload,
    /// Every JWT-SVID `jti` and X.509-SVID serial issued over this companion's channel: denied
    /// when the workload ends.
    pub issued: crate::revoke::WorkloadLedger,
}

impl Identity {
    pub fn new(spiffe_id: SpiffeId, rule: String, workload: Workload) -> Self {
        Identity {
            spiffe_id,
            rule,
            workload,
            issued: Default::default(),
        }
    }
}
