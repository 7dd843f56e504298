//! `nhictl configure <runtime>`: wire nhi into a container runtime's configuration, the way
//! `nvidia-ctk runtime configure` does. Every writer is idempotent (configuring twice gives the
//! same bytes), keeps everything else in the file, supports a dry run that prints the result,
//! and refuses a file it cannot parse. None of them restarts anything: they say what to restart.

pub mod containerd;
pub mod docker;
pub mod hooks;
pub mod nomad;

use std::path::{Path, PathBuf};

/// Where the nhi binaries and config are on this node.
#[derive(Debug, Clone)]
pub struct Paths {
    pub nhi_runc: PathBuf,
    pub hook: PathBuf,
    pub config: PathBuf,
}

impl Default for Paths {
    fn default() -> Self {
        Paths {
            nhi_runc: "/usr/bin/nhi-runc".into(),
            hook: "/usr/bin/nhi-hook".into(),
            config: nhi_core::config::DEFAULT_CONFIG_PATH.into(),
        }
    }
}

/// A file the configuration step wants written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub path: PathBuf,
    pub content: String,
    /// Whether the file on disk differs.
    pub changed: bool,
}

impl Change {
    pub fn new(path: &Path, content: String) -> Self {
        let changed = std::fs::read_to_string(path)
            .map(|old| old != content)
            .unwrap_or(true);
        Change {
            path: path.to_path_buf(),
            content,
            changed,
        }
    }
}

/// What a configure step produced: files, and what the operator should do next.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    pub changes: Vec<Change>,
    pub next_step: String,
}

impl Plan {
    /// Writes the changed files atomically (same directory temp file + rename), keeping the
    /// mode of a file that already exists.
    pub fn apply(&self) -> Result<(), String> {
        for c in self.changes.iter().filter(|c| c.changed) {
            write_atomic(&c.path, c.content.as_bytes())
                .map_err(|e| format!("{}: {e}", c.path.display()))?;
        }
        Ok(())
    }

    /// The dry-run rendering: each file with a header line.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for c in &self.changes {
            out.push_str(&format!(
                "# {} ({})\n",
                c.path.display(),
                if c.changed {
                    "would change"
                } else {
                    "unchanged"
                }
            ));
            out.push_str(&c.content);
            if !c.content.ends_with('\n') {
                out.push('\n');
            }
        }
        out
    }
}

/// Replaces a runtime's config file; an existing file keeps its mode (new ones get 0644), and
/// the content is synced before the rename, so a crash leaves the old or the new config.
fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use nhi_core::atomic_file::{replace, Durability, Mode, Options};
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let opts = Options {
        mode: Mode::KeepOr(0o644),
        owner: None,
        durability: Durability::Data,
    };
    replace(path, data, &opts)
}

/// Reads a config file; a missing file is empty.
pub fn read_or_empty(path: &Path) -> Result<String, String> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(String::new()),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}
