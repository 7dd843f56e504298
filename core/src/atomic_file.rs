//! Replacing a file whole: every nhi writer of state, keys, secrets, audit heads, runtime
//! configs and bundle specs goes through [`replace`], so they share one set of guarantees.
//!
//! - Readers see the old or the new content, never a partial file: the data goes to a temporary
//!   file in the same directory, which is then renamed over the target.
//! - The temporary file is created fresh (`O_CREAT|O_EXCL`), never through a symlink
//!   (`O_NOFOLLOW`), close-on-exec, with its final mode (set with `fchmod`, so the umask does not
//!   widen or narrow it) and, when asked, its final owner (`fchown`) before a byte is written:
//!   a secret is never readable by anyone else, not even for an instant.
//! - Its name is unique per process and call (`.<name>.<pid>.<n>.tmp`), so concurrent writers
//!   of one target never write into each other's temporary file; the last rename wins.
//! - How much survives a crash is the caller's choice ([`Durability`]).
//! - On any error the temporary file is removed and the target is untouched.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// What a completed [`replace`] guarantees across a power loss or kernel crash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Atomic for readers only: after a crash the file may hold the old content, the new one,
    /// or (on some filesystems) be empty. For state that is rebuilt or re-derived anyway.
    Rename,
    /// The new content is on disk before the rename (`fdatasync`); after a crash the file holds
    /// the old or the new content, but the rename itself may be undone.
    Data,
    /// As `Data`, and the directory is synced after the rename: once `replace` returns, the new
    /// content is what a reboot finds. For keys and anything that must not go back.
    Full,
}

/// The mode of the new file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Exactly these permission bits.
    Fixed(u32),
    /// The permission bits of the file being replaced, or these if there is none (a config file
    /// an operator made world-readable, or locked down, stays so).
    KeepOr(u32),
}

/// How [`replace`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    pub mode: Mode,
    /// Owner `(uid, gid)` of the new file; `None` keeps the writer's own.
    pub owner: Option<(u32, u32)>,
    pub durability: Durability,
}

impl Options {
    /// A file only its owner can read and write, fully durable: keys, sealed secrets.
    pub const PRIVATE_DURABLE: Options = Options {
        mode: Mode::Fixed(0o600),
        owner: None,
        durability: Durability::Full,
    };
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// A temporary path beside `path`, unique to this process and call.
fn temp_beside(path: &Path) -> io::Result<PathBuf> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name to replace"))?;
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut tmp = std::ffi::OsString::from(".");
    tmp.push(name);
    tmp.push(format!(".{}.{n}.tmp", std::process::id()));
    Ok(path.with_file_name(tmp))
}

fn parent(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// Syncs the directory holding `path`, making a rename in it durable.
pub fn sync_parent(path: &Path) -> io::Result<()> {
    File::open(parent(path))?.sync_all()
}

/// Replaces `path` with `data` (see the module docs for the guarantees).
pub fn replace(path: &Path, data: &[u8], opts: &Options) -> io::Result<()> {
    let mode = match opts.mode {
        Mode::Fixed(m) => m,
        Mode::KeepOr(default) => match fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_file() => m.permissions().mode() & 0o7777,
            Ok(_) => default,
            Err(e) if e.kind() == io::ErrorKind::NotFound => default,
            Err(e) => return Err(e),
        },
    };
    let tmp = temp_beside(path)?;
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode & 0o777)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        if let Some((uid, gid)) = opts.owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        // After fchown: a chown clears set-id bits, and the umask narrowed the create mode.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        if opts.durability != Durability::Rename {
            f.sync_data()?;
        }
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    if opts.durability == Durability::Full {
        sync_parent(path)?;
    }
    Ok(())
}

/// Points the symlink `link` at `target` atomically: concurrent callers each rename their own
/// fresh link over it, so `link` always exists and resolves to one of their targets.
pub fn replace_symlink(link: &Path, target: &Path) -> io::Result<()> {
    let tmp = temp_beside(link)?;
    std::os::unix::fs::symlink(target, &tmp)?;
    fs::rename(&tmp, link).inspect_err(|_| {
        let _ = fs::remove_file(&tmp);
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn opts(mode: Mode, durability: Durability) -> Options {
        Options {
            mode,
            owner: None,
            durability,
        }
    }

    fn leftovers(dir: &Path) -> Vec<String> {
        fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect()
    }

    #[test]
    fn replaces_with_exact_mode_at_every_durability() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        for (i, d) in [Durability::Rename, Durability::Data, Durability::Full]
            .into_iter()
            .enumerate()
        {
            let body = format!("v{i}");
            replace(&p, body.as_bytes(), &opts(Mode::Fixed(0o640), d)).unwrap();
            assert_eq!(fs::read_to_string(&p).unwrap(), body);
            assert_eq!(fs::metadata(&p).unwrap().mode() & 0o7777, 0o640);
        }
        // The umask does not narrow an explicit mode.
        replace(&p, b"w", &opts(Mode::Fixed(0o666), Durability::Rename)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o666);
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn keeps_the_mode_of_the_file_it_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.toml");
        replace(&p, b"a", &opts(Mode::KeepOr(0o644), Durability::Data)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o644);
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        replace(&p, b"b", &opts(Mode::KeepOr(0o644), Durability::Data)).unwrap();
        assert_eq!(fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"b");
    }

    #[test]
    fn a_symlink_target_is_replaced_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, b"keep").unwrap();
        let p = dir.path().join("f");
        std::os::unix::fs::symlink(&victim, &p).unwrap();
        replace(&p, b"new", &Options::PRIVATE_DURABLE).unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"keep");
        assert!(fs::symlink_metadata(&p).unwrap().file_type().is_file());
        assert_eq!(fs::read(&p).unwrap(), b"new");
    }

    #[test]
    fn failure_leaves_the_target_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        fs::write(&p, b"old").unwrap();
        // The target is a directory: the rename fails after the temporary file was written.
        let d = dir.path().join("d");
        fs::create_dir(&d).unwrap();
        fs::write(d.join("x"), b"").unwrap();
        assert!(replace(&d, b"new", &Options::PRIVATE_DURABLE).is_err());
        assert!(leftovers(dir.path()).is_empty());
        // A missing directory: nothing created anywhere.
        assert!(replace(&dir.path().join("no/f"), b"x", &Options::PRIVATE_DURABLE).is_err());
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert!(replace(Path::new("/"), b"x", &Options::PRIVATE_DURABLE).is_err());
    }

    #[test]
    fn concurrent_writers_never_share_a_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        let bodies: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 64 * 1024]).collect();
        std::thread::scope(|s| {
            for b in &bodies {
                let p = &p;
                s.spawn(move || {
                    for _ in 0..20 {
                        replace(p, b, &opts(Mode::Fixed(0o600), Durability::Rename)).unwrap();
                    }
                });
            }
        });
        let got = fs::read(&p).unwrap();
        assert!(bodies.contains(&got), "a torn or mixed file");
        assert!(leftovers(dir.path()).is_empty());
    }

    #[test]
    fn owner_is_set_before_the_rename_when_permitted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("secret");
        // Our own uid/gid (what a new file gets) is always permitted, root or not.
        let own = tempfile::tempfile().unwrap().metadata().unwrap();
        let me = (own.uid(), own.gid());
        let o = Options {
            mode: Mode::Fixed(0o400),
            owner: Some(me),
            durability: Durability::Data,
        };
        replace(&p, b"s", &o).unwrap();
        let m = fs::metadata(&p).unwrap();
        assert_eq!((m.uid(), m.gid()), me);
        assert_eq!(m.mode() & 0o777, 0o400);
        // A 0400 file is replaced, not opened for writing.
        replace(&p, b"t", &o).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"t");
    }

    #[test]
    fn symlink_is_swapped_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("runc");
        replace_symlink(&link, Path::new("/a")).unwrap();
        replace_symlink(&link, Path::new("/b")).unwrap();
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("/b"));
        assert!(leftovers(dir.path()).is_empty());
    }
}
