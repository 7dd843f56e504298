//! containerd-shim-nhi-v2's logic: become the stock runc v2 shim, with `runc` meaning nhi-runc.
//!
//! containerd starts `containerd-shim-nhi-v2 [flags] start|delete` for runtime
//! `io.containerd.nhi.v2`. We make sure `<shim_bin_dir>/runc` links to the `nhi-runc` next to
//! this binary, prepend that directory to `PATH` and `exec` `containerd-shim-runc-v2` with the
//! same arguments. The runc shim re-executes itself as the long-lived shim server with the same
//! environment, and runs `runc` through `PATH` unless the runtime options name a `BinaryName`.
//! So every task API call (create, start, exec, kill, pause, stats, OOM events, delete) is
//! handled by the stock shim of whatever containerd version is installed (task v2 on 1.6/1.7,
//! v3 on 2.x), and only container creation passes through nhi-runc.

use std::ffi::OsString;
use std::io;
use std::path::{Path, PathBuf};

use nhi_core::Config;

use crate::runtime::{exec, resolve};

/// Points `<dir>/runc` at `target`, atomically (concurrent shim starts race here).
pub fn ensure_runc_link(dir: &Path, target: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let link = dir.join("runc");
    if std::fs::read_link(&link).is_ok_and(|t| t == target) {
        return Ok(());
    }
    nhi_core::atomic_file::replace_symlink(&link, target)
}

/// `PATH` with `dir` first.
pub fn path_with(dir: &Path, path: Option<OsString>) -> OsString {
    let mut parts = vec![dir.to_path_buf()];
    if let Some(p) = path {
        parts.extend(std::env::split_paths(&p).filter(|d| d != dir));
    } else {
        parts.extend(
            [
                "/usr/local/sbin",
                "/usr/local/bin",
                "/usr/sbin",
                "/usr/bin",
                "/sbin",
                "/bin",
            ]
            .map(PathBuf::from),
        );
    }
    std::env::join_paths(parts).expect("paths without ':'")
}

/// Runs the shim with `args` (without argv0). Returns only on failure.
pub fn main(args: Vec<String>) -> i32 {
    match run(args) {
        Ok(never) => match never {},
        Err(e) => {
            eprintln!("containerd-shim-nhi-v2: {e}");
            1
        }
    }
}

enum Never {}

fn run(args: Vec<String>) -> Result<Never, String> {
    let cfg_path = crate::wrapper::config_path();
    let config = Config::load(&cfg_path).map_err(|e| e.to_string())?;
    let me = std::fs::read_link("/proc/self/exe").map_err(|e| format!("own path: {e}"))?;
    let wrapper = me.with_file_name("nhi-runc");
    if !wrapper.is_file() {
        return Err(format!(
            "{} is missing (it ships next to this shim)",
            wrapper.display()
        ));
    }
    let dir = &config.runtime.shim_bin_dir;
    ensure_runc_link(dir, &wrapper).map_err(|e| format!("{}: {e}", dir.display()))?;
    let path = path_with(dir, std::env::var_os("PATH"));
    let shim = resolve(&config.runtime.runc_shim, Some(path.clone()))?;
    // nhi-runc finds the config through NHI_CONFIG.
    let env = [
        ("PATH", path.as_os_str()),
        ("NHI_CONFIG", cfg_path.as_os_str()),
    ];
    let err = exec(&shim, &config.runtime.runc_shim, &args, &env);
    Err(format!("exec {}: {err}", shim.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn link_is_created_and_replaced_atomically() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("bin");
        ensure_runc_link(&dir, Path::new("/a/nhi-runc")).unwrap();
        ensure_runc_link(&dir, Path::new("/a/nhi-runc")).unwrap();
        assert_eq!(
            std::fs::read_link(dir.join("runc")).unwrap(),
            Path::new("/a/nhi-runc")
        );
        ensure_runc_link(&dir, Path::new("/b/nhi-runc")).unwrap();
        assert_eq!(
            std::fs::read_link(dir.join("runc")).unwrap(),
            Path::new("/b/nhi-runc")
        );
    }

    #[test]
    fn path_prefix() {
        let p = path_with(
            Path::new("/run/nhi/bin"),
            Some("/usr/bin:/run/nhi/bin:/bin".into()),
        );
        assert_eq!(p, OsString::from("/run/nhi/bin:/usr/bin:/bin"));
        assert!(path_with(Path::new("/x"), None)
            .to_str()
            .unwrap()
            .starts_with("/x:"));
    }
}
