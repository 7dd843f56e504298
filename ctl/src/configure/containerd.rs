//! containerd: a CRI runtime handler `nhi` (`runtime_type = "io.containerd.runc.v2"`,
//! `options.BinaryName = nhi-runc`, the other options copied from the default runtime,
//! `pod_annotations = ["nhi.dev/*"]`), for config version 2 (containerd 1.x,
//! `io.containerd.grpc.v1.cri`) and version 3 (containerd 2.x, `io.containerd.cri.v1.runtime`),
//! in place or as a drop-in under `conf.d` pulled in by `imports`.
//!
//! containerd merges an imported file by replacing whole plugin sections, so a drop-in holding
//! only our handler would drop every other CRI setting of the main file (sandbox image, CNI,
//! runtimes). The drop-in therefore carries a copy of the main file's CRI plugin section plus
//! the handler; after editing that section in the main file, run `nhictl configure` again.

use std::path::{Path, PathBuf};

use toml_edit::{value, Array, DocumentMut, Item, Table};

use super::{read_or_empty, Change, Paths, Plan};

pub const HANDLER: &str = "nhi";

#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Write the handler to this drop-in file (and make `config` import it) instead of in place.
    pub drop_in: Option<PathBuf>,
    pub set_as_default: bool,
}

fn cri_plugin(version: i64) -> &'static str {
    if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    }
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut, String> {
    text.parse::<DocumentMut>()
        .map_err(|e| format!("{}: not valid TOML: {e}", path.display()))
}

/// The config `version`. A file without one is containerd's version 1, which we refuse.
fn version_of(path: &Path, doc: &DocumentMut, empty: bool) -> Result<i64, String> {
    match doc.get("version") {
        None if empty => Ok(2),
        None => Err(format!(
            "{}: no `version` key, so containerd reads it as config version 1; migrate it first (`containerd config migrate`) or add `version = 2`",
            path.display()
        )),
        Some(v) => match v.as_integer() {
            Some(n @ 2..=3) => Ok(n),
            _ => Err(format!("{}: config version {v} is not supported (2 or 3)", path.display())),
        },
    }
}

/// The table at `keys`, creating missing ones as implicit (no empty headers in the output).
fn table_at<'a>(root: &'a mut Table, keys: &[&str]) -> Result<&'a mut Table, String> {
    let mut t = root;
    for (i, k) in keys.iter().enumerate() {
        let entry = t.entry(k).or_insert_with(|| {
            let mut n = Table::new();
            n.set_implicit(true);
            Item::Table(n)
        });
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("{} is not a table", keys[..=i].join(".")))?;
    }
    Ok(t)
}

fn containerd_table(doc: &mut DocumentMut, version: i64) -> Result<&mut Table, String> {
    table_at(
        doc.as_table_mut(),
        &["plugins", cri_plugin(version), "containerd"],
    )
}

/// Options of the default runtime (`default_runtime_name`, else `runc`) in `doc`, if any.
fn default_options(doc: &mut DocumentMut, version: i64) -> Option<Table> {
    let ctd = containerd_table(doc, version).ok()?;
    let name = ctd
        .get("default_runtime_name")
        .and_then(|v| v.as_str())
        .unwrap_or("runc")
        .to_string();
    if name == HANDLER {
        return None;
    }
    ctd.get("runtimes")?
        .get(&name)?
        .get("options")?
        .as_table()
        .cloned()
}

/// Writes the `nhi` handler into `doc`.
fn put_handler(
    doc: &mut DocumentMut,
    version: i64,
    copied: Option<Table>,
    paths: &Paths,
    set_as_default: bool,
) -> Result<(), String> {
    let ctd = containerd_table(doc, version)?;
    if set_as_default {
        ctd["default_runtime_name"] = value(HANDLER);
    }
    let rt = table_at(ctd, &["runtimes", HANDLER])?;
    rt.set_implicit(false);
    rt["runtime_type"] = value("io.containerd.runc.v2");
    let mut ann = Array::new();
    ann.push("nhi.dev/*");
    rt["pod_annotations"] = value(ann);
    let mut opts = copied.unwrap_or_default();
    opts.remove("BinaryName");
    opts.set_implicit(false);
    opts.set_position(None);
    let mut ordered = Table::new();
    ordered["BinaryName"] = value(paths.nhi_runc.display().to_string());
    for (k, v) in opts.iter() {
        ordered.insert(k, v.clone());
    }
    rt.insert("options", Item::Table(ordered));
    Ok(())
}

/// Makes `doc` import `pattern` (idempotent).
fn add_import(doc: &mut DocumentMut, pattern: &str) -> Result<(), String> {
    let imports = doc
        .entry("imports")
        .or_insert_with(|| value(Array::new()))
        .as_array_mut()
        .ok_or("`imports` is not an array")?;
    if !imports.iter().any(|v| v.as_str() == Some(pattern)) {
        imports.push(pattern);
    }
    Ok(())
}

pub fn plan(opts: &Options, paths: &Paths) -> Result<Plan, String> {
    let text = read_or_empty(&opts.config)?;
    let mut main = parse(&opts.config, &text)?;
    let version = version_of(&opts.config, &main, text.trim().is_empty())?;
    if main.get("version").is_none() {
        main["version"] = value(version);
    }
    let copied = default_options(&mut main, version);
    let mut changes = Vec::new();
    match &opts.drop_in {
        None => {
            put_handler(&mut main, version, copied, paths, opts.set_as_default)?;
            changes.push(Change::new(&opts.config, main.to_string()));
        }
        Some(drop_in) => {
            // Validate whatever is there, then rebuild it from the main file.
            parse(drop_in, &read_or_empty(drop_in)?)?;
            let mut d = DocumentMut::new();
            d["version"] = value(version);
            let plugin = cri_plugin(version);
            if let Some(section) = main.get("plugins").and_then(|p| p.get(plugin)).cloned() {
                let plugins = table_at(d.as_table_mut(), &["plugins"])?;
                plugins.insert(plugin, section);
            }
            put_handler(&mut d, version, copied, paths, opts.set_as_default)?;
            let pattern = drop_in
                .parent()
                .map(|p| p.join("*.toml").display().to_string())
                .unwrap_or_else(|| drop_in.display().to_string());
            let covered = main
                .get("imports")
                .and_then(|i| i.as_array())
                .is_some_and(|a| {
                    a.iter()
                        .any(|v| v.as_str() == Some(&pattern) || v.as_str() == drop_in.to_str())
                });
            if !covered {
                add_import(&mut main, &pattern)?;
            }
            changes.push(Change::new(&opts.config, main.to_string()));
            changes.push(Change::new(drop_in, d.to_string()));
        }
    }
    Ok(Plan {
        changes,
        next_step: "restart containerd to load the `nhi` runtime handler (e.g. `systemctl restart containerd`); Kubernetes pods pick it with a RuntimeClass whose handler is `nhi`".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths() -> Paths {
        Paths::default()
    }

    fn run(
        config: &Path,
        text: &str,
        drop_in: Option<PathBuf>,
        default: bool,
    ) -> Result<Plan, String> {
        std::fs::write(config, text).unwrap();
        plan(
            &Options {
                config: config.into(),
                drop_in,
                set_as_default: default,
            },
            &paths(),
        )
    }

    const V2: &str = r#"version = 2
root = "/var/lib/containerd"

# keep this comment
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "registry.k8s.io/pause:3.6"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = true
        BinaryName = "/usr/sbin/runc"
"#;

    #[test]
    fn v2_in_place_is_idempotent_and_keeps_the_rest() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        let p = run(&f, V2, None, false).unwrap();
        let out = &p.changes[0].content;
        assert!(
            out.contains("# keep this comment") && out.contains("restrict_oom_score_adj = true")
        );
        let doc: toml::Value = toml::from_str(out).unwrap();
        let nhi = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["nhi"];
        assert_eq!(nhi["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
        assert_eq!(
            nhi["options"]["BinaryName"].as_str(),
            Some("/usr/bin/nhi-runc")
        );
        assert_eq!(
            nhi["options"]["SystemdCgroup"].as_bool(),
            Some(true),
            "copied from runc"
        );
        assert_eq!(
            nhi["pod_annotations"].as_array().unwrap()[0].as_str(),
            Some("nhi.dev/*")
        );
        let runc = &doc["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["runc"];
        assert_eq!(
            runc["options"]["BinaryName"].as_str(),
            Some("/usr/sbin/runc"),
            "runc untouched"
        );
        p.apply().unwrap();
        let again = run(&f, &std::fs::read_to_string(&f).unwrap(), None, false).unwrap();
        assert!(!again.changes[0].changed, "second run changes nothing");
        assert_eq!(&again.changes[0].content, out);
    }

    #[test]
    fn v3_and_set_as_default() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        let p = run(&f, "version = 3\n", None, true).unwrap();
        let doc: toml::Value = toml::from_str(&p.changes[0].content).unwrap();
        let ctd = &doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"];
        assert_eq!(ctd["default_runtime_name"].as_str(), Some("nhi"));
        assert_eq!(
            ctd["runtimes"]["nhi"]["options"]["BinaryName"].as_str(),
            Some("/usr/bin/nhi-runc")
        );
        assert!(doc["plugins"].get("io.containerd.grpc.v1.cri").is_none());
    }

    #[test]
    fn drop_in_with_imports() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        let drop = d.path().join("conf.d/99-nhi.toml");
        let p = run(&f, V2, Some(drop.clone()), false).unwrap();
        assert_eq!(p.changes.len(), 2);
        let main: toml::Value = toml::from_str(&p.changes[0].content).unwrap();
        let pattern = d.path().join("conf.d/*.toml").display().to_string();
        assert_eq!(
            main["imports"].as_array().unwrap()[0].as_str(),
            Some(pattern.as_str())
        );
        assert!(
            main["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
                .get("nhi")
                .is_none()
        );
        let di: toml::Value = toml::from_str(&p.changes[1].content).unwrap();
        assert_eq!(di["version"].as_integer(), Some(2));
        let cri = &di["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(
            cri["restrict_oom_score_adj"].as_bool(),
            Some(true),
            "the whole CRI section is carried"
        );
        assert_eq!(
            cri["sandbox_image"].as_str(),
            Some("registry.k8s.io/pause:3.6")
        );
        assert_eq!(
            cri["containerd"]["runtimes"]["runc"]["options"]["BinaryName"].as_str(),
            Some("/usr/sbin/runc")
        );
        assert_eq!(
            di["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]["nhi"]["options"]
                ["SystemdCgroup"]
                .as_bool(),
            Some(true)
        );
        p.apply().unwrap();
        let again = run(&f, &std::fs::read_to_string(&f).unwrap(), Some(drop), false).unwrap();
        assert!(again.changes.iter().all(|c| !c.changed));
    }

    #[test]
    fn refuses_what_it_cannot_handle() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        let e = run(&f, "version = 2\n[plugins\n", None, false).unwrap_err();
        assert!(e.contains("not valid TOML"), "{e}");
        let e = run(&f, "[plugins.cri]\nx = 1\n", None, false).unwrap_err();
        assert!(e.contains("version 1"), "{e}");
        let e = run(&f, "version = 2\nplugins = 3\n", None, false).unwrap_err();
        assert!(e.contains("not a table"), "{e}");
        // An empty or missing file becomes a version 2 config.
        let p = run(&f, "", None, false).unwrap();
        assert!(p.changes[0].content.starts_with("version = 2"));
    }
}
