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

use nhi_core::nhid_client::{Attached, ClientError, NhidClient};
use nhi_core::select::select;
use nhi_core::untrusted_fs::UntrustedReadError;
use nhi_core::workload::{netns_of, NetnsMode};
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
        .take(MAX_STATE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|e| HookError::State(e.to_string()))?;
    if buf.len() as u64 > MAX_STATE_BYTES {
        return Err(HookError::State(format!(
            "more than the {MAX_STATE_BYTES} bytes an OCI state can be"
        )));
    }
    parse_json(&buf).map_err(HookError::State)
}

/// Largest OCI state read from stdin (a real one is a few hundred bytes).
const MAX_STATE_BYTES: u64 = 1 << 20;

/// Parses JSON into `T`; errors name the field (`process.args[0]`), the reason and the
/// position, instead of serde's bare "invalid type".
fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let field = e.path().to_string();
        if field == "." {
            e.inner().to_string()
        } else {
            format!("field {field}: {}", e.inner())
        }
    })
}

/// The bundle's `config.json`: the runtime wrote it, but the path and its content come from
/// whoever made the bundle, so it is read as untrusted (a regular file, never a FIFO, device
/// or link, at most `max` bytes).
fn load_spec(path: &Path, max: u64) -> Result<Spec, HookError> {
    let err = |message: String| HookError::Spec {
        path: path.display().to_string(),
        message,
    };
    let bytes = nhi_core::untrusted_fs::read_regular(path, max).map_err(|e| {
        err(match e {
            UntrustedReadError::Refused { reason, .. } => reason,
            UntrustedReadError::Io { source, .. } => source.to_string(),
        })
    })?;
    parse_json(&bytes).map_err(err)
}

fn create_runtime(config: &Config, state: &State) -> Result<Outcome, HookError> {
    let spec = load_spec(
        &state.bundle().join("config.json"),
        config.hook.max_spec_bytes,
    )?;
    let mut workload = Workload::from_oci(state, &spec);
    // The Nomad proof comes before selection: rules may match on Nomad metadata, and it is
    // read beneath the Nomad data dir only, from a container with Nomad's mounts.
    let nomad_error = nhi_core::nomad::attach(&config.nomad, &spec, &mut workload).err();
    // Select first otherwise: a container no rule selects causes no read beyond its
    // config.json (and, for Nomad's mount layout, its signed identity).
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
    let container = workload.container_id.clone();
    let fail = |message: String| {
        if rule.fail_open {
            Ok(Outcome::FailedOpen { message })
        } else {
            Err(HookError::Attach {
                container: container.clone(),
                message,
            })
        }
    };
    if let Some(why) = nomad_error {
        if rule.spiffe_id.vars().any(|v| v.starts_with("nomad.")) {
            return fail(format!("Nomad identity for rule {:?}: {why}", rule.name));
        }
    }
    if netns_of(&spec) == NetnsMode::Host {
        return fail(format!(
            "selected by nhi rule {:?} but shares the host network namespace; nhi never attaches there",
            rule.name
        ));
    }
    // The token is read only when the identity needs it.
    if rule.spiffe_id.vars().any(|v| v == "k8s.service_account") {
        if let Err(why) = attach_service_account(config, &spec, &mut workload) {
            return fail(format!("service account for rule {:?}: {why}", rule.name));
        }
    }
    let nhid = NhidClient::new(&config.socket, config.hook.timeout);
    match nhid.attach(workload, state.pid().unwrap_or(0), &rule.name) {
        Ok(Attached::Companion { spiffe_id, .. }) => Ok(Outcome::Attached { spiffe_id }),
        Ok(Attached::Reserved { .. }) => Ok(Outcome::Reserved),
        Ok(Attached::NotSelected) => Ok(Outcome::NotSelected),
        Err(ClientError::Refused(message)) => fail(format!("nhid refused the attach: {message}")),
        Err(ClientError::TooLarge(big)) => fail(format!(
            "attach request not sent: {big} (the container's nhi.dev/* annotations are too large)"
        )),
        Err(e) => fail(e.to_string()),
    }
}

/// Fills `k8s.service_account` from the kubelet-projected token of an app container, read on
/// the host at the mount's source, beneath the kubelet root (see `nhi_core::k8s`).
fn attach_service_account(config: &Config, spec: &Spec, w: &mut Workload) -> Result<(), String> {
    if w.is_k8s_sandbox() {
        return Ok(());
    }
    let Some(k) = w.k8s.as_mut() else {
        return Err("not a Kubernetes container (no CRI annotations)".into());
    };
    let Some(path) = nhi_core::k8s::token_source(spec) else {
        return Err("the container has no service-account token mount".into());
    };
    let pod_uid = k.pod_uid.as_deref().unwrap_or_default();
    let token =
        nhi_core::k8s::read_projected_token(&config.kubernetes.kubelet_root, &path, pod_uid)?;
    if let Some(jwks) = &config.kubernetes.service_account_jwks {
        satoken::verify(
            &token,
            jwks,
            config.kubernetes.service_account_issuer.as_deref(),
        )?;
    }
    let sa = nhi_core::k8s::service_account(
        &token,
        k.namespace.as_deref().unwrap_or_default(),
        pod_uid,
    )?;
    k.service_account = Some(sa);
    // In cluster mode nhid shows OpenBao this token (re-read, beneath kubelet's root).
    k.token_path = Some(path);
    Ok(())
}

fn poststop(config: &Config, container_id: &str) {
    // A container nhid never attached is a no-op there; nhid's garbage collection covers a
    // poststop that can't reach it.
    let _ = NhidClient::new(&config.socket, config.hook.timeout).detach(container_id);
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

    fn mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    fn create_err(cfg: &Path, state: &str) -> String {
        run(Stage::CreateRuntime, cfg, state.as_bytes())
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn a_fifo_or_huge_config_json_is_refused_at_once_naming_the_file() {
        let (d, cfg, state) = setup(RULE, r#"{"type":"network"}"#);
        let spec = d.path().join("bundle/config.json");
        let t = std::time::Instant::now();
        fs::remove_file(&spec).unwrap();
        mkfifo(&spec);
        let e = create_err(&cfg, &state);
        assert!(
            e.contains(&spec.display().to_string()) && e.contains("FIFO"),
            "{e}"
        );
        fs::remove_file(&spec).unwrap();
        fs::File::create(&spec).unwrap().set_len(100 << 20).unwrap();
        let e = create_err(&cfg, &state);
        assert!(
            e.contains("config.json") && e.contains("more than the 4194304 bytes allowed"),
            "{e}"
        );
        fs::remove_file(&spec).unwrap();
        std::os::unix::fs::symlink(d.path().join("nhi.toml"), &spec).unwrap();
        let e = create_err(&cfg, &state);
        assert!(e.contains("symbolic link"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn spec_errors_name_the_file_the_field_and_the_reason() {
        let (d, cfg, state) = setup(RULE, r#"{"type":"network"}"#);
        let spec = d.path().join("bundle/config.json");
        fs::write(
            &spec,
            r#"{"ociVersion":"1.0.2","process":{"cwd":"/","args":"sh"}}"#,
        )
        .unwrap();
        let e = create_err(&cfg, &state);
        assert!(
            e.contains("config.json")
                && e.contains("field process.args")
                && e.contains("expected a sequence"),
            "{e}"
        );
        let e = run(
            Stage::CreateRuntime,
            &cfg,
            &br#"{"ociVersion":"1","id":5}"#[..],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("stdin") && e.contains("field id"), "{e}");
    }

    #[test]
    fn an_attach_request_over_nhids_limit_is_refused_with_that_reason() {
        let (d, cfg, state) = setup(RULE, r#"{"type":"network"}"#);
        let big = "x".repeat(nhi_core::wire::MAX_LINE);
        fs::write(
            d.path().join("bundle/config.json"),
            format!(
                r#"{{"ociVersion":"1.0.2","annotations":{{"nhi.dev/inject":"true","nhi.dev/big":"{big}"}},"linux":{{"namespaces":[{{"type":"network"}}]}}}}"#
            ),
        )
        .unwrap();
        let e = create_err(&cfg, &state);
        assert!(
            e.contains("attach request not sent")
                && e.contains("more than the 1048576 bytes nhid accepts")
                && !e.contains("Broken pipe"),
            "{e}"
        );
    }

    /// A CRI app container whose service-account mount holds a FIFO named `token`.
    fn pod_with_fifo_token(rule: &str) -> (tempfile::TempDir, std::path::PathBuf, String) {
        let (d, cfg, state) = setup(rule, r#"{"type":"network"}"#);
        let root = d.path().join("kubelet");
        let vol = root.join("pods/u1/volumes/kubernetes.io~projected/v");
        fs::create_dir_all(&vol).unwrap();
        mkfifo(&vol.join("token"));
        let mut c = fs::read_to_string(&cfg).unwrap();
        c.push_str(&format!(
            "[kubernetes]\nkubelet_root = \"{}\"\n",
            root.display()
        ));
        fs::write(&cfg, c).unwrap();
        fs::write(
            d.path().join("bundle/config.json"),
            format!(
                r#"{{"ociVersion":"1.0.2","annotations":{{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-namespace":"team","io.kubernetes.cri.sandbox-uid":"u1"}},
                "mounts":[{{"destination":"/var/run/secrets/kubernetes.io/serviceaccount","source":"{}","type":"bind"}}],
                "linux":{{"namespaces":[{{"type":"network"}}]}}}}"#,
                vol.display()
            ),
        )
        .unwrap();
        (d, cfg, state)
    }

    #[test]
    fn the_token_is_read_only_for_a_rule_that_needs_it_and_never_blocks() {
        let t = std::time::Instant::now();
        // Selected, identity from the service account: the FIFO is refused, not waited on.
        let (_d, cfg, state) = pod_with_fifo_token(
            "[[rule]]\nname = \"k\"\nspiffe_id = \"sa/{k8s.service_account}\"\n[rule.match]\nk8s_namespaces = [\"team\"]\n",
        );
        let e = create_err(&cfg, &state);
        assert!(
            e.contains("service account for rule") && e.contains("FIFO"),
            "{e}"
        );
        // Selected, but the identity does not use the service account: no token read, so the
        // FIFO does not matter (the attach then fails on the missing nhid).
        let (_d, cfg, state) = pod_with_fifo_token(
            "[[rule]]\nname = \"k\"\nspiffe_id = \"pod/{k8s.namespace}\"\n[rule.match]\nk8s_namespaces = [\"team\"]\n",
        );
        let e = create_err(&cfg, &state);
        assert!(
            e.contains("cannot reach nhid") && !e.contains("FIFO"),
            "{e}"
        );
        // Not selected at all.
        let (_d, cfg, state) = pod_with_fifo_token("");
        assert_eq!(
            run(Stage::CreateRuntime, &cfg, state.as_bytes()).unwrap(),
            Outcome::NotSelected
        );
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
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
