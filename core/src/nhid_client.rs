//! The one client of `nhid`'s agent socket, used by the hook and by nhictl: a typed method per
//! request, each returning the answer that request can have. An `Error` answer, an answer of
//! the wrong kind, a request too large to send and an unreachable socket are told apart in
//! [`ClientError`], so callers never match on [`AgentResponse`] themselves.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::wire::{
    call_agent, AgentRequest, AgentResponse, RequestTooLarge, RevokeTarget, SecretInfo,
    SecretValue, Status, Validated,
};
use crate::Workload;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket could not be reached, or the connection failed midway.
    #[error("cannot reach nhid at {socket} ({source}); is nhid running?")]
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    /// Not sent: the request is over the line limit.
    #[error("request not sent: {0}")]
    TooLarge(RequestTooLarge),
    /// nhid answered with an error.
    #[error("{0}")]
    Refused(String),
    /// nhid answered, but not what this request is answered with (a version mismatch).
    #[error("unexpected answer from nhid to {request}: {answer}")]
    Unexpected {
        request: &'static str,
        answer: String,
    },
}

/// What `attach` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attached {
    /// A companion serves the container's network namespace with this identity.
    Companion {
        spiffe_id: String,
        companion_pid: i32,
        netns_inode: u64,
        /// Another container of the same network namespace already had the companion.
        joined: bool,
    },
    /// A pod sandbox: its network namespace is reserved for the pod's companion.
    Reserved { netns_inode: u64 },
    /// nhid's own rule selection picked no rule.
    NotSelected,
}

/// What a revocation (or its undoing) did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub spiffe_id: String,
    /// Credentials already issued and now on the deny list.
    pub jtis: usize,
    pub serials: usize,
    pub undone: bool,
}

/// A client of one `nhid` socket.
#[derive(Debug, Clone)]
pub struct NhidClient {
    socket: PathBuf,
    timeout: Duration,
}

/// Turns the one answer a request has into `Some`, anything else into `None`.
macro_rules! expect {
    ($self:ident, $req:expr, $name:literal, $pat:pat => $out:expr) => {
        match $self.call(&$req)? {
            $pat => Ok($out),
            other => Err(ClientError::Unexpected {
                request: $name,
                answer: format!("{other:?}"),
            }),
        }
    };
}

impl NhidClient {
    /// `timeout` bounds each read and write on the connection.
    pub fn new(socket: &Path, timeout: Duration) -> Self {
        NhidClient {
            socket: socket.to_path_buf(),
            timeout,
        }
    }

    /// One request, one answer; an `Error` answer is [`ClientError::Refused`].
    fn call(&self, req: &AgentRequest) -> Result<AgentResponse, ClientError> {
        match call_agent(&self.socket, req, self.timeout) {
            Ok(AgentResponse::Error { message }) => Err(ClientError::Refused(message)),
            Ok(answer) => Ok(answer),
            Err(e) => match e
                .get_ref()
                .and_then(|i| i.downcast_ref::<RequestTooLarge>())
            {
                Some(big) => Err(ClientError::TooLarge(big.clone())),
                None => Err(ClientError::Unreachable {
                    socket: self.socket.clone(),
                    source: e,
                }),
            },
        }
    }

    /// From `nhi-hook createRuntime`: attach a companion to the container whose init is `pid`;
    /// `rule` is the rule the hook selected.
    pub fn attach(
        &self,
        workload: Workload,
        pid: i32,
        rule: &str,
    ) -> Result<Attached, ClientError> {
        let req = AgentRequest::Attach {
            workload: Box::new(workload),
            pid,
            rule: rule.to_string(),
        };
        match self.call(&req)? {
            AgentResponse::Attached {
                spiffe_id,
                companion_pid,
                netns_inode,
                joined,
            } => Ok(Attached::Companion {
                spiffe_id,
                companion_pid,
                netns_inode,
                joined,
            }),
            AgentResponse::Reserved { netns_inode } => Ok(Attached::Reserved { netns_inode }),
            AgentResponse::NotSelected => Ok(Attached::NotSelected),
            other => Err(ClientError::Unexpected {
                request: "attach",
                answer: format!("{other:?}"),
            }),
        }
    }

    /// From `nhi-hook poststop`: the container is gone. Whether its companion was stopped.
    pub fn detach(&self, container_id: &str) -> Result<bool, ClientError> {
        let req = AgentRequest::Detach {
            container_id: container_id.to_string(),
        };
        expect!(self, req, "detach", AgentResponse::Detached { stopped } => stopped)
    }

    pub fn status(&self) -> Result<Status, ClientError> {
        expect!(self, AgentRequest::Status, "status", AgentResponse::Status(s) => s)
    }

    /// Stores a new version (`must_exist`: only replace an existing secret); `value_b64`
    /// `None` has nhid generate one. The stored name and version.
    pub fn secret_put(
        &self,
        name: &str,
        value_b64: Option<String>,
        must_exist: bool,
    ) -> Result<(String, u64), ClientError> {
        let req = AgentRequest::SecretPut {
            name: name.to_string(),
            value_b64,
            must_exist,
        };
        expect!(self, req, "secret put", AgentResponse::SecretStored { name, version } => (name, version))
    }

    pub fn secret_get(&self, name: &str) -> Result<SecretValue, ClientError> {
        let req = AgentRequest::SecretGet {
            name: name.to_string(),
        };
        expect!(self, req, "secret get", AgentResponse::Secret(s) => s)
    }

    pub fn secret_list(&self) -> Result<Vec<SecretInfo>, ClientError> {
        expect!(self, AgentRequest::SecretList, "secret list", AgentResponse::Secrets { secrets } => secrets)
    }

    /// The removed secret's name.
    pub fn secret_rm(&self, name: &str) -> Result<String, ClientError> {
        let req = AgentRequest::SecretRm {
            name: name.to_string(),
        };
        expect!(self, req, "secret rm", AgentResponse::SecretRemoved { name } => name)
    }

    /// Rotates the trust domain's CA: (signs_from, old_leaves_at, not_after), unix times.
    pub fn ca_rotate(
        &self,
        activate_after_secs: Option<u64>,
    ) -> Result<(u64, u64, u64), ClientError> {
        expect!(self, AgentRequest::CaRotate { activate_after_secs }, "ca rotate",
            AgentResponse::CaRotated { signs_from, old_leaves_at, not_after } => (signs_from, old_leaves_at, not_after))
    }

    /// Cuts node `node` off the cluster (`undo`: takes it back) with an operator's OpenBao
    /// token; answers the node's OpenBao entity and every node now cut off.
    pub fn node_revoke(
        &self,
        node: &str,
        undo: bool,
        operator_token: crate::wire::Redacted,
    ) -> Result<(String, Vec<String>), ClientError> {
        expect!(self, AgentRequest::NodeRevoke { node: node.to_string(), undo, operator_token }, "node revoke",
            AgentResponse::NodeRevoked { entity_id, revoked_nodes, .. } => (entity_id, revoked_nodes))
    }

    pub fn revoke(&self, target: RevokeTarget, undo: bool) -> Result<Revoked, ClientError> {
        expect!(self, AgentRequest::Revoke { target, undo }, "revoke",
            AgentResponse::Revoked { spiffe_id, jtis, serials, undone } =>
                Revoked { spiffe_id, jtis, serials, undone })
    }

    /// Signature, audience, expiry and the deny list, checked by nhid.
    pub fn validate(&self, token: &str, audience: &str) -> Result<Validated, ClientError> {
        let req = AgentRequest::Validate {
            token: token.to_string(),
            audience: audience.to_string(),
        };
        expect!(self, req, "validate", AgentResponse::Validated(v) => v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// A one-shot nhid stand-in: reads one request line, answers `answer`, returns the request.
    fn serve_once(
        answer: &'static str,
    ) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nhid.sock");
        let l = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            (&s).write_all(answer.as_bytes()).unwrap();
            line
        });
        (dir, path, h)
    }

    #[test]
    fn each_answer_is_typed_and_errors_are_told_apart() {
        let (_d, p, h) = serve_once("{\"result\":\"detached\",\"stopped\":true}\n");
        let c = NhidClient::new(&p, Duration::from_secs(5));
        assert!(c.detach("c1").unwrap());
        assert!(h.join().unwrap().contains("\"op\":\"detach\""));

        let (_d, p, _h) = serve_once("{\"result\":\"error\",\"message\":\"no such secret\"}\n");
        let c = NhidClient::new(&p, Duration::from_secs(5));
        let e = c.secret_get("x").unwrap_err();
        assert!(
            matches!(&e, ClientError::Refused(m) if m == "no such secret"),
            "{e}"
        );

        let (_d, p, _h) = serve_once("{\"result\":\"not_selected\"}\n");
        let c = NhidClient::new(&p, Duration::from_secs(5));
        let e = c.status().unwrap_err();
        assert!(
            e.to_string()
                .starts_with("unexpected answer from nhid to status"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let c = NhidClient::new(&dir.path().join("none.sock"), Duration::from_secs(5));
        let e = c.status().unwrap_err();
        assert!(matches!(e, ClientError::Unreachable { .. }));
        assert!(e.to_string().contains("is nhid running?"));
        let e = c.secret_put(&"n".repeat(2 << 20), None, false).unwrap_err();
        assert!(matches!(e, ClientError::TooLarge(_)), "{e}");
    }
}
