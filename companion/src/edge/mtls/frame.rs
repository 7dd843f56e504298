//! One application connection inside a companion-to-companion TLS connection, so that the TLS
//! connection can carry the next one when this one has ended (see [`super::pool`]).
//!
//! After the caller's preface ([`super::PREFACE`]) each direction is a run of frames: a
//! 4-byte big-endian length and that many bytes; a frame of length 0 is that direction's end
//! of stream (what a FIN is to TCP). When both directions have ended cleanly, [`Framed`] hands
//! the TLS stream back (through the channel given to [`Framed::new`]) when it is dropped, and
//! the connection waits, idle, for its next preface. Anything else — an error on either side,
//! a connection closed without its end frame, bytes arriving after the application has gone —
//! drops the TLS connection, which the other side sees as an abrupt end and passes on to its
//! application as a reset, as with a single connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::oneshot;

/// The largest frame written (larger writes are cut).
pub const MAX_FRAME: usize = 1 << 20;
/// How long the peer's end frame is waited for after this side's application has closed.
pub const LINGER: Duration = Duration::from_secs(1);

/// The header of a frame of `len` bytes (at most [`MAX_FRAME`]; 0: end of stream).
pub fn header(len: usize) -> [u8; 4] {
    debug_assert!(len <= MAX_FRAME);
    (len as u32).to_be_bytes()
}

/// A TLS stream carrying one application connection as frames.
pub struct Framed<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    inner: Option<S>,
    back: Option<oneshot::Sender<S>>,
    // Reading: the header being read, the bytes left in the current frame.
    hdr: [u8; 4],
    hdr_got: usize,
    left: usize,
    read_done: bool,
    // Writing: the header of the current frame, how much of it is written, its bytes left.
    out_hdr: [u8; 4],
    out_hdr_at: usize,
    out_left: usize,
    write_done: bool,
    broken: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Framed<S> {
    /// Frames one application connection over `inner`; a clean end sends `inner` to `back`.
    pub fn new(inner: S, back: oneshot::Sender<S>) -> Self {
        Framed {
            inner: Some(inner),
            back: Some(back),
            hdr: [0; 4],
            hdr_got: 0,
            left: 0,
            read_done: false,
            out_hdr: [0; 4],
            out_hdr_at: 4,
            out_left: 0,
            write_done: false,
            broken: false,
        }
    }

    fn inner(&mut self) -> io::Result<&mut S> {
        self.inner
            .as_mut()
            .ok_or_else(|| io::Error::other("framed stream already handed back"))
    }

    /// Marks the stream unusable for another connection when `r` is an error.
    fn watch<T>(&mut self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if matches!(r, Poll::Ready(Err(_))) {
            self.broken = true;
        }
        r
    }

    fn poll_read_inner(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.read_done || out.remaining() == 0 {
            return Poll::Ready(Ok(()));
        }
        while self.left == 0 {
            let (hdr, got) = (&mut self.hdr, self.hdr_got);
            let Some(inner) = self.inner.as_mut() else {
                return Poll::Ready(Err(io::Error::other("handed back")));
            };
            let mut rb = ReadBuf::new(&mut hdr[got..]);
            std::task::ready!(Pin::new(inner).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionReset,
                    "the peer's companion ended the connection without its end of stream",
                )));
            }
            self.hdr_got += n;
            if self.hdr_got == 4 {
                self.hdr_got = 0;
                let len = u32::from_be_bytes(self.hdr) as usize;
                if len == 0 {
                    self.read_done = true;
                    return Poll::Ready(Ok(()));
                }
                if len > MAX_FRAME {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("frame of {len} bytes (at most {MAX_FRAME})"),
                    )));
                }
                self.left = len;
            }
        }
        let want = self.left.min(out.remaining());
        let mut rb = ReadBuf::new(out.initialize_unfilled_to(want));
        std::task::ready!(Pin::new(self.inner()?).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::ConnectionReset,
                "the peer's companion ended the connection in the middle of a frame",
            )));
        }
        self.left -= n;
        out.advance(n);
        Poll::Ready(Ok(()))
    }

    fn poll_write_inner(&mut self, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.write_done {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after end of stream",
            )));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if self.out_left == 0 {
            // A new frame: the next `len` bytes of the stream, whichever writes bring them.
            let len = data.len().min(MAX_FRAME);
            self.out_hdr = header(len);
            self.out_hdr_at = 0;
            self.out_left = len;
        }
        let take = data.len().min(self.out_left);
        let data = &data[..take];
        let at = self.out_hdr_at;
        let hdr = self.out_hdr;
        let inner = Pin::new(self.inner()?);
        let n = if at < 4 {
            let bufs = [io::IoSlice::new(&hdr[at..]), io::IoSlice::new(data)];
            let n = std::task::ready!(inner.poll_write_vectored(cx, &bufs))?;
            let h = n.min(4 - at);
            self.out_hdr_at += h;
            n - h
        } else {
            std::task::ready!(inner.poll_write(cx, data))?
        };
        if n == 0 {
            // Only (part of) the header went out: ask again for the data.
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.out_left -= n;
        Poll::Ready(Ok(n))
    }

    fn poll_end(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_done {
            if self.out_left > 0 {
                return Poll::Ready(Err(io::Error::other(
                    "end of stream in the middle of a frame",
                )));
            }
            if self.out_hdr_at == 4 {
                self.out_hdr = header(0);
                self.out_hdr_at = 0;
            }
            while self.out_hdr_at < 4 {
                let at = self.out_hdr_at;
                let hdr = self.out_hdr;
                let n = std::task::ready!(Pin::new(self.inner()?).poll_write(cx, &hdr[at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.out_hdr_at += n;
            }
            self.write_done = true;
        }
        Pin::new(self.inner()?).poll_flush(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for Framed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = this.poll_read_inner(cx, out);
        this.watch(r)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for Framed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = this.poll_write_inner(cx, data);
        this.watch(r)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = match this.inner() {
            Ok(i) => Pin::new(i).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        };
        this.watch(r)
    }

    /// Ends this direction with an end frame (the TLS connection stays open).
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = this.poll_end(cx);
        this.watch(r)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for Framed<S> {
    fn drop(&mut self) {
        if self.broken || !self.write_done || self.out_left > 0 {
            return;
        }
        let (Some(inner), Some(back)) = (self.inner.take(), self.back.take()) else {
            return;
        };
        if self.read_done {
            let _ = back.send(inner);
            return;
        }
        // This side is done; the peer's end frame (and nothing else) is awaited a moment.
        let left = self.left;
        let got = self.hdr_got;
        if left > 0 || got > 0 || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        tokio::spawn(async move {
            let mut inner = inner;
            let mut hdr = [0u8; 4];
            let end = tokio::time::timeout(LINGER, inner.read_exact(&mut hdr)).await;
            if matches!(end, Ok(Ok(_))) && hdr == [0; 4] {
                let _ = back.send(inner);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    fn pair() -> (
        Framed<DuplexStream>,
        oneshot::Receiver<DuplexStream>,
        Framed<DuplexStream>,
        oneshot::Receiver<DuplexStream>,
    ) {
        let (a, b) = tokio::io::duplex(8 * 1024);
        let (ta, ra) = oneshot::channel();
        let (tb, rb) = oneshot::channel();
        (Framed::new(a, ta), ra, Framed::new(b, tb), rb)
    }

    #[tokio::test]
    async fn both_ends_clean_hand_the_stream_back_for_the_next_connection() {
        let (mut a, ra, mut b, rb) = pair();
        let big = vec![7u8; 300_000];
        let writer = async {
            a.write_all(b"hello").await.unwrap();
            a.write_all(&big).await.unwrap();
            a.shutdown().await.unwrap();
            let mut back = Vec::new();
            a.read_to_end(&mut back).await.unwrap();
            (a, back)
        };
        let reader = async {
            let mut got = Vec::new();
            b.read_to_end(&mut got).await.unwrap();
            b.write_all(b"bye").await.unwrap();
            b.shutdown().await.unwrap();
            (b, got)
        };
        let ((a, back), (b, got)) = tokio::join!(writer, reader);
        assert_eq!(got.len(), 5 + big.len());
        assert_eq!(&got[..5], b"hello");
        assert_eq!(back, b"bye");
        drop((a, b));
        // The second connection over the same two streams.
        let (ta, ra2) = oneshot::channel();
        let (tb, _rb2) = oneshot::channel();
        let mut a = Framed::new(ra.await.unwrap(), ta);
        let mut b = Framed::new(rb.await.unwrap(), tb);
        a.write_all(b"again").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"again");
        drop(b);
        drop(a);
        // `a` never read `b`'s end frame (b dropped without one): not handed back.
        assert!(tokio::time::timeout(LINGER * 2, ra2)
            .await
            .unwrap()
            .is_err());
    }

    #[tokio::test]
    async fn an_abrupt_end_is_an_error_and_nothing_is_handed_back() {
        let (mut a, ra, b, _rb) = pair();
        drop(b);
        let mut buf = [0u8; 8];
        let e = a.read(&mut buf).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset);
        drop(a);
        assert!(ra.await.is_err());
    }

    #[tokio::test]
    async fn a_half_closed_side_lingers_for_the_peers_end_frame() {
        let (mut a, ra, mut b, _rb) = pair();
        a.write_all(b"request").await.unwrap();
        a.shutdown().await.unwrap();
        let mut got = vec![0u8; 7];
        b.read_exact(&mut got).await.unwrap();
        b.write_all(b"response").await.unwrap();
        b.shutdown().await.unwrap();
        let mut resp = vec![0u8; 8];
        a.read_exact(&mut resp).await.unwrap();
        // `a`'s application went away before reading the end frame: `a` lingers for it.
        drop(a);
        assert_eq!(resp, b"response");
        let _ = b.read(&mut [0u8; 1]).await.unwrap();
        drop(b);
        assert!(tokio::time::timeout(LINGER * 2, ra).await.unwrap().is_ok());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let (x, mut y) = tokio::io::duplex(64);
        let (t, _r) = oneshot::channel();
        let mut f = Framed::new(x, t);
        y.write_all(&((MAX_FRAME as u32) + 1).to_be_bytes())
            .await
            .unwrap();
        let e = f.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
