//! One process in a pod floods each listener of its companion with 20,000 connections (idle,
//! slow-loris, keep-alive holding, half-open HTTP/2 and TLS), holding thousands open at once,
//! while another process of the same pod keeps making ordinary requests: every one of those
//! succeeds, the companion's peak memory stays under the documented bound and its file
//! descriptors under its budget, and all of them are released after the flood. Listeners: the
//! HTTP API, the Workload API over TCP and over its unix socket, the edge proxy's outbound and
//! inbound ports.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nhi_core::config::CompanionLimits;
use nhi_integration::edge::{container_ns, listen_in, peer, PEER_IP, WORKLOAD_IP};
use nhi_integration::*;

/// Connections opened against each listener.
const CONNECTIONS: usize = 20_000;
const ATTACKERS: usize = 4;
/// Connections each attacker keeps open at once: 4 × 1,500 is more than any listener holds.
const WINDOW: usize = 1_500;
/// The companion's peak resident memory under every flood, at the default limits
/// (docs/ARCHITECTURE.md, "Companion limits"; measured 58 MiB release, 63 MiB debug). The
/// companion of the issue grew to 244 MB on one listener and kept it.
const RSS_BOUND_KIB: u64 = 80 * 1024;

const POLICY: &str = r#"
[[policy]]
id = "flood"
spiffe_ids = ["spiffe://example.org/container/flood"]
default = "deny"
# Names hold only for what they resolve to (issue 13): the flood's plain HTTP names the peer by
# its address, and the TLS rule's resolver is the peer (nothing answers there: the half-open
# ClientHellos below never get as far as a decision).
dns = ["10.77.0.1"]
[[policy.egress]]
id = "web"
action = "allow"
ports = [80]
host = "10.77.0.1"
[[policy.egress]]
id = "tls"
action = "allow"
ports = [443]
sni = "*.test"
[[policy.egress]]
id = "raw"
action = "allow"
ports = [9000]
[[policy.inbound]]
id = "self"
ports = [8080]
allow = ["spiffe://example.org/container/flood"]
audience = "flood"
"#;

/// Opens a connection to `to`, waiting at most `wait` for the kernel to complete it.
fn open(to: &SocketAddr, wait: Duration) -> std::io::Result<TcpStream> {
    TcpStream::connect_timeout(to, wait)
}

/// Reads what comes within `wait` (a response being held open, or nothing).
fn glance(s: &mut TcpStream, wait: Duration) {
    let mut buf = [0u8; 512];
    let _ = s
        .set_read_timeout(Some(wait))
        .and_then(|_| s.read(&mut buf));
}

/// What an attacking connection does after connecting, before it is held open.
#[derive(Clone, Copy)]
enum Move {
    /// Nothing at all.
    Idle,
    /// A request cut short (slow loris, a half-open HTTP/2 preface or TLS ClientHello).
    Partial(&'static [u8]),
    /// A whole request; its answer is read, the connection kept (keep-alive holding).
    Request(&'static [u8]),
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface and an empty SETTINGS frame: a client that never asks anything.
const H2_SETTINGS: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
/// The first 40 bytes of a TLS ClientHello announcing 512.
const TLS_PARTIAL: &[u8] =
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefghijklmnopqrstuvwxyz012";

/// Runs `f` on a new thread in the network namespace at `ns` (the host's when `None`).
fn spawn_in<T: Send + 'static>(
    ns: Option<PathBuf>,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            let file = std::fs::File::open(&ns).unwrap();
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        }
        f()
    })
}

/// Opens `CONNECTIONS` connections from `ATTACKERS` threads, cycling through `moves`, each
/// thread holding up to `WINDOW` open. A connect the kernel does not complete within 100 ms
/// (the accept queue is full and the SYN was dropped) is abandoned and tried again at once on
/// a new socket, so the pressure never lets up. Returns (connected, abandoned).
fn attack(ns: Option<PathBuf>, moves: Vec<(SocketAddr, Move)>) -> (usize, usize) {
    let moves = Arc::new(moves);
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let deadline = Instant::now() + Duration::from_secs(90);
    let threads: Vec<_> = (0..ATTACKERS)
        .map(|t| {
            let (moves, ok, failed) = (moves.clone(), ok.clone(), failed.clone());
            spawn_in(ns.clone(), move || {
                let mut held = VecDeque::with_capacity(WINDOW);
                let mut i = 0;
                while i < CONNECTIONS / ATTACKERS && Instant::now() < deadline {
                    let (target, mv) = &moves[(i * ATTACKERS + t) % moves.len()];
                    let Ok(mut c) = open(target, Duration::from_millis(100)) else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    i += 1;
                    ok.fetch_add(1, Ordering::Relaxed);
                    match mv {
                        Move::Idle => {}
                        Move::Partial(b) => {
                            let _ = c.write_all(b);
                        }
                        Move::Request(b) => {
                            if c.write_all(b).is_ok() {
                                glance(&mut c, Duration::from_millis(200));
                            }
                        }
                    }
                    held.push_back(c);
                    if held.len() > WINDOW {
                        held.pop_front();
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// The unix-socket flood from a process of its own (python3): `CONNECTIONS` connects, idle or
/// stopping after the HTTP/2 preface or its SETTINGS, `ATTACKERS * WINDOW` held at once.
fn unix_attack(sock: &std::path::Path) -> (usize, usize) {
    const SCRIPT: &str = r#"
import collections, socket, sys
path, total, window = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
moves = [b"", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
         b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"]
held, ok, failed = collections.deque(), 0, 0
while ok < total:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        failed += 1
        s.close()
        continue
    ok += 1
    try:
        if moves[ok % 3]:
            s.sendall(moves[ok % 3])
    except OSError:
        pass
    held.append(s)
    if len(held) > window:
        held.popleft().close()
print(ok, failed)
"#;
    let out = std::process::Command::new("python3")
        .args(["-c", SCRIPT])
        .arg(sock)
        .arg(CONNECTIONS.to_string())
        .arg((ATTACKERS * WINDOW).to_string())
        .output()
        .expect("python3");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut n = text.split_whitespace().map(|v| v.parse::<usize>().unwrap());
    (n.next().unwrap(), n.next().unwrap())
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// `VmHWM` (peak resident set) of `pid`, in KiB.
fn peak_rss_kib(pid: i32) -> u64 {
    proc_status(pid, "VmHWM")
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap()
}

/// Runs `flood` while `probe` runs every 20 ms from `probe_ns`; asserts
/// every probe succeeded and the companion's fds stayed within budget, then that they are
/// released.
fn under_flood(
    label: &str,
    companion: i32,
    flood: impl FnOnce() -> (usize, usize),
    probe_ns: Option<PathBuf>,
    mut probe: impl FnMut() -> Result<(), String> + Send + 'static,
) {
    let baseline = fd_count(companion);
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let prober = spawn_in(probe_ns, move || {
        let mut results = Vec::new();
        while !s.load(Ordering::Relaxed) {
            let t = Instant::now();
            let r = probe();
            results.push((t.elapsed(), r));
            std::thread::sleep(Duration::from_millis(20));
        }
        results
    });
    let s = stop.clone();
    let sampler = std::thread::spawn(move || {
        let mut peak = 0;
        while !s.load(Ordering::Relaxed) {
            peak = peak.max(fd_count(companion));
            std::thread::sleep(Duration::from_millis(20));
        }
        peak
    });
    let started = Instant::now();
    let (connected, failed) = flood();
    let took = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let probes = prober.join().unwrap();
    let fd_peak = sampler.join().unwrap();
    let mut lat: Vec<Duration> = probes.iter().map(|p| p.0).collect();
    lat.sort();
    let errors: Vec<&String> = probes.iter().filter_map(|p| p.1.as_ref().err()).collect();
    eprintln!(
        "{label}: {connected} connections ({failed} connects abandoned: accept queue full) in {took:.1?}; {} probes, {} failed, latency p50 {:?} max {:?}; companion fds {baseline} -> peak {fd_peak}, RSS peak {} KiB",
        probes.len(),
        errors.len(),
        lat[lat.len() / 2],
        lat[lat.len() - 1],
        peak_rss_kib(companion),
    );
    assert!(probes.len() >= 5, "{label}: too few probes ran");
    let reconnects = RECONNECTS.swap(0, Ordering::Relaxed);
    assert!(
        reconnects * 50 <= probes.len(),
        "{label}: {reconnects} of {} probes needed a reconnect",
        probes.len()
    );
    assert!(
        errors.is_empty(),
        "{label}: legitimate requests failed during the flood: {errors:?}"
    );
    assert_eq!(connected, CONNECTIONS, "{label}: the flood did not happen");
    let budget = CompanionLimits::default().fd_budget() as usize;
    assert!(fd_peak <= budget, "{label}: {fd_peak} fds, budget {budget}");
    // The attackers are gone: every connection they held is released.
    assert!(
        eventually(Duration::from_secs(20), || fd_count(companion)
            <= baseline + 8),
        "{label}: the companion still holds {} fds (baseline {baseline})",
        fd_count(companion)
    );
}

/// `GET path` on a fresh connection (as a short-lived process would), expecting 200.
fn http_get(to: SocketAddr, host: &str, path: &str, extra: &str) -> Result<(), String> {
    let mut s =
        TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Connection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("{path}: {e}"))?;
    if resp.starts_with("HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!(
            "{path}: {}",
            resp.lines().next().unwrap_or("no answer")
        ))
    }
}

/// A JWT-SVID fetched over the Workload API at `endpoint` on a fresh connection. A connect
/// that fails is retried within the 5 s (a full accept queue refuses a unix-socket connect at
/// once, where TCP retransmits its SYN; gRPC channels reconnect the same way); a request that
/// was sent is never retried.
/// [`grpc_probe_once`], and over loopback TCP once more on a fresh connection if the first was
/// closed before any answer: there every process of the pod is 127.0.0.1, so under a flood a
/// connection just opened can be closed as the quietest before its request is read (the
/// documented semantics, ARCHITECTURE "Failure semantics"); a client reconnects. Counted in
/// `RECONNECTS`, which stays a small fraction of the probes (asserted); on the unix socket
/// (peers told apart by pid) there is no second chance.
fn grpc_probe(rt: &tokio::runtime::Runtime, endpoint: &str) -> Result<(), String> {
    match grpc_probe_once(rt, endpoint) {
        Err(e) if endpoint.starts_with("tcp://") && e.contains("transport error") => {
            RECONNECTS.fetch_add(1, Ordering::Relaxed);
            grpc_probe_once(rt, endpoint).map_err(|e2| format!("{e}; reconnected: {e2}"))
        }
        r => r,
    }
}

static RECONNECTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

fn grpc_probe_once(rt: &tokio::runtime::Runtime, endpoint: &str) -> Result<(), String> {
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), async {
            let client = loop {
                match spiffe::WorkloadApiClient::connect_to(endpoint).await {
                    Ok(c) => break c,
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            };
            client
                .fetch_jwt_svid(["flood"], None)
                .await
                .map(|_| ())
                .map_err(|e| format!("FetchJWTSVID: {e}"))
        })
        .await
        .map_err(|_| "no answer in 5 s".to_string())?
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A cheap upstream on `listener`: answers `200 ok` to every request head, holds anything else
/// open until the peer closes. One thread, any number of connections.
fn upstream(listener: std::net::TcpListener) {
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        runtime().block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((mut s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let mut buf = vec![0u8; 4096];
                    let mut seen = Vec::new();
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        while let Some(end) = seen.windows(4).position(|w| w == b"\r\n\r\n") {
                            seen.drain(..end + 4);
                            let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                            if s.write_all(ok).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        })
    });
}

#[test]
fn a_flood_on_every_companion_listener_never_starves_the_pod_nor_grows_the_companion() {
    let mut node = Node::new(ANNOTATED_RULE);
    node.append_config(POLICY);
    node.start();
    let c = node.named_container("flood");
    let pid = c.pid();
    let companion = node.companion_pid(&c.id).expect("companion");
    let ns = container_ns(pid);
    let peer_ns = peer(&unique_id("flp"), pid);
    for port in [80, 443, 9000] {
        upstream(listen_in(
            &peer_ns.path(),
            SocketAddr::new(PEER_IP.into(), port),
        ));
    }
    // The application the inbound rule protects, on loopback in the pod.
    upstream(listen_in(&ns, "127.0.0.1:8080".parse().unwrap()));
    let token = c.get_json("/v1/token?audience=flood")["token"]
        .as_str()
        .unwrap()
        .to_string();
    eprintln!(
        "companion before: RSS {} KiB, {} fds",
        proc_status(companion, "VmRSS"),
        fd_count(companion)
    );

    let api: SocketAddr = "127.0.0.1:15100".parse().unwrap();
    under_flood(
        "HTTP API",
        companion,
        || {
            attack(
                Some(ns.clone()),
                vec![
                    (api, Move::Idle),
                    (
                        api,
                        Move::Partial(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "),
                    ),
                    (
                        api,
                        Move::Request(b"GET /v1/identity HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"),
                    ),
                ],
            )
        },
        Some(ns.clone()),
        {
            let mut n = 0u64;
            let to = "127.0.0.1:15100".parse().unwrap();
            move || {
                n += 1;
                let path = if n % 2 == 0 {
                    "/healthz"
                } else {
                    "/v1/identity"
                };
                http_get(to, "127.0.0.1", path, "")
            }
        },
    );

    let wapi: SocketAddr = "127.0.0.1:15101".parse().unwrap();
    under_flood(
        "Workload API (TCP)",
        companion,
        || {
            attack(
                Some(ns.clone()),
                vec![
                    (wapi, Move::Idle),
                    (wapi, Move::Partial(H2_PREFACE)),
                    (wapi, Move::Partial(H2_SETTINGS)),
                ],
            )
        },
        Some(ns.clone()),
        {
            let rt = runtime();
            move || grpc_probe(&rt, "tcp://127.0.0.1:15101")
        },
    );

    // On the socket the companion knows each peer's pid: the flood comes from another process
    // of the pod than the probes, as it would.
    let sock = node.path("containers").join(&c.id).join("workload.sock");
    under_flood(
        "Workload API (unix socket)",
        companion,
        || unix_attack(&sock),
        None,
        {
            let rt = runtime();
            let endpoint = format!("unix://{}", sock.display());
            move || grpc_probe(&rt, &endpoint)
        },
    );

    let peer_at = |port| SocketAddr::new(PEER_IP.into(), port);
    under_flood(
        "edge proxy (outbound)",
        companion,
        || {
            attack(
                Some(ns.clone()),
                vec![
                    (peer_at(9000), Move::Idle),
                    (
                        peer_at(80),
                        Move::Request(b"GET /held HTTP/1.1\r\nHost: 10.77.0.1\r\n\r\n"),
                    ),
                    (peer_at(443), Move::Partial(TLS_PARTIAL)),
                    (
                        peer_at(80),
                        Move::Partial(b"GET /slow HTTP/1.1\r\nHost: 10.77.0.1\r\nX-Slow: "),
                    ),
                ],
            )
        },
        Some(ns.clone()),
        {
            let to = SocketAddr::new(PEER_IP.into(), 80);
            move || http_get(to, "10.77.0.1", "/probe", "")
        },
    );

    let inbound = SocketAddr::new(WORKLOAD_IP.into(), 8080);
    under_flood(
        "edge proxy (inbound)",
        companion,
        || {
            attack(
                Some(peer_ns.path()),
                vec![
                    (inbound, Move::Idle),
                    (
                        inbound,
                        Move::Partial(b"GET / HTTP/1.1\r\nHost: app\r\nX-Slow: "),
                    ),
                    (
                        inbound,
                        Move::Request(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n"),
                    ),
                ],
            )
        },
        Some(peer_ns.path()),
        {
            let to = SocketAddr::new(WORKLOAD_IP.into(), 8080);
            let auth = format!("Authorization: Bearer {token}\r\n");
            move || http_get(to, "app", "/probe", &auth)
        },
    );

    let peak = peak_rss_kib(companion);
    eprintln!("companion peak RSS over every flood: {peak} KiB");
    assert!(
        peak < RSS_BOUND_KIB,
        "the companion peaked at {peak} KiB, over the {RSS_BOUND_KIB} KiB bound"
    );
    assert!(alive(companion), "the companion survived");
    c.delete();
}
