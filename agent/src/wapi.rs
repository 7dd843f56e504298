//! The SPIFFE Workload API's unix socket. The companion runs in the host's mount namespace as
//! an unprivileged uid, so it cannot bind inside a container. `nhid` binds one listening socket
//! per companion (per network namespace) at `<containers_dir>/.wapi/<netns inode>.sock` (a
//! root-only directory) and hands the listening fd to the companion at every (re)start; for
//! each container with a `/run/nhi` directory (made by `nhi-runc`) it hard-links that socket
//! as `<containers_dir>/<id>/workload.sock`, which the container sees as
//! `/run/nhi/workload.sock` (`SPIFFE_ENDPOINT_SOCKET`). The socket belongs to the uid of the
//! container's init, mode 0600, like the secret files next to it.

use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

/// Name of the socket in the container's `/run/nhi`.
pub const SOCKET_NAME: &str = "workload.sock";

fn hidden_dir(containers_dir: &Path) -> PathBuf {
    containers_dir.join(".wapi")
}

/// Where the listening socket of network namespace `inode` lives on the host.
pub fn socket_path(containers_dir: &Path, inode: u64) -> PathBuf {
    hidden_dir(containers_dir).join(format!("{inode}.sock"))
}

/// Name of the AWS container-credential token file in the container's `/run/nhi`.
pub const AWS_TOKEN_NAME: &str = "aws-token";

/// A bound Workload API socket: the listener and the path (and inode) it was bound at, plus
/// the companion's AWS authorization token (and its root-only copy next to the socket) when its
/// rule names an AWS source. For a companion re-adopted after an nhid restart, the listener is
/// the companion's alone (`listener` is `None`): should it die, [`rebind`] makes a new one.
pub struct Socket {
    pub listener: Option<UnixListener>,
    path: PathBuf,
    ino: u64,
    pub aws_token: Option<zeroize::Zeroizing<String>>,
}

fn token_path(containers_dir: &Path, inode: u64) -> PathBuf {
    hidden_dir(containers_dir).join(format!("{inode}.{AWS_TOKEN_NAME}"))
}

/// A fresh random authorization token: 32 bytes, URL-safe base64.
pub fn new_token() -> zeroize::Zeroizing<String> {
    use base64::Engine;
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut raw[..]).expect("the OS random source failed");
    zeroize::Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[..]))
}

/// Writes `value` to `path` (replaced by rename), mode 0400, owned by `owner`.
fn write_file(path: &Path, value: &[u8], owner: (u32, u32)) -> io::Result<()> {
    crate::secrets::write_owned(&path.with_extension("tmp"), path, value, owner)
}

impl Socket {
    /// Removes the socket's path if it is still this socket (a newer companion of the same
    /// namespace may have bound it again meanwhile).
    pub fn unbind(&self) {
        if fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = fs::remove_file(&self.path);
            let _ = fs::remove_file(self.path.with_extension(AWS_TOKEN_NAME));
        }
    }
}

/// Binds the Workload API socket of namespace `inode` (replacing a stale one); with `aws`, also
/// makes the companion's AWS authorization token.
pub fn bind(containers_dir: &Path, inode: u64, aws: bool) -> io::Result<Socket> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(containers_dir)?;
    let dir = hidden_dir(containers_dir);
    match fs::DirBuilder::new().mode(0o700).create(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = fs::symlink_metadata(&dir)?;
    if !meta.is_dir() || meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(io::Error::other(format!(
            "{} is not a directory owned by nhid",
            dir.display()
        )));
    }
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
    let path = socket_path(containers_dir, inode);
    let _ = fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    let ino = fs::symlink_metadata(&path)?.ino();
    let aws_token = if aws {
        let t = new_token();
        write_file(&token_path(containers_dir, inode), t.as_bytes(), (0, 0))?;
        Some(t)
    } else {
        let _ = fs::remove_file(token_path(containers_dir, inode));
        None
    };
    Ok(Socket {
        listener: Some(listener),
        path,
        ino,
        aws_token,
    })
}

impl Socket {
    /// The socket of namespace `inode` an earlier nhid bound for a companion that is being
    /// re-adopted (the companion holds the listener), with its AWS token if it has one.
    pub fn existing(containers_dir: &Path, inode: u64) -> Option<Socket> {
        use std::os::unix::fs::FileTypeExt;
        let path = socket_path(containers_dir, inode);
        let meta = fs::symlink_metadata(&path).ok()?;
        if !meta.file_type().is_socket() {
            return None;
        }
        let aws_token = fs::read(token_path(containers_dir, inode))
            .ok()
            .and_then(|t| String::from_utf8(t).ok())
            .map(zeroize::Zeroizing::new);
        Some(Socket {
            listener: None,
            path,
            ino: meta.ino(),
            aws_token,
        })
    }
}

/// A new socket for namespace `inode` whose previous listener is gone with a re-adopted
/// companion: binds it and moves every container's `workload.sock` link of the old socket
/// (and its AWS token file) over to it, keeping each link's owner.
pub fn rebind(containers_dir: &Path, inode: u64, aws: bool) -> io::Result<Socket> {
    let old = fs::symlink_metadata(socket_path(containers_dir, inode))
        .ok()
        .map(|m| m.ino());
    let s = bind(containers_dir, inode, aws)?;
    let Some(old) = old else { return Ok(s) };
    for e in fs::read_dir(containers_dir)?.flatten() {
        let name = e.file_name();
        let Some(dir) = name
            .to_str()
            .and_then(|n| crate::secrets::container_dir(containers_dir, n))
        else {
            continue;
        };
        if let Ok(m) = fs::symlink_metadata(dir.join(SOCKET_NAME)) {
            if m.ino() == old {
                link_into(&dir, containers_dir, inode, (m.uid(), m.gid()));
            }
        }
    }
    Ok(s)
}

/// Removes every socket and token left by a previous `nhid` except those of namespaces in
/// `keep` (after recovery: the others belong to companions that are gone).
pub fn clear_stale(containers_dir: &Path, keep: &std::collections::HashSet<u64>) {
    let dir = hidden_dir(containers_dir);
    if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        crate::netns::remove_files_except(&dir, keep);
    }
}

/// Links namespace `inode`'s socket into the container's `/run/nhi` directory (if the
/// injection path made one) and gives it to the container's init uid (`owner`).
pub fn link_into(container_dir: &Path, containers_dir: &Path, inode: u64, owner: (u32, u32)) {
    let src = socket_path(containers_dir, inode);
    let dst = container_dir.join(SOCKET_NAME);
    let res = (|| {
        if !src.exists() {
            return Ok(());
        }
        let _ = fs::remove_file(&dst);
        fs::hard_link(&src, &dst)?;
        std::os::unix::fs::lchown(&dst, Some(owner.0), Some(owner.1))?;
        fs::set_permissions(&dst, fs::Permissions::from_mode(0o600))
    })();
    if let Err(e) = res {
        tracing::error!(dir = %container_dir.display(), "workload API socket: {e}");
    }
    // The AWS token file, if this namespace's companion serves AWS credentials.
    let token = zeroize::Zeroizing::new(fs::read(token_path(containers_dir, inode)).ok());
    let dst = container_dir.join(AWS_TOKEN_NAME);
    match token.as_deref() {
        Some(t) => {
            if let Err(e) = write_file(&dst, t, owner) {
                tracing::error!(dir = %container_dir.display(), "AWS token file: {e}");
            }
        }
        None => {
            let _ = fs::remove_file(&dst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_link_and_unbind() {
        let root = tempfile::tempdir().unwrap();
        let s1 = bind(root.path(), 42, true).unwrap();
        let token = s1.aws_token.clone().unwrap();
        assert_eq!(token.len(), 43);
        let p = socket_path(root.path(), 42);
        assert!(p.exists());
        assert_eq!(
            fs::metadata(hidden_dir(root.path())).unwrap().mode() & 0o777,
            0o700
        );
        let c = root.path().join("c1");
        fs::create_dir(&c).unwrap();
        let me = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        link_into(&c, root.path(), 42, me);
        let linked = c.join(SOCKET_NAME);
        assert_eq!(fs::metadata(&linked).unwrap().mode() & 0o777, 0o600);
        let tf = c.join(AWS_TOKEN_NAME);
        assert_eq!(fs::read(&tf).unwrap(), token.as_bytes());
        assert_eq!(fs::metadata(&tf).unwrap().mode() & 0o777, 0o400);
        // The link reaches the same listener.
        let _s = std::os::unix::net::UnixStream::connect(&linked).unwrap();
        s1.listener.as_ref().unwrap().accept().unwrap();
        // A newer bind of the same namespace is not removed by the older socket.
        let s2 = bind(root.path(), 42, false).unwrap();
        assert!(!token_path(root.path(), 42).exists());
        s1.unbind();
        assert!(p.exists());
        s2.unbind();
        assert!(!p.exists());
        // A re-adopted companion's socket: found again by path; if its listener dies with the
        // companion, a new one takes over every container link (and the AWS token file).
        let s4 = bind(root.path(), 9, true).unwrap();
        link_into(&c, root.path(), 9, me);
        let found = Socket::existing(root.path(), 9).unwrap();
        assert!(found.listener.is_none());
        assert_eq!(found.aws_token.as_deref(), s4.aws_token.as_deref());
        drop(s4);
        let s5 = rebind(root.path(), 9, true).unwrap();
        let _s = std::os::unix::net::UnixStream::connect(c.join(SOCKET_NAME)).unwrap();
        s5.listener.as_ref().unwrap().accept().unwrap();
        assert_eq!(
            fs::read(&tf).unwrap(),
            s5.aws_token.as_ref().unwrap().as_bytes()
        );
        assert!(Socket::existing(root.path(), 10).is_none());
        let _s3 = bind(root.path(), 7, true).unwrap();
        clear_stale(root.path(), &Default::default());
        assert_eq!(fs::read_dir(hidden_dir(root.path())).unwrap().count(), 0);
    }
}
