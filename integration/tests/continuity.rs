//! Continuity across nhid restarts (issue 14, item 5): companions keep serving their cache
//! while nhid is away and the restarted nhid re-adopts them; what needs nhid is refused at once
//! with the reason; a companion nobody re-adopts exits after `orphan_timeout`; nobody but root
//! reaches a companion's re-adoption socket; a companion without a record is stopped.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nhi_integration::edge::{container_ns, in_netns};
use nhi_integration::*;

fn rules() -> String {
    format!(
        r#"{ANNOTATED_RULE}
[[grant]]
secrets = ["db"]
spiffe_ids = ["spiffe://{TRUST_DOMAIN}/container/*"]
"#
    )
}

/// What the load on one companion saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    /// Answered while nhid was down.
    ok_during_outage: u64,
    failures: Vec<String>,
}

/// Requests cached credentials (a JWT-SVID, the X.509-SVID, a secret) from the companion in
/// `pid`'s network namespace, one after the other, until `stop`.
fn load(
    pid: i32,
    stop: Arc<AtomicBool>,
    nhid_down: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Tally> {
    let ns = container_ns(pid);
    std::thread::spawn(move || {
        in_netns(&ns, move || {
            let mut t = Tally::default();
            let paths = ["/v1/token?audience=load", "/v1/x509", "/v1/secrets/db"];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let path = paths[i % paths.len()];
                i += 1;
                let down = nhid_down.load(Ordering::Relaxed);
                match companion_request("GET", path, "") {
                    Ok((200, _)) => {
                        t.ok += 1;
                        if down && nhid_down.load(Ordering::Relaxed) {
                            t.ok_during_outage += 1;
                        }
                    }
                    Ok((st, body)) => t.failures.push(format!("{path}: {st} {body}")),
                    Err(e) => t.failures.push(format!("{path}: {e}")),
                }
            }
            t
        })
    })
}

#[test]
fn kill_9_of_nhid_under_load_fails_no_cached_request_and_companions_are_readopted() {
    let mut node = Node::new(&rules());
    node.start();
    let out = node.nhictl(&["secret", "put", "db", "--from-stdin"], b"s3cret");
    assert!(out.status.success(), "{out:?}");
    let names = ["cont-a", "cont-b", "cont-c"];
    let cs: Vec<Container> = names.iter().map(|n| node.named_container(n)).collect();
    let pids: Vec<i32> = cs
        .iter()
        .map(|c| node.companion_pid(&c.id).unwrap())
        .collect();
    for c in &cs {
        for p in ["/v1/token?audience=load", "/v1/x509", "/v1/secrets/db"] {
            assert!(c.get(p).is_ok(), "warming {p} in {}", c.id);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let down = Arc::new(AtomicBool::new(false));
    let loads: Vec<_> = cs
        .iter()
        .map(|c| load(c.pid(), stop.clone(), down.clone()))
        .collect();
    std::thread::sleep(Duration::from_millis(300));

    // Crash: no shutdown of nhid runs.
    down.store(true, Ordering::Relaxed);
    node.kill();
    std::thread::sleep(Duration::from_millis(500));
    for p in &pids {
        assert!(alive(*p), "a companion died with nhid");
    }
    // What needs nhid is refused at once, with the reason.
    let t = Instant::now();
    let (st, body) = http_in_netns(cs[0].pid(), "GET", "/v1/token?audience=uncached");
    assert_eq!(st, 503, "{body}");
    assert!(body.contains("no connection to nhid"), "{body}");
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    // A container ends while nhid is down.
    cs[2].delete();

    let t = Instant::now();
    node.start();
    down.store(false, Ordering::Relaxed);
    eprintln!(
        "nhid restarted and re-adopted its companions in {:?}",
        t.elapsed()
    );
    assert_eq!(
        node.companion_pid(&cs[0].id),
        Some(pids[0]),
        "{}",
        node.log()
    );
    assert_eq!(node.companion_pid(&cs[1].id), Some(pids[1]));
    assert!(
        eventually(Duration::from_secs(5), || !alive(pids[2])),
        "the companion of the container that ended is stopped"
    );
    assert_eq!(node.status().workloads.len(), 2);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let tallies: Vec<Tally> = loads.into_iter().map(|h| h.join().unwrap()).collect();

    // Zero failures for cached credentials on the companions whose containers lived, before,
    // during and after the outage.
    for (name, t) in names.iter().zip(&tallies).take(2) {
        eprintln!(
            "{name}: {} requests answered, {} while nhid was down",
            t.ok, t.ok_during_outage
        );
        assert!(
            t.failures.is_empty(),
            "{name}: {:?}",
            &t.failures[..t.failures.len().min(5)]
        );
        assert!(
            t.ok_during_outage > 0,
            "{name}: no request ran during the outage"
        );
    }
    // Served through the new nhid again.
    for c in &cs[..2] {
        assert!(c.get("/v1/token?audience=uncached").is_ok());
    }
    assert!(node.log().contains("companion re-adopted"));
    for c in &cs[..2] {
        c.delete();
    }
    for p in &pids {
        assert!(!alive(*p));
    }
}

#[test]
fn an_orphaned_companion_exits_after_orphan_timeout_and_only_root_reaches_its_socket() {
    let mut node = Node::new(&rules());
    node.set_companion_option("orphan_timeout = \"3s\"");
    node.start();
    let c = node.named_container("orphan");
    let companion = node.companion_pid(&c.id).unwrap();
    let companion_uid = node.companion_uid(&c.id).to_string();
    assert!(c.get("/v1/token?audience=x").is_ok());
    let sockets: Vec<_> = std::fs::read_dir(node.state_dir.join("companions"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "sock"))
        .collect();
    assert_eq!(sockets.len(), 1, "one re-adoption socket per companion");

    node.kill();
    let gone_at = Instant::now();
    // Another process of the companion's uid (a compromised companion) cannot even reach the
    // socket a restarted nhid will use: its directory is root's alone.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid",
            &companion_uid,
            "--regid",
            &companion_uid,
            "--clear-groups",
            // The system's interpreter: one under root's home (pyenv) is out of that uid's reach.
            if std::path::Path::new("/usr/bin/python3").exists() {
                "/usr/bin/python3"
            } else {
                "python3"
            },
            "-c",
            "import socket,sys\ns=socket.socket(socket.AF_UNIX)\ntry:\n s.connect(sys.argv[1]); print('connected')\nexcept OSError as e:\n print(e.errno)",
        ])
        .arg(&sockets[0])
        .output()
        .expect("setpriv python3");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (nix::errno::Errno::EACCES as i32).to_string(),
        "{out:?}"
    );
    // It serves its cache meanwhile, then gives up.
    assert!(c.get("/v1/token?audience=x").is_ok());
    assert!(
        eventually(Duration::from_secs(10), || !alive(companion)),
        "the companion outlived orphan_timeout"
    );
    assert!(gone_at.elapsed() >= Duration::from_secs(3));
    // The next nhid finds it gone and starts a new one for the container that still runs.
    node.start();
    let new = node.companion_pid(&c.id).unwrap();
    assert_ne!(new, companion);
    assert!(c.get("/v1/token?audience=x").is_ok());
    // A companion whose record is lost (a full disk, an operator's cleanup) is not left holding
    // the namespace's ports: the next nhid stops it and starts a new one.
    node.kill();
    for e in std::fs::read_dir(node.state_dir.join("companions")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "json") {
            std::fs::remove_file(p).unwrap();
        }
    }
    node.start();
    assert!(!alive(new), "the unrecorded companion was stopped");
    let newest = node.companion_pid(&c.id).unwrap();
    assert_ne!(newest, new);
    assert!(c.get("/v1/token?audience=y").is_ok());
    c.delete();
}
