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

/// HTTP/1.1 keep-alive server: records each request head; answers `ok`, or N bytes for
/// `GET /bytes/N`.
pub fn http_server(l: TcpListener) -> Seen {
    accept_loop(l, Seen::default(), |c, seen| {
        let mut w = c.try_clone().unwrap();
        let mut r = BufReader::new(c);
        loop {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
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
