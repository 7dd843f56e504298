//! Re-adopting running companions after an `nhid` restart (upgrade, crash, `kill -9`), so
//! workloads see no gap: companions keep serving their cache while `nhid` is away and the next
//! `nhid` takes them over without restarting them.
//!
//! The mechanism, per companion, set up at spawn:
//! - a unix socket bound by `nhid` at `<state_dir>/companions/<netns inode>.sock` (the state dir
//!   is 0700 root: no other user can reach, replace or connect to it) and handed to the
//!   companion unlistened, like the channel; the companion calls `listen(2)` on it, so the
//!   kernel reports the companion's pid and uid as the socket's peer credentials;
//! - a random 256-bit key the companion gets in its `hello` answer (`Init.adopt_key`), of which
//!   `nhid` keeps only the SHA-256;
//! - a record `<state_dir>/companions/<netns inode>.json`: pid, start time, uid, key digest.
//!
//! A restarted `nhid` restores each attachment record (`crate::persist`) whose containers
//! still run and, if that namespace's companion record names a live process, connects to the
//! namespace's socket and accepts the connection only if `SO_PEERCRED` names exactly the
//! recorded process (pid, its start time, uid) and the companion's first message carries the
//! key. It then serves that connection for the identity of its own attachment record; the
//! companion says nothing about who it is. What fails is stopped (after the same pid + start
//! time check, through a pidfd, so a reused pid is never signalled) and replaced by a fresh
//! companion.
//!
//! Why not systemd's fd store: CI and many nodes do not run systemd as PID 1, and a socket
//! the companion inherited works the same everywhere; the companion needs no path, no
//! `socket(2)` and no `connect(2)` (it only `accept`s), which keeps its seccomp and Landlock
//! sandbox as it is.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::unix::AsyncFd;
use zeroize::Zeroizing;

use crate::netns::ProcRef;

/// Directory under the state dir.
const DIR: &str = "companions";

/// What a restarted `nhid` needs to recognise a running companion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompanionRecord {
    pub pid: i32,
    /// Clock ticks since boot (`/proc/<pid>/stat`), so a reused pid is never mistaken for it.
    pub start_time: u64,
    pub uid: u32,
    /// SHA-256 (hex) of the key the companion proves itself with.
    pub key_sha256: String,
}

/// The key a companion proves itself with: 32 random bytes, URL-safe base64.
pub struct AdoptKey(Zeroizing<String>);

impl AdoptKey {
    pub fn generate() -> Self {
        use base64::Engine;
        let mut raw = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut raw[..]).expect("the OS random source failed");
        AdoptKey(Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[..]),
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn digest(&self) -> String {
        digest(self.as_str())
    }
}

fn digest(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `presented` is the key whose digest is `key_sha256`. Compares digests without
/// early exit.
pub fn key_matches(key_sha256: &str, presented: &str) -> bool {
    let d = digest(presented);
    d.len() == key_sha256.len()
        && d.bytes()
            .zip(key_sha256.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// The companion records and re-adoption sockets of one state dir.
#[derive(Clone)]
pub struct Records {
    dir: PathBuf,
}

impl Records {
    /// `<state_dir>/companions`, created 0700.
    pub fn open(state_dir: &Path) -> Result<Self, String> {
        let dir = state_dir.join(DIR);
        crate::keystore::create_private_dir(&dir).map_err(|e| e.to_string())?;
        Ok(Records { dir })
    }

    pub fn socket_path(&self, inode: u64) -> PathBuf {
        self.dir.join(format!("{inode}.sock"))
    }

    fn record_path(&self, inode: u64) -> PathBuf {
        self.dir.join(format!("{inode}.json"))
    }

    /// Binds (without listening) a fresh re-adoption socket for namespace `inode`, replacing
    /// any previous one. The companion inherits it and listens.
    pub fn bind(&self, inode: u64) -> io::Result<OwnedFd> {
        use nix::sys::socket::{bind, socket, AddressFamily, SockFlag, SockType, UnixAddr};
        let path = self.socket_path(inode);
        let addr = UnixAddr::new(&path).map_err(io::Error::from)?;
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let _ = fs::remove_file(&path);
        bind(fd.as_raw_fd(), &addr)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
        Ok(fd)
    }

    /// Records the companion now serving namespace `inode`. Written atomically; a lost record
    /// only means that companion is replaced rather than re-adopted after a restart.
    pub fn save(&self, inode: u64, r: &CompanionRecord) {
        let path = self.record_path(inode);
        if let Err(e) = crate::persist::write_json(&path, r) {
            tracing::warn!(
                "saving companion record {}: {e} (the companion will be restarted rather than re-adopted after an nhid restart)",
                path.display()
            );
        }
    }

    pub fn load(&self, inode: u64) -> Option<CompanionRecord> {
        let path = self.record_path(inode);
        let data = fs::read(&path).ok()?;
        match serde_json::from_slice(&data) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(
                    "dropping unreadable companion record {}: {e}",
                    path.display()
                );
                None
            }
        }
    }

    /// Forgets namespace `inode`'s companion: record and socket.
    pub fn remove(&self, inode: u64) {
        let _ = fs::remove_file(self.record_path(inode));
        let _ = fs::remove_file(self.socket_path(inode));
    }

    /// Forgets namespace `inode`'s companion if the record is still that of process `pid` (a
    /// newer companion of the same namespace may have replaced it meanwhile).
    pub fn remove_if_pid(&self, inode: u64, pid: i32) {
        if self.load(inode).is_none_or(|r| r.pid == pid) {
            self.remove(inode);
        }
    }

    /// Namespaces with a companion record.
    pub fn inodes(&self) -> Vec<u64> {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name();
                let name = name.to_str()?;
                name.strip_suffix(".json")?.parse().ok()
            })
            .collect()
    }

    /// Removes every record and socket except those of `keep` (after recovery: what is left
    /// belongs to companions that are gone).
    pub fn clear_except(&self, keep: &HashSet<u64>) {
        crate::netns::remove_files_except(&self.dir, keep);
    }
}

/// A process `nhid` did not start (or no longer is the parent of), held by a pidfd: signals go
/// to exactly that process, never to a later one that reused its pid.
pub struct Pidfd {
    fd: AsyncFd<OwnedFd>,
    pid: i32,
}

impl Pidfd {
    /// Opens `p.pid` and checks, after opening, that it is still the process started at
    /// `p.start_time` (so the pidfd cannot name a successor).
    pub fn open(p: ProcRef) -> io::Result<Self> {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
        let raw = unsafe { libc::syscall(libc::SYS_pidfd_open, p.pid, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the syscall returned a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw as i32) };
        if !p.alive() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("process {} is not the recorded one any more", p.pid),
            ));
        }
        // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open (and the same fd)
        // for as long as it is registered.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(Pidfd { fd, pid: p.pid })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) on a pidfd we own, no siginfo, no flags.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.fd.get_ref().as_raw_fd(),
                sig as i32,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Returns once the process has exited (a pidfd polls readable then).
    pub async fn exited(&self) {
        if let Ok(mut g) = self.fd.readable().await {
            g.retain_ready();
        }
    }

    /// SIGTERM, `grace`, then SIGKILL; returns once it is gone (or after another `grace`).
    pub async fn terminate(&self, grace: Duration) {
        use nix::sys::signal::Signal;
        let _ = self.signal(Signal::SIGTERM);
        if tokio::time::timeout(grace, self.exited()).await.is_ok() {
            return;
        }
        let _ = self.signal(Signal::SIGKILL);
        let _ = tokio::time::timeout(grace, self.exited()).await;
    }
}

/// Connects to namespace `inode`'s re-adoption socket and checks that the process listening
/// on it is exactly the recorded companion: `SO_PEERCRED` pid and uid as recorded and the pid
/// still the process started at the recorded time. Returns the connection (the companion's
/// key is checked on its first message, see `supervisor`) and a pidfd on the companion.
pub async fn connect(
    records: &Records,
    inode: u64,
    rec: &CompanionRecord,
    timeout: Duration,
) -> Result<(tokio::net::UnixStream, Pidfd), String> {
    let path = records.socket_path(inode);
    let stream = tokio::time::timeout(timeout, tokio::net::UnixStream::connect(&path))
        .await
        .map_err(|_| format!("{}: no answer within {timeout:?}", path.display()))?
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("{}: peer credentials: {e}", path.display()))?;
    let pid = cred.pid().unwrap_or(0);
    if pid != rec.pid || cred.uid() != rec.uid {
        return Err(format!(
            "{}: listened on by pid {pid} uid {}, but the record names pid {} uid {}",
            path.display(),
            cred.uid(),
            rec.pid,
            rec.uid
        ));
    }
    let pidfd = Pidfd::open(ProcRef {
        pid: rec.pid,
        start_time: rec.start_time,
    })
    .map_err(|e| format!("companion pid {}: {e}", rec.pid))?;
    Ok((stream, pidfd))
}

/// The first thing a re-adopting `nhid` sends on the connection (before the companion's
/// `reattach`): one byte (`nhi_core::wire::FD_CHANNEL_BYTE`) carrying, as `SCM_RIGHTS`, the companion's end of a new fd channel
/// (`SOCK_SEQPACKET`), over which the containers' Workload API sockets are handed to it again
/// (the previous `nhid`'s end of the old one closed with it). Returns `nhid`'s end. Sent only
/// once `connect` has checked the peer is exactly the recorded companion process; nothing is
/// sent over the new channel before the companion proved itself with its key.
pub fn send_fd_channel(conn: &tokio::net::UnixStream) -> io::Result<OwnedFd> {
    use nix::sys::socket::{
        sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
    };
    let (ours, theirs) = socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    let fds = [theirs.as_raw_fd()];
    let iov = [io::IoSlice::new(&[nhi_core::wire::FD_CHANNEL_BYTE])];
    // A fresh connection's send buffer is empty: one byte never blocks.
    let sent = sendmsg::<()>(
        conn.as_raw_fd(),
        &iov,
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)?;
    if sent != 1 {
        return Err(io::Error::other("short write of the fd channel"));
    }
    Ok(ours)
}

/// Stops the recorded companion of a namespace that is not restored (its containers are gone,
/// or the config now gives it another identity), if that very process still runs.
pub async fn stop_recorded(rec: &CompanionRecord, grace: Duration) -> bool {
    match Pidfd::open(ProcRef {
        pid: rec.pid,
        start_time: rec.start_time,
    }) {
        Ok(p) => {
            p.terminate(grace).await;
            true
        }
        Err(_) => false,
    }
}

/// Companion processes that run now, by network namespace: started from `binary` (also when
/// an upgrade replaced the file since), as a uid of `range`, in the host's mount namespace (never a
/// container's). For companions no usable record names (a full disk when it was written, an
/// operator's cleanup): left alone they would hold the companion's ports in their namespace until
/// `orphan_timeout`. Another nhid's companions (its own binary path) are not ours.
pub fn running(range: nhi_core::config::UidRange, binary: &Path) -> HashMap<u64, Vec<ProcRef>> {
    use std::os::unix::fs::MetadataExt;
    let mut out: HashMap<u64, Vec<ProcRef>> = HashMap::new();
    let Ok(own_mnt) = fs::metadata("/proc/self/ns/mnt").map(|m| m.ino()) else {
        return out;
    };
    let Ok(entries) = fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let base = format!("/proc/{pid}");
        let exe = fs::read_link(format!("{base}/exe")).ok().map(|p| {
            let s = p.to_string_lossy().into_owned();
            PathBuf::from(s.strip_suffix(" (deleted)").unwrap_or(&s))
        });
        let matches = exe.as_deref() == Some(binary)
            && crate::uids::real_uid(pid).is_some_and(|u| range.contains(u))
            && fs::metadata(format!("{base}/ns/mnt")).is_ok_and(|m| m.ino() == own_mnt);
        if !matches {
            continue;
        }
        if let (Ok(net), Ok(p)) = (fs::metadata(format!("{base}/ns/net")), ProcRef::of(pid)) {
            out.entry(net.ino()).or_default().push(p);
        }
    }
    out
}

/// Stops `procs` (each only if it is still that process), concurrently.
pub async fn stop_all(procs: impl IntoIterator<Item = ProcRef>, grace: Duration) {
    let mut set = tokio::task::JoinSet::new();
    for p in procs {
        set.spawn(async move {
            if let Ok(fd) = Pidfd::open(p) {
                tracing::info!(pid = p.pid, "stopping a companion nobody serves");
                fd.terminate(grace).await;
            }
        });
    }
    while set.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn me() -> CompanionRecord {
        let pid = std::process::id() as i32;
        CompanionRecord {
            pid,
            start_time: crate::netns::start_time(pid).unwrap(),
            uid: nix::unistd::geteuid().as_raw(),
            key_sha256: AdoptKey::generate().digest(),
        }
    }

    /// The listening socket as the companion makes it: bound by "nhid", listened on by the
    /// process that then owns it (here the test itself).
    fn listen(records: &Records, inode: u64) -> std::os::unix::net::UnixListener {
        let fd = records.bind(inode).unwrap();
        nix::sys::socket::listen(&fd, nix::sys::socket::Backlog::new(16).unwrap()).unwrap();
        std::os::unix::net::UnixListener::from(fd)
    }

    #[test]
    fn keys_match_only_themselves() {
        let k = AdoptKey::generate();
        assert_eq!(k.as_str().len(), 43);
        assert!(key_matches(&k.digest(), k.as_str()));
        assert!(!key_matches(&k.digest(), AdoptKey::generate().as_str()));
        assert!(!key_matches(&k.digest(), ""));
        assert!(!key_matches("", k.as_str()));
    }

    #[test]
    fn records_round_trip_and_are_cleared_except_kept() {
        let d = tempfile::tempdir().unwrap();
        let r = Records::open(d.path()).unwrap();
        let rec = me();
        r.save(7, &rec);
        r.save(8, &rec);
        let _l = listen(&r, 7);
        assert_eq!(r.load(7), Some(rec));
        let mut inodes = r.inodes();
        inodes.sort();
        assert_eq!(inodes, vec![7, 8]);
        r.clear_except(&HashSet::from([7]));
        assert!(r.load(8).is_none());
        assert!(r.socket_path(7).exists());
        r.remove(7);
        assert!(r.load(7).is_none() && !r.socket_path(7).exists());
    }

    /// Only the recorded process passes: a listener whose pid or uid is not the record's is
    /// refused before a word is exchanged, as is a process whose pid was reused.
    #[test]
    fn only_the_recorded_process_is_accepted() {
        rt().block_on(async {
            let d = tempfile::tempdir().unwrap();
            let r = Records::open(d.path()).unwrap();
            let l = listen(&r, 1);
            l.set_nonblocking(true).unwrap();
            let _l = tokio::net::UnixListener::from_std(l).unwrap();
            let t = Duration::from_secs(2);
            let rec = me();
            let (_s, pidfd) = connect(&r, 1, &rec, t).await.unwrap();
            assert_eq!(pidfd.pid(), rec.pid);
            // Another process's record (pid 1: init) for this socket.
            let other = CompanionRecord {
                pid: 1,
                start_time: crate::netns::start_time(1).unwrap(),
                ..rec.clone()
            };
            let e = connect(&r, 1, &other, t).await.map(|_| ()).unwrap_err();
            assert!(e.contains("record names pid 1"), "{e}");
            let wrong_uid = CompanionRecord {
                uid: rec.uid + 1,
                ..rec.clone()
            };
            assert!(connect(&r, 1, &wrong_uid, t).await.is_err());
            // Same pid, another start time: a reused pid.
            let reused = CompanionRecord {
                start_time: rec.start_time + 1,
                ..rec.clone()
            };
            let e = connect(&r, 1, &reused, t).await.map(|_| ()).unwrap_err();
            assert!(e.contains("not the recorded one"), "{e}");
            assert!(
                !stop_recorded(&reused, t).await,
                "never signals a reused pid"
            );
            // No socket at all.
            assert!(connect(&r, 2, &rec, t).await.is_err());
        });
    }

    /// A child to stop: its pid, and a thread that returns whether it exited successfully.
    fn sleeper() -> (i32, std::thread::JoinHandle<bool>) {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        (
            pid,
            std::thread::spawn(move || child.wait().unwrap().success()),
        )
    }

    #[test]
    fn running_companions_are_found_by_binary_uid_and_namespaces() {
        rt().block_on(async {
            // `sleep` as a stand-in: same uid and mount namespace as this test.
            let (pid, reaper) = sleeper();
            let me = nix::unistd::geteuid().as_raw();
            // Built directly: parsing refuses a range holding root, as the test may run as.
            let mine = nhi_core::config::UidRange {
                first: me,
                last: me,
            };
            let other = nhi_core::config::UidRange {
                first: me + 1,
                last: me + 1,
            };
            let sleep = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
            let found = running(mine, &sleep);
            let netns = crate::netns::NetNs::own().unwrap().inode;
            assert!(found
                .get(&netns)
                .is_some_and(|v| v.iter().any(|p| p.pid == pid)));
            assert!(!running(other, &sleep)
                .values()
                .flatten()
                .any(|p| p.pid == pid));
            assert!(!running(mine, Path::new("/usr/libexec/nhi/nhi-companion"))
                .values()
                .flatten()
                .any(|p| p.pid == pid));
            stop_all([ProcRef::of(pid).unwrap()], Duration::from_secs(2)).await;
            assert!(!reaper.join().unwrap());
        });
    }

    #[test]
    fn a_pidfd_outlives_nothing_and_terminates_its_process() {
        rt().block_on(async {
            let (pid, reaper) = sleeper();
            let p = Pidfd::open(ProcRef::of(pid).unwrap()).unwrap();
            // `exited` fires only when it is gone.
            assert!(tokio::time::timeout(Duration::from_millis(100), p.exited())
                .await
                .is_err());
            p.terminate(Duration::from_secs(2)).await;
            tokio::time::timeout(Duration::from_secs(1), p.exited())
                .await
                .expect("exited");
            assert!(!reaper.join().unwrap());
        });
    }
}
