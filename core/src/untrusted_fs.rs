//! Reading files a container can influence, as root on the host, without following a link,
//! blocking on a FIFO or device, or reading without bound (the NVIDIA CVE-2024-0132 class: a
//! privileged hook tricked into opening a host file through a path the workload planted).
//!
//! - [`read_beneath`]: a path below a trusted directory (e.g. kubelet's root) is resolved with
//!   `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`: no component may be
//!   a symlink and resolution never leaves the directory, whatever `..` the path holds.
//! - [`read_regular`]: a single path (e.g. a bundle's `config.json`) opened with `O_NOFOLLOW`.
//! - [`read_link_beneath`]: the target of a link below a trusted directory, read with
//!   `readlinkat(2)` (never followed), for layouts whose links are part of a contract the caller
//!   checks (kubelet's atomic writer).
//!
//! Both open with `O_NONBLOCK | O_NOCTTY | O_CLOEXEC`, check with `fstat` on the opened fd that it
//! is a regular file no larger than the caller's bound, and read at most that bound (a file that
//! grows while read is refused, not truncated). Errors name the path and the reason.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum UntrustedReadError {
    #[error("{path}: {reason}")]
    Refused { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl UntrustedReadError {
    fn refused(path: &Path, reason: impl Into<String>) -> Self {
        Self::Refused {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }

    fn io(path: &Path, source: std::io::Error) -> Self {
        // ELOOP from RESOLVE_NO_SYMLINKS / O_NOFOLLOW and EXDEV from RESOLVE_BENEATH deserve
        // words, not errno names.
        match source.raw_os_error() {
            Some(libc::ELOOP) => Self::refused(path, "a path component is a symbolic link"),
            Some(libc::EXDEV) => Self::refused(path, "the path leaves its base directory"),
            _ => Self::Io {
                path: path.to_path_buf(),
                source,
            },
        }
    }
}

const OPEN_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC;

/// Reads `rel` below the trusted directory `base`, refusing symlinks anywhere in `rel`, any
/// escape from `base`, anything but a regular file, and files over `max` bytes. `base` itself is
/// trusted (operator configuration) and opened normally. Returns the bytes and the opened file's
/// path as the kernel resolved it (for an additional by-fd check by the caller).
pub fn read_beneath(
    base: &Path,
    rel: &Path,
    max: u64,
) -> Result<(Vec<u8>, PathBuf), UntrustedReadError> {
    let full = base.join(rel);
    let file = File::from(open_beneath(base, rel, OPEN_FLAGS)?);
    let resolved = fd_path(&file).unwrap_or_else(|| full.clone());
    let bytes = read_checked(file, &full, max)?;
    Ok((bytes, resolved))
}

/// The target of the symbolic link `rel` below the trusted directory `base`, read without
/// following anything: every component before the last must be a real directory beneath
/// `base` (as for [`read_beneath`]); the link itself is read with `readlinkat(2)`, never
/// opened. `None` when `rel` exists but is not a link. Targets longer than `max` bytes are
/// refused. For layouts whose links are part of a contract (kubelet's atomic writer:
/// `token -> ..data/token`), which the caller checks lexically before reading what they name
/// with [`read_beneath`].
pub fn read_link_beneath(
    base: &Path,
    rel: &Path,
    max: usize,
) -> Result<Option<PathBuf>, UntrustedReadError> {
    let full = base.join(rel);
    let name = match rel.file_name() {
        Some(n) if rel.components().next_back() == Some(Component::Normal(n)) => n,
        _ => {
            return Err(UntrustedReadError::refused(
                &full,
                "the path does not end in a file name",
            ))
        }
    };
    let parent = rel.parent().unwrap_or(Path::new(""));
    let dir = if parent.as_os_str().is_empty() {
        check_relative(&full, rel)?;
        open_base(base)?
    } else {
        open_beneath(
            base,
            parent,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )?
    };
    let c_name = std::ffi::CString::new(name.as_bytes())
        .map_err(|_| UntrustedReadError::refused(&full, "the path contains a NUL byte"))?;
    let mut buf = vec![0u8; max + 1];
    // SAFETY: readlinkat(2) with a valid directory fd, a NUL-terminated name and a buffer of
    // the length we pass; it writes at most that many bytes and returns their count or -1.
    let n = unsafe {
        libc::readlinkat(
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            c_name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EINVAL) => Ok(None),
            _ => Err(UntrustedReadError::io(&full, e)),
        };
    }
    let n = n as usize;
    if n > max {
        return Err(UntrustedReadError::refused(
            &full,
            format!("the link's target is longer than {max} bytes"),
        ));
    }
    buf.truncate(n);
    Ok(Some(PathBuf::from(std::ffi::OsString::from_vec(buf))))
}

fn check_relative(full: &Path, rel: &Path) -> Result<(), UntrustedReadError> {
    if rel.is_absolute() || rel.components().any(|c| c == Component::ParentDir) {
        return Err(UntrustedReadError::refused(
            full,
            "the path is absolute or contains '..'",
        ));
    }
    Ok(())
}

/// The trusted base directory, as an `O_PATH` handle to resolve beneath.
fn open_base(base: &Path) -> Result<OwnedFd, UntrustedReadError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(base)
        .map(OwnedFd::from)
        .map_err(|e| UntrustedReadError::io(base, e))
}

/// `openat2(base, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`.
fn open_beneath(
    base: &Path,
    rel: &Path,
    flags: libc::c_int,
) -> Result<OwnedFd, UntrustedReadError> {
    let full = base.join(rel);
    check_relative(&full, rel)?;
    let dir = open_base(base)?;
    let c_rel = std::ffi::CString::new(rel.as_os_str().as_bytes())
        .map_err(|_| UntrustedReadError::refused(&full, "the path contains a NUL byte"))?;
    // SAFETY: open_how is a plain C struct; zeroed is a valid value for every field.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2(2) with a valid directory fd, a NUL-terminated path and a fully
    // initialised open_how of the size we pass; it returns a new fd or -1.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            std::os::fd::AsRawFd::as_raw_fd(&dir),
            c_rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(UntrustedReadError::io(
            &full,
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: fd was just returned by openat2 and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Reads one file at `path`, refusing a symlink as its last component, anything but a regular
/// file, and files over `max` bytes. Never blocks on a FIFO or device.
pub fn read_regular(path: &Path, max: u64) -> Result<Vec<u8>, UntrustedReadError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(OPEN_FLAGS | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| UntrustedReadError::io(path, e))?;
    read_checked(file, path, max)
}

fn read_checked(file: File, path: &Path, max: u64) -> Result<Vec<u8>, UntrustedReadError> {
    let meta = file
        .metadata()
        .map_err(|e| UntrustedReadError::io(path, e))?;
    let ft = meta.file_type();
    if !ft.is_file() {
        let kind = if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else if ft.is_socket() {
            "a socket"
        } else if ft.is_dir() {
            "a directory"
        } else {
            "not a regular file"
        };
        return Err(UntrustedReadError::refused(
            path,
            format!("is {kind}, not a regular file"),
        ));
    }
    if meta.size() > max {
        return Err(UntrustedReadError::refused(
            path,
            format!(
                "is {} bytes, more than the {max} bytes allowed",
                meta.size()
            ),
        ));
    }
    let mut buf = Vec::with_capacity(meta.size() as usize);
    file.take(max + 1)
        .read_to_end(&mut buf)
        .map_err(|e| UntrustedReadError::io(path, e))?;
    if buf.len() as u64 > max {
        return Err(UntrustedReadError::refused(
            path,
            format!("grew past the {max} bytes allowed while being read"),
        ));
    }
    Ok(buf)
}

/// The path the kernel resolved for an open fd (`/proc/self/fd/N`), if procfs tells.
pub fn fd_path(file: &File) -> Option<PathBuf> {
    std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(file)
    ))
    .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn refused(e: UntrustedReadError) -> String {
        match e {
            UntrustedReadError::Refused { reason, .. } => reason,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn reads_a_regular_file_beneath_and_reports_where_it_was() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        std::fs::write(d.path().join("a/b/token"), b"tok").unwrap();
        let (bytes, at) = read_beneath(d.path(), Path::new("a/b/token"), 16).unwrap();
        assert_eq!(bytes, b"tok");
        assert_eq!(at, d.path().canonicalize().unwrap().join("a/b/token"));
    }

    #[test]
    fn symlinks_anywhere_escapes_and_dotdot_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), b"host file").unwrap();
        std::fs::create_dir_all(d.path().join("a")).unwrap();
        symlink(outside.path().join("secret"), d.path().join("a/token")).unwrap();
        symlink(outside.path(), d.path().join("dirlink")).unwrap();
        symlink("token", d.path().join("a/relative")).unwrap();
        for rel in ["a/token", "dirlink/secret", "a/relative"] {
            let r = refused(read_beneath(d.path(), Path::new(rel), 64).unwrap_err());
            assert!(r.contains("symbolic link"), "{rel}: {r}");
        }
        for rel in ["../x", "a/../../x"] {
            let r = refused(read_beneath(d.path(), Path::new(rel), 64).unwrap_err());
            assert!(r.contains(".."), "{rel}: {r}");
        }
        let abs = outside.path().join("secret");
        assert!(read_beneath(d.path(), &abs, 64).is_err());
        // The final component alone, with read_regular.
        let r = refused(read_regular(&d.path().join("a/token"), 64).unwrap_err());
        assert!(r.contains("symbolic link"), "{r}");
    }

    #[test]
    fn fifos_directories_and_large_files_are_refused_without_blocking() {
        let d = tempfile::tempdir().unwrap();
        let fifo = d.path().join("fifo");
        nix_mkfifo(&fifo);
        let t = std::time::Instant::now();
        let r = refused(read_regular(&fifo, 64).unwrap_err());
        assert!(r.contains("FIFO"), "{r}");
        let r = refused(read_beneath(d.path(), Path::new("fifo"), 64).unwrap_err());
        assert!(r.contains("FIFO"), "{r}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        let r = refused(read_regular(d.path(), 64).unwrap_err());
        assert!(r.contains("directory"), "{r}");
        std::fs::write(d.path().join("big"), vec![b'x'; 100]).unwrap();
        let r = refused(read_regular(&d.path().join("big"), 99).unwrap_err());
        assert!(r.contains("100 bytes"), "{r}");
        assert_eq!(read_regular(&d.path().join("big"), 100).unwrap().len(), 100);
        let e = read_regular(&d.path().join("missing"), 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing") && e.contains("No such file"), "{e}");
    }

    #[test]
    fn links_are_read_not_followed_and_only_beneath() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("v/..2024_01_01")).unwrap();
        symlink("..2024_01_01", d.path().join("v/..data")).unwrap();
        symlink("..data/token", d.path().join("v/token")).unwrap();
        std::fs::write(d.path().join("v/plain"), b"x").unwrap();
        symlink(outside.path(), d.path().join("up")).unwrap();
        assert_eq!(
            read_link_beneath(d.path(), Path::new("v/token"), 64).unwrap(),
            Some(PathBuf::from("..data/token"))
        );
        assert_eq!(
            read_link_beneath(d.path(), Path::new("v/..data"), 64).unwrap(),
            Some(PathBuf::from("..2024_01_01"))
        );
        assert_eq!(
            read_link_beneath(d.path(), Path::new("v/plain"), 64).unwrap(),
            None
        );
        let e = read_link_beneath(d.path(), Path::new("v/missing"), 64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("No such file"), "{e}");
        let r = refused(read_link_beneath(d.path(), Path::new("v/token"), 4).unwrap_err());
        assert!(r.contains("longer than 4"), "{r}");
        // A link in the directories leading to it is refused, and so is '..'.
        symlink(outside.path(), outside.path().join("self")).unwrap();
        let r = refused(read_link_beneath(d.path(), Path::new("up/self"), 64).unwrap_err());
        assert!(r.contains("symbolic link"), "{r}");
        let r = refused(read_link_beneath(d.path(), Path::new("v/../v/token"), 64).unwrap_err());
        assert!(r.contains(".."), "{r}");
        assert!(read_link_beneath(d.path(), Path::new("v/.."), 64).is_err());
        assert_eq!(
            read_link_beneath(d.path(), Path::new("up"), 256).unwrap(),
            Some(outside.path().to_path_buf())
        );
    }

    fn nix_mkfifo(p: &Path) {
        let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
