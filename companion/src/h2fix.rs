//! gRPC C-core clients (grpcio: py-spiffe, and the other wrapped-C-core languages) send the
//! unix socket's *path* as the HTTP/2 `:authority` when they dial `unix:/path`. That is not a
//! valid URI authority (e.g. `tmp%2Fnhi%2Fworkload.sock`), and `h2` resets such streams (PROTOCOL_ERROR) before any handler runs.
//! On the Workload API's unix socket the authority means nothing (there is no host), so this
//! adapter sits between the socket and `h2` and rewrites an invalid `:authority` value in place
//! to the same number of `x` bytes.
//!
//! Same length matters: the value may enter the HPACK dynamic table, whose size accounting (and
//! every later index) must stay identical on both sides. Only literal representations with a
//! raw (non-Huffman) value inside one complete HEADERS frame are touched; anything else passes
//! through unchanged (and fails in `h2` as before). Only the client-to-server direction is read.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const FLAG_END_HEADERS: u8 = 0x4;
const FLAG_PADDED: u8 = 0x8;
const FLAG_PRIORITY: u8 = 0x20;
/// Larger HEADERS frames pass through untouched (h2's default max frame size is 16 KiB).
const MAX_HEADERS_FRAME: usize = 1 << 16;

pub struct AuthorityFix<T> {
    inner: T,
    /// Bytes read from `inner` not yet classified.
    raw: Vec<u8>,
    /// Bytes ready for the reader.
    out: Vec<u8>,
    out_pos: usize,
    preface_left: usize,
    /// Bytes of a non-HEADERS frame payload still to pass through.
    pass_left: usize,
    eof: bool,
}

impl<T> AuthorityFix<T> {
    pub fn new(inner: T) -> Self {
        AuthorityFix {
            inner,
            raw: Vec::new(),
            out: Vec::new(),
            out_pos: 0,
            preface_left: PREFACE_LEN,
            pass_left: 0,
            eof: false,
        }
    }

    /// Moves every complete unit of `raw` to `out`, rewriting HEADERS frames.
    fn process(&mut self) {
        loop {
            if self.preface_left > 0 || self.pass_left > 0 {
                let left = if self.preface_left > 0 {
                    &mut self.preface_left
                } else {
                    &mut self.pass_left
                };
                let n = (*left).min(self.raw.len());
                if n == 0 {
                    return;
                }
                *left -= n;
                self.out.extend(self.raw.drain(..n));
                continue;
            }
            if self.raw.len() < FRAME_HEADER {
                return;
            }
            let len = (usize::from(self.raw[0]) << 16)
                | (usize::from(self.raw[1]) << 8)
                | usize::from(self.raw[2]);
            let (kind, flags) = (self.raw[3], self.raw[4]);
            if kind == HEADERS && flags & FLAG_END_HEADERS != 0 && len <= MAX_HEADERS_FRAME {
                if self.raw.len() < FRAME_HEADER + len {
                    return;
                }
                fix_headers_payload(&mut self.raw[FRAME_HEADER..FRAME_HEADER + len], flags);
                self.out.extend(self.raw.drain(..FRAME_HEADER + len));
            } else {
                self.out.extend(self.raw.drain(..FRAME_HEADER));
                self.pass_left = len;
            }
        }
    }
}

/// Rewrites an invalid raw `:authority` literal in a HEADERS frame payload, in place.
pub fn fix_headers_payload(payload: &mut [u8], flags: u8) {
    let mut start = 0;
    let mut end = payload.len();
    if flags & FLAG_PADDED != 0 {
        let Some(&pad) = payload.first() else { return };
        start = 1;
        end = match end.checked_sub(usize::from(pad)) {
            Some(e) if e >= start => e,
            _ => return,
        };
    }
    if flags & FLAG_PRIORITY != 0 {
        start += 5;
    }
    if start <= end {
        fix_header_block(&mut payload[start..end]);
    }
}

/// An HPACK integer with an `n`-bit prefix at `b[*i]`; advances `i`.
fn int(b: &[u8], i: &mut usize, n: u32) -> Option<usize> {
    let max = (1usize << n) - 1;
    let mut v = usize::from(*b.get(*i)?) & max;
    *i += 1;
    if v < max {
        return Some(v);
    }
    let mut shift = 0;
    loop {
        let byte = *b.get(*i)?;
        *i += 1;
        v = v.checked_add(usize::from(byte & 0x7f).checked_shl(shift)?)?;
        shift += 7;
        if byte & 0x80 == 0 || shift > 28 {
            return Some(v);
        }
    }
}

/// A string literal at `b[*i]`: (huffman, start, len); advances `i` past it.
fn string(b: &[u8], i: &mut usize) -> Option<(bool, usize, usize)> {
    let huff = *b.get(*i)? & 0x80 != 0;
    let len = int(b, i, 7)?;
    let start = *i;
    *i = start.checked_add(len).filter(|e| *e <= b.len())?;
    Some((huff, start, len))
}

/// Conservative: host names, IPv4 and a port. `%` (grpcio's `tmp%2Fpath.sock`) is not valid
/// in an authority's host for the `http` crate.
fn valid_authority_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~:".contains(&c)
}

/// Walks an HPACK header block; rewrites raw `:authority` literal values that are not valid
/// authorities. Stops quietly at anything it cannot parse.
pub fn fix_header_block(b: &mut [u8]) {
    let mut i = 0;
    while i < b.len() {
        let first = b[i];
        let (prefix, literal) = match first {
            f if f & 0x80 != 0 => (7, false),    // indexed
            f if f & 0xc0 == 0x40 => (6, true),  // literal, incremental indexing
            f if f & 0xe0 == 0x20 => (5, false), // dynamic table size update
            _ => (4, true),                      // literal without / never indexed
        };
        let Some(index) = int(b, &mut i, prefix) else {
            return;
        };
        if !literal {
            continue;
        }
        let is_authority = if index == 0 {
            match string(b, &mut i) {
                Some((false, s, l)) => &b[s..s + l] == b":authority",
                Some(_) => false,
                None => return,
            }
        } else {
            index == 1 // static table entry 1 is `:authority`
        };
        let Some((huff, s, l)) = string(b, &mut i) else {
            return;
        };
        if is_authority && !huff && !b[s..s + l].iter().all(|c| valid_authority_byte(*c)) {
            b[s..s + l].fill(b'x');
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out.clear();
                    this.out_pos = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof {
                // Whatever incomplete frame is left goes through as is.
                if this.raw.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                this.out.append(&mut this.raw);
                continue;
            }
            let mut tmp = [0u8; 8192];
            let mut rb = ReadBuf::new(&mut tmp);
            match Pin::new(&mut this.inner).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) => {
                    if rb.filled().is_empty() {
                        this.eof = true;
                    } else {
                        this.raw.extend_from_slice(rb.filled());
                        this.process();
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

impl<T: tonic::transport::server::Connected> tonic::transport::server::Connected
    for AuthorityFix<T>
{
    type ConnectInfo = T::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    /// `:method: POST` (indexed 3), `:authority` literal with incremental indexing (name index
    /// 1), a literal-name header without indexing, then `:path` indexed-name literal.
    fn block(authority: &[u8]) -> Vec<u8> {
        let mut b = vec![0x83, 0x41, authority.len() as u8];
        b.extend_from_slice(authority);
        b.extend_from_slice(&[0x00, 0x02, b't', b'e', 0x08]);
        b.extend_from_slice(b"trailers");
        b.extend_from_slice(&[0x44, 0x02, b'/', b'x']);
        b
    }

    #[test]
    fn rewrites_only_an_invalid_raw_authority_keeping_lengths() {
        let mut b = block(b"/run/nhi/workload.sock");
        let before = b.clone();
        fix_header_block(&mut b);
        assert_eq!(b.len(), before.len());
        assert_eq!(&b[3..3 + 22], &[b'x'; 22][..]);
        assert_eq!(&b[25..], &before[25..], "the rest is untouched");
        let mut pct = block(b"tmp%2Fwapi.sock");
        fix_header_block(&mut pct);
        assert_eq!(&pct[3..3 + 15], b"xxxxxxxxxxxxxxx");
        let mut ok = block(b"localhost:15101");
        let before = ok.clone();
        fix_header_block(&mut ok);
        assert_eq!(ok, before);
        // Literal name `:authority`, never indexed.
        let mut lit = vec![0x10, 0x0a];
        lit.extend_from_slice(b":authority");
        lit.push(0x03);
        lit.extend_from_slice(b"a/b");
        fix_header_block(&mut lit);
        assert_eq!(&lit[lit.len() - 3..], b"xxx");
        // Garbage never panics.
        for n in 0..40 {
            let mut g: Vec<u8> = (0..n).map(|i| (i * 37 + 0x41) as u8).collect();
            fix_header_block(&mut g);
            fix_headers_payload(&mut g, FLAG_PADDED | FLAG_PRIORITY);
        }
    }

    #[tokio::test]
    async fn frames_split_across_reads_are_rewritten() {
        let payload = block(b"/tmp/s.sock");
        let mut wire = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        // A SETTINGS frame (passed through), then the HEADERS frame.
        wire.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        let l = payload.len();
        wire.extend_from_slice(&[0, 0, l as u8, HEADERS, FLAG_END_HEADERS, 0, 0, 0, 1]);
        wire.extend_from_slice(&payload);
        let (mut a, b) = tokio::io::duplex(4096);
        let mut fixed = AuthorityFix::new(b);
        let w = wire.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in w.chunks(5) {
                a.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
        });
        let mut got = vec![0u8; wire.len()];
        fixed.read_exact(&mut got).await.unwrap();
        assert_eq!(got.len(), wire.len());
        assert_eq!(&got[..wire.len() - l], &wire[..wire.len() - l]);
        assert!(got.windows(11).any(|w| w == b"xxxxxxxxxxx"));
    }
}
