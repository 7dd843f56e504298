//! Zero-copy relay for spliced (L4 and TLS passthrough) connections: `splice(2)` moves bytes
//! socket → pipe → socket inside the kernel, one pipe per direction, driven by tokio's
//! readiness. Half-closes are passed on (EOF on one side shuts down writing on the other).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::Interest;
use tokio::net::TcpStream;

/// Bytes moved per `splice` call (and the pipe size asked for).
const CHUNK: usize = 1 << 20;

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two fds into the array we own; on success we take ownership of both.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // A bigger pipe means fewer wake-ups per megabyte; failure (limits) only costs speed.
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(wr.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    Ok((rd, wr))
}

fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between two fds this process owns for the call's duration; null offsets
    // (sockets and pipes have none).
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

async fn one_way(
    from: &TcpStream,
    to: &TcpStream,
    progress: &(dyn Fn() + Sync),
) -> io::Result<u64> {
    let (prd, pwr) = pipe()?;
    let mut total = 0u64;
    loop {
        // Socket → pipe.
        let n = loop {
            from.readable().await?;
            match from.try_io(Interest::READABLE, || {
                splice(from.as_raw_fd(), pwr.as_raw_fd(), CHUNK)
            }) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        };
        if n == 0 {
            // EOF: pass the half-close on.
            // SAFETY: shutdown on a socket fd borrowed from `to`, alive for the call.
            unsafe { libc::shutdown(to.as_raw_fd(), libc::SHUT_WR) };
            return Ok(total);
        }
        // Pipe → socket, until the pipe is empty.
        let mut left = n;
        while left > 0 {
            to.writable().await?;
            match to.try_io(Interest::WRITABLE, || {
                splice(prd.as_raw_fd(), to.as_raw_fd(), left)
            }) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(k) => left -= k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
        total += n as u64;
        progress();
    }
}

/// Relays both directions until both have ended, or until either fails or `stop` resolves
/// (then both stop); (bytes client → upstream, upstream → client). `progress` is called after
/// every chunk moved.
pub async fn relay(
    client: &TcpStream,
    upstream: &TcpStream,
    progress: &(dyn Fn() + Sync),
    stop: impl std::future::Future<Output = ()>,
) -> io::Result<(u64, u64)> {
    tokio::select! {
        r = async { tokio::try_join!(one_way(client, upstream, progress), one_way(upstream, client, progress)) } => r,
        () = stop => Err(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            "closed by the companion's connection limits (idle, or evicted for a new connection)",
        )),
    }
}
