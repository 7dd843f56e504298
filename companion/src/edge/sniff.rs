//! Recognizing the first bytes of a connection without consuming them: a TLS ClientHello (and
//! its server name, read without terminating TLS), the start of a plaintext HTTP/1 request, or
//! the preface of HTTP/2 with prior knowledge (h2c: gRPC without TLS).

/// What the first bytes of a connection are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sniffed {
    /// Not enough bytes yet to tell.
    NeedMore,
    /// A TLS ClientHello; the server name if it carried one.
    Tls(Option<String>),
    /// A plaintext HTTP/1 request line.
    Http,
    /// The whole plaintext HTTP/2 connection preface ([`H2_PREFACE`]).
    Http2,
    /// Something else (or a malformed ClientHello): decide by address and port only.
    Other,
}

const METHODS: [&str; 9] = [
    "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
];

/// What a plaintext HTTP/2 client with prior knowledge sends first (RFC 9113, 3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Largest TLS record we wait for (a ClientHello is one record; 16 KiB + header).
pub const MAX_HELLO: usize = 5 + (1 << 14);

pub fn sniff(b: &[u8]) -> Sniffed {
    if b.is_empty() {
        return Sniffed::NeedMore;
    }
    if b[0] == 0x16 {
        return tls(b);
    }
    let n = b.len().min(H2_PREFACE.len());
    if b[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Sniffed::Http2
        } else {
            Sniffed::NeedMore
        };
    }
    request_line(b)
}

/// Longest request line waited for before calling it HTTP anyway (see [`request_line`]).
pub const MAX_LINE: usize = 4096;

/// Whether `b` begins an HTTP/1 request, judged as leniently as the most lenient servers parse
/// (Go's `net/http` takes a method token of any length, nginx skips stray CR and LF, Python's
/// `http.server` splits on any whitespace): blank bytes (CR, LF, space, tab) before it are
/// skipped; a known method and a space is HTTP at once; any other token followed by a space or
/// a tab is HTTP once its line holds an `HTTP/` version, and [`Sniffed::Other`] only when the
/// whole line has none. Anything else that is no token (a NUL, a `*1\r\n`, a TLS record) is
/// told apart at once. A line still open after [`MAX_LINE`] bytes is [`Sniffed::Http`]: a
/// caller must not escape HTTP handling by sending a long one.
fn request_line(b: &[u8]) -> Sniffed {
    let blank = |c: &u8| matches!(c, b'\r' | b'\n' | b' ' | b'\t');
    let start = b.iter().position(|c| !blank(c)).unwrap_or(b.len());
    let long = b.len() >= MAX_LINE;
    let b = &b[start..];
    if b.is_empty() {
        return if long {
            Sniffed::Http
        } else {
            Sniffed::NeedMore
        };
    }
    for m in METHODS {
        let want = m.len() + 1;
        let n = b.len().min(want);
        let prefix = format!("{m} ");
        if b[..n] == prefix.as_bytes()[..n] {
            return if n == want {
                Sniffed::Http
            } else {
                Sniffed::NeedMore
            };
        }
    }
    let open = if long {
        Sniffed::Http
    } else {
        Sniffed::NeedMore
    };
    let Some(sep) = b.iter().position(|&c| !is_tchar(c)) else {
        return open;
    };
    if sep == 0 || !matches!(b[sep], b' ' | b'\t') {
        return Sniffed::Other;
    }
    let Some(end) = b[sep..].iter().position(|&c| c == b'\n') else {
        return open;
    };
    if b[sep..sep + end].windows(5).any(|w| w == b"HTTP/") {
        Sniffed::Http
    } else {
        Sniffed::Other
    }
}

/// A character of an HTTP token (RFC 9110, 5.6.2).
fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn tls(b: &[u8]) -> Sniffed {
    if b.len() < 5 {
        return Sniffed::NeedMore;
    }
    // Record: type 22 (handshake), version 3.x, length.
    if b[1] != 3 {
        return Sniffed::Other;
    }
    let len = u16::from_be_bytes([b[3], b[4]]) as usize;
    if len > MAX_HELLO - 5 {
        return Sniffed::Other;
    }
    if b.len() < 5 + len {
        return Sniffed::NeedMore;
    }
    match client_hello_sni(&b[5..5 + len]) {
        Some(sni) => Sniffed::Tls(sni),
        None => Sniffed::Other,
    }
}

/// A cursor that fails (returns `None`) instead of panicking on short input.
struct Cur<'a>(&'a [u8]);

impl<'a> Cur<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (h, t) = self.0.split_at(n);
        self.0 = t;
        Some(h)
    }
    fn u8(&mut self) -> Option<usize> {
        self.take(1).map(|b| b[0] as usize)
    }
    fn u16(&mut self) -> Option<usize> {
        self.take(2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    }
    fn u24(&mut self) -> Option<usize> {
        self.take(3)
            .map(|b| ((b[0] as usize) << 16) | ((b[1] as usize) << 8) | b[2] as usize)
    }
}

/// `Some(None)`: a well-formed ClientHello without server name; `None`: not a ClientHello.
fn client_hello_sni(hs: &[u8]) -> Option<Option<String>> {
    let mut c = Cur(hs);
    if c.u8()? != 1 {
        return None; // not client_hello
    }
    let body_len = c.u24()?;
    let mut c = Cur(c.take(body_len)?);
    c.take(2)?; // legacy_version
    c.take(32)?; // random
    let sid = c.u8()?;
    c.take(sid)?;
    let suites = c.u16()?;
    c.take(suites)?;
    let comp = c.u8()?;
    c.take(comp)?;
    if c.0.is_empty() {
        return Some(None); // no extensions
    }
    let ext_len = c.u16()?;
    let mut exts = Cur(c.take(ext_len)?);
    while !exts.0.is_empty() {
        let typ = exts.u16()?;
        let len = exts.u16()?;
        let data = exts.take(len)?;
        if typ != 0 {
            continue;
        }
        let mut d = Cur(data);
        let list_len = d.u16()?;
        let mut list = Cur(d.take(list_len)?);
        while !list.0.is_empty() {
            let name_type = list.u8()?;
            let n = list.u16()?;
            let name = list.take(n)?;
            if name_type == 0 {
                let s = std::str::from_utf8(name).ok()?;
                if s.is_empty()
                    || !s
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
                {
                    return None;
                }
                return Some(Some(s.to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal TLS 1.2-style ClientHello record with an optional server name.
    pub(crate) fn client_hello(sni: Option<&str>) -> Vec<u8> {
        let mut exts = Vec::new();
        if let Some(name) = sni {
            let n = name.as_bytes();
            let mut list = vec![0u8];
            list.extend((n.len() as u16).to_be_bytes());
            list.extend(n);
            let mut data = (list.len() as u16).to_be_bytes().to_vec();
            data.extend(list);
            exts.extend(0u16.to_be_bytes());
            exts.extend((data.len() as u16).to_be_bytes());
            exts.extend(data);
        }
        // An unrelated extension (supported_groups) first would be realistic; add one after.
        exts.extend(10u16.to_be_bytes());
        exts.extend(4u16.to_be_bytes());
        exts.extend([0, 2, 0, 29]);
        let mut body = vec![3, 3];
        body.extend([7u8; 32]);
        body.push(0); // session id
        body.extend(2u16.to_be_bytes());
        body.extend([0x13, 0x01]);
        body.extend([1, 0]); // compression: null
        body.extend((exts.len() as u16).to_be_bytes());
        body.extend(exts);
        let mut hs = vec![1];
        hs.extend(&(body.len() as u32).to_be_bytes()[1..]);
        hs.extend(body);
        let mut rec = vec![0x16, 3, 1];
        rec.extend((hs.len() as u16).to_be_bytes());
        rec.extend(hs);
        rec
    }

    #[test]
    fn reads_sni_from_a_client_hello() {
        let h = client_hello(Some("API.Example.com"));
        assert_eq!(sniff(&h), Sniffed::Tls(Some("api.example.com".into())));
        assert_eq!(sniff(&client_hello(None)), Sniffed::Tls(None));
        // Every truncation asks for more, never panics or guesses.
        for n in 0..h.len() {
            assert_eq!(sniff(&h[..n]), Sniffed::NeedMore, "at {n}");
        }
    }

    #[test]
    fn malformed_hellos_are_other() {
        let mut h = client_hello(Some("a.example"));
        h[5] = 2; // server_hello
        assert_eq!(sniff(&h), Sniffed::Other);
        let mut h = client_hello(Some("a.example"));
        let at = h.len() - 12;
        h[at] = b' '; // bad byte in the name
        assert_eq!(sniff(&h), Sniffed::Other);
        assert_eq!(sniff(&[0x16, 9, 9, 0, 1, 0]), Sniffed::Other);
    }

    #[test]
    fn recognizes_http_requests() {
        assert_eq!(sniff(b"GET / HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(sniff(b"DELETE /x"), Sniffed::Http);
        assert_eq!(sniff(b"DEL"), Sniffed::NeedMore);
        // Could still be a method of its own (`GETX / HTTP/1.1`): the line decides.
        assert_eq!(sniff(b"GETX"), Sniffed::NeedMore);
        assert_eq!(sniff(b"GETX\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH"), Sniffed::NeedMore);
        assert_eq!(sniff(b"SSH-2.0-OpenSSH_9.6\r\n"), Sniffed::Other);
        assert_eq!(sniff(b"\x00\x01"), Sniffed::Other);
        assert_eq!(sniff(b""), Sniffed::NeedMore);
    }

    #[test]
    fn recognizes_the_http2_preface_only_whole() {
        let mut h = H2_PREFACE.to_vec();
        for n in 1..h.len() {
            assert_eq!(sniff(&h[..n]), Sniffed::NeedMore, "at {n}");
        }
        assert_eq!(sniff(&h), Sniffed::Http2);
        h.extend_from_slice(b"\x00\x00\x00\x04\x00\x00\x00\x00\x00");
        assert_eq!(
            sniff(&h),
            Sniffed::Http2,
            "with the SETTINGS frame after it"
        );
        // Not the HTTP/2 preface: an HTTP/1 request line (whose method hyper then refuses).
        assert_eq!(sniff(b"PRI * HTTP/1.1\r\n"), Sniffed::Http);
        assert_eq!(sniff(b"PUT /x HTTP/1.1"), Sniffed::Http);
        assert_eq!(sniff(b"PATCH /x"), Sniffed::Http);
    }

    #[test]
    fn any_method_token_with_a_request_line_is_http() {
        // As leniently as servers parse: a method of any length, stray CR, tabs, odd
        // versions, bytes beyond ASCII in the target.
        for line in [
            &b"PROPFIND /whoami HTTP/1.1\r\n"[..],
            b"QUERY /q HTTP/1.1\r\nHost: x\r\n",
            b"get / HTTP/1.1\r\n",
            b"PRI / HTTP/1.1\n",
            b"\r\nGET / HTTP/1.1\r\n",
            b"\r\n\r\nMKCOL /dir HTTP/1.0\r\n",
            b"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA / HTTP/1.1\r\n",
            b"\rGET / HTTP/1.1\r\n",
            b"GET\t/\tHTTP/1.1\r\n",
            b"  QUERY / HTTP/1.1  \r\n",
            b"QUERY / HTTP/1.10\r\n",
            b"QUERY /\xc3\xa9 HTTP/1.1\r\n",
        ] {
            assert_eq!(
                sniff(line),
                Sniffed::Http,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
        // Still plausible: wait for the rest of the line.
        assert_eq!(sniff(b"PROPFIND"), Sniffed::NeedMore);
        assert_eq!(sniff(b"QUERY /\xc3\xa9"), Sniffed::NeedMore);
        assert_eq!(sniff(b"payload-with-no-end-yet"), Sniffed::NeedMore);
        assert_eq!(sniff(b"PROPFIND /whoami HTT"), Sniffed::NeedMore);
        assert_eq!(sniff(b"\r\n"), Sniffed::NeedMore);
        // A plausible line longer than we wait for is HTTP (hyper decides), not a raw relay.
        let mut long = b"PROPFIND /".to_vec();
        long.resize(MAX_LINE, b'a');
        assert_eq!(sniff(&long), Sniffed::Http);
        // Other protocols are told apart at once.
        for other in [
            &b"*1\r\n$4\r\nPING\r\n"[..],        // Redis
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f", // PostgreSQL SSLRequest
            b"get key\r\n",                      // memcached
            b"SSH-2.0-OpenSSH_9.6 Debian\r\n",
            b"HELLO world\r\n",
            b"payload-with-an-end\n",
        ] {
            assert_eq!(
                sniff(other),
                Sniffed::Other,
                "{}",
                String::from_utf8_lossy(other)
            );
        }
    }
}
