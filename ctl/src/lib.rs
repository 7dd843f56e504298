//! nhictl: the operator CLI. Talks to `nhid` over its root-only socket; verifies tokens offline;
//! wires nhi into container runtimes (`configure`).

pub mod audit;
pub mod configure;
pub mod node;
pub mod secret;
pub mod token;

use std::path::Path;
use std::time::Duration;

use nhi_core::nhid_client::NhidClient;
use nhi_core::wire::Status;

/// How long nhictl waits on each read and write to `nhid`.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// The client of the `nhid` that the config at `config` names.
pub fn client(config: &Path) -> Result<NhidClient, String> {
    let socket = nhi_core::Config::load(config)
        .map_err(|e| e.to_string())?
        .socket;
    Ok(NhidClient::new(&socket, TIMEOUT))
}

pub fn status(nhid: &NhidClient) -> Result<Status, String> {
    nhid.status().map_err(|e| e.to_string())
}

/// Human-readable status.
pub fn render_status(s: &Status) -> String {
    let mut out = format!(
        "trust domain: {}\nissuer:       {}\nworkloads:    {}\n",
        s.trust_domain,
        s.issuer,
        s.workloads.len()
    );
    if !s.store.kind.is_empty() {
        out.push_str(&format!("store:        {}", s.store.kind));
        if s.store.degraded.is_empty() {
            out.push_str(" (healthy)\n");
        } else {
            out.push_str(&format!(" DEGRADED: {}\n", s.store.degraded.join("; ")));
        }
    }
    let (ended, revoked): (Vec<_>, Vec<_>) = s.revocations.iter().partition(|r| r.ended.is_some());
    if !ended.is_empty() {
        let (jtis, serials) = ended
            .iter()
            .fold((0, 0), |(j, x), r| (j + r.jtis.len(), x + r.serials.len()));
        out.push_str(&format!(
            "ended:        {} workloads, their {jtis} JWT-SVIDs and {serials} X.509-SVIDs denied until they expire\n",
            ended.len()
        ));
    }
    if !revoked.is_empty() {
        out.push_str(&format!("revoked:      {}\n", revoked.len()));
        for r in revoked {
            out.push_str(&format!(
                "  {}  at={} jtis={} serials={}\n",
                r.spiffe_id,
                r.revoked_at,
                r.jtis.len(),
                r.serials.len()
            ));
        }
    }
    if !s.revoked_nodes.is_empty() {
        out.push_str(&format!("nodes cut off: {}\n", s.revoked_nodes.join(", ")));
    }
    for w in &s.workloads {
        out.push_str(&format!(
            "  {}  rule={} companion_pid={} netns={} containers={}\n",
            w.spiffe_id.as_deref().unwrap_or("(identity pending)"),
            w.rule,
            w.companion_pid,
            w.netns_inode,
            w.containers.join(",")
        ));
    }
    out
}

pub use nhi_core::jwt::{verify_token, Claims};

#[cfg(test)]
mod tests {
    use super::*;
    use nhi_core::wire::{EndedWorkload, Revocation};

    #[test]
    fn status_counts_ended_workloads_apart_from_revoked_identities() {
        let rev = |id: &str, ended: bool| Revocation {
            spiffe_id: id.into(),
            revoked_at: if ended { 0 } else { 7 },
            jtis: vec!["j1".into(), "j2".into()],
            serials: vec!["s".into()],
            ended: ended.then(|| EndedWorkload {
                id: "ab".into(),
                workload: "container c".into(),
                ended_at: 1,
                expires_at: 2,
            }),
        };
        let s = Status {
            trust_domain: "td".into(),
            issuer: "embedded".into(),
            bundle_pem: String::new(),
            bundle_spiffe: serde_json::Value::Null,
            workloads: vec![],
            store: Default::default(),
            revocations: vec![rev("spiffe://td/a", false), rev("spiffe://td/b", true)],
            revoked_nodes: vec!["node-7".into()],
        };
        let out = render_status(&s);
        assert!(out.contains("nodes cut off: node-7\n"), "{out}");
        assert!(
            out.contains("revoked:      1\n  spiffe://td/a  at=7"),
            "{out}"
        );
        assert!(!out.contains("spiffe://td/b"), "{out}");
        assert!(
            out.contains("ended:        1 workloads, their 2 JWT-SVIDs and 1 X.509-SVIDs"),
            "{out}"
        );
    }
}
