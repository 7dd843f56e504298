//! Secret files: `<containers_dir>/<container id>/secrets/<name>`, which `nhi-runc` bind-mounts
//! read-only at `/run/nhi` in the container, so the workload reads `/run/nhi/secrets/<name>`.
//! `nhid` writes them (the companion never touches the host's filesystem): mode 0400, owned by
//! the uid/gid the container's process runs as (the OCI spec's `process.user`, so a non-root
//! app reads its files and other uids in the container read nothing), replaced by rename so a
//! reader sees the old or the new value, never a partial one. `/run` is a tmpfs: nothing
//! reaches a disk.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nhi_core::workload::HostUser;

/// The per-container directory, if the injection path created it (only `nhi-runc` and the shim
/// can add the mount; with the plain OCI hook there is none and secrets are HTTP-only).
pub fn container_dir(containers_dir: &Path, container_id: &str) -> Option<PathBuf> {
    let ok_id = !container_id.is_empty()
        && !container_id.starts_with('.')
        && container_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'+'));
    if !ok_id {
        return None;
    }
    let dir = containers_dir.join(container_id);
    // Only a real directory (not a symlink planted there) is used.
    fs::symlink_metadata(&dir)
        .ok()
        .filter(|m| m.is_dir())
        .map(|_| dir)
}

/// The owner of a container's files: who its process runs as, else (no `process.user` the
/// host can map) the real uid/gid of its init process `pid` as the host sees it.
pub fn owner(user: Option<HostUser>, pid: i32) -> std::io::Result<HostUser> {
    if let Some(u) = user {
        return Ok(u);
    }
    let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u32>().ok())
            .ok_or_else(|| std::io::Error::other(format!("no {name} in /proc/{pid}/status")))
    };
    Ok(HostUser {
        uid: field("Uid:")?,
        gid: field("Gid:")?,
    })
}

/// Atomically replaces `<dir>/secrets/<name>` with `value`, mode 0400, owned by `owner`.
pub fn write(dir: &Path, name: &str, value: &[u8], owner: HostUser) -> std::io::Result<()> {
    let secrets = dir.join("secrets");
    match fs::DirBuilder::new().mode(0o755).create(&secrets) {
        Ok(()) => fs::set_permissions(&secrets, fs::Permissions::from_mode(0o755))?,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    write_owned(&secrets.join(name), value, owner)
}

/// Replaces `path` with `value` (readers see the old or the new content): mode 0400, owned by
/// `owner` from the start, never through a symlink, synced before the rename.
pub fn write_owned(path: &Path, value: &[u8], owner: HostUser) -> std::io::Result<()> {
    let opts = nhi_core::atomic_file::Options {
        mode: nhi_core::atomic_file::Mode::Fixed(0o400),
        owner: Some((owner.uid, owner.gid)),
        durability: nhi_core::atomic_file::Durability::Data,
    };
    nhi_core::atomic_file::replace(path, value, &opts)
}

pub fn remove(dir: &Path, name: &str) {
    let _ = fs::remove_file(dir.join("secrets").join(name));
}

/// Removes every secret file of the container (revocation).
pub fn clear(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir.join("secrets")) {
        for e in entries.flatten() {
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Removes the container's directory (detach); `nhi-runc` made it, `nhid` ends it.
pub fn remove_container_dir(containers_dir: &Path, container_id: &str) {
    if let Some(dir) = container_dir(containers_dir, container_id) {
        let _ = fs::remove_dir_all(dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn files_are_replaced_whole_with_owner_and_mode() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir(root.path().join("c1")).unwrap();
        assert!(container_dir(root.path(), "c2").is_none());
        assert!(container_dir(root.path(), "../c1").is_none());
        std::os::unix::fs::symlink("/etc", root.path().join("evil")).unwrap();
        assert!(container_dir(root.path(), "evil").is_none());
        let dir = container_dir(root.path(), "c1").unwrap();
        let me = owner(None, std::process::id() as i32).unwrap();
        assert_eq!(
            owner(Some(HostUser { uid: 7, gid: 8 }), 1).unwrap(),
            HostUser { uid: 7, gid: 8 }
        );
        write(&dir, "db", b"v1", me).unwrap();
        write(&dir, "db", b"v2", me).unwrap();
        let f = dir.join("secrets/db");
        assert_eq!(fs::read(&f).unwrap(), b"v2");
        let m = fs::metadata(&f).unwrap();
        assert_eq!(m.mode() & 0o777, 0o400);
        assert_eq!((m.uid(), m.gid()), (me.uid, me.gid));
        assert_eq!(
            fs::read_dir(dir.join("secrets")).unwrap().count(),
            1,
            "no temp left"
        );
        clear(&dir);
        assert!(!f.exists());
        remove_container_dir(root.path(), "c1");
        assert!(!root.path().join("c1").exists());
    }
}
