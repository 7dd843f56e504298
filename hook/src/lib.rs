//! nhi-hook: the OCI hook. `createRuntime` (alias `prestart`) reads the container state from
//! stdin and the bundle's config.json, decides whether a rule selects the container and asks
//! `nhid` to attach a companion; `poststop` asks it to detach. It never writes to stdout.
//!
//! Failure semantics: a selected container whose attach fails makes the hook fail (the runtime
//! then refuses to start the container) unless its rule says `fail_open = true`. A container no
//! rule selects is left alone, even when `nhid` is down. `poststop` never fails the runtime.

use std::io::Read;
use std::path::Path;

pub mod satoken;

use nhi_core::select::select;
use nhi_core::wire::{call_agent, AgentRequest, AgentResponse};
use nhi_core::workload::{netns_of, NetNs};
use nhi_core::{Config, Workload};
use oci_spec::runtime::{Spec, State};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    CreateRuntime,
    Poststop,
}

impl Stage {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "createRuntime" | "prestart" => Some(Stage::CreateRuntime),
            "poststop" => Some(Stage::Poststop),
            _ => None,
        }
    }
}

/// What the hook did, for the binary to turn into an exit code and at most one stderr line.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    NotSelected,
    Attached {
        spiffe_id: String,
    },
    /// A pod sandbox: the pod's namespace waits for its first app container's identity.
    Reserved,
    /// The attach failed but the rule is fail-open: the container starts without a companion.
    FailedOpen {
        message: String,
    },
    Detached,
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("reading the container state from stdin: {0}")]
    State(String),
    #[error(transparent)]
    Config(#[from] nhi_core::config::ConfigError),
    #[error("reading {path}: {message}")]
    Spec { path: String, message: String },
    /// A selected container can't get its companion (fail-closed).
    #[error("container {container}: {message}")]
    Attach { container: String, message: String },
}

pub fn run(stage: Stage, config_path: &Path, stdin: impl Read) -> Result<Outcome, HookError> {
    let state = read_state(stdin)?;
    let config = Config::load(config_path)?;
    match stage {
        Stage::CreateRuntime => create_runtime(&config, &state),
        Stage::Poststop => {
            poststop(&config, state.id());
            Ok(Outcome::Detached)
        }
    }
}

fn read_state(mut stdin: impl Read) -> Result<State, HookError> {
    let mut buf = Vec::with_capacity(4096);
    stdin
        .by_ref()
        .take(1 << 20)
        .read_to_end(&mut buf)
        .map_err(|e| HookError::State(e.to_string()))?;
    serde_json::from_slice(&buf).map_err(|e| HookError::State(e.to_string()))
}

fn create_runtime(config: &Config, state: &State) -> Result<Outcome, HookError> {
    let path = state.bundle().join("config.json");
    let spec = Spec::load(&path).map_err(|e| HookError::Spec {
        path: path.display().to_string(),
        message: e.to_string(),
    })?;
    let mut workload = Workload::from_oci(state, &spec);
    let sa_error = attach_service_account(config, &spec, &mut workload).err();
    let rule = match select(config, &workload) {
        Ok(Some(rule)) => rule,
        Ok(None) => return Ok(Outcome::NotSelected),
        // The container asked for a rule it may not pick: it does not start, so nobody
        // mistakes it for a workload with the identity it asked for.
        Err(message) => {
            return Err(HookError::Attach {
                container: workload.container_id.clone(),
                message,
            })
        }
    };
    let fail = |message: String| {
        if rule.fail_open {
            Ok(Outcome::FailedOpen { message })
        } else {
            Err(HookError::Attach {
                container: workload.container_id.clone(),
                message,
            })
        }
    };
    if let Some(why) = sa_error {
        if rule.spiffe_id.vars().any(|v| v == "k8s.service_account") {
            return fail(format!("service account for rule {:?}: {why}", rule.name));
        }
    }
    if netns_of(&spec) == NetNs::Host {
        return fail(format!(
            "selected by nhi rule {:?} but shares the host network namespace; nhi never attaches there",
            rule.name
        ));
    }
    let req = AgentRequest::Attach {
        pid: state.pid().unwrap_or(0),
        rule: rule.name.clone(),
        workload: Box::new(workload.clone()),
    };
    match call_agent(&config.socket, &req, config.hook.timeout) {
        Ok(AgentResponse::Attached { spiffe_id, .. }) => Ok(Outcome::Attached { spiffe_id }),
        Ok(AgentResponse::Reserved { .. }) => Ok(Outcome::Reserved),
        Ok(AgentResponse::NotSelected) => Ok(Outcome::NotSelected),
        Ok(AgentResponse::Error { message }) => fail(format!("nhid refused the attach: {message}")),
        Ok(other) => fail(format!("unexpected answer from nhid: {other:?}")),
        Err(e) => fail(format!(
            "cannot reach nhid at {} ({e}); is nhid running?",
            config.socket.display()
        )),
    }
}

/// Fills `k8s.service_account` from the kubelet-projected token of an app container, read on
/// the host at the mount's source (see `nhi_core::k8s`). No token mount is not an error.
fn attach_service_account(config: &Config, spec: &Spec, w: &mut Workload) -> Result<(), String> {
    if w.is_k8s_sandbox() {
        return Ok(());
    }
    let Some(k) = w.k8s.as_mut() else {
        return Ok(());
    };
    let Some(path) = nhi_core::k8s::token_source(spec) else {
        return Err("the container has no service-account token mount".into());
    };
    let mut token = String::new();
    std::fs::File::open(&path)
        .and_then(|f| f.take(64 * 1024).read_to_string(&mut token))
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if let Some(jwks) = &config.kubernetes.service_account_jwks {
        satoken::verify(
            &token,
            jwks,
            config.kubernetes.service_account_issuer.as_deref(),
        )?;
    }
    let sa = nhi_core::k8s::service_account(
        &path,
        &token,
        &config.kubernetes.kubelet_root,
        k.namespace.as_deref().unwrap_or_default(),
        k.pod_uid.as_deref().unwrap_or_default(),
    )?;
    k.service_account = Some(sa);
    Ok(())
}

fn poststop(config: &Config, container_id: &str) {
    let req = AgentRequest::Detach {
        container_id: container_id.to_string(),
    };
    // A container nhid never attached is a no-op there; nhid's garbage collection covers a
    // poststop that can't reach it.
    let _ = call_agent(&config.socket, &req, config.hook.timeout);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn setup(rule: &str, namespaces: &str) -> (tempfile::TempDir, std::path::PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("nhi.toml");
        fs::write(
            &cfg,
            format!(
                "trust_domain = \"td\"\nsocket = \"{}/none.sock\"\n{rule}",
                dir.path().display()
            ),
        )
        .unwrap();
        let bundle = dir.path().join("bundle");
        fs::create_dir(&bundle).unwrap();
        fs::write(
            bundle.join("config.json"),
            format!(
                r#"{{"ociVersion":"1.0.2","annotations":{{"nhi.dev/inject":"true"}},"linux":{{"namespaces":[{namespaces}]}}}}"#
            ),
        )
        .unwrap();
        let state = format!(
            r#"{{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":1,"bundle":"{}"}}"#,
            bundle.display()
        );
        (dir, cfg, state)
    }

    const RULE: &str = "[[rule]]\nname = \"r\"\nspiffe_id = \"c/{container.id}\"\n[rule.match]\nannotations = { \"nhi.dev/inject\" = \"true\" }\n";
    const OPEN: &str =
        "[[rule]]\nname = \"r\"\nspiffe_id = \"c/{container.id}\"\nfail_open = true\n";

    #[test]
    fn unselected_containers_are_untouched_even_without_nhid() {
        let (_d, cfg, state) = setup("", r#"{"type":"network"}"#);
        let out = run(Stage::CreateRuntime, &cfg, state.as_bytes()).unwrap();
        assert_eq!(out, Outcome::NotSelected);
    }

    #[test]
    fn selected_container_fails_closed_when_nhid_is_down() {
        let (_d, cfg, state) = setup(RULE, r#"{"type":"network"}"#);
        let e = run(Stage::CreateRuntime, &cfg, state.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot reach nhid") && e.contains("c1"), "{e}");
    }

    #[test]
    fn fail_open_rule_lets_it_start() {
        let (_d, cfg, state) = setup(OPEN, r#"{"type":"network"}"#);
        let out = run(Stage::CreateRuntime, &cfg, state.as_bytes()).unwrap();
        assert!(matches!(out, Outcome::FailedOpen { .. }));
    }

    #[test]
    fn host_netns_is_refused_before_asking_nhid() {
        let (_d, cfg, state) = setup(RULE, r#"{"type":"pid"}"#);
        let e = run(Stage::CreateRuntime, &cfg, state.as_bytes())
            .unwrap_err()
            .to_string();
        assert!(e.contains("host network namespace"), "{e}");
    }

    #[test]
    fn bad_input_is_an_error() {
        let (_d, cfg, _) = setup(RULE, "");
        assert!(matches!(
            run(Stage::CreateRuntime, &cfg, &b"{not json"[..]),
            Err(HookError::State(_))
        ));
        assert!(Stage::parse("prestart") == Some(Stage::CreateRuntime));
        assert!(Stage::parse("bogus").is_none());
    }

    #[test]
    fn poststop_never_fails() {
        let (_d, cfg, state) = setup(RULE, "");
        assert_eq!(
            run(Stage::Poststop, &cfg, state.as_bytes()).unwrap(),
            Outcome::Detached
        );
    }
}
