//! containerd: a CRI runtime handler `nhi` (`runtime_type = "io.containerd.runc.v2"`,
//! `options.BinaryName = nhi-runc`, the other options copied from the default runtime,
//! `pod_annotations = ["nhi.dev/*"]`), for config version 2 (containerd 1.x,
//! `io.containerd.grpc.v1.cri`) and versions 3 and 4 (containerd 2.x; 2.3 writes 4; both name
//! the CRI runtime plugin `io.containerd.cri.v1.runtime`), in place or as a drop-in under
//! `conf.d` pulled in by `imports`.
//!
//! A new (missing or empty) file gets the version the installed containerd writes itself
//! (`containerd --version`: 1.x → 2, 2.0–2.2 → 3, 2.3 and later → 4), or the one given with
//! `--config-version`, so containerd never has to migrate what we wrote.
//!
//! Drop-ins: containerd 1.x merges an imported file by replacing whole plugin sections, so a
//! version 2 drop-in holding only our handler would drop every other CRI setting of the main
//! file (sandbox image, CNI, runtimes): it carries a copy of the main file's CRI plugin section
//! plus the handler; after editing that section in the main file, run `nhictl configure` again.
//! containerd 2.x merges imports deeply (key by key), so a version 3/4 drop-in is minimal: the
//! handler (and `default_runtime_name` with `--set-as-default`) and nothing else.

use std::path::{Path, PathBuf};
use std::process::Command;

use toml_edit::{value, Array, DocumentMut, Item, Table};

use super::{read_or_empty, Change, Paths, Plan};

pub const HANDLER: &str = "nhi";
/// The config versions this writer understands.
pub const VERSIONS: std::ops::RangeInclusive<i64> = 2..=4;

#[derive(Debug, Clone)]
pub struct Options {
    pub config: PathBuf,
    /// Write the handler to this drop-in file (and make `config` import it) instead of in place.
    pub drop_in: Option<PathBuf>,
    pub set_as_default: bool,
    /// The config version to write (`--config-version`). Without it a new file gets the
    /// version `containerd` (the binary below) writes, and an existing file keeps its own.
    pub config_version: Option<i64>,
    /// The containerd binary asked for its version when a new file is written.
    pub containerd: PathBuf,
}

impl Options {
    pub fn new(config: impl Into<PathBuf>) -> Self {
        Options {
            config: config.into(),
            drop_in: None,
            set_as_default: false,
            config_version: None,
            containerd: "containerd".into(),
        }
    }
}

fn cri_plugin(version: i64) -> &'static str {
    if version >= 3 {
        "io.containerd.cri.v1.runtime"
    } else {
        "io.containerd.grpc.v1.cri"
    }
}

/// containerd 2.x merges imported files key by key; 1.x replaces whole plugin sections.
fn deep_merged_imports(version: i64) -> bool {
    version >= 3
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut, String> {
    text.parse::<DocumentMut>()
        .map_err(|e| format!("{}: not valid TOML: {e}", path.display()))
}

fn check_supported(what: &str, v: i64) -> Result<i64, String> {
    if VERSIONS.contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{what} {v} is not supported (2 for containerd 1.x, 3 or 4 for containerd 2.x)"
        ))
    }
}

/// The config version containerd `major.minor` writes itself (`containerd config default`).
pub fn version_for(major: u64, minor: u64) -> i64 {
    match (major, minor) {
        (0 | 1, _) => 2,
        (2, 0..=2) => 3,
        _ => 4,
    }
}

/// `major.minor` from `containerd --version` output, e.g. `containerd
/// github.com/containerd/containerd/v2 v2.3.4 <commit>` or Debian's `containerd
/// github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1`.
pub fn parse_containerd_version(out: &str) -> Option<(u64, u64)> {
    out.split_whitespace().skip(1).find_map(|tok| {
        let t = tok.strip_prefix('v').unwrap_or(tok);
        let mut parts = t.split(['.', '~', '-', '+']);
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        Some((major, minor))
    })
}

/// The config version the installed containerd (`bin`) writes, by asking it.
pub fn detect_version(bin: &Path) -> Result<i64, String> {
    let hint = "pass --config-version 2 (containerd 1.x), 3 (2.0–2.2) or 4 (2.3 and later)";
    let out = Command::new(bin).arg("--version").output().map_err(|e| {
        format!(
            "cannot ask `{} --version` which config version to write ({e}); {hint}",
            bin.display()
        )
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    match parse_containerd_version(&text) {
        Some((major, minor)) if out.status.success() => Ok(version_for(major, minor)),
        _ => Err(format!(
            "`{} --version` answered {:?}, which names no version; {hint}",
            bin.display(),
            text.trim()
        )),
    }
}

/// The config `version`. A file without one is containerd's version 1, which we refuse; a new
/// (empty) file gets `--config-version` or the installed containerd's version.
fn version_of(path: &Path, doc: &DocumentMut, empty: bool, opts: &Options) -> Result<i64, String> {
    let file = match doc.get("version") {
        None if empty => None,
        None => {
            return Err(format!(
                "{}: no `version` key, so containerd reads it as config version 1; migrate it first (`containerd config migrate`) or add `version = 2`",
                path.display()
            ))
        }
        Some(v) => match v.as_integer() {
            Some(n) => Some(check_supported(
                &format!("{}: config version", path.display()),
                n,
            )?),
            None => {
                return Err(format!(
                    "{}: config version {} is not an integer",
                    path.display(),
                    v.to_string().trim()
                ))
            }
        },
    };
    match (file, opts.config_version) {
        (Some(f), Some(flag)) if f != flag => Err(format!(
            "{}: the file is config version {f} but --config-version {flag} was given; migrate it with `containerd config migrate` first, or drop the flag",
            path.display()
        )),
        (Some(f), _) => Ok(f),
        (None, Some(flag)) => check_supported("--config-version", flag),
        (None, None) => detect_version(&opts.containerd),
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
    let version = version_of(&opts.config, &main, text.trim().is_empty(), opts)?;
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
            // 1.x replaces whole sections on import: carry the main file's CRI section along.
            // 2.x merges deeply: the handler alone is enough, and nothing else is shadowed.
            let section = main.get("plugins").and_then(|p| p.get(plugin)).cloned();
            if let (false, Some(section)) = (deep_merged_imports(version), section) {
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
        let mut o = Options::new(config);
        o.drop_in = drop_in;
        o.set_as_default = default;
        o.config_version = Some(2).filter(|_| text.trim().is_empty());
        plan(&o, &paths())
    }

    /// What `containerd config default` of containerd 2.3 writes (version 4).
    const V4_DEFAULT: &str = include_str!("../../testdata/containerd-2.3-config-default.toml");

    /// The `nhi` handler as written: runc v2 shim, nhi-runc, runc's `SystemdCgroup` copied.
    fn assert_handler(nhi: &toml::Value, systemd_cgroup: bool) {
        assert_eq!(nhi["runtime_type"].as_str(), Some("io.containerd.runc.v2"));
        assert_eq!(
            nhi["options"]["BinaryName"].as_str(),
            Some("/usr/bin/nhi-runc")
        );
        assert_eq!(
            nhi["options"]["SystemdCgroup"].as_bool(),
            Some(systemd_cgroup),
            "copied from runc"
        );
        assert_eq!(
            nhi["pod_annotations"].as_array().unwrap()[0].as_str(),
            Some("nhi.dev/*")
        );
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
        assert_handler(nhi, true);
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
        // Versions we do not know are named once, with single spaces (was "version  5").
        let e = run(&f, "version = 5\n", None, false).unwrap_err();
        assert!(
            e.ends_with("config version 5 is not supported (2 for containerd 1.x, 3 or 4 for containerd 2.x)"),
            "{e}"
        );
        let e = run(&f, "version = \"4\"\n", None, false).unwrap_err();
        assert!(e.contains("config version \"4\" is not an integer"), "{e}");
        // An empty or missing file gets the version asked for.
        let p = run(&f, "", None, false).unwrap();
        assert!(p.changes[0].content.starts_with("version = 2"));
    }

    #[test]
    fn containerd_2_3_default_config_version_4_in_place_is_idempotent() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        let p = run(&f, V4_DEFAULT, None, false).unwrap();
        let out = &p.changes[0].content;
        assert!(out.starts_with("version = 4\n"), "{out}");
        let doc: toml::Value = toml::from_str(out).unwrap();
        let ctd = &doc["plugins"]["io.containerd.cri.v1.runtime"]["containerd"];
        assert_handler(&ctd["runtimes"]["nhi"], false);
        assert_eq!(
            ctd["runtimes"]["runc"]["options"]["BinaryName"].as_str(),
            Some("")
        );
        assert_eq!(ctd["default_runtime_name"].as_str(), Some("runc"));
        assert!(doc["plugins"]["io.containerd.grpc.v1.cri"]
            .get("containerd")
            .is_none());
        // Everything else is kept byte for byte: the output is the input plus the handler's
        // lines (inserted after runc's tables).
        let mut original = V4_DEFAULT.lines().peekable();
        let mut added = Vec::new();
        for line in out.lines() {
            if original.peek() == Some(&line) {
                original.next();
            } else {
                added.push(line);
            }
        }
        assert_eq!(
            original.next(),
            None,
            "a line of the input was changed or lost"
        );
        assert_eq!(
            added
                .iter()
                .copied()
                .filter(|l| l.starts_with('['))
                .collect::<Vec<_>>(),
            [
                "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.nhi]",
                "[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.nhi.options]"
            ],
            "{added:?}"
        );
        p.apply().unwrap();
        let again = run(&f, &std::fs::read_to_string(&f).unwrap(), None, false).unwrap();
        assert!(!again.changes[0].changed, "second run changes nothing");
    }

    #[test]
    fn containerd_2_x_drop_in_is_minimal_and_the_main_file_only_gains_the_import() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("config.toml");
        let drop = d.path().join("conf.d/99-nhi.toml");
        // The 2.3 default already imports /etc/containerd/conf.d/*.toml; ours lives elsewhere.
        let p = run(&f, V4_DEFAULT, Some(drop.clone()), true).unwrap();
        let main: toml::Value = toml::from_str(&p.changes[0].content).unwrap();
        let imports: Vec<&str> = main["imports"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let pattern = d.path().join("conf.d/*.toml").display().to_string();
        assert_eq!(imports, ["/etc/containerd/conf.d/*.toml", pattern.as_str()]);
        assert!(
            main["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
                .get("nhi")
                .is_none()
        );
        let di: toml::Value = toml::from_str(&p.changes[1].content).unwrap();
        assert_eq!(di["version"].as_integer(), Some(4));
        // Deep merge: nothing but the handler and the default runtime name.
        assert_eq!(di.as_table().unwrap().len(), 2, "{di}");
        let plugins = di["plugins"].as_table().unwrap();
        assert_eq!(plugins.len(), 1, "{di}");
        let cri = plugins["io.containerd.cri.v1.runtime"].as_table().unwrap();
        assert_eq!(cri.len(), 1, "no copy of the CRI section: {di}");
        let ctd = cri["containerd"].as_table().unwrap();
        assert_eq!(ctd["default_runtime_name"].as_str(), Some("nhi"));
        assert_eq!(ctd["runtimes"].as_table().unwrap().len(), 1, "{di}");
        assert_eq!(
            ctd["runtimes"]["nhi"]["options"]["BinaryName"].as_str(),
            Some("/usr/bin/nhi-runc")
        );
        p.apply().unwrap();
        let again = run(&f, &std::fs::read_to_string(&f).unwrap(), Some(drop), true).unwrap();
        assert!(again.changes.iter().all(|c| !c.changed));
        // A drop-in the main file already imports (the 2.3 default's own pattern) adds nothing.
        let g = d.path().join("default.toml");
        let p = run(
            &g,
            V4_DEFAULT,
            Some("/etc/containerd/conf.d/99-nhi.toml".into()),
            false,
        )
        .unwrap();
        assert!(!p.changes[0].changed, "main file untouched");
    }

    #[test]
    fn a_new_file_gets_the_version_the_installed_containerd_writes() {
        assert_eq!(
            parse_containerd_version(
                "containerd github.com/containerd/containerd/v2 v2.3.4 0123abcd\n"
            ),
            Some((2, 3))
        );
        assert_eq!(
            parse_containerd_version(
                "containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+b1\n"
            ),
            Some((1, 6))
        );
        assert_eq!(
            parse_containerd_version("containerd containerd.io 1.7.27 05044ec0a9\n"),
            Some((1, 7))
        );
        assert_eq!(parse_containerd_version("containerd\n"), None);
        assert_eq!(version_for(1, 7), 2);
        assert_eq!(version_for(2, 0), 3);
        assert_eq!(version_for(2, 2), 3);
        assert_eq!(version_for(2, 3), 4);
        assert_eq!(version_for(3, 0), 4);

        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("containerd");
        let f = d.path().join("config.toml");
        let with = |answer: &str, flag: Option<i64>| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::write(&fake, format!("#!/bin/sh\necho '{answer}'\n")).unwrap();
            std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
            let mut o = Options::new(&f);
            o.containerd = fake.clone();
            o.config_version = flag;
            plan(&o, &paths())
        };
        let p = with(
            "containerd github.com/containerd/containerd/v2 v2.3.4 abc",
            None,
        )
        .unwrap();
        assert!(p.changes[0].content.starts_with("version = 4\n"));
        assert!(p.changes[0]
            .content
            .contains("[plugins.\"io.containerd.cri.v1.runtime\".containerd.runtimes.nhi]"));
        let p = with(
            "containerd github.com/containerd/containerd/v2 v2.1.0 abc",
            None,
        )
        .unwrap();
        assert!(p.changes[0].content.starts_with("version = 3\n"));
        let p = with(
            "containerd github.com/containerd/containerd 1.6.20~ds1 x",
            None,
        )
        .unwrap();
        assert!(p.changes[0].content.starts_with("version = 2\n"));
        // The flag wins over the binary; garbage from the binary is an error naming the flag.
        let p = with("nonsense", Some(3)).unwrap();
        assert!(p.changes[0].content.starts_with("version = 3\n"));
        let e = with("nonsense", None).unwrap_err();
        assert!(e.contains("--config-version"), "{e}");
        let mut o = Options::new(&f);
        o.containerd = d.path().join("missing");
        let e = plan(&o, &paths()).unwrap_err();
        assert!(
            e.contains("cannot ask") && e.contains("--config-version"),
            "{e}"
        );
        // An existing file keeps its version; a flag that disagrees is refused.
        std::fs::write(&f, "version = 2\n").unwrap();
        let e = with("x", Some(4)).unwrap_err();
        assert!(e.contains("config version 2 but --config-version 4"), "{e}");
        assert!(with("x", Some(2)).is_ok());
    }
}
