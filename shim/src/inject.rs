//! Adding the nhi hooks to a bundle's `config.json`, idempotently, keeping everything else.
//!
//! The document is edited as a generic JSON value with key order preserved, so fields nhi does
//! not know (newer spec versions, runtime-specific extensions) survive unchanged. Our hooks are
//! recognised by their path and stage argument: injecting twice changes nothing, and hooks other
//! tools put there (GPU, network, ...) stay, ours run after them.

use std::path::Path;

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("{path}: {message}")]
    Io { path: String, message: String },
    #[error("{path}: not an OCI runtime config: {message}")]
    Invalid { path: String, message: String },
}

/// What to inject.
pub struct Injection<'a> {
    pub hook: &'a Path,
    pub config: &'a Path,
    /// Host directory to bind-mount read-only at [`RUN_NHI`] (secret files), for containers a
    /// rule selects.
    pub run_dir: Option<&'a Path>,
    /// `NAME=value` pointers added to the container's environment (socket paths, URLs, file
    /// paths; never a secret). A variable the container already sets is left alone.
    pub env: Vec<String>,
}

/// Where the container sees its nhi directory (`secrets/<name>` inside).
pub const RUN_NHI: &str = "/run/nhi";

impl Injection<'_> {
    fn entry(&self, stage: &str) -> Value {
        json!({
            "path": self.hook.display().to_string(),
            "args": ["nhi-hook", stage, "--config", self.config.display().to_string()],
        })
    }

    fn is_ours(&self, hook: &Value, stage: &str) -> bool {
        hook.get("path").and_then(Value::as_str) == Some(&self.hook.display().to_string())
            && hook
                .get("args")
                .and_then(Value::as_array)
                .and_then(|a| a.get(1))
                .and_then(Value::as_str)
                == Some(stage)
    }

    /// Adds our hooks to `spec`. Returns whether anything changed.
    pub fn apply(&self, spec: &mut Value) -> Result<bool, String> {
        let obj = spec
            .as_object_mut()
            .ok_or("the document is not a JSON object")?;
        let hooks = obj.entry("hooks").or_insert_with(|| json!({}));
        if hooks.is_null() {
            *hooks = json!({});
        }
        let hooks = hooks.as_object_mut().ok_or("\"hooks\" is not an object")?;
        let mut changed = false;
        for stage in ["createRuntime", "poststop"] {
            let list = hooks.entry(stage).or_insert_with(|| json!([]));
            if list.is_null() {
                *list = json!([]);
            }
            let list = list
                .as_array_mut()
                .ok_or_else(|| format!("hooks.{stage} is not an array"))?;
            if !list.iter().any(|h| self.is_ours(h, stage)) {
                list.push(self.entry(stage));
                changed = true;
            }
        }
        if let Some(dir) = self.run_dir {
            let mounts = obj.entry("mounts").or_insert_with(|| json!([]));
            if mounts.is_null() {
                *mounts = json!([]);
            }
            let mounts = mounts.as_array_mut().ok_or("\"mounts\" is not an array")?;
            let ours = |m: &Value| m.get("destination").and_then(Value::as_str) == Some(RUN_NHI);
            if !mounts.iter().any(ours) {
                mounts.push(json!({
                    "destination": RUN_NHI,
                    "type": "bind",
                    "source": dir.display().to_string(),
                    "options": ["rbind", "ro", "nosuid", "nodev", "noexec"],
                }));
                changed = true;
            }
        }
        changed |= add_env(obj, &self.env)?;
        Ok(changed)
    }

    /// Injects into `<bundle>/config.json`, rewriting it atomically only if it changed.
    pub fn apply_to_bundle(&self, bundle: &Path) -> Result<bool, InjectError> {
        let path = bundle.join("config.json");
        let p = path.display().to_string();
        let io = |e: std::io::Error| InjectError::Io {
            path: p.clone(),
            message: e.to_string(),
        };
        let data = std::fs::read(&path).map_err(io)?;
        let mut spec: Value = serde_json::from_slice(&data).map_err(|e| InjectError::Invalid {
            path: p.clone(),
            message: e.to_string(),
        })?;
        let changed = self
            .apply(&mut spec)
            .map_err(|message| InjectError::Invalid {
                path: p.clone(),
                message,
            })?;
        if changed {
            use nhi_core::atomic_file::{replace, Durability, Mode, Options};
            let out = serde_json::to_vec(&spec).expect("JSON value serializes");
            // The runtime reads the spec right after: no need for it to survive a crash.
            let opts = Options {
                mode: Mode::KeepOr(0o644),
                owner: None,
                durability: Durability::Rename,
            };
            replace(&path, &out, &opts).map_err(io)?;
        }
        Ok(changed)
    }
}

/// Environment pointers for a container that gets `/run/nhi`: the Workload API socket, and the
/// AWS container-credential provider when its rule names an AWS source.
pub fn pointers(aws: bool) -> Vec<String> {
    let mut env = vec![format!(
        "SPIFFE_ENDPOINT_SOCKET=unix://{RUN_NHI}/workload.sock"
    )];
    if aws {
        env.push(format!(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:15100{AWS_PATH}"
        ));
        env.push(format!(
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE={RUN_NHI}/aws-token"
        ));
    }
    env
}

/// The companion's AWS container-credential endpoint.
pub const AWS_PATH: &str = "/v1/aws/credentials";

fn add_env(obj: &mut serde_json::Map<String, Value>, env: &[String]) -> Result<bool, String> {
    if env.is_empty() {
        return Ok(false);
    }
    let process = obj
        .get_mut("process")
        .and_then(Value::as_object_mut)
        .ok_or("\"process\" is missing or not an object")?;
    let list = process.entry("env").or_insert_with(|| json!([]));
    if list.is_null() {
        *list = json!([]);
    }
    let list = list
        .as_array_mut()
        .ok_or("\"process.env\" is not an array")?;
    let mut changed = false;
    for var in env {
        let name = var.split('=').next().unwrap_or("");
        let set = list.iter().any(|v| {
            v.as_str()
                .is_some_and(|s| s.split('=').next() == Some(name))
        });
        if !set {
            list.push(Value::String(var.clone()));
            changed = true;
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inj() -> Injection<'static> {
        Injection {
            hook: Path::new("/usr/bin/nhi-hook"),
            config: Path::new("/etc/nhi/nhi.toml"),
            run_dir: None,
            env: vec![],
        }
    }

    #[test]
    fn adds_once_and_keeps_other_hooks_and_unknown_fields() {
        let mut spec: Value = serde_json::from_str(
            r#"{"ociVersion":"1.2.0","zzz_unknown":{"b":1,"a":[1.5,18446744073709551615,-9223372036854775808]},
                "hooks":{"createRuntime":[{"path":"/usr/bin/nvidia-ctk","args":["nvidia-ctk","hook"]}],
                         "prestart":[{"path":"/x"}]},
                "process":{"args":["sh"]}}"#,
        )
        .unwrap();
        let before = spec.clone();
        assert!(inj().apply(&mut spec).unwrap());
        let once = spec.clone();
        assert!(
            !inj().apply(&mut spec).unwrap(),
            "second injection is a no-op"
        );
        assert_eq!(spec, once);
        let cr = spec["hooks"]["createRuntime"].as_array().unwrap();
        assert_eq!(cr.len(), 2);
        assert_eq!(
            cr[0]["path"], "/usr/bin/nvidia-ctk",
            "existing hooks stay first"
        );
        assert_eq!(cr[1]["args"][1], "createRuntime");
        assert_eq!(spec["hooks"]["poststop"][0]["args"][1], "poststop");
        assert_eq!(spec["hooks"]["prestart"], before["hooks"]["prestart"]);
        assert_eq!(spec["zzz_unknown"], before["zzz_unknown"]);
        // Key order is preserved too.
        let keys: Vec<&String> = spec.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["ociVersion", "zzz_unknown", "hooks", "process"]);
        let text = serde_json::to_string(&spec).unwrap();
        assert!(text.contains("18446744073709551615") && text.contains("-9223372036854775808"));
    }

    #[test]
    fn run_dir_mount_is_added_once() {
        let dir = Path::new("/run/nhi/containers/c1");
        let inj = Injection {
            run_dir: Some(dir),
            ..inj()
        };
        let mut spec =
            json!({"ociVersion": "1.0.2", "mounts": [{"destination": "/proc", "type": "proc"}]});
        assert!(inj.apply(&mut spec).unwrap());
        assert!(!inj.apply(&mut spec).unwrap());
        let m = spec["mounts"].as_array().unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[1]["source"], "/run/nhi/containers/c1");
        assert_eq!(m[1]["options"][1], "ro");
    }

    #[test]
    fn env_pointers_are_added_once_and_never_override() {
        let inj = Injection {
            env: pointers(true),
            ..inj()
        };
        let mut spec = json!({"process": {"args": ["sh"], "env": ["PATH=/bin", "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/mine"]}});
        assert!(inj.apply(&mut spec).unwrap());
        assert!(!inj.apply(&mut spec).unwrap());
        let env = spec["process"]["env"].as_array().unwrap();
        assert_eq!(env.len(), 4, "{env:?}");
        assert_eq!(
            env[2],
            "SPIFFE_ENDPOINT_SOCKET=unix:///run/nhi/workload.sock"
        );
        assert_eq!(
            env[3],
            "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:15100/v1/aws/credentials"
        );
        assert_eq!(env[1], "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/mine");
        assert_eq!(pointers(false).len(), 1);
    }

    #[test]
    fn null_or_missing_hooks() {
        let mut spec = json!({"ociVersion": "1.0.2", "hooks": null});
        assert!(inj().apply(&mut spec).unwrap());
        let mut spec = json!({"ociVersion": "1.0.2"});
        assert!(inj().apply(&mut spec).unwrap());
        assert_eq!(spec["hooks"]["createRuntime"].as_array().unwrap().len(), 1);
        let mut bad = json!({"hooks": {"poststop": 3}});
        assert!(inj().apply(&mut bad).is_err());
    }

    #[test]
    fn bundle_file_round_trip() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("config.json"),
            r#"{"ociVersion":"1.0.2","x":{"y":true}}"#,
        )
        .unwrap();
        assert!(inj().apply_to_bundle(d.path()).unwrap());
        let first = std::fs::read(d.path().join("config.json")).unwrap();
        assert!(!inj().apply_to_bundle(d.path()).unwrap());
        assert_eq!(
            std::fs::read(d.path().join("config.json")).unwrap(),
            first,
            "untouched when already injected"
        );
        std::fs::write(d.path().join("config.json"), "{nope").unwrap();
        assert!(matches!(
            inj().apply_to_bundle(d.path()),
            Err(InjectError::Invalid { .. })
        ));
    }
}
