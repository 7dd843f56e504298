//! Edge-policy test kit: a peer network namespace wired to a container by a veth pair (the
//! "outside world": test upstreams live there, inbound callers come from there), threads that
//! run inside a given network namespace, and test upstreams that count what reaches them.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The peer side's address; the container gets [`WORKLOAD_IP`].
pub const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
pub const WORKLOAD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn sh(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().expect(cmd);
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A named network namespace (`ip netns`), deleted on drop.
pub struct NamedNs {
    pub name: String,
}

impl NamedNs {
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Runs `cmd args` inside this namespace and returns its output.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, cmd])
            .args(args)
            .output()
            .expect("ip netns exec")
    }

    /// Names the network namespace of `pid` (keeps it alive after the process is gone).
    pub fn attach(name: &str, pid: i32) -> NamedNs {
        sh("ip", &["netns", "attach", name, &pid.to_string()]);
        NamedNs { name: name.into() }
    }
}

impl Drop for NamedNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A fresh namespace linked to the container whose init is `pid`: `PEER_IP` here, `WORKLOAD_IP`
/// there, on a /24.
pub fn peer(name: &str, pid: i32) -> NamedNs {
    sh("ip", &["netns", "add", name]);
    let ns = NamedNs { name: name.into() };
    let pid = pid.to_string();
    sh(
        "ip",
        &[
            "-n", name, "link", "add", "vp", "type", "veth", "peer", "name", "vc", "netns", &pid,
        ],
    );
    sh(
        "ip",
        &["-n", name, "addr", "add", "10.77.0.1/24", "dev", "vp"],
    );
    sh("ip", &["-n", name, "link", "set", "vp", "up"]);
    sh("ip", &["-n", name, "link", "set", "lo", "up"]);
    for args in [
        vec!["addr", "add", "10.77.0.2/24", "dev", "vc"],
        vec!["link", "set", "vc", "up"],
    ] {
        let mut a = vec!["-t", &pid, "-n", "ip"];
        a.extend(args);
        sh("nsenter", &a);
    }
    ns
}

/// Runs `f` on a thread that joined the network namespace at `ns` (and nothing else).
pub fn in_netns<T: Send + 'static>(ns: &Path, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(ns).unwrap_or_else(|e| panic!("{}: {e}", ns.display()));
    std::thread::spawn(move || {
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

pub fn container_ns(pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/ns/net"))
}

/// A listener bound inside the namespace at `ns` (it stays there, whoever accepts).
pub fn listen_in(ns: &Path, addr: SocketAddr) -> TcpListener {
    in_netns(ns, move || TcpListener::bind(addr).expect("bind in netns"))
}

/// What reached a test upstream.
#[derive(Clone, Default)]
pub struct Seen {
    pub connections: Arc<AtomicUsize>,
    /// HTTP request heads (request line and headers), in arrival order.
    pub requests: Arc<Mutex<Vec<String>>>,
}

impl Seen {
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn accept_loop(l: TcpListener, seen: Seen, handle: fn(TcpStream, &Seen)) -> Seen {
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            s.connections.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            std::thread::spawn(move || handle(c, &s));
        }
    });
    seen
}

/// Echoes every byte back.
pub fn echo_server(l: TcpListener) -> Seen {
    accept_loop(l, Seen::default(), |mut c, _| {
        let mut r = c.try_clone().unwrap();
        let _ = std::io::copy(&mut r, &mut c);
    })
}

/// A protocol whose server speaks first (as MySQL, SMTP or FTP do): sends `greeting` on
/// every new connection, then echoes every byte.
pub fn greeting_server(l: TcpListener, greeting: &'static str) -> Seen {
    let seen = Seen::default();
    let s = seen.clone();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            s.connections.fetch_add(1, Ordering::SeqCst);
            std::thread::spawn(move || {
                if c.write_all(greeting.as_bytes()).is_ok() {
                    let mut r = c.try_clone().unwrap();
                    let _ = std::io::copy(&mut r, &mut c);
                }
            });
        }
    });
    seen
}

/// A non-HTTP bulk source: reads a decimal byte count and a newline, sends that many bytes
/// and closes.
pub fn bulk_server(l: TcpListener) -> Seen {
    accept_loop(l, Seen::default(), |c, _| {
        let mut w = c.try_clone().unwrap();
        let mut line = String::new();
        if BufReader::new(c).read_line(&mut line).is_err() {
            return;
        }
        let mut left: usize = line.trim().parse().unwrap_or(0);
        let chunk = vec![b'x'; 256 * 1024];
        while left > 0 {
            let k = left.min(chunk.len());
            if w.write_all(&chunk[..k]).is_err() {
                return;
            }
            left -= k;
        }
    })
}

/// An HTTP/1 request head (request line and headers, without the blank line after them);
/// `None` if the connection ends first.
fn read_head(r: &mut impl BufRead) -> Option<String> {
    let mut head = String::new();
    loop {
        let mut line = String::new();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return None,
            Ok(_) if line == "\r\n" => return Some(head),
            Ok(_) => head.push_str(&line),
        }
    }
}

/// HTTP/1.1 keep-alive server: records each request head; answers `ok`, or N bytes for
/// `GET /bytes/N`.
pub fn http_server(l: TcpListener) -> Seen {
    accept_loop(l, Seen::default(), |c, seen| {
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        loop {
            let Some(head) = read_head(&mut r) else {
                return;
            };
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            let mut body = vec![0; len];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
            seen.requests.lock().unwrap().push(head);
            let n: usize = path
                .strip_prefix("/bytes/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if n > 0 {
                let hdr = format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
                if w.write_all(hdr.as_bytes()).is_err() {
                    return;
                }
                let chunk = vec![b'x'; 256 * 1024];
                let mut left = n;
                while left > 0 {
                    let k = left.min(chunk.len());
                    if w.write_all(&chunk[..k]).is_err() {
                        return;
                    }
                    left -= k;
                }
            } else if w
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .is_err()
            {
                return;
            }
        }
    })
}

/// An HTTP/1 server that accepts any upgrade asked of it (as a WebSocket server does, or a Go
/// h2c handler): records the request head; a request with an `Upgrade` header gets `101
/// Switching Protocols` naming the same protocol and then every byte echoed; one without gets
/// `200 ok` and the connection closed.
pub fn upgrade_server(l: TcpListener) -> Seen {
    accept_loop(l, Seen::default(), |c, seen| {
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        let Some(head) = read_head(&mut r) else {
            return;
        };
        let asked = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("upgrade")
                .then(|| v.trim().to_string())
        });
        seen.requests.lock().unwrap().push(head);
        let Some(protocol) = asked else {
            let _ =
                w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
            return;
        };
        let switched = format!(
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: {protocol}\r\nConnection: Upgrade\r\n\r\n"
        );
        if w.write_all(switched.as_bytes()).is_err() {
            return;
        }
        let _ = std::io::copy(&mut r, &mut w);
    })
}

/// From inside `ns`: an HTTP/1 request to upgrade to `protocol` (`websocket`, `h2c`), with
/// `headers`, then `msg` over the upgraded connection; the answer's status line and what came
/// back (after a status other than 101: the first bytes of the body).
pub fn upgrade_echo(
    ns: &Path,
    addr: SocketAddr,
    protocol: &str,
    headers: &[(&str, &str)],
    msg: &str,
) -> Result<(String, String), String> {
    let mut req = format!(
        "GET /socket HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: {protocol}\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let msg = msg.to_string();
    in_netns(ns, move || {
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut w = s.try_clone().unwrap();
        w.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s);
        let mut status = String::new();
        r.read_line(&mut status).map_err(|e| e.to_string())?;
        loop {
            let mut line = String::new();
            match r.read_line(&mut line) {
                Ok(0) => return Err(format!("closed after {status:?}")),
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        w.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
        let mut back = vec![0; msg.len()];
        r.read_exact(&mut back)
            .map_err(|e| format!("{}: {e}", status.trim_end()))?;
        Ok((
            status.trim_end().to_string(),
            String::from_utf8_lossy(&back).into_owned(),
        ))
    })
}

/// An HTTP/2 server with prior knowledge (h2c, what a gRPC service without TLS speaks):
/// records each request's head (`METHOD path HTTP/2` and its headers, one per line, as
/// [`http_server`] does) and answers `ok` with a `grpc-status: 0` trailer.
pub fn h2c_server(l: TcpListener) -> Seen {
    use http_body_util::BodyExt;
    use hyper::body::{Bytes, Frame};
    let seen = Seen::default();
    let s = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            l.set_nonblocking(true).unwrap();
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            while let Ok((c, _)) = l.accept().await {
                s.connections.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                let svc = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let s = s.clone();
                        async move {
                            let mut head =
                                format!("{} {} HTTP/2\r\n", req.method(), req.uri().path());
                            for (k, v) in req.headers() {
                                head.push_str(&format!("{k}: {}\r\n", v.to_str().unwrap_or("?")));
                            }
                            // Request trailers are recorded as header lines too.
                            if let Ok(body) = req.into_body().collect().await {
                                for (k, v) in body.trailers().into_iter().flatten() {
                                    head.push_str(&format!(
                                        "{k}: {}\r\n",
                                        v.to_str().unwrap_or("?")
                                    ));
                                }
                            }
                            s.requests.lock().unwrap().push(head);
                            let mut trailers = hyper::HeaderMap::new();
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            let body = Frames(
                                [
                                    Frame::data(Bytes::from_static(b"ok")),
                                    Frame::trailers(trailers),
                                ]
                                .into(),
                            );
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                        }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(c), svc),
                );
            }
        });
    });
    seen
}

/// A response body of frames all ready at once (data, then trailers).
struct Frames(std::collections::VecDeque<hyper::body::Frame<hyper::body::Bytes>>);

impl hyper::body::Body for Frames {
    type Data = hyper::body::Bytes;
    type Error = std::convert::Infallible;
    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

/// From inside `ns`: one request over a new HTTP/2 connection with prior knowledge (h2c) with
/// `headers`, sent again as the request body's trailers; the status, the body and the
/// `grpc-status` trailer.
pub fn h2c_request(
    ns: &Path,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String, Option<String>), String> {
    use http_body_util::BodyExt;
    let uri = format!("http://{addr}{path}");
    let headers: Vec<(String, String)> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    in_netns(ns, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let exchange = async {
                let tcp = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("connect: {e}"))?;
                let (mut send, conn) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(tcp),
                )
                .await
                .map_err(|e| format!("h2 handshake: {e}"))?;
                tokio::spawn(conn);
                let mut req = hyper::Request::post(uri.as_str());
                for (k, v) in &headers {
                    req = req.header(k.as_str(), v.as_str());
                }
                let mut trailers = hyper::HeaderMap::new();
                for (k, v) in &headers {
                    trailers.append(
                        hyper::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                        v.parse().unwrap(),
                    );
                }
                let body = Frames(
                    [
                        hyper::body::Frame::data(hyper::body::Bytes::from_static(b"hi")),
                        hyper::body::Frame::trailers(trailers),
                    ]
                    .into(),
                );
                let req = req.body(body).unwrap();
                let resp = send
                    .send_request(req)
                    .await
                    .map_err(|e| format!("h2 request: {e}"))?;
                let status = resp.status().as_u16();
                let body = resp
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| format!("h2 body: {e}"))?;
                let grpc = body
                    .trailers()
                    .and_then(|t| t.get("grpc-status"))
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                Ok((
                    status,
                    String::from_utf8_lossy(&body.to_bytes()).into_owned(),
                    grpc,
                ))
            };
            tokio::time::timeout(Duration::from_secs(10), exchange)
                .await
                .map_err(|_| "h2c request timed out".to_string())?
        })
    })
}

/// A self-signed certificate for `names`: (cert DER, key DER).
pub fn test_cert(names: &[&str]) -> (Vec<u8>, Vec<u8>) {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("cert");
    (ck.cert.der().to_vec(), ck.signing_key.serialize_der())
}

/// TLS server (rustls) that echoes one line back per connection.
pub fn tls_server(l: TcpListener, cert: Vec<u8>, key: Vec<u8>) -> Seen {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.into()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.into()),
        )
        .expect("server config");
    let cfg = Arc::new(cfg);
    let seen = Seen::default();
    let s = seen.clone();
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            s.connections.fetch_add(1, Ordering::SeqCst);
            let cfg = cfg.clone();
            std::thread::spawn(move || {
                let conn = rustls::ServerConnection::new(cfg).unwrap();
                let mut tls = rustls::StreamOwned::new(conn, c);
                let mut line = String::new();
                if BufReader::new(&mut tls).read_line(&mut line).is_ok() {
                    let _ = tls.write_all(line.as_bytes());
                    let _ = tls.flush();
                }
            });
        }
    });
    seen
}

/// From inside `ns`: a TLS handshake to `addr` naming `sni` (trusting `ca`), then one line
/// echoed. `Err` if the handshake or the echo failed.
pub fn tls_echo(ns: &Path, addr: SocketAddr, sni: &str, ca: Vec<u8>) -> Result<String, String> {
    let sni = sni.to_string();
    in_netns(ns, move || {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.into()).map_err(|e| e.to_string())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let name = rustls_pki_types::ServerName::try_from(sni).map_err(|e| e.to_string())?;
        let conn = rustls::ClientConnection::new(Arc::new(cfg), name).map_err(|e| e.to_string())?;
        let s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, s);
        tls.write_all(b"hello over tls\n")
            .map_err(|e| e.to_string())?;
        let mut line = String::new();
        BufReader::new(&mut tls)
            .read_line(&mut line)
            .map_err(|e| e.to_string())?;
        Ok(line)
    })
}

/// From inside `ns`: connect, send `msg`, read it back. `Err` when refused or reset.
pub fn tcp_echo(ns: &Path, addr: SocketAddr, msg: &str) -> Result<String, String> {
    let msg = msg.to_string();
    in_netns(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(msg.as_bytes()).map_err(|e| e.to_string())?;
        let mut buf = vec![0; msg.len()];
        s.read_exact(&mut buf).map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    })
}

/// From inside `ns`: one HTTP/1.1 request (`Connection: close`); status and body.
pub fn http(
    ns: &Path,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(u16, String), String> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    in_netns(ns, move || {
        let mut s =
            TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).map_err(|e| e.to_string())?;
        let resp = String::from_utf8_lossy(&resp).into_owned();
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no HTTP response: {resp:?}"))?;
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    })
}

/// A second address of the peer namespace: an "unrelated" server a workload may name an
/// allowed host towards.
pub const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);

impl NamedNs {
    /// Adds `addr` (CIDR) to the peer side's interface (`vp`).
    pub fn add_addr(&self, cidr: &str) {
        let dev = "vp";
        let out = self.exec("ip", &["addr", "add", cidr, "dev", dev, "nodad"]);
        assert!(out.status.success(), "ip addr add {cidr}: {out:?}");
    }
}

/// Adds `cidr` to the container side (`vc`) of the veth made by [`peer`].
pub fn add_workload_addr(pid: i32, cidr: &str) {
    sh(
        "nsenter",
        &[
            "-t",
            &pid.to_string(),
            "-n",
            "ip",
            "addr",
            "add",
            cidr,
            "dev",
            "vc",
            "nodad",
        ],
    );
}

/// A process run inside a named namespace, killed on drop.
pub struct NsDaemon {
    child: std::process::Child,
    pub dir: tempfile::TempDir,
}

impl Drop for NsDaemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl NsDaemon {
    fn spawn(ns: &NamedNs, cmd: &str, args: &[String], dir: tempfile::TempDir) -> NsDaemon {
        let child = Command::new("ip")
            .args(["netns", "exec", &ns.name, cmd])
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).expect("daemon stderr file"))
            .spawn()
            .unwrap_or_else(|e| panic!("{cmd}: {e} (run scripts/install-deps)"));
        NsDaemon { child, dir }
    }

    /// The daemon's stderr so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// A file the daemon writes in its directory (a log).
    pub fn file(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

fn daemon_dir() -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix("nhi-it-d-")
        .tempdir()
        .expect("tempdir");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    d
}

/// A real DNS server (dnsmasq, Debian `dnsmasq-base`) in `ns` on `listen`:53, answering
/// `name → ip` for each record (and nothing else), every query logged to `queries.log`.
pub fn dnsmasq(ns: &NamedNs, listen: Ipv4Addr, records: &[(&str, Ipv4Addr)], ttl: u32) -> NsDaemon {
    let dir = daemon_dir();
    let mut args: Vec<String> = vec![
        "--keep-in-foreground".into(),
        "--conf-file=/dev/null".into(),
        "--no-resolv".into(),
        "--no-hosts".into(),
        "--bind-interfaces".into(),
        format!("--listen-address={listen}"),
        "--port=53".into(),
        "--user=root".into(),
        "--pid-file=".into(),
        format!("--local-ttl={ttl}"),
        "--log-queries".into(),
        format!(
            "--log-facility={}",
            dir.path().join("queries.log").display()
        ),
    ];
    for (name, ip) in records {
        args.push(format!("--host-record={name},{ip}"));
    }
    let d = NsDaemon::spawn(ns, "dnsmasq", &args, dir);
    // Ready when it answers on TCP (it listens on both).
    let addr = SocketAddr::new(listen.into(), 53);
    let ready = (0..200).any(|_| {
        let ok = in_netns(&ns.path(), move || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
        });
        if !ok {
            std::thread::sleep(Duration::from_millis(25));
        }
        ok
    });
    assert!(ready, "dnsmasq did not start: {}", d.stderr());
    d
}

/// A real nginx (Debian `nginx-light`) in `ns` on `listen`: `location /admin` answers
/// `admin area`, everything else `public`; every request it serves is logged to `access.log`
/// as the URI nginx resolved (`$uri`) and the target the client sent (`$request_uri`).
pub fn nginx(ns: &NamedNs, listen: SocketAddr) -> NsDaemon {
    let dir = daemon_dir();
    let d = dir.path().display().to_string();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n  log_format seen '$uri $request_uri';\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         \x20 server {{\n    listen {listen};\n    access_log {d}/access.log seen;\n    location /admin {{ return 200 \"admin area\\n\"; }}\n    location / {{ return 200 \"public\\n\"; }}\n  }}\n}}\n"
    );
    std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
    let args = vec![
        "-c".to_string(),
        dir.path().join("nginx.conf").display().to_string(),
        "-p".to_string(),
        d.clone(),
    ];
    let daemon = NsDaemon::spawn(ns, "nginx", &args, dir);
    let ready = (0..200).any(|_| {
        let ok = in_netns(&ns.path(), move || {
            TcpStream::connect_timeout(&listen, Duration::from_millis(100)).is_ok()
        });
        if !ok {
            std::thread::sleep(Duration::from_millis(25));
        }
        ok
    });
    assert!(
        ready,
        "nginx did not start: {} {}",
        daemon.stderr(),
        daemon.file("error.log")
    );
    daemon
}

/// A UDP socket bound inside `ns` that counts the datagrams reaching it.
pub fn udp_listener(ns: &Path, addr: SocketAddr) -> Arc<AtomicUsize> {
    let sock = in_netns(ns, move || {
        std::net::UdpSocket::bind(addr).expect("bind udp in netns")
    });
    let seen = Arc::new(AtomicUsize::new(0));
    let s = seen.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while sock.recv_from(&mut buf).is_ok() {
            s.fetch_add(1, Ordering::SeqCst);
        }
    });
    seen
}

/// From a thread inside `ns` (a process outside the companion's cgroup): one UDP datagram.
pub fn udp_send(ns: &Path, to: SocketAddr, payload: &[u8]) -> std::io::Result<()> {
    let payload = payload.to_vec();
    in_netns(ns, move || {
        let bind: SocketAddr = if to.is_ipv4() {
            "0.0.0.0:0".parse().unwrap()
        } else {
            "[::]:0".parse().unwrap()
        };
        let s = std::net::UdpSocket::bind(bind)?;
        s.send_to(&payload, to).map(|_| ())
    })
}

/// A veth pair between the network namespaces of two containers (init pids `a`, `b`): `a`
/// gets `10.<net>.0.1/24` on `<name>a`, `b` gets `10.<net>.0.2/24` on `<name>b`. `name` at
/// most 13 characters (interface names are 15).
pub fn link_containers(name: &str, net: u8, a: i32, b: i32) {
    let (ea, eb) = (format!("{name}a"), format!("{name}b"));
    sh(
        "ip",
        &["link", "add", &ea, "type", "veth", "peer", "name", &eb],
    );
    for (end, pid, host) in [(&ea, a, 1), (&eb, b, 2)] {
        let pid = pid.to_string();
        sh("ip", &["link", "set", end, "netns", &pid]);
        let addr = format!("10.{net}.0.{host}/24");
        sh(
            "nsenter",
            &["-t", &pid, "-n", "ip", "addr", "add", &addr, "dev", end],
        );
        sh(
            "nsenter",
            &["-t", &pid, "-n", "ip", "link", "set", end, "up"],
        );
    }
}
