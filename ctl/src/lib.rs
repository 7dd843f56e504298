//! nhictl: the operator CLI. Talks to `nhid` over its root-only socket; verifies tokens offline;
//! wires nhi into container runtimes (`configure`).

pub mod configure;

use std::path::Path;
use std::time::Duration;

use nhi_core::wire::{call_agent, AgentRequest, AgentResponse, Status};

/// One request to nhid; its `Error` answer becomes `Err`.
pub fn agent(socket: &Path, req: &AgentRequest) -> Result<AgentResponse, String> {
    match call_agent(socket, req, Duration::from_secs(30)) {
        Ok(AgentResponse::Error { message }) => Err(message),
        Ok(r) => Ok(r),
        Err(e) => Err(format!("cannot reach nhid at {}: {e}", socket.display())),
    }
}

pub fn status(socket: &Path) -> Result<Status, String> {
    match agent(socket, &AgentRequest::Status)? {
        AgentResponse::Status(s) => Ok(s),
        other => Err(format!("unexpected answer: {other:?}")),
    }
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
    if !s.revocations.is_empty() {
        out.push_str(&format!("revoked:      {}\n", s.revocations.len()));
        for r in &s.revocations {
            out.push_str(&format!(
                "  {}  at={} jtis={} serials={}\n",
                r.spiffe_id,
                r.revoked_at,
                r.jtis.len(),
                r.serials.len()
            ));
        }
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
