//! The audit log with real containers under runc: credential issuance and refusals land as
//! hash-chained records naming the workload (SPIFFE ID and container id) and never a secret's
//! value; 10,000 requests through one companion give exactly 10,000 records across rotated
//! files; `nhictl audit verify` names an edited, deleted or reordered record and a truncated
//! tail; a full queue's loss is itself a record; the Prometheus endpoint counts it all.

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nhi_integration::*;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node whose audit log rotates at `max_file_bytes`, with metrics on a free port.
fn node(audit: &str) -> (Node, u16) {
    let port = free_port();
    let mut node = Node::with_config(
        ANNOTATED_RULE,
        &format!("[audit]\n{audit}\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    node.append_config(&format!(
        r#"
[[grant]]
secrets = ["db-password"]
spiffe_ids = ["spiffe://{TRUST_DOMAIN}/container/alpha"]
"#
    ));
    node.start();
    (node, port)
}

fn audit_dir(node: &Node) -> PathBuf {
    node.state_dir.join("audit")
}

fn jwt_records(node: &Node) -> Vec<serde_json::Value> {
    node.audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "credential" && r["credential"]["name"] == "jwt-svid")
        .collect()
}

fn scrape(port: u16) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of one sample line (`name{labels} value`) in a scrape.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
}

fn verify(node: &Node, dir: &Path) -> (bool, String) {
    let out = node.nhictl(&["audit", "verify", "--dir", dir.to_str().unwrap()], b"");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// `GET /v1/token?audience=<prefix><i>` for i in `range`, over keep-alive connections from
/// `threads` threads inside the network namespace of `pid`. Returns how many answered 200.
fn tokens_in_netns(pid: i32, prefix: &str, range: std::ops::Range<u32>, threads: u32) -> u32 {
    let per = range.len() as u32 / threads;
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let ns = fs::File::open(format!("/proc/{pid}/ns/net")).unwrap();
            let prefix = prefix.to_string();
            let from = range.start + t * per;
            let to = if t == threads - 1 {
                range.end
            } else {
                from + per
            };
            std::thread::spawn(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                let s = TcpStream::connect("127.0.0.1:15100").expect("companion");
                let paths = (from..to).map(|i| format!("/v1/token?audience={prefix}{i}"));
                keep_alive_gets(s, "127.0.0.1", paths)
                    .into_iter()
                    .filter(|s| *s == 200)
                    .count() as u32
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

#[test]
fn credential_fetches_are_audited_with_identity_and_container_never_the_value() {
    let (node, port) = node("");
    let value = format!("pw-{}", unique_id("audit"));
    let put = node.nhictl(
        &["secret", "put", "db-password", "--from-stdin"],
        value.as_bytes(),
    );
    assert!(put.status.success(), "{put:?}");
    let a = node.named_container("alpha");
    let b = node.named_container("beta");
    let alpha = format!("spiffe://{TRUST_DOMAIN}/container/alpha");
    let beta = format!("spiffe://{TRUST_DOMAIN}/container/beta");

    assert_eq!(
        a.get_json("/v1/secrets/db-password")["value"],
        value.as_str()
    );
    a.get_json("/v1/token?audience=svc-a");
    a.get("/v1/x509").expect("x509");
    assert_eq!(
        http_in_netns(b.pid(), "GET", "/v1/secrets/db-password").0,
        403
    );
    assert_eq!(http_in_netns(a.pid(), "GET", "/v1/secrets/db-pass2").0, 403);

    let find = |id: &str, name: &str, decision: &str| {
        node.audit_records().into_iter().find(|r| {
            r["spiffe_id"] == id && r["credential"]["name"] == name && r["decision"] == decision
        })
    };
    // Every record so far is written before `tail --follow -n 0` below starts.
    assert!(
        eventually(Duration::from_secs(10), || find(
            &beta,
            "secret:db-password",
            "deny"
        )
        .is_some()
            && find(&alpha, "secret:db-pass2", "deny").is_some()),
        "refusal audited: {:?}",
        node.audit_records()
    );
    let got = find(&alpha, "secret:db-password", "allow").expect("delivery audited");
    assert_eq!(got["workload"]["container_id"], a.id.as_str());
    assert_eq!(got["workload"]["container_name"], "alpha");
    assert_eq!(got["credential"]["version"], "1");
    assert_eq!(got["kind"], "credential");
    let jwt = find(&alpha, "jwt-svid", "allow").expect("JWT-SVID audited");
    assert_eq!(jwt["detail"], "audience=svc-a");
    assert!(
        jwt["credential"]["version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "jti: {jwt}"
    );
    let x = find(&alpha, "x509-svid", "allow").expect("X.509-SVID audited");
    assert_eq!(x["workload"]["container_id"], a.id.as_str());
    let denied = find(&beta, "secret:db-password", "deny").unwrap();
    assert_eq!(denied["workload"]["container_id"], b.id.as_str());
    assert_eq!(denied["detail"], "not granted");

    // The value is nowhere in the log files; the files are root's alone.
    for e in fs::read_dir(audit_dir(&node)).unwrap() {
        let p = e.unwrap().path();
        let bytes = fs::read(&p).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&value),
            "secret value in {}",
            p.display()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    let (ok, out) = verify(&node, &audit_dir(&node));
    assert!(ok, "{out}");

    // tail --identity shows only that workload; the default dir comes from the config.
    let out = node.nhictl(&["audit", "tail", "-n", "100", "--identity", &beta], b"");
    assert!(out.status.success(), "{out:?}");
    let lines = String::from_utf8_lossy(&out.stdout);
    assert!(
        lines.lines().count() >= 1 && lines.lines().all(|l| l.contains(&beta)),
        "{lines}"
    );

    // tail --follow prints records as they are written.
    let mut follow = std::process::Command::new(bin("nhictl"))
        .args(["--config", node.config.to_str().unwrap()])
        .args(["audit", "tail", "--follow", "-n", "0", "--identity", &alpha])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        line
    });
    std::thread::sleep(Duration::from_millis(500));
    a.get_json("/v1/token?audience=followed");
    assert!(eventually(Duration::from_secs(10), || reader.is_finished()));
    let _ = follow.kill();
    let _ = follow.wait();
    let line = reader.join().unwrap();
    assert!(
        line.contains("audience=followed") && line.contains(&alpha),
        "{line}"
    );

    // The metrics endpoint, scraped for real.
    let text = scrape(port);
    for series in [
        format!(
            r#"nhi_audit_events_total{{spiffe_id="{beta}",kind="credential",decision="deny"}}"#
        ),
        r#"nhi_credential_issuance_total{credential="secret",decision="allow"}"#.to_string(),
        r#"nhi_credential_issuance_total{credential="jwt-svid",decision="allow"}"#.to_string(),
        r#"nhi_credential_issuance_seconds_count{credential="x509-svid"}"#.to_string(),
        "nhi_audit_records_written_total".to_string(),
    ] {
        assert!(
            sample(&text, &series).is_some_and(|v| v >= 1.0),
            "{series} in:\n{text}"
        );
    }
    assert_eq!(sample(&text, "nhi_attached_workloads"), Some(2.0), "{text}");
    a.delete();
    b.delete();
}

#[test]
fn ten_thousand_requests_make_exactly_ten_thousand_records_and_tampering_is_named() {
    // ~450-byte records, 1 MB segments: the 10,000 land in at least 3 files.
    let (mut node, _) = node("max_file_bytes = 1000000");
    let a = node.named_container("alpha");
    const N: u32 = 10_000;
    // Distinct audiences: each misses the companion's cache and is a real issuance by nhid.
    let t = std::time::Instant::now();
    let ok = tokens_in_netns(a.pid(), "a", 0..N, 4);
    eprintln!("{N} requests in {:?}", t.elapsed());
    assert_eq!(ok, N, "every request answered");
    assert!(
        eventually(Duration::from_secs(30), || jwt_records(&node).len() as u32
            >= N),
        "only {} records",
        jwt_records(&node).len()
    );
    let recs = jwt_records(&node);
    assert_eq!(recs.len() as u32, N, "exactly one record per request");
    let audiences: BTreeSet<String> = recs
        .iter()
        .map(|r| r["detail"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(audiences.len() as u32, N, "one record for each audience");
    assert!(recs
        .iter()
        .all(|r| r["workload"]["container_id"] == a.id.as_str()));
    assert!(
        !node.audit_records().iter().any(|r| r["kind"] == "dropped"),
        "nothing lost"
    );
    eprintln!("records after {:?}", t.elapsed());
    let dir = audit_dir(&node);
    let (ok, out) = verify(&node, &dir);
    eprintln!("verified after {:?}", t.elapsed());
    assert!(ok, "{out}");
    let files = fs::read_dir(&dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "jsonl")
        })
        .count();
    assert!(
        files >= 3,
        "rotation across at least 3 files, got {files}: {out}"
    );

    // nhid restarts (the container keeps running): the chain resumes, it does not break.
    node.stop();
    node.start();
    assert!(tokens_in_netns(a.pid(), "after-restart-", 0..10, 1) == 10);
    assert!(eventually(
        Duration::from_secs(10),
        || jwt_records(&node).len() as u32 == N + 10
    ));
    node.stop();
    let (ok, out) = verify(&node, &dir);
    assert!(
        ok && out.contains(&format!("{} records", node.audit_records().len())),
        "{out}"
    );

    // Tampering, each on its own copy of the log.
    let seg2 = "audit-00000002.jsonl";
    let tamper = |name: &str, f: &dyn Fn(&mut Vec<String>)| -> String {
        let copy = node.path(&format!("tamper-{name}"));
        fs::create_dir_all(&copy).unwrap();
        for e in fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
        }
        let target = copy.join(seg2);
        let mut lines: Vec<String> = fs::read_to_string(&target)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        f(&mut lines);
        fs::write(&target, lines.join("\n") + "\n").unwrap();
        let (ok, out) = verify(&node, &copy);
        assert!(!ok, "{name}: verify passed: {out}");
        out
    };
    let seq_at = |line: usize| -> u64 {
        let text = fs::read_to_string(dir.join(seg2)).unwrap();
        let r: serde_json::Value =
            serde_json::from_str(text.lines().nth(line - 1).unwrap()).unwrap();
        r["seq"].as_u64().unwrap()
    };
    let s100 = seq_at(100);
    let out = tamper("edit", &|l| l[99] = l[99].replace("\"allow\"", "\"deny\""));
    assert!(
        out.contains(&format!("{seg2}:100 (seq {s100}): record changed")),
        "{out}"
    );
    let out = tamper("delete", &|l| {
        l.remove(99);
    });
    assert!(
        out.contains(&format!("{seg2}:100 (seq {})", s100 + 1))
            && out.contains(&format!("seq {s100} is missing (dropped)")),
        "{out}"
    );
    let out = tamper("reorder", &|l| l.swap(99, 100));
    assert!(
        out.contains(&format!("{seg2}:100 (seq {})", s100 + 1)) && out.contains("out of order"),
        "{out}"
    );
    // Dropping a whole middle file, and cutting the log's tail.
    let copy = node.path("tamper-file");
    fs::create_dir_all(&copy).unwrap();
    for e in fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != seg2 {
            fs::copy(&p, copy.join(p.file_name().unwrap())).unwrap();
        }
    }
    let (ok, out) = verify(&node, &copy);
    assert!(
        !ok && out.contains(&format!("{seg2}: segment is missing")),
        "{out}"
    );
    let copy = node.path("tamper-tail");
    fs::create_dir_all(&copy).unwrap();
    let mut segs: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    for p in &segs {
        fs::copy(p, copy.join(p.file_name().unwrap())).unwrap();
    }
    let last = segs
        .iter()
        .rev()
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    let last = copy.join(last.file_name().unwrap());
    let text = fs::read_to_string(&last).unwrap();
    let kept: Vec<&str> = text.lines().collect();
    fs::write(&last, kept[..kept.len() - 2].join("\n") + "\n").unwrap();
    let (ok, out) = verify(&node, &copy);
    assert!(!ok && out.contains("log truncated"), "{out}");

    // nhid restarted on a cut log never appends to it: a new segment opens with a chain_break
    // record, and verify keeps naming both the gap and the break.
    let real_last = dir.join(last.file_name().unwrap());
    let text = fs::read_to_string(&real_last).unwrap();
    let kept: Vec<&str> = text.lines().collect();
    fs::write(&real_last, kept[..kept.len() - 2].join("\n") + "\n").unwrap();
    node.start();
    assert_eq!(tokens_in_netns(a.pid(), "after-break-", 0..3, 1), 3);
    assert!(
        node.log().contains("audit log chain is broken"),
        "{}",
        node.log()
    );
    node.stop();
    let breaks: Vec<serde_json::Value> = node
        .audit_records()
        .into_iter()
        .filter(|r| r["kind"] == "chain_break")
        .collect();
    assert_eq!(breaks.len(), 1, "{breaks:?}");
    assert!(breaks[0]["detail"].as_str().unwrap().contains("truncated"));
    let (ok, out) = verify(&node, &dir);
    assert!(
        !ok && out.contains("are missing (dropped)") && out.contains("broken when it started"),
        "{out}"
    );
    a.delete();
}

#[test]
fn a_full_queue_loses_events_only_with_a_dropped_record_and_exact_accounting() {
    // A 1-slot queue with an fsync per record: the writer falls behind for sure.
    let (node, port) = node("queue = 1\nfsync = \"always\"");
    let a = node.named_container("alpha");
    let mut issued = 0;
    let mut round = 0;
    let lost = |node: &Node| -> u64 {
        node.audit_records()
            .iter()
            .filter(|r| r["kind"] == "dropped")
            .map(|r| r["dropped"].as_u64().unwrap())
            .sum()
    };
    while round < 5 && lost(&node) == 0 {
        issued += tokens_in_netns(a.pid(), &format!("r{round}-"), 0..400, 8);
        round += 1;
        std::thread::sleep(Duration::from_millis(1500));
    }
    let lost = lost(&node);
    assert!(
        lost > 0,
        "a 1-slot queue never overflowed in {round} rounds"
    );
    let written = jwt_records(&node).len() as u64;
    assert_eq!(
        written + lost,
        issued as u64,
        "every issuance is a record or counted in a dropped record"
    );
    let dropped = node
        .audit_records()
        .into_iter()
        .find(|r| r["kind"] == "dropped")
        .unwrap();
    assert!(dropped["detail"]
        .as_str()
        .unwrap()
        .contains("nhid's audit queue was full"));
    assert!(dropped.get("spiffe_id").is_none(), "nhid's own record");
    let (ok, out) = verify(&node, &audit_dir(&node));
    assert!(ok, "{out}");
    let text = scrape(port);
    assert_eq!(
        sample(&text, r#"nhi_audit_dropped_total{source="nhid"}"#),
        Some(lost as f64),
        "{text}"
    );
    a.delete();
}

/// A tmpfs mounted on `dir` for the test's length (lazily unmounted, even on a panic).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let st = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success(), "remount {}", self.0.display());
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// (events written, events counted as lost by `dropped` records) in the log at `dir`.
fn written_and_lost(dir: &Path) -> (u64, u64) {
    let recs: Vec<serde_json::Value> = nhi_core::audit_log::tail(dir, usize::MAX, None)
        .unwrap()
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let written = recs
        .iter()
        .filter(|r| r["kind"] != "dropped" && r["kind"] != "chain_break")
        .count() as u64;
    let lost = recs.iter().filter_map(|r| r["dropped"].as_u64()).sum();
    (written, lost)
}

#[test]
fn a_full_audit_disk_loses_records_only_counted_never_looking_tampered_and_issuance_goes_on() {
    let port = free_port();
    let base = tempfile::Builder::new()
        .prefix("nhi-it-audit-tmpfs-")
        .tempdir()
        .unwrap();
    let dir = base.path().join("audit");
    // Room for a few hundred records: the load below fills it.
    let tmpfs = Tmpfs::mount(&dir, "128k");
    let mut node = Node::with_config(
        ANNOTATED_RULE,
        &format!(
            "[audit]\ndir = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            dir.display()
        ),
    );
    node.start();
    let a = node.named_container("alpha");
    assert_eq!(tokens_in_netns(a.pid(), "before-", 0..5, 1), 5);
    assert!(eventually(Duration::from_secs(10), || written_and_lost(
        &dir
    )
    .0 >= 5));
    let before = written_and_lost(&dir).0;

    // 2,000 issuances (distinct audiences: each one is nhid's), the disk full after a few
    // hundred: nhid keeps issuing every one.
    const N: u32 = 2000;
    let issued = tokens_in_netns(a.pid(), "full-", 0..N, 4);
    assert_eq!(issued, N, "issuance never waits for the audit disk");
    let mid = scrape(port);
    let lost_now = sample(&mid, r#"nhi_audit_dropped_total{source="disk"}"#).unwrap_or(0.0);
    assert!(lost_now > 0.0, "the disk never filled:\n{mid}");
    assert!(sample(&mid, "nhi_audit_write_errors_total").unwrap_or(0.0) > 0.0);

    // Space returns; the next batch writes the count of what was lost, then goes on.
    tmpfs.resize("16m");
    assert_eq!(tokens_in_netns(a.pid(), "after-", 0..10, 1), 10);
    let expected = before + u64::from(N) + 10;
    assert!(
        eventually(Duration::from_secs(15), || {
            let (w, l) = written_and_lost(&dir);
            w + l >= expected
        }),
        "written + lost = {:?}, expected {expected}",
        written_and_lost(&dir)
    );
    let text = scrape(port);
    node.stop();
    let (written, lost) = written_and_lost(&dir);
    assert!(
        lost > 0 && written < expected,
        "{written} written, {lost} lost"
    );
    assert_eq!(
        written + lost,
        expected,
        "every issuance is a record or counted in a dropped record, exactly"
    );
    assert_eq!(
        sample(&text, r#"nhi_audit_dropped_total{source="disk"}"#),
        Some(lost as f64),
        "the metrics show the loss: {text}"
    );
    let (ok, out) = verify(&node, &dir);
    eprintln!("{written} written, {lost} lost; verify says:\n{out}");
    assert!(ok, "loss must not look like tampering: {out}");
    assert!(
        out.contains("loss:")
            && out.contains("not written to the log")
            && out.contains("No space left on device")
            && out.contains(&format!("{lost} events lost and counted")),
        "{out}"
    );
    for word in [
        "changed",
        "out of order",
        "missing",
        "truncated",
        "not a valid record",
    ] {
        assert!(!out.contains(word), "{word}: {out}");
    }
    a.delete();
}
