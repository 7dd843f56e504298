//! The Workload API unix sockets `nhid` hands over the fd channel (a `SOCK_SEQPACKET`
//! socketpair inherited at spawn, `--fd-channel-fd`): one listening socket per container with a
//! `/run/nhi` directory, each owned by the uid that container runs as. `nhid` binds them (the
//! companion touches no file); the companion only accepts on them. Messages: `{"add": KEY}`
//! carrying one fd (`SCM_RIGHTS`), replacing any socket of that key, and `{"remove": KEY}` when
//! the container is gone. Accepted connections of every socket go to one stream the Workload
//! API server reads.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex};

use tokio::io::unix::AsyncFd;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;

/// Connections accepted on any of the sockets.
pub type Incoming = mpsc::Receiver<io::Result<UnixStream>>;

/// Longest message `nhid` sends (a JSON object naming a container id).
const MAX_MESSAGE: usize = 4096;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Message {
    #[serde(default)]
    add: Option<String>,
    #[serde(default)]
    remove: Option<String>,
}

/// The Workload API unix sockets the companion serves, by key, and where their connections go.
/// Cheap to clone. An fd channel from a re-adopting `nhid` is attached like the first one:
/// its `add` of a key replaces the socket the previous `nhid` handed over.
#[derive(Clone)]
pub struct Listeners {
    tx: mpsc::Sender<io::Result<UnixStream>>,
    serving: Arc<Mutex<HashMap<String, AbortHandle>>>,
}

impl Listeners {
    /// No socket yet; accepted connections will arrive on the returned receiver.
    pub fn new() -> (Self, Incoming) {
        let (tx, rx) = mpsc::channel(64);
        (
            Listeners {
                tx,
                serving: Arc::default(),
            },
            rx,
        )
    }

    /// Starts reading the fd channel `fd`. When `nhid` closes its end, the sockets it handed
    /// over keep being served.
    pub fn attach(&self, fd: OwnedFd) -> io::Result<()> {
        set_nonblocking(&fd)?;
        // SAFETY: the OwnedFd moves into the AsyncFd, which alone owns it from here on:
        // nothing closes or replaces the fd while it is registered.
        let fd = unsafe { AsyncFd::register(fd) }.map_err(|e| io::Error::other(e.to_string()))?;
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                let got = match fd.readable().await {
                    Ok(mut guard) => match guard.try_io(|fd| receive(fd.get_ref().as_raw_fd())) {
                        Ok(r) => r,
                        Err(_would_block) => continue,
                    },
                    Err(e) => Err(e),
                };
                let (msg, listener) = match got {
                    Ok(Some(m)) => m,
                    // nhid closed its end: the main channel says what happens next.
                    Ok(None) => break,
                    Err(e) => {
                        crate::log!("nhi-companion: fd channel: {e}");
                        break;
                    }
                };
                this.apply(msg, listener);
            }
        });
        Ok(())
    }

    fn apply(&self, msg: Message, listener: Option<OwnedFd>) {
        let mut serving = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        match (msg.add, msg.remove, listener) {
            (Some(key), None, Some(l)) => match listen(l) {
                Ok(l) => {
                    let task = tokio::spawn(accept(l, self.tx.clone()));
                    if let Some(old) = serving.insert(key, task.abort_handle()) {
                        old.abort();
                    }
                }
                Err(e) => crate::log!("nhi-companion: Workload API socket for {key}: {e}"),
            },
            (None, Some(key), None) => {
                if let Some(t) = serving.remove(&key) {
                    t.abort();
                }
            }
            _ => crate::log!("nhi-companion: fd channel: malformed message"),
        }
    }
}

/// Starts reading the fd channel `fd`; accepted connections arrive on the returned receiver.
pub fn start(fd: OwnedFd) -> io::Result<Incoming> {
    let (l, incoming) = Listeners::new();
    l.attach(fd)?;
    Ok(incoming)
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on an fd we own, with constant arguments.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// One message and the fd it carried, if any; `None` at end of stream.
fn receive(fd: RawFd) -> io::Result<Option<(Message, Option<OwnedFd>)>> {
    let mut buf = [0u8; MAX_MESSAGE];
    let (len, fds) = recv_with_fds(fd, &mut buf)?;
    if len == 0 && fds.is_empty() {
        return Ok(None);
    }
    let msg: Message = serde_json::from_slice(&buf[..len])
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
    // Extra fds (never sent by nhid) are closed when the iterator drops.
    Ok(Some((msg, fds.into_iter().next())))
}

/// One non-blocking `recvmsg` into `buf`: the bytes read and the fds that came with them
/// (`SCM_RIGHTS`, close-on-exec). Fds beyond what the caller expects are the caller's to drop.
pub(crate) fn recv_with_fds(fd: RawFd, buf: &mut [u8]) -> io::Result<(usize, Vec<OwnedFd>)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut cmsg = nix::cmsg_space!([RawFd; 1]);
    let mut iov = [io::IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_CMSG_CLOEXEC | MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            // SAFETY: the kernel just installed these fds in this process for us; nothing
            // else refers to them.
            fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
        }
    }
    Ok((msg.bytes, fds))
}

/// Takes a listening unix stream socket; anything else is refused.
fn listen(fd: OwnedFd) -> io::Result<UnixListener> {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r != 0 || accepting == 0 {
        return Err(io::Error::other("not a listening socket"));
    }
    let l = std::os::unix::net::UnixListener::from(fd);
    l.local_addr()?;
    l.set_nonblocking(true)?;
    // A deeper accept queue than the one nhid bound it with: under a flood of connects the
    // companion drains it at full speed (see `limits`), and a unix connect that finds it full
    // fails at once instead of retrying like a TCP SYN.
    // SAFETY: listen(2) on a listening socket we own; on failure the old backlog stays.
    unsafe { libc::listen(l.as_raw_fd(), 1024) };
    UnixListener::from_std(l)
}

async fn accept(l: UnixListener, tx: mpsc::Sender<io::Result<UnixStream>>) {
    loop {
        let c = l.accept().await.map(|(s, _)| s);
        if let Err(e) = &c {
            crate::log!("nhi-companion: Workload API socket: accept: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        }
        if tx.send(c).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_come_and_go_over_the_fd_channel() {
        use nix::sys::socket::{
            sendmsg, socketpair, AddressFamily, ControlMessage, MsgFlags, SockFlag, SockType,
        };
        let (ours, theirs) = socketpair(
            AddressFamily::Unix,
            SockType::SeqPacket,
            None,
            SockFlag::SOCK_CLOEXEC,
        )
        .unwrap();
        let mut incoming = start(theirs).unwrap();
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("w.sock");
        let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let send = |payload: &str, fd: Option<RawFd>| {
            let iov = [io::IoSlice::new(payload.as_bytes())];
            let fds = fd.map(|f| [f]);
            let cm: Vec<ControlMessage<'_>> = fds
                .as_ref()
                .map(|f| vec![ControlMessage::ScmRights(f)])
                .unwrap_or_default();
            sendmsg::<()>(ours.as_raw_fd(), &iov, &cm, MsgFlags::empty(), None).unwrap();
        };
        send(r#"{"add":"c1"}"#, Some(l.as_raw_fd()));
        drop(l); // the companion holds its own copy now
        let _client = tokio::net::UnixStream::connect(&path).await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(5), incoming.recv())
            .await
            .unwrap();
        assert!(got.unwrap().is_ok());
        // Not a listening socket: refused, the channel goes on.
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        send(r#"{"add":"c2"}"#, Some(a.as_raw_fd()));
        send(r#"{"remove":"c1"}"#, None);
        // Once removed, nobody accepts: the connection waits in the backlog, never arrives.
        for _ in 0..50 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        let _late = tokio::net::UnixStream::connect(&path).await;
        let none =
            tokio::time::timeout(std::time::Duration::from_millis(300), incoming.recv()).await;
        assert!(none.is_err(), "no connection is accepted after remove");
    }
}
