//! The SPIFFE Workload API's unix sockets and the AWS token files in containers' `/run/nhi`.
//! The companion runs in the host's mount namespace as an unprivileged uid with no file access
//! after start, so it cannot bind inside a container. For each attached container with a
//! `/run/nhi` directory (made by `nhi-runc`: `<containers_dir>/<id>`) `nhid` binds a listening
//! socket of its own at `<containers_dir>/<id>/workload.sock` (the container's
//! `/run/nhi/workload.sock`, `SPIFFE_ENDPOINT_SOCKET`), owned by the uid/gid the container's
//! process runs as (the OCI spec's `process.user`), mode 0600, and hands the listening fd to
//! its companion over the companion's fd channel (again at every restart). Each app container
//! of a pod has its own socket inode, so containers running as different uids each get one
//! only they (and root) can connect to. The socket goes with the container's directory.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};

use nhi_core::workload::HostUser;

/// Name of the socket in the container's `/run/nhi`.
pub const SOCKET_NAME: &str = "workload.sock";

/// Name of the AWS container-credential token file in the container's `/run/nhi`.
pub const AWS_TOKEN_NAME: &str = "aws-token";

/// A bound Workload API socket of one container: the listener and the path (and inode) it was
/// bound at.
pub struct ContainerSocket {
    pub listener: UnixListener,
    path: PathBuf,
    ino: u64,
    /// Leave the path in place when dropped (`nhid` lets go of a running companion).
    keep: bool,
}

impl ContainerSocket {
    /// Binds `<container_dir>/workload.sock` (replacing a stale one), owned by `owner`, 0600.
    /// Bound through `/proc/self/fd/<dir>/`: a socket path must fit in 108 bytes, and
    /// `<containers_dir>/<64-hex container id>/workload.sock` may not; the directory is opened
    /// without following a symlink.
    pub fn bind(container_dir: &Path, owner: HostUser) -> io::Result<Self> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        let path = container_dir.join(SOCKET_NAME);
        let _ = fs::remove_file(&path);
        let dir = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(container_dir)?;
        let short = format!("/proc/self/fd/{}/{SOCKET_NAME}", dir.as_raw_fd());
        let listener = UnixListener::bind(&short)?;
        drop(dir);
        let res = (|| {
            // Nobody but root can connect before it belongs to the owner.
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
            std::os::unix::fs::lchown(&path, Some(owner.uid), Some(owner.gid))?;
            fs::symlink_metadata(&path).map(|m| m.ino())
        })();
        match res {
            Ok(ino) => Ok(ContainerSocket {
                listener,
                path,
                ino,
                keep: false,
            }),
            Err(e) => {
                let _ = fs::remove_file(&path);
                Err(e)
            }
        }
    }
}

impl ContainerSocket {
    /// Closes nhid's copy but leaves the path: the companion it was handed to keeps serving it
    /// while `nhid` is away, and the next `nhid` binds it anew.
    pub fn keep_path(mut self) {
        self.keep = true;
    }
}

impl Drop for ContainerSocket {
    /// Removes the socket's path if it is still this socket (unless kept).
    fn drop(&mut self) {
        if !self.keep && fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// A fresh random authorization token: 32 bytes, URL-safe base64.
pub fn new_token() -> zeroize::Zeroizing<String> {
    use base64::Engine;
    let mut raw = zeroize::Zeroizing::new([0u8; 32]);
    getrandom::fill(&mut raw[..]).expect("the OS random source failed");
    zeroize::Zeroizing::new(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[..]))
}

/// Writes (or, without a token, removes) the container's `/run/nhi/aws-token`: mode 0400,
/// owned by `owner`.
pub fn write_aws_token(container_dir: &Path, token: Option<&str>, owner: HostUser) {
    let dst = container_dir.join(AWS_TOKEN_NAME);
    match token {
        Some(t) => {
            if let Err(e) = crate::secrets::write_owned(&dst, t.as_bytes(), owner) {
                tracing::error!(dir = %container_dir.display(), "AWS token file: {e}");
            }
        }
        None => {
            let _ = fs::remove_file(&dst);
        }
    }
}

/// The token of a container's `/run/nhi/aws-token` (root reads it: `nhid` wrote it), if it
/// holds one: what a re-adopted companion already checks requests against.
pub fn read_aws_token(container_dir: &Path) -> Option<zeroize::Zeroizing<String>> {
    let bytes = nhi_core::untrusted_fs::read_regular(&container_dir.join(AWS_TOKEN_NAME), 256)
        .ok()
        .map(zeroize::Zeroizing::new)?;
    let t = std::str::from_utf8(&bytes).ok()?.trim();
    (!t.is_empty()).then(|| zeroize::Zeroizing::new(t.to_string()))
}

/// Removes what an `nhid` before per-container sockets left (`<containers_dir>/.wapi`): at
/// start, before any companion runs.
pub fn clear_stale(containers_dir: &Path) {
    let dir = containers_dir.join(".wapi");
    if fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        let _ = fs::remove_dir_all(&dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_belong_to_the_container_user_and_go_when_dropped() {
        let root = tempfile::tempdir().unwrap();
        // As long as a CRI container directory: longer than a socket address can be.
        let c = root.path().join("c1".repeat(40));
        fs::create_dir(&c).unwrap();
        let me = HostUser {
            uid: nix::unistd::getuid().as_raw(),
            gid: nix::unistd::getgid().as_raw(),
        };
        let s1 = ContainerSocket::bind(&c, me).unwrap();
        let p = c.join(SOCKET_NAME);
        let m = fs::metadata(&p).unwrap();
        assert_eq!(m.mode() & 0o777, 0o600);
        assert_eq!((m.uid(), m.gid()), (me.uid, me.gid));
        let link = root.path().join("s");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let _client = std::os::unix::net::UnixStream::connect(&link).unwrap();
        s1.listener.accept().unwrap();
        // A newer bind of the same path is not removed by the older socket.
        let s2 = ContainerSocket::bind(&c, me).unwrap();
        drop(s1);
        assert!(p.exists());
        drop(s2);
        assert!(!p.exists());

        let token = new_token();
        assert_eq!(token.len(), 43);
        write_aws_token(&c, Some(&token), me);
        let tf = c.join(AWS_TOKEN_NAME);
        assert_eq!(fs::read(&tf).unwrap(), token.as_bytes());
        assert_eq!(fs::metadata(&tf).unwrap().mode() & 0o777, 0o400);
        write_aws_token(&c, None, me);
        assert!(!tf.exists());

        fs::create_dir(root.path().join(".wapi")).unwrap();
        fs::write(root.path().join(".wapi/1.sock"), b"").unwrap();
        clear_stale(root.path());
        assert!(!root.path().join(".wapi").exists());
    }
}
