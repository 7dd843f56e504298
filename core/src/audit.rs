//! Audit events: what a companion observed at its workload's edge (a connection, an HTTP request,
//! an inbound call) and what `nhid` decided about a credential. A companion never says who it
//! serves: `nhid` adds the workload's SPIFFE ID and runtime metadata from its own attachment
//! record before the event is chained into the audit log, so a compromised companion can lie
//! about traffic but not about whose traffic it was.
//!
//! Events never carry a credential's value: only its name and version.

use serde::{Deserialize, Serialize};

/// One thing that happened at a workload's edge or in issuance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct AuditEvent {
    /// Unix time in milliseconds when the event ended (connection closed, request answered,
    /// credential issued or refused).
    pub ts_ms: u64,
    pub kind: AuditKind,
    /// Where the traffic came from, `ip:port` (the workload for outbound, the peer for inbound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<Destination>,
    pub decision: Decision,
    /// The policy rule (or grant) that decided; `None` when a default action applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Bytes from the workload towards the destination.
    #[serde(default)]
    pub bytes_out: u64,
    /// Bytes from the destination back to the workload.
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub duration_ms: u64,
    /// A credential issued, refused or injected (name and version, never the value).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<CredentialRef>,
    /// A short human-readable reason (why denied, what failed). Never a secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// A connection over mutual TLS between workloads: the peer's proven identity and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsAudit>,
}

/// The mutual TLS facts of a connection (issue 18).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct MtlsAudit {
    /// This workload's side: it called (`caller`) or was called (`callee`).
    pub role: MtlsRole,
    /// The SPIFFE ID the peer proved in the handshake; empty when none was proven (a refused
    /// or failed handshake).
    pub peer: String,
    /// No handshake on this connection's way: the caller took a connection made ahead of need
    /// or freed by an earlier one; the callee's connection had carried an earlier one.
    #[serde(default)]
    pub warm: bool,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum MtlsRole {
    #[default]
    Caller,
    Callee,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// An outbound TCP connection (L4 or TLS by SNI).
    #[default]
    Connection,
    /// One outbound plaintext HTTP request.
    HttpRequest,
    /// One inbound request checked by an inbound rule.
    Inbound,
    /// Non-TCP packets the kernel's rules in the workload's namespace denied (written by
    /// `nhid`, rate-limited: one record per logged packet; a summary with exact counts when
    /// the rules are replaced or removed).
    Packet,
    /// One DNS query the companion relayed to a policy's resolver; `destination.host` is the
    /// name asked, `detail` the answer.
    Dns,
    /// A credential (JWT-SVID, X.509-SVID, secret, AWS credentials) issued or refused.
    Credential,
    /// Events lost because the sink fell behind; `detail` says how many.
    Dropped,
    /// Written by `nhid` only: at startup it found its log's end did not match the head (a
    /// truncated, edited or missing file) and started a new segment; `detail` says what it found.
    ChainBreak,
    /// Written by `nhid` only: a workload's last container is gone; `detail` says how many of
    /// the credentials it was issued went on the deny list, and until when.
    WorkloadEnded,
    /// Written by `nhid` only: a cluster node was cut off (`deny`) or taken back (`allow`);
    /// `detail` names the node and where this node learnt it.
    NodeRevoked,
}

impl AuditKind {
    /// Kinds only `nhid` itself may write; a companion sending one is ignored.
    pub fn nhid_only(self) -> bool {
        matches!(
            self,
            AuditKind::ChainBreak | AuditKind::WorkloadEnded | AuditKind::NodeRevoked
        )
    }
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    #[default]
    Allow,
    Deny,
    /// The request was allowed but failed (upstream unreachable, issuer error).
    Error,
}

/// Where outbound traffic was going (or, for inbound, which local port was called).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Destination {
    /// The original destination `ip:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// TLS server name from the ClientHello.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
    /// HTTP Host header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CredentialRef {
    /// `jwt-svid`, `x509-svid`, `secret:<name>`, `aws`, ...
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Most events one `audit` message on the companion channel carries.
pub const MAX_BATCH: usize = 256;

pub use crate::clock::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_compactly_and_round_trip() {
        let ev = AuditEvent {
            ts_ms: 1,
            kind: AuditKind::HttpRequest,
            destination: Some(Destination {
                addr: Some("10.0.0.1:80".into()),
                method: Some("GET".into()),
                path: Some("/x".into()),
                ..Default::default()
            }),
            decision: Decision::Deny,
            rule: Some("no-admin".into()),
            ..Default::default()
        };
        let s = serde_json::to_string(&ev).unwrap();
        assert_eq!(
            s,
            r#"{"ts_ms":1,"kind":"http_request","destination":{"addr":"10.0.0.1:80","method":"GET","path":"/x"},"decision":"deny","rule":"no-admin","bytes_out":0,"bytes_in":0,"duration_ms":0}"#
        );
        assert_eq!(serde_json::from_str::<AuditEvent>(&s).unwrap(), ev);
    }
}
