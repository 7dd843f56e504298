//! Podman and CRI-O: oci-hooks(5) files (version 1.0.0) in a hooks directory, one per stage,
//! matching on the `nhi.dev/inject` annotation (or `always`).

use std::path::PathBuf;

use serde_json::json;

use super::{Change, Paths, Plan};

#[derive(Debug, Clone)]
pub struct Options {
    pub hooks_dir: PathBuf,
    /// Run the hook for every container (selection then comes from nhi's rules alone).
    pub always: bool,
    /// `podman` or `crio`, for the message.
    pub runtime: &'static str,
}

pub fn plan(opts: &Options, paths: &Paths) -> Result<Plan, String> {
    let when = if opts.always {
        json!({"always": true})
    } else {
        json!({"annotations": {"^nhi\\.dev/inject$": "^true$"}})
    };
    let mut changes = Vec::new();
    for stage in ["createRuntime", "poststop"] {
        let hook = json!({
            "version": "1.0.0",
            "hook": {
                "path": paths.hook.display().to_string(),
                "args": ["nhi-hook", stage, "--config", paths.config.display().to_string()],
            },
            "when": when,
            "stages": [stage],
        });
        let mut content = serde_json::to_string_pretty(&hook).expect("JSON serializes");
        content.push('\n');
        changes.push(Change::new(
            &opts.hooks_dir.join(format!("nhi-{stage}.json")),
            content,
        ));
    }
    let next_step = match opts.runtime {
        "crio" => "CRI-O reads hooks directories at start: restart it (e.g. `systemctl restart crio`)".to_string(),
        _ => format!(
            "podman reads {} on every run (pass --hooks-dir if it is not a default hooks directory); annotate containers with nhi.dev/inject=true",
            opts.hooks_dir.display()
        ),
    };
    Ok(Plan { changes, next_step })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_file_per_stage() {
        let d = tempfile::tempdir().unwrap();
        let o = Options {
            hooks_dir: d.path().into(),
            always: false,
            runtime: "podman",
        };
        let p = plan(&o, &Paths::default()).unwrap();
        assert_eq!(p.changes.len(), 2);
        let v: serde_json::Value = serde_json::from_str(&p.changes[0].content).unwrap();
        assert_eq!(v["version"], "1.0.0");
        assert_eq!(v["stages"], json!(["createRuntime"]));
        assert_eq!(v["hook"]["args"][1], "createRuntime");
        assert_eq!(v["when"]["annotations"]["^nhi\\.dev/inject$"], "^true$");
        p.apply().unwrap();
        assert!(plan(&o, &Paths::default())
            .unwrap()
            .changes
            .iter()
            .all(|c| !c.changed));
        let always = plan(&Options { always: true, ..o }, &Paths::default()).unwrap();
        assert!(always.changes[1].content.contains("\"always\": true"));
    }
}
