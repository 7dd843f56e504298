//! Wire types. Two channels, both newline-delimited JSON:
//! - the agent API on `nhid`'s root-only unix socket (hook / nhictl → nhid), one request and one
//!   response per connection;
//! - the companion channel, a socketpair created by `nhid` at spawn (nhid ↔ one companion), many
//!   requests in flight, matched by `id`.

use serde::{Deserialize, Serialize};

use crate::workload::Workload;

/// Requests to `nhid`'s agent API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AgentRequest {
    /// From `nhi-hook createRuntime`: attach a companion to the container whose init is `pid`.
    Attach {
        workload: Box<Workload>,
        pid: i32,
        /// The rule the hook selected; `nhid` re-evaluates with its own config and only uses this
        /// to detect a hook/daemon config mismatch.
        rule: String,
    },
    /// From `nhi-hook poststop`: the container is gone.
    Detach {
        container_id: String,
    },
    Status,
    /// `nhictl secret put` / `rotate`: store a new version. `value_b64` `None` (rotate only):
    /// nhid generates 32 random bytes.
    SecretPut {
        name: String,
        value_b64: Option<String>,
        /// Only replace an existing secret (`rotate`).
        must_exist: bool,
    },
    SecretGet {
        name: String,
    },
    SecretList,
    SecretRm {
        name: String,
    },
    /// `nhictl revoke`: by SPIFFE ID or by a container (whose identity is revoked).
    Revoke {
        target: RevokeTarget,
        undo: bool,
    },
    /// `nhictl token verify` and companions: signature, audience, expiry and the deny list.
    Validate {
        token: String,
        audience: String,
    },
    /// `nhictl ca rotate`: a new CA in the bundle now, signing `activate_after_secs` later
    /// (default: half an X.509-SVID's life); the old one leaves once its last SVID expired.
    CaRotate {
        activate_after_secs: Option<u64>,
    },
    /// `nhictl node revoke NODE`: cut a node off the cluster (or, `undo`, take it back), with
    /// an operator's OpenBao token for this one command (nodes may not do it themselves).
    NodeRevoke {
        node: String,
        undo: bool,
        operator_token: Redacted,
    },
}

/// A node cut off the cluster (`<kv_prefix>/node-revocations/<node>` in OpenBao): every node
/// drops its JWT keys and OpenBao refuses its tokens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NodeRevocation {
    pub node: String,
    pub revoked_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RevokeTarget {
    SpiffeId(String),
    Workload(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AgentResponse {
    Attached {
        spiffe_id: String,
        companion_pid: i32,
        netns_inode: u64,
        /// Another container of the same network namespace already had the companion.
        joined: bool,
    },
    /// A pod sandbox: its network namespace is reserved for the pod's companion, which starts
    /// with the identity of the first app container.
    Reserved {
        netns_inode: u64,
    },
    NotSelected,
    Detached {
        /// The companion was stopped (last container of its network namespace).
        stopped: bool,
    },
    Status(Status),
    SecretStored {
        name: String,
        version: u64,
    },
    Secret(SecretValue),
    Secrets {
        secrets: Vec<SecretInfo>,
    },
    SecretRemoved {
        name: String,
    },
    Revoked {
        spiffe_id: String,
        /// Credentials already issued and now on the deny list.
        jtis: usize,
        serials: usize,
        undone: bool,
    },
    Validated(Validated),
    CaRotated {
        /// Unix times: the new CA signs from, the old one leaves the bundle at, the new one
        /// expires at.
        signs_from: u64,
        old_leaves_at: u64,
        not_after: u64,
    },
    NodeRevoked {
        node: String,
        undone: bool,
        /// The node's OpenBao entity, now disabled (or enabled again).
        entity_id: String,
        /// Every node cut off now.
        revoked_nodes: Vec<String>,
    },
    Error {
        message: String,
    },
}

/// A secret's value in transit (base64, any bytes). Debug never shows the value.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretValue {
    pub name: String,
    pub version: u64,
    pub value_b64: String,
    /// Unix time after which a holder must not serve it without asking `nhid` again.
    pub expires_at: u64,
}

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretValue")
            .field("name", &self.name)
            .field("version", &self.version)
            .field("value_b64", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A secret's name and version, never its value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SecretInfo {
    pub name: String,
    pub version: u64,
    pub updated_at: u64,
}

/// A JWT-SVID that passed validation.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Validated {
    pub spiffe_id: String,
    pub claims: serde_json::Value,
}

/// One entry of the deny list. Either a revoked identity: credentials issued to it up to
/// `revoked_at` are refused, and the ones `nhid` knows it issued are listed by `jti` /
/// certificate serial; or (`ended` set) the credentials one workload of `spiffe_id` was issued,
/// listed when its last container went, refused until they expire (no cut-off: other
/// workloads of the same identity go on).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Revocation {
    pub spiffe_id: String,
    pub revoked_at: u64,
    #[serde(default)]
    pub jtis: Vec<String>,
    #[serde(default)]
    pub serials: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<EndedWorkload>,
}

/// A workload whose last container is gone.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndedWorkload {
    /// Random, names the entry (`ended/<id>`).
    pub id: String,
    /// Which workload: container ids, pod namespace/name, Nomad allocation.
    pub workload: String,
    pub ended_at: u64,
    /// When the last listed credential expires; the entry goes then.
    pub expires_at: u64,
}

impl Revocation {
    /// The entry's key in the list and the store: the SPIFFE ID for an identity's revocation,
    /// `ended/<id>` (never a SPIFFE ID) for an ended workload's credentials.
    pub fn key(&self) -> String {
        match &self.ended {
            Some(e) => format!("ended/{}", e.id),
            None => self.spiffe_id.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub trust_domain: String,
    pub issuer: String,
    pub bundle_pem: String,
    /// The trust bundle in the SPIFFE bundle format (`nhictl bundle --format spiffe`).
    #[serde(default)]
    pub bundle_spiffe: serde_json::Value,
    pub workloads: Vec<WorkloadStatus>,
    #[serde(default)]
    pub store: StoreStatus,
    #[serde(default)]
    pub revocations: Vec<Revocation>,
    /// Nodes cut off the cluster (`nhictl node revoke`).
    #[serde(default)]
    pub revoked_nodes: Vec<String>,
}

/// The secret store's health, for `nhictl status`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreStatus {
    pub kind: String,
    /// Empty when healthy; otherwise what is degraded and why.
    #[serde(default)]
    pub degraded: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkloadStatus {
    /// `None` while a pod's identity waits for its first app container.
    pub spiffe_id: Option<String>,
    pub rule: String,
    pub netns_inode: u64,
    /// 0 when no companion runs (identity pending).
    pub companion_pid: i32,
    pub containers: Vec<String>,
    pub workload: Workload,
}

/// Companion → nhid: one line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelRequest {
    /// A [`Call`]'s id, echoed by its [`Reply`]; [`EVENT_ID`] on notices.
    pub id: u64,
    #[serde(flatten)]
    pub body: FromCompanion,
}

/// What a companion sends: the opening of the channel, calls `nhid` answers, notices it
/// does not. One JSON shape for all (`kind` names the message); the Rust types keep apart
/// what is answered and what is not.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FromCompanion {
    /// The opening of a channel `nhid` created at spawn, sent once the HTTP listener is bound:
    /// the companion is ready to serve. Answered with [`ToCompanion::Init`].
    Hello,
    /// The opening of a connection a restarted `nhid` made to the companion's re-adoption
    /// socket: proves the companion is the one `nhid` started (the key it got in
    /// [`Init::adopt_key`]). Answered with [`ToCompanion::Init`] for the identity of `nhid`'s
    /// attachment record, never one the companion names.
    Reattach { key: Redacted },
    #[serde(untagged)]
    Call(Call),
    #[serde(untagged)]
    Notice(Notice),
}

/// A request for a credential or a check, answered by one [`Reply`] with the call's id.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Call {
    Jwt {
        audience: Vec<String>,
    },
    X509,
    Secret {
        name: String,
    },
    Validate {
        token: String,
        audience: String,
    },
    /// A secret the identity's edge policy brokers in egress rule `rule_id`: for the companion
    /// to inject upstream, never served to the workload (no grant needed, none implied).
    BrokeredSecret {
        rule_id: String,
    },
}

/// A notice (sent with id [`EVENT_ID`], never answered).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Notice {
    /// A log line of a companion whose stderr is gone (it was started by an earlier `nhid`).
    Log { line: String },
    /// Audit events the companion observed, and how many it had to drop since the last batch
    /// because this channel fell behind. `nhid` attributes them to the companion's workload
    /// itself.
    Audit {
        events: Vec<crate::audit::AuditEvent>,
        #[serde(default)]
        dropped: u64,
    },
}

/// nhid → companion: one line. Replies carry their call's `id`; events carry [`EVENT_ID`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChannelResponse {
    pub id: u64,
    #[serde(flatten)]
    pub body: ToCompanion,
}

/// What `nhid` sends: the identity opening the channel, replies to calls, events it pushes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ToCompanion {
    /// The answer to `hello` or `reattach`.
    Init(Box<Init>),
    #[serde(untagged)]
    Reply(Reply),
    #[serde(untagged)]
    Event(Event),
}

impl From<Reply> for ToCompanion {
    fn from(r: Reply) -> Self {
        ToCompanion::Reply(r)
    }
}

/// The answer to one [`Call`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    Jwt(JwtSvid),
    X509(Box<X509Svid>),
    Secret(SecretValue),
    Validated(Validated),
    /// Not allowed for this identity (not granted, revoked, bad token): HTTP 403.
    Denied {
        message: String,
    },
    /// No such secret: HTTP 404.
    NotFound {
        message: String,
    },
    Error {
        message: String,
    },
    /// `nhid` could not start the request in time (its class's budget of requests in flight
    /// and queue are full, or no slot freed up within the queue's deadline): HTTP 503, retry.
    Busy {
        message: String,
    },
}

/// A [`Reply`] that refuses: what the companion tells the workload instead of a credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Denied(String),
    NotFound(String),
    Error(String),
    Busy(String),
}

impl Reply {
    /// `Err` when the reply is a refusal, else the reply itself.
    pub fn refused(self) -> Result<Reply, Refusal> {
        match self {
            Reply::Denied { message } => Err(Refusal::Denied(message)),
            Reply::NotFound { message } => Err(Refusal::NotFound(message)),
            Reply::Error { message } => Err(Refusal::Error(message)),
            Reply::Busy { message } => Err(Refusal::Busy(message)),
            answer => Ok(answer),
        }
    }

    /// What kind of reply this is, for error messages.
    pub fn kind(&self) -> &'static str {
        match self {
            Reply::Jwt(_) => "jwt",
            Reply::X509(_) => "x509",
            Reply::Secret(_) => "secret",
            Reply::Validated(_) => "validated",
            Reply::Denied { .. } => "denied",
            Reply::NotFound { .. } => "not_found",
            Reply::Error { .. } => "error",
            Reply::Busy { .. } => "busy",
        }
    }
}

impl Refusal {
    pub fn message(&self) -> &str {
        match self {
            Refusal::Denied(m) | Refusal::NotFound(m) | Refusal::Error(m) | Refusal::Busy(m) => m,
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.message())
    }
}

/// What `nhid` pushes to a companion on its own.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// A secret has a new version (or was removed); drop the cached value.
    SecretChanged { name: String },
    /// The identity was revoked; drop every cached credential and refuse until restored.
    Revoked { message: String },
    /// The revocation was undone.
    Restored,
    /// The edge policy changed (`nhid` reloaded its config); applies to new connections.
    Policy {
        #[serde(default)]
        policy: Option<Box<crate::policy::Policy>>,
    },
    /// The peers mutual TLS refuses from now on, whatever their certificate: SPIFFE IDs (or
    /// `*` globs) of revoked identities and of the nodes cut off (`spiffe://<td>/node/<n>/*`).
    /// The whole list each time.
    DeniedPeers { peers: Vec<String> },
    /// The trust bundle or the JWKS changed (CA renewal, a node joined or left).
    Trust {
        bundle_pem: String,
        jwks: serde_json::Value,
        /// Both as one SPIFFE bundle (`x509-svid` and `jwt-svid` keys, `spiffe_sequence`).
        #[serde(default)]
        bundle_spiffe: serde_json::Value,
    },
}

/// `id` of events nhid pushes to a companion.
pub const EVENT_ID: u64 = 0;

/// What a companion learns about its workload when it says hello.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Init {
    pub spiffe_id: String,
    pub trust_domain: String,
    pub rule: String,
    pub workload: Workload,
    pub bundle_pem: String,
    pub jwks: serde_json::Value,
    /// The trust bundle in the SPIFFE bundle format (`GET /v1/bundle.spiffe`).
    #[serde(default)]
    pub bundle_spiffe: serde_json::Value,
    /// The identity is revoked: serve nothing until a `restored` event.
    #[serde(default)]
    pub revoked: bool,
    /// The edge policy for this identity; `None`: its traffic is not intercepted.
    #[serde(default)]
    pub policy: Option<crate::policy::Policy>,
    /// The proxy ports the companion listens on.
    #[serde(default)]
    pub egress: crate::policy::EgressConfig,
    /// The AWS container-credential provider, when the workload's rule names an AWS source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aws: Option<AwsProvider>,
    /// Bounds on the companion's listeners (`[companion.limits]`).
    #[serde(default)]
    pub limits: crate::config::CompanionLimits,
    /// Peers mutual TLS refuses (see [`Event::DeniedPeers`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_peers: Vec<String>,
    /// At spawn only: the key the companion proves itself with when a restarted `nhid`
    /// re-adopts it (`nhid` keeps only its SHA-256).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopt_key: Option<Redacted>,
}

/// The one byte a re-adopting `nhid` sends first on a companion's re-adoption connection,
/// carrying (`SCM_RIGHTS`) the companion's end of a new fd channel.
pub const FD_CHANNEL_BYTE: u8 = b'F';

/// A secret string whose `Debug` never shows it.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Redacted(pub String);

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Drop for Redacted {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// What the companion needs to serve `GET /v1/aws/credentials`. Debug never shows the token.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct AwsProvider {
    /// The granted secret holding the session credentials (JSON).
    pub secret: String,
    /// The `Authorization` value callers must present (`nhid` wrote it to the workload's
    /// token file).
    pub token: String,
}

impl std::fmt::Debug for AwsProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwsProvider")
            .field("secret", &self.secret)
            .field("token", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JwtSvid {
    pub token: String,
    /// The token's `jti`, for the issuer's ledger and deny list.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub jti: String,
    pub spiffe_id: String,
    pub audience: Vec<String>,
    pub issued_at: u64,
    pub expires_at: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct X509Svid {
    pub spiffe_id: String,
    /// Leaf first, then any intermediates.
    pub cert_chain_pem: String,
    pub key_pem: String,
    pub bundle_pem: String,
    pub serial: String,
    pub issued_at: u64,
    pub expires_at: u64,
}

/// Largest line either side accepts on these channels.
pub const MAX_LINE: usize = 1 << 20;

/// Reads one newline-terminated JSON value from a blocking reader (used by the hook and nhictl).
pub fn read_line_json<T: serde::de::DeserializeOwned>(
    r: &mut impl std::io::BufRead,
) -> std::io::Result<T> {
    let mut line = String::new();
    use std::io::BufRead;
    let n = std::io::Read::take(&mut *r, MAX_LINE as u64).read_line(&mut line)?;
    if n == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed before a response",
        ));
    }
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

/// A request longer than nhid reads ([`MAX_LINE`]): refused before it is sent, so the caller
/// can say so instead of reporting the broken pipe nhid's refusal would cause.
#[derive(Debug, Clone, thiserror::Error)]
#[error("the request is {size} bytes, more than the {max} bytes nhid accepts")]
pub struct RequestTooLarge {
    pub size: usize,
    pub max: usize,
}

/// One blocking request/response on the agent socket. A request over [`MAX_LINE`] fails with
/// an `InvalidInput` error wrapping [`RequestTooLarge`], before connecting.
pub fn call_agent(
    socket: &std::path::Path,
    req: &AgentRequest,
    timeout: std::time::Duration,
) -> std::io::Result<AgentResponse> {
    use std::io::Write;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    if line.len() > MAX_LINE {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            RequestTooLarge {
                size: line.len(),
                max: MAX_LINE,
            },
        ));
    }
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    (&stream).write_all(&line)?;
    let mut reader = std::io::BufReader::new(&stream);
    read_line_json(&mut reader)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON is what it was before the types were split (one `kind` per message), so a
    /// companion and an `nhid` of either side of the split still understand each other across
    /// a re-adoption.
    #[test]
    fn channel_messages_keep_their_wire_shape() {
        let cases: Vec<(ChannelRequest, &str)> = vec![
            (
                ChannelRequest {
                    id: 7,
                    body: FromCompanion::Call(Call::Jwt {
                        audience: vec!["a".into()],
                    }),
                },
                r#"{"id":7,"kind":"jwt","audience":["a"]}"#,
            ),
            (
                ChannelRequest {
                    id: 1,
                    body: FromCompanion::Hello,
                },
                r#"{"id":1,"kind":"hello"}"#,
            ),
            (
                ChannelRequest {
                    id: 0,
                    body: FromCompanion::Notice(Notice::Log { line: "l".into() }),
                },
                r#"{"id":0,"kind":"log","line":"l"}"#,
            ),
            (
                ChannelRequest {
                    id: 3,
                    body: FromCompanion::Call(Call::X509),
                },
                r#"{"id":3,"kind":"x509"}"#,
            ),
        ];
        for (msg, json) in cases {
            assert_eq!(serde_json::to_string(&msg).unwrap(), json);
            let back: ChannelRequest = serde_json::from_str(json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        let back: ChannelRequest =
            serde_json::from_str(r#"{"id":0,"kind":"audit","events":[]}"#).unwrap();
        assert!(matches!(
            back.body,
            FromCompanion::Notice(Notice::Audit { dropped: 0, .. })
        ));
        let back: ChannelRequest =
            serde_json::from_str(r#"{"id":2,"kind":"reattach","key":"k"}"#).unwrap();
        assert!(matches!(back.body, FromCompanion::Reattach { .. }));
        assert!(serde_json::from_str::<ChannelRequest>(r#"{"id":2,"kind":"nope"}"#).is_err());

        let cases: Vec<(ChannelResponse, &str)> = vec![
            (
                ChannelResponse {
                    id: 7,
                    body: ToCompanion::Reply(Reply::Error {
                        message: "no".into(),
                    }),
                },
                r#"{"id":7,"kind":"error","message":"no"}"#,
            ),
            (
                ChannelResponse {
                    id: 0,
                    body: ToCompanion::Event(Event::Revoked {
                        message: "r".into(),
                    }),
                },
                r#"{"id":0,"kind":"revoked","message":"r"}"#,
            ),
            (
                ChannelResponse {
                    id: 0,
                    body: ToCompanion::Event(Event::Restored),
                },
                r#"{"id":0,"kind":"restored"}"#,
            ),
        ];
        for (msg, json) in cases {
            assert_eq!(serde_json::to_string(&msg).unwrap(), json);
            let back: ChannelResponse = serde_json::from_str(json).unwrap();
            assert_eq!(serde_json::to_string(&back).unwrap(), json);
        }
        let back: ChannelResponse =
            serde_json::from_str(r#"{"id":0,"kind":"policy","policy":null}"#).unwrap();
        assert!(matches!(
            back.body,
            ToCompanion::Event(Event::Policy { policy: None })
        ));
        let refusal = Reply::Busy {
            message: "full".into(),
        }
        .refused()
        .unwrap_err();
        assert_eq!(refusal, Refusal::Busy("full".into()));
    }

    #[test]
    fn agent_requests_are_tagged() {
        let s = serde_json::to_string(&AgentRequest::Detach {
            container_id: "c".into(),
        })
        .unwrap();
        assert_eq!(s, r#"{"op":"detach","container_id":"c"}"#);
    }
}
