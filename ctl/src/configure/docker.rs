//! Docker: `daemon.json` `runtimes.nhi = {"path": <nhi-runc>}` (plus `runtimeArgs` naming the
//! nhi config when it is not the default), optionally `default-runtime`.

use std::path::PathBuf;

use serde_json::{json, Map, Value};

use super::{read_or_empty, Change, Paths, Plan};

#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    pub set_as_default: bool,
}

pub fn plan(opts: &Options, paths: &Paths) -> Result<Plan, String> {
    let text = read_or_empty(&opts.config)?;
    let mut doc: Value = if text.trim().is_empty() {
        Value::Object(Map::new())
    } else {
        serde_json::from_str(&text)
            .map_err(|e| format!("{}: not valid JSON: {e}", opts.config.display()))?
    };
    let obj = doc
        .as_object_mut()
        .ok_or_else(|| format!("{}: not a JSON object", opts.config.display()))?;
    let runtimes = obj
        .entry("runtimes")
        .or_insert_with(|| json!({}))
        .as_object_mut()
        .ok_or_else(|| format!("{}: \"runtimes\" is not an object", opts.config.display()))?;
    let mut rt = json!({"path": paths.nhi_runc.display().to_string()});
    if paths.config != std::path::Path::new(nhi_core::config::DEFAULT_CONFIG_PATH) {
        rt["runtimeArgs"] = json!(["--nhi-config", paths.config.display().to_string()]);
    }
    runtimes.insert("nhi".into(), rt);
    if opts.set_as_default {
        obj.insert("default-runtime".into(), json!("nhi"));
    }
    let mut content = serde_json::to_string_pretty(&doc).expect("JSON serializes");
    content.push('\n');
    Ok(Plan {
        changes: vec![Change::new(&opts.config, content)],
        next_step: "restart dockerd to load the `nhi` runtime (e.g. `systemctl restart docker`), then `docker run --runtime nhi ...`".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_runtime_keeps_the_rest_and_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("daemon.json");
        std::fs::write(&f, r#"{"log-driver":"journald","runtimes":{"nvidia":{"path":"nvidia-container-runtime"}},"zzz":[1,2]}"#).unwrap();
        let o = Options {
            config: f.clone(),
            set_as_default: true,
        };
        let p = plan(&o, &Paths::default()).unwrap();
        let v: Value = serde_json::from_str(&p.changes[0].content).unwrap();
        assert_eq!(v["runtimes"]["nhi"]["path"], "/usr/bin/nhi-runc");
        assert!(v["runtimes"]["nhi"].get("runtimeArgs").is_none());
        assert_eq!(v["runtimes"]["nvidia"]["path"], "nvidia-container-runtime");
        assert_eq!(v["log-driver"], "journald");
        assert_eq!(v["default-runtime"], "nhi");
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["log-driver", "runtimes", "zzz", "default-runtime"]);
        p.apply().unwrap();
        assert!(!plan(&o, &Paths::default()).unwrap().changes[0].changed);
    }

    #[test]
    fn custom_config_and_errors() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("daemon.json");
        let paths = Paths {
            config: "/tmp/x/nhi.toml".into(),
            ..Paths::default()
        };
        let p = plan(
            &Options {
                config: f.clone(),
                set_as_default: false,
            },
            &paths,
        )
        .unwrap();
        let v: Value = serde_json::from_str(&p.changes[0].content).unwrap();
        assert_eq!(
            v["runtimes"]["nhi"]["runtimeArgs"],
            json!(["--nhi-config", "/tmp/x/nhi.toml"])
        );
        std::fs::write(&f, "{oops").unwrap();
        let e = plan(
            &Options {
                config: f.clone(),
                set_as_default: false,
            },
            &paths,
        )
        .unwrap_err();
        assert!(e.contains("not valid JSON"), "{e}");
        std::fs::write(&f, "[]").unwrap();
        assert!(plan(
            &Options {
                config: f,
                set_as_default: false
            },
            &paths
        )
        .is_err());
    }
}
