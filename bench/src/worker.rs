//! A thread living in one network namespace that runs requests on demand (so a benchmark's
//! samples do not pay a thread start and `setns` each).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub type Job = Box<dyn FnOnce(&mut Vec<u8>) -> Duration + Send>;

/// A thread living in one network namespace that runs requests on demand.
pub struct Worker {
    tx: mpsc::Sender<(Job, mpsc::Sender<Duration>)>,
}

impl Worker {
    pub fn new(ns: std::path::PathBuf) -> Worker {
        let (tx, rx) = mpsc::channel::<(Job, mpsc::Sender<Duration>)>();
        let file = std::fs::File::open(&ns).unwrap();
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            for (job, reply) in rx {
                let _ = reply.send(job(&mut buf));
            }
        });
        Worker { tx }
    }

    pub fn run(&self, job: Job) -> Duration {
        let (tx, rx) = mpsc::channel();
        self.tx.send((job, tx)).unwrap();
        rx.recv().expect("request failed")
    }

    /// One HTTP GET on a new connection, `Host` as given (default: the address).
    pub fn get_as(&self, addr: SocketAddr, path: &str, host: Option<&str>) -> Duration {
        let path = path.to_string();
        let host = host.map(str::to_string).unwrap_or_else(|| addr.to_string());
        self.run(Box::new(move |buf| {
            let t = Instant::now();
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let (mut total, mut want) = (0, None);
            loop {
                let n = s.read(buf).unwrap();
                assert!(
                    n > 0 || total > 0,
                    "{addr} (Host {host}): connection closed before an answer"
                );
                if n == 0 {
                    break;
                }
                // The head arrives in the first read (one small write by the server).
                if want.is_none() {
                    want = expected(&buf[..n]);
                    assert!(
                        buf.starts_with(b"HTTP/1.1 200"),
                        "{}",
                        String::from_utf8_lossy(&buf[..n.min(200)])
                    );
                }
                total += n;
                if want.is_some_and(|w| total >= w) {
                    break;
                }
            }
            t.elapsed()
        }))
    }

    pub fn get(&self, addr: SocketAddr, path: &str) -> Duration {
        self.get_as(addr, path, None)
    }

    /// `payload` sent on a new TCP connection to an echo service at `addr` and read back.
    pub fn echo(&self, addr: SocketAddr, payload: &'static [u8]) -> Duration {
        self.run(Box::new(move |buf| {
            let t = Instant::now();
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            s.write_all(payload).unwrap();
            s.read_exact(&mut buf[..payload.len()]).unwrap();
            assert_eq!(&buf[..payload.len()], payload);
            t.elapsed()
        }))
    }

    /// `n` bytes from a [`nhi_integration::edge::bulk_server`] at `addr`, on a new connection.
    pub fn bulk(&self, addr: SocketAddr, n: usize) -> Duration {
        self.run(Box::new(move |buf| {
            let t = Instant::now();
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_nodelay(true).unwrap();
            writeln!(s, "{n}").unwrap();
            let mut total = 0;
            loop {
                let k = s.read(buf).unwrap();
                if k == 0 {
                    break;
                }
                total += k;
            }
            assert_eq!(total, n, "{addr}: short bulk transfer");
            t.elapsed()
        }))
    }

    /// `payload` to `addr` from a new UDP socket (a new flow), then its answer.
    pub fn udp(&self, addr: SocketAddr, payload: Vec<u8>) -> Duration {
        self.run(Box::new(move |buf| {
            let t = Instant::now();
            let s = UdpSocket::bind("0.0.0.0:0").unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.connect(addr).unwrap();
            s.send(&payload).unwrap();
            let n = s.recv(buf).expect("no UDP answer");
            assert!(n > 0);
            t.elapsed()
        }))
    }
}

/// Header length + Content-Length, from the first bytes of a response.
fn expected(first: &[u8]) -> Option<usize> {
    let s = String::from_utf8_lossy(&first[..first.len().min(512)]);
    let head_end = s.find("\r\n\r\n")? + 4;
    let len: usize = s
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length").then_some(v)
        })?
        .trim()
        .parse()
        .ok()?;
    Some(head_end + len)
}
