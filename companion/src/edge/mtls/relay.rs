//! Moving bytes between an application's plaintext connection and a companion's TLS one, in
//! big batches. TLS is read and written one record (≤ 16 KiB) at a time; relayed naively, every
//! record costs a read and a write system call on each side (the seccomp filter runs on each).
//! Two things cut that down for bulk transfers while keeping small exchanges as they were:
//!
//! - [`Buffered`] sits under the TLS stream and reads the socket in large chunks, so rustls
//!   pulls its records from memory;
//! - [`pump`] gathers everything that is ready (several records) before it writes once.
//!
//! Buffers start at [`MIN`] and grow (doubling, up to [`MAX`]) only while reads keep filling
//! them, and shrink back when traffic turns small. The bytes of grown buffers across the whole
//! companion are bounded by [`BUDGET`], so a thousand bulk connections cannot take the
//! companion past its memory limit: beyond the budget they simply stay at [`MIN`].

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::limits::Conn;

/// Every buffer starts (and ends up again, when traffic is small) this big.
pub const MIN: usize = 16 * 1024;
/// The largest a buffer grows.
pub const MAX: usize = 256 * 1024;
/// Bytes beyond [`MIN`] that all grown buffers of the companion may hold together.
pub const BUDGET: usize = 16 << 20;

static GROWN: AtomicUsize = AtomicUsize::new(0);

/// A byte buffer that grows within the companion-wide [`BUDGET`] and gives its growth back
/// when it shrinks or is dropped.
pub struct Buf {
    bytes: Vec<u8>,
}

impl Default for Buf {
    fn default() -> Self {
        Buf {
            bytes: vec![0; MIN],
        }
    }
}

impl Buf {
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Adapts the size to the last fill: doubled after a full one (if the budget allows),
    /// back to [`MIN`] after one that used less than a sixteenth.
    fn adapt(&mut self, filled: usize) {
        let len = self.bytes.len();
        if filled == len && len < MAX {
            let more = len;
            let taken = GROWN.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |g| {
                (g + more <= BUDGET).then_some(g + more)
            });
            if taken.is_ok() {
                self.bytes.resize(len + more, 0);
            }
        } else if len > MIN && filled < len / 16 {
            self.shrink();
        }
    }

    fn shrink(&mut self) {
        let extra = self.bytes.len() - MIN;
        if extra > 0 {
            self.bytes.truncate(MIN);
            self.bytes.shrink_to_fit();
            GROWN.fetch_sub(extra, Ordering::Relaxed);
        }
    }
}

impl Drop for Buf {
    fn drop(&mut self) {
        self.shrink();
    }
}

/// Bytes of grown buffers in use right now (for tests and status).
pub fn grown() -> usize {
    GROWN.load(Ordering::Relaxed)
}

/// Reads `r` into `buf` until it is full or `r` has nothing more right now: (bytes, end of
/// stream seen). Pending only when not a byte was ready.
fn poll_gather<R: AsyncRead + Unpin>(
    r: &mut R,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Poll<io::Result<(usize, bool)>> {
    let mut filled = 0;
    while filled < buf.len() {
        let mut rb = ReadBuf::new(&mut buf[filled..]);
        match Pin::new(&mut *r).poll_read(cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                return Poll::Ready(Ok((filled, true)))
            }
            Poll::Ready(Ok(())) => filled += rb.filled().len(),
            // What was read before the error is passed on first; the next read meets it
            // again (or the end of the stream).
            Poll::Ready(Err(_)) if filled > 0 => break,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending if filled == 0 => return Poll::Pending,
            Poll::Pending => break,
        }
    }
    Poll::Ready(Ok((filled, false)))
}

/// Copies `r` to `w` until the end of `r` (then shuts `w` down), writing whatever is ready at
/// once in one go and touching the connection's idle clock on each batch. Returns the bytes
/// copied.
pub async fn pump<R, W>(mut r: R, mut w: W, conn: &Conn) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = Buf::default();
    let mut total = 0u64;
    loop {
        let (n, eof) = std::future::poll_fn(|cx| poll_gather(&mut r, cx, &mut buf.bytes)).await?;
        if n > 0 {
            w.write_all(&buf.bytes[..n]).await?;
            w.flush().await?;
            conn.touch();
            total += n as u64;
        }
        if eof {
            // An end of stream that cannot be passed on is an error (for frames: the
            // connection cannot carry another one).
            w.shutdown().await?;
            return Ok(total);
        }
        buf.adapt(n);
    }
}

/// A stream whose reads are served from a buffer filled by large reads of the socket (see the
/// module's notes); writes pass straight through.
pub struct Buffered<S> {
    inner: S,
    buf: Buf,
    at: usize,
    end: usize,
    /// Bytes the last fill brought, to size the buffer before the next one.
    last: usize,
}

impl<S> Buffered<S> {
    pub fn new(inner: S) -> Self {
        Buffered {
            inner,
            buf: Buf::default(),
            at: 0,
            end: 0,
            last: 0,
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// Bytes read from the socket and not yet consumed.
    pub fn held(&self) -> usize {
        self.end - self.at
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Buffered<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at == this.end {
            // Sized for this fill by the last one (never while bytes are held).
            if this.last > 0 {
                this.buf.adapt(std::mem::take(&mut this.last));
            }
            let mut rb = ReadBuf::new(&mut this.buf.bytes);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    (this.at, this.end, this.last) = (0, n, n);
                    if n == 0 {
                        return Poll::Ready(Ok(()));
                    }
                }
                other => return other,
            }
        }
        let n = (this.end - this.at).min(out.remaining());
        out.put_slice(&this.buf.bytes[this.at..this.at + n]);
        this.at += n;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Buffered<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
