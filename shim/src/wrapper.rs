//! nhi-runc's logic.

use std::io::Write;
use std::path::{Path, PathBuf};

use nhi_core::Config;

use crate::args::{parse, RuncArgs};
use crate::inject::Injection;
use crate::runtime::{exec, log_line, resolve};

/// The config file: `NHI_CONFIG`, else the default path.
pub fn config_path() -> PathBuf {
    std::env::var_os("NHI_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| nhi_core::config::DEFAULT_CONFIG_PATH.into())
}

/// Takes nhi-runc's own leading `--nhi-config PATH` / `--nhi-config=PATH` off the arguments
/// (Docker passes `runtimeArgs` first); everything after it is runc's.
pub fn take_own_args(args: &mut Vec<String>) -> Option<PathBuf> {
    let first = args.first()?;
    if let Some(p) = first.strip_prefix("--nhi-config=") {
        let p = PathBuf::from(p);
        args.remove(0);
        return Some(p);
    }
    if first == "--nhi-config" && args.len() >= 2 {
        let p = PathBuf::from(args.remove(1));
        args.remove(0);
        return Some(p);
    }
    None
}

/// The hook to inject: `runtime.hook`, else `nhi-hook` next to this executable.
fn hook_path(config: &Config) -> PathBuf {
    config.runtime.hook.clone().unwrap_or_else(|| {
        std::fs::read_link("/proc/self/exe")
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("nhi-hook")))
            .unwrap_or_else(|| "/usr/bin/nhi-hook".into())
    })
}

/// Runs nhi-runc with `args` (without argv0). Returns only on failure, with the exit code.
pub fn main(mut args: Vec<String>) -> i32 {
    let cfg_path = take_own_args(&mut args).unwrap_or_else(config_path);
    let parsed = parse(&args);
    let config = Config::load(&cfg_path);
    if parsed.creates() {
        let prepared = config
            .as_ref()
            .map_err(|e| e.to_string())
            .and_then(|c| prepare(c, &cfg_path, &parsed));
        if let Err(e) = prepared {
            return fail(&parsed, &format!("nhi-runc: {e}"));
        }
    }
    // Pass-through never depends on nhi's config being valid: a broken config must not stop
    // `kill`, `delete` or `state` of existing containers.
    let runtime = config
        .as_ref()
        .map(|c| c.runtime.runtime.clone())
        .unwrap_or_else(|_| "runc".into());
    let program = match resolve(&runtime, std::env::var_os("PATH")) {
        Ok(p) => p,
        Err(e) => return fail(&parsed, &format!("nhi-runc: {e}")),
    };
    let err = exec(&program, &runtime, &args, &[]);
    fail(
        &parsed,
        &format!("nhi-runc: exec {}: {err}", program.display()),
    )
}

fn prepare(config: &Config, cfg_path: &Path, parsed: &RuncArgs) -> Result<(), String> {
    let bundle = match &parsed.bundle {
        Some(b) => b.clone(),
        None => std::env::current_dir().map_err(|e| format!("current directory: {e}"))?,
    };
    let hook = hook_path(config);
    if !hook.is_file() {
        return Err(format!(
            "hook {} does not exist (runtime.hook)",
            hook.display()
        ));
    }
    let cfg_abs = std::fs::canonicalize(cfg_path).unwrap_or_else(|_| cfg_path.to_path_buf());
    let rule = parsed
        .id
        .as_deref()
        .and_then(|id| selected_rule(config, &bundle, id));
    let run_dir = match (&parsed.id, &rule) {
        (Some(id), Some(_)) => Some(make_run_dir(config, id)?),
        _ => None,
    };
    let env = match &rule {
        Some(r) => crate::inject::pointers(r.aws_credentials.is_some()),
        None => vec![],
    };
    Injection {
        hook: &hook,
        config: &cfg_abs,
        run_dir: run_dir.as_deref(),
        env,
    }
    .apply_to_bundle(&bundle)
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// The rule that selects the container, if any (only those get a `/run/nhi` directory and
/// the env pointers into it).
fn selected_rule(config: &Config, bundle: &Path, id: &str) -> Option<nhi_core::Rule> {
    let data = std::fs::read(bundle.join("config.json")).ok()?;
    let spec = serde_json::from_slice::<oci_spec::runtime::Spec>(&data).ok()?;
    let state = serde_json::json!({
        "ociVersion": "1.0.2", "id": id, "status": "creating", "pid": 0,
        "bundle": bundle.display().to_string(),
    });
    let state = serde_json::from_value::<oci_spec::runtime::State>(state).ok()?;
    let mut w = nhi_core::Workload::from_oci(&state, &spec);
    // The same Nomad proof the hook checks; without it no Nomad rule selects the container.
    let _ = nhi_core::nomad::attach(&config.nomad, &spec, &mut w);
    // A rule the container may not pick gets no directory; the hook then refuses the container.
    nhi_core::select::select(config, &w).ok().flatten().cloned()
}

/// `<store.containers_dir>/<id>`, root-owned, 0755 (files inside are 0400 to the container's
/// uid). `nhid` removes it when the container is detached.
fn make_run_dir(config: &Config, id: &str) -> Result<PathBuf, String> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if id.is_empty() || id.starts_with('.') || id.contains('/') {
        return Err(format!(
            "container id {id:?} is not usable as a directory name"
        ));
    }
    let base = &config.store.containers_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(base)
        .map_err(|e| format!("{}: {e}", base.display()))?;
    let dir = base.join(id);
    match std::fs::DirBuilder::new().mode(0o755).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("{}: {e}", dir.display())),
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(dir)
}

/// Reports like runc: to the caller's `--log` file in its format, and to stderr. Never stdout.
fn fail(parsed: &RuncArgs, msg: &str) -> i32 {
    if let Some(log) = &parsed.log {
        if let Ok(mut f) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
        {
            let _ = f.write_all(log_line(parsed.log_json, msg).as_bytes());
        }
    }
    eprintln!("{msg}");
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_args_are_stripped() {
        let mut a: Vec<String> = ["--nhi-config", "/x.toml", "--root", "/r", "create", "id"]
            .map(String::from)
            .to_vec();
        assert_eq!(take_own_args(&mut a), Some("/x.toml".into()));
        assert_eq!(a, ["--root", "/r", "create", "id"]);
        let mut a: Vec<String> = ["--nhi-config=/y.toml", "state", "id"]
            .map(String::from)
            .to_vec();
        assert_eq!(take_own_args(&mut a), Some("/y.toml".into()));
        assert_eq!(a, ["state", "id"]);
        let mut a: Vec<String> = ["state", "--nhi-config", "/z"].map(String::from).to_vec();
        assert_eq!(take_own_args(&mut a), None, "only leading");
        assert_eq!(a.len(), 3);
    }
}
