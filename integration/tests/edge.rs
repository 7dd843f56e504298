//! Edge policy with real containers under runc and real traffic: nhid's nftables rules in the
//! container's network namespace send its outbound TCP through the companion, which allows,
//! resets or answers 403 by L4, TLS SNI (real handshakes) and HTTP method/path; test upstreams
//! in a peer namespace (over a veth pair) count what reaches them. Brokered credentials reach
//! the upstream and never the workload; inbound rules demand a valid, unrevoked JWT-SVID from
//! an allowed identity; SIGHUP reloads policies for new connections without restarting anything.
//!
//! Size: one test binary per capability; each test here is one attack or one rule shape, with
//! its own node and upstreams.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use nhi_integration::edge::*;
use nhi_integration::*;

fn at(port: u16) -> SocketAddr {
    SocketAddr::new(PEER_IP.into(), port)
}

/// A node whose containers named `name` get `container/<name>` and `policy` (TOML) applies.
fn node(policy: &str) -> Node {
    let mut node = Node::new(ANNOTATED_RULE);
    node.append_config(policy);
    node.start();
    node
}

fn short(prefix: &str) -> String {
    // Named netns: keep names short and unique per test process.
    unique_id(prefix)
}

const L4_SNI_HTTP: &str = r#"
[[policy]]
id = "edge"
spiffe_ids = ["spiffe://example.org/container/edge-web"]
default = "deny"
dns = ["10.77.0.1"]
[[policy.egress]]
id = "no-admin"
action = "deny"
ports = [8080]
path_prefix = "/admin"
[[policy.egress]]
id = "http-get"
action = "allow"
ports = [8080, 8081]
methods = ["GET"]
[[policy.egress]]
id = "tls-ok"
action = "allow"
ports = [8443]
sni = "*.allowed.test"
[[policy.egress]]
id = "l4-ok"
action = "allow"
cidr = ["10.77.0.0/24"]
ports = [9000]
"#;

fn nft_in(ns: &NamedNs) -> String {
    let out = ns.exec("nft", &["list", "table", "inet", "nhi"]);
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        String::new()
    }
}

#[test]
fn egress_by_l4_sni_and_http_and_rules_only_in_the_workload_netns() {
    let node = node(L4_SNI_HTTP);
    let host_before = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    let c = node.named_container("edge-web");
    let pid = c.pid();
    let peer = peer(&short("edgep"), pid);
    let named = NamedNs::attach(&short("edgec"), pid);
    let ns = container_ns(pid);

    // The rules are in the container's namespace, not the host's; the companion is exempt by
    // its cgroup, never by a uid.
    let rules = nft_in(&named);
    assert!(rules.contains("redirect to :15001"), "{rules}");
    assert!(rules.contains("socket cgroupv2 level 3"), "{rules}");
    assert!(!rules.contains("skuid"), "{rules}");
    let host_after = Command::new("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    assert_eq!(
        host_before.stdout, host_after.stdout,
        "the host's ruleset is untouched"
    );

    // L4: 9000 allowed, 9001 denied by default (reset; the upstream never sees it).
    let allowed = echo_server(listen_in(&peer.path(), at(9000)));
    let denied = echo_server(listen_in(&peer.path(), at(9001)));
    assert_eq!(tcp_echo(&ns, at(9000), "ping").unwrap(), "ping");
    let e = tcp_echo(&ns, at(9001), "ping").unwrap_err();
    assert!(
        e.contains("reset") || e.contains("failed to fill") || e.contains("broken"),
        "{e}"
    );
    assert_eq!(allowed.connections(), 1);
    assert_eq!(
        denied.connections(),
        0,
        "denied traffic never reaches the upstream"
    );

    // SNI: a real TLS handshake through the proxy for an allowed name (which resolves to the
    // upstream's address at the policy's resolver), none for another.
    let _dns = dnsmasq(&peer, PEER_IP, &[("api.allowed.test", PEER_IP)], 60);
    let (cert, key) = test_cert(&["api.allowed.test", "evil.test"]);
    let tls = tls_server(listen_in(&peer.path(), at(8443)), cert.clone(), key);
    assert_eq!(
        tls_echo(&ns, at(8443), "api.allowed.test", cert.clone()).unwrap(),
        "hello over tls\n"
    );
    assert!(tls_echo(&ns, at(8443), "evil.test", cert).is_err());
    assert_eq!(
        tls.connections(),
        1,
        "the denied handshake never reached it"
    );

    // HTTP: per request, by method and path; denials are 403 JSON naming the rule.
    let web = http_server(listen_in(&peer.path(), at(8080)));
    let (status, body) = http(&ns, at(8080), "GET", "/hello", &[]).unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    let (status, body) = http(&ns, at(8080), "GET", "/admin/users", &[]).unwrap();
    assert_eq!(status, 403, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["rule"], "no-admin", "{v}");
    let (status, body) = http(&ns, at(8080), "POST", "/hello", &[]).unwrap();
    assert_eq!(status, 403, "{body}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body).unwrap()["policy"],
        "edge"
    );
    // The workload's own process (busybox wget) goes through the proxy too.
    let out = c.exec(&["wget", "-qO-", "http://10.77.0.1:8080/from-wget"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok", "{out:?}");
    let seen = web.requests();
    assert_eq!(seen.len(), 2, "only allowed requests arrive: {seen:?}");
    assert!(seen[0].starts_with("GET /hello "), "{seen:?}");
    assert!(seen[1].starts_with("GET /from-wget "), "{seen:?}");

    // An upgrade (a WebSocket handshake) an allowed request asks for: the 101 and every byte
    // after it pass.
    let sockets = upgrade_server(listen_in(&peer.path(), at(8081)));
    assert_eq!(
        upgrade_echo(&ns, at(8081), "websocket", &[], "after the upgrade"),
        Ok((
            "HTTP/1.1 101 Switching Protocols".to_string(),
            "after the upgrade".to_string()
        ))
    );
    assert!(sockets.requests()[0].starts_with("GET /socket "));
    // Recorded when it ended, with what it carried each way.
    assert!(
        eventually(Duration::from_secs(5), || node.audit_records().iter().any(
            |r| {
                r["kind"] == "http_request"
                    && r["destination"]["path"] == "/socket"
                    && r["detail"]
                        .as_str()
                        .is_some_and(|d| d.contains("switched to WebSocket"))
                    && r["bytes_out"] == 17
                    && r["bytes_in"] == 17
            }
        )),
        "no WebSocket record with its bytes: {:?}",
        node.audit_records()
    );
    // Any other upgrade (`h2c`: every later request would pass as HTTP/2 bytes, past the
    // per-request rules) is taken out: the request goes on as a plain one.
    assert_eq!(
        upgrade_echo(
            &ns,
            at(8081),
            "h2c",
            &[("HTTP2-Settings", "AAMAAABkAAQAAP__")],
            "xy"
        ),
        Ok(("HTTP/1.1 200 OK".to_string(), "ok".to_string()))
    );
    let head = &sockets.requests()[1];
    assert!(
        !head.to_ascii_lowercase().contains("upgrade")
            && !head.to_ascii_lowercase().contains("http2-settings"),
        "{head}"
    );

    // Loopback stays direct: the companion's own API still answers.
    assert!(c.get("/healthz").is_ok());

    // Detach removes the rules (the namespace itself outlives the container via our handle).
    c.delete();
    assert!(
        eventually(Duration::from_secs(5), || nft_in(&named).is_empty()),
        "rules still there after detach: {}",
        nft_in(&named)
    );
    assert!(node.log().contains("edge policy rules removed"));
}

#[test]
fn brokered_secret_reaches_the_upstream_and_never_the_workload() {
    let node = node(
        r#"
[[policy]]
id = "broker"
spiffe_ids = ["spiffe://example.org/container/edge-broker"]
default = "deny"
[[policy.egress]]
id = "api"
ports = [8080]
host = "10.77.0.1"
broker = { secret = "edge-api-token", header = "authorization", format = "Bearer {value}" }
[[policy.egress]]
id = "svid"
ports = [8081]
broker = { jwt_audience = "upstream-api", header = "x-svid", format = "{value}" }
"#,
    );
    let value = format!("tok-{}", unique_id("v"));
    let out = node.nhictl(
        &["secret", "put", "edge-api-token", "--from-stdin"],
        value.as_bytes(),
    );
    assert!(out.status.success(), "{out:?}");
    let c = node.named_container("edge-broker");
    let pid = c.pid();
    let peer = peer(&short("edgeb"), pid);
    let web = http_server(listen_in(&peer.path(), at(8080)));

    // The application (busybox wget) sends no credential; the upstream receives one.
    let out = c.exec(&["wget", "-qO-", "http://10.77.0.1:8080/v1/charge"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok", "{out:?}");
    let seen = web.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(
        seen[0].to_ascii_lowercase().contains(&format!(
            "authorization: bearer {}",
            value.to_ascii_lowercase()
        )),
        "{seen:?}"
    );

    // The workload cannot read it: not in its environment, no file, /v1/secrets refuses.
    let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&env).contains(&value));
    let (status, body) = http_in_netns(pid, "GET", "/v1/secrets/edge-api-token");
    assert_eq!(status, 403, "{body}");
    let ls = c.exec(&["ls", "/run/nhi/secrets/"]);
    assert!(!String::from_utf8_lossy(&ls.stdout).contains("edge-api-token"));
    let grep = c.exec(&[
        "sh",
        "-c",
        &format!("cat /run/nhi/* /run/nhi/*/* 2>/dev/null | grep -c {value} || true"),
    ]);
    assert_eq!(String::from_utf8_lossy(&grep.stdout).trim(), "0");
    // A JWT-SVID of the workload for the rule's audience is brokerable too.
    let svid = http_server(listen_in(&peer.path(), at(8081)));
    let out = c.exec(&["wget", "-qO-", "http://10.77.0.1:8081/x"]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok", "{out:?}");
    let head = svid.requests().remove(0);
    let token = head
        .lines()
        .find_map(|l| l.strip_prefix("x-svid: "))
        .unwrap_or_else(|| panic!("no x-svid header: {head}"))
        .trim()
        .to_string();
    use base64::Engine;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token.split('.').nth(1).unwrap())
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["sub"], "spiffe://example.org/container/edge-broker");
    assert_eq!(claims["aud"], serde_json::json!(["upstream-api"]));
    assert!(!node.log().contains(&value), "secret value in nhid's log");
    assert!(node.log().contains("delivered brokered secret"));
    // Audited like any issuance (name, version, the rule; never the value), and the proxied
    // request records which credential it carried.
    assert!(
        eventually(Duration::from_secs(5), || node.audit_records().iter().any(
            |r| {
                r["kind"] == "credential"
                    && r["credential"]["name"] == "secret:edge-api-token"
                    && r["credential"]["version"] == "1"
                    && r["detail"] == "brokered by rule api"
            }
        )),
        "no brokered-secret record: {:?}",
        node.audit_records()
    );
    assert!(
        eventually(Duration::from_secs(5), || node.audit_records().iter().any(
            |r| {
                r["kind"] == "http_request"
                    && r["destination"]["path"] == "/v1/charge"
                    && r["credential"]["name"]
                        .as_str()
                        .is_some_and(|n| n.contains("edge-api-token"))
            }
        )),
        "no request record naming the injected credential: {:?}",
        node.audit_records()
    );
    let audit_files = std::fs::read_dir(node.state_dir.join("audit")).unwrap();
    for f in audit_files {
        let text = std::fs::read_to_string(f.unwrap().path()).unwrap();
        assert!(!text.contains(&value), "secret value in the audit log");
    }
    c.delete();
}

#[test]
fn inbound_requires_a_valid_unrevoked_jwt_svid_from_an_allowed_identity() {
    let node = node(
        r#"
[[policy]]
id = "inbound"
spiffe_ids = ["spiffe://example.org/container/edge-app"]
default = "allow"
[[policy.inbound]]
id = "callers"
ports = [8080, 8081]
allow = ["spiffe://example.org/container/edge-caller"]
audience = "edge-app"
"#,
    );
    let app = node.named_container("edge-app");
    let caller = node.named_container("edge-caller");
    let other = node.named_container("edge-other");
    let pid = app.pid();
    // The application listens on loopback inside its namespace.
    let served = http_server(listen_in(
        &container_ns(pid),
        "127.0.0.1:8080".parse().unwrap(),
    ));
    let peer = peer(&short("edgei"), pid);
    let to_app = SocketAddr::new(WORKLOAD_IP.into(), 8080);
    let token = |c: &Container| {
        c.get_json("/v1/token?audience=edge-app")["token"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let call = |tok: Option<&str>| {
        let auth = tok.map(|t| format!("Bearer {t}"));
        let headers: Vec<(&str, &str)> = auth
            .as_deref()
            .map(|a| vec![("Authorization", a)])
            .unwrap_or_default();
        http(&peer.path(), to_app, "GET", "/inside", &headers).unwrap()
    };

    assert_eq!(call(None).0, 401);
    assert_eq!(call(Some("not-a-jwt")).0, 403);
    let (status, body) = call(Some(&token(&other)));
    assert_eq!(
        status, 403,
        "a valid token of an identity not allowed: {body}"
    );
    assert_eq!(served.connections(), 0, "refused calls never reach the app");

    let good = token(&caller);
    let (status, body) = call(Some(&good));
    assert_eq!((status, body.as_str()), (200, "ok"));
    assert_eq!(served.requests().len(), 1);
    // An allowed caller's WebSocket (an upgrade the app accepts) goes on after the 101; one
    // without a token never reaches the app.
    let sockets = upgrade_server(listen_in(
        &container_ns(pid),
        "127.0.0.1:8081".parse().unwrap(),
    ));
    let to_sockets = SocketAddr::new(WORKLOAD_IP.into(), 8081);
    let bearer = format!("Bearer {good}");
    assert_eq!(
        upgrade_echo(
            &peer.path(),
            to_sockets,
            "websocket",
            &[("Authorization", &bearer)],
            "frames"
        ),
        Ok((
            "HTTP/1.1 101 Switching Protocols".to_string(),
            "frames".to_string()
        ))
    );
    let refused = upgrade_echo(&peer.path(), to_sockets, "websocket", &[], "frames");
    assert!(
        refused
            .as_ref()
            .is_ok_and(|(status, _)| status.starts_with("HTTP/1.1 401")),
        "{refused:?}"
    );
    assert_eq!(sockets.connections(), 1);

    // Revoked: the same token is refused.
    let out = node.nhictl(&["revoke", "--workload", &caller.id], b"");
    assert!(out.status.success(), "{out:?}");
    let (status, body) = call(Some(&good));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    assert_eq!(served.requests().len(), 1);
    for c in [&app, &caller, &other] {
        c.delete();
    }
}

#[test]
fn sighup_reloads_policy_for_new_connections_without_restarting_the_container() {
    let policy = |port: u16| {
        format!(
            r#"
[[policy]]
id = "reload"
spiffe_ids = ["spiffe://example.org/container/edge-reload"]
default = "deny"
[[policy.egress]]
id = "only"
ports = [{port}]
"#
        )
    };
    let node = node(&policy(9000));
    let c = node.named_container("edge-reload");
    // Not covered at first: untouched until a reload gives it a policy.
    let late = node.named_container("edge-late");
    let late_peer = peer(&short("edgel"), late.pid());
    let late_ns = container_ns(late.pid());
    let late_named = NamedNs::attach(&short("edgen"), late.pid());
    echo_server(listen_in(&late_peer.path(), at(9000)));
    let late_9001 = echo_server(listen_in(&late_peer.path(), at(9001)));
    assert!(nft_in(&late_named).is_empty(), "no policy, no rules");
    assert!(tcp_echo(&late_ns, at(9000), "x").is_ok());
    let pid = c.pid();
    let companion = node.companion_pid(&c.id).unwrap();
    let peer = peer(&short("edger"), pid);
    let ns = container_ns(pid);
    let a = echo_server(listen_in(&peer.path(), at(9000)));
    let b = echo_server(listen_in(&peer.path(), at(9001)));
    assert!(tcp_echo(&ns, at(9000), "x").is_ok());
    assert!(tcp_echo(&ns, at(9001), "x").is_err());

    let cfg = std::fs::read_to_string(&node.config).unwrap();
    std::fs::write(
        &node.config,
        cfg.replace("ports = [9000]", "ports = [9001]").replace(
            "spiffe_ids = [\"spiffe://example.org/container/edge-reload\"]",
            "spiffe_ids = [\"spiffe://example.org/container/edge-reload\", \"spiffe://example.org/container/edge-late\"]",
        ),
    )
    .unwrap();
    node.reload();
    assert!(
        eventually(Duration::from_secs(5), || tcp_echo(&ns, at(9001), "y")
            .is_ok()),
        "reload did not allow 9001: {}",
        node.log()
    );
    assert!(tcp_echo(&ns, at(9000), "x").is_err());
    assert_eq!(a.connections(), 1);
    assert!(b.connections() >= 1);
    assert_eq!(c.pid(), pid, "the container was not restarted");
    assert_eq!(node.companion_pid(&c.id), Some(companion));
    // The newly covered workload is intercepted now: its rules exist and 9000 is denied.
    assert!(
        eventually(Duration::from_secs(5), || tcp_echo(&late_ns, at(9000), "x")
            .is_err()),
        "edge-late not intercepted after reload: {}",
        node.log()
    );
    assert!(nft_in(&late_named).contains("redirect to :15001"));
    // ... and its companion, which had nothing to proxy before, now proxies what is allowed.
    assert_eq!(
        tcp_echo(&late_ns, at(9001), "via proxy").unwrap(),
        "via proxy"
    );
    assert_eq!(late_9001.connections(), 1);

    // A config that no longer loads keeps the current policy.
    std::fs::write(&node.config, "not toml").unwrap();
    node.reload();
    std::thread::sleep(Duration::from_millis(300));
    assert!(tcp_echo(&ns, at(9001), "z").is_ok());
    assert!(node.log().contains("keeping the current policies"));
    std::fs::write(&node.config, cfg).unwrap();
    c.delete();
    late.delete();
}

#[test]
fn rules_fail_closed_while_nhid_restarts_and_come_back_with_the_companion() {
    let mut node = node(
        r#"
[[policy]]
id = "restart"
spiffe_ids = ["spiffe://example.org/container/edge-restart"]
default = "deny"
[[policy.egress]]
id = "only"
ports = [9000]
"#,
    );
    let c = node.named_container("edge-restart");
    let pid = c.pid();
    let peer = peer(&short("edgeq"), pid);
    let ns = container_ns(pid);
    let up = echo_server(listen_in(&peer.path(), at(9000)));
    let other = echo_server(listen_in(&peer.path(), at(9001)));
    assert!(tcp_echo(&ns, at(9000), "a").is_ok());

    // nhid down: its companion keeps enforcing the policy it has.
    let companion = node.companion_pid(&c.id).unwrap();
    node.stop();
    assert!(tcp_echo(&ns, at(9000), "b").is_ok());
    assert!(tcp_echo(&ns, at(9001), "b").is_err());
    // The companion down too: the rules stay, so nothing leaves unchecked.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(companion),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(eventually(Duration::from_secs(5), || !alive(companion)));
    assert!(tcp_echo(&ns, at(9000), "c").is_err());
    assert!(tcp_echo(&ns, at(9001), "c").is_err());
    node.start();
    assert!(
        eventually(Duration::from_secs(10), || tcp_echo(&ns, at(9000), "d")
            .is_ok()),
        "{}",
        node.log()
    );
    assert!(tcp_echo(&ns, at(9001), "e").is_err());
    assert_eq!(other.connections(), 0);
    assert_eq!(up.connections(), 3);
    c.delete();
}

const AUDITED_HTTP: &str = r#"
[[policy]]
id = "audited"
spiffe_ids = ["spiffe://example.org/container/edge-audit"]
default = "deny"
[[policy.egress]]
id = "no-admin"
action = "deny"
ports = [8080]
path_prefix = "/admin"
[[policy.egress]]
id = "web"
action = "allow"
ports = [8080]
methods = ["GET"]
"#;

/// `n` HTTP/1.1 requests over one keep-alive connection from inside `ns`; every tenth goes to
/// `/admin/...` (denied by the proxy with a 403, the connection stays up). Returns the statuses.
fn keep_alive_requests(ns: &std::path::Path, addr: SocketAddr, tag: u32, n: u32) -> Vec<u16> {
    in_netns(ns, move || {
        let s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        let paths = (0..n).map(move |i| {
            if i % 10 == 9 {
                format!("/admin/{tag}/{i}")
            } else {
                format!("/ok/{tag}/{i}")
            }
        });
        keep_alive_gets(s, &addr.to_string(), paths)
    })
}

#[test]
fn ten_thousand_proxied_requests_make_exactly_ten_thousand_chained_audit_records() {
    let mut node = Node::with_config(ANNOTATED_RULE, "[audit]\nmax_file_bytes = 1000000\n");
    node.append_config(AUDITED_HTTP);
    node.start();
    let c = node.named_container("edge-audit");
    let pid = c.pid();
    let peer = peer(&short("edgea"), pid);
    let web = http_server(listen_in(&peer.path(), at(8080)));
    let ns = container_ns(pid);

    const THREADS: u32 = 4;
    const PER: u32 = 2_500;
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let ns = ns.clone();
            std::thread::spawn(move || keep_alive_requests(&ns, at(8080), t, PER))
        })
        .collect();
    let statuses: Vec<u16> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert_eq!(statuses.len(), 10_000);
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 9_000);
    assert_eq!(statuses.iter().filter(|s| **s == 403).count(), 1_000);
    assert_eq!(web.requests().len(), 9_000, "denied requests never arrive");

    let http_records = |node: &Node| -> Vec<serde_json::Value> {
        node.audit_records()
            .into_iter()
            .filter(|r| r["kind"] == "http_request")
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(30), || http_records(&node).len()
            >= 10_000),
        "only {} records",
        http_records(&node).len()
    );
    let recs = http_records(&node);
    assert_eq!(recs.len(), 10_000, "exactly one record per request");
    assert!(
        !node.audit_records().iter().any(|r| r["kind"] == "dropped"),
        "nothing lost"
    );
    // Every request is there once, attributed by nhid to this container, with its decision.
    let paths: std::collections::BTreeSet<&str> = recs
        .iter()
        .map(|r| r["destination"]["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), 10_000, "one record for each distinct request");
    for r in &recs {
        assert_eq!(r["workload"]["container_id"], c.id.as_str(), "{r}");
        assert_eq!(
            r["spiffe_id"], "spiffe://example.org/container/edge-audit",
            "{r}"
        );
        let path = r["destination"]["path"].as_str().unwrap();
        let (decision, rule) = if path.starts_with("/admin/") {
            ("deny", "no-admin")
        } else {
            ("allow", "web")
        };
        assert_eq!(
            (r["decision"].as_str(), r["rule"].as_str()),
            (Some(decision), Some(rule)),
            "{r}"
        );
        assert_eq!(r["destination"]["method"], "GET", "{r}");
    }

    let dir = node.state_dir.join("audit");
    let out = node.nhictl(&["audit", "verify", "--dir", dir.to_str().unwrap()], b"");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The cgroup path nhid gave the companion of `c` (from the companion's /proc).
fn companion_cgroup(node: &Node, c: &Container) -> String {
    let pid = node.companion_pid(&c.id).expect("companion");
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    cg.lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or_else(|| panic!("no cgroup v2 line: {cg}"))
        .to_string()
}

/// A bound of the companion's cgroup: v2 file if the v2 hierarchy has it, else the v1 one.
fn cgroup_bound(path: &str, v2: &str, v1: &str) -> String {
    for dir in cgroup_dirs(path) {
        for f in [v2, v1] {
            if let Ok(v) = std::fs::read_to_string(dir.join(f)) {
                return v.trim().to_string();
            }
        }
    }
    panic!("no {v2}/{v1} for cgroup {path}")
}

const BY_UID: &str = r#"
[[policy]]
id = "uid"
spiffe_ids = ["spiffe://example.org/container/edge-uid"]
default = "deny"
[[policy.egress]]
id = "only-9000"
ports = [9000]
"#;

/// Issue 13, "by uid": the companion used to be exempt from interception by its uid, so any
/// process of the workload running as that uid (root can setuid to it) left unchecked. Now it is
/// exempt by its cgroup: a process with the companion's uid is intercepted like any other, the
/// companion's own connections still leave, and no workload process can join that cgroup.
#[test]
fn the_companion_is_exempt_by_its_cgroup_and_its_uid_gives_a_workload_nothing() {
    let mut node = Node::new(ANNOTATED_RULE);
    // [companion.cgroup] must sit in the [companion] table the harness wrote: merge it there.
    let cfg = std::fs::read_to_string(&node.config).unwrap();
    let cfg = cfg.replacen(
        "[companion.cgroup]\n",
        "[companion.cgroup]\nmemory_max = \"96M\"\npids_max = 48\n",
        1,
    );
    std::fs::write(&node.config, cfg).unwrap();
    node.append_config(BY_UID);
    node.start();
    let c = node.named_container("edge-uid");
    let pid = c.pid();
    let peer = peer(&short("edgeu"), pid);
    let allowed = http_server(listen_in(&peer.path(), at(9000)));
    let denied = http_server(listen_in(&peer.path(), at(9001)));

    // The companion runs in a cgroup of its own, with the configured bounds.
    let cg = companion_cgroup(&node, &c);
    let inode = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .unwrap();
    assert_eq!(cg, format!("{}/c-{inode}", node.cgroup_parent));
    assert_eq!(
        cgroup_bound(&cg, "memory.max", "memory.limit_in_bytes"),
        (96u64 << 20).to_string()
    );
    assert_eq!(cgroup_bound(&cg, "pids.max", "pids.max"), "48");
    let companion = node.companion_pid(&c.id).unwrap();
    for dir in cgroup_dirs(&cg) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert_eq!(procs.trim(), companion.to_string(), "{}", dir.display());
    }

    let wget = |user: Option<&str>, port: u16| {
        let url = format!("http://10.77.0.1:{port}/as-{}", user.unwrap_or("root"));
        let mut args = vec!["exec"];
        if let Some(u) = user {
            args.extend(["--user", u]);
        }
        args.extend([c.id.as_str(), "timeout", "10", "wget", "-qO-", url.as_str()]);
        runc(&node.runc_root, &args)
    };
    // Allowed traffic leaves through the companion (whose own connection is the exempt one).
    let out = wget(None, 9000);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ok", "{out:?}");
    // Denied for root, for an ordinary uid and for the companion's own uid alike.
    let companion_uid = {
        let u = node.companion_uid(&c.id);
        format!("{u}:{u}")
    };
    for user in [None, Some("1000:1000"), Some(companion_uid.as_str())] {
        let out = wget(user, 9001);
        assert!(
            !out.status.success(),
            "{user:?} reached a denied port: {out:?}"
        );
        let out = wget(user, 9000);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "ok",
            "{user:?}: {out:?}"
        );
    }
    assert_eq!(denied.connections(), 0, "nothing reached the denied port");
    assert_eq!(allowed.requests().len(), 4);

    // No workload process can join the companion's cgroup: root in the container cannot see
    // the hierarchy, write to it, or mount it.
    let leaf = cg.trim_start_matches('/');
    for attempt in [
        format!("echo $$ > /sys/fs/cgroup/unified/{leaf}/cgroup.procs"),
        format!("echo $$ > /sys/fs/cgroup/{leaf}/cgroup.procs"),
        "mount -t cgroup2 none /tmp".to_string(),
        "mount -t cgroup -o memory none /tmp".to_string(),
    ] {
        let out = c.exec(&["sh", "-c", &attempt]);
        assert!(!out.status.success(), "{attempt}: {out:?}");
    }
    for dir in cgroup_dirs(&cg) {
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert_eq!(
            procs.trim(),
            companion.to_string(),
            "only the companion in it"
        );
    }

    // The cgroup goes with the companion.
    c.delete();
    assert!(
        eventually(Duration::from_secs(5), || cgroup_dirs(&cg)
            .iter()
            .all(|d| !d.exists())),
        "companion cgroup left behind"
    );
}

const PACKETS: &str = r#"
[[policy]]
id = "packets"
spiffe_ids = ["spiffe://example.org/container/edge-udp"]
default = "deny"
dns = ["10.77.0.1"]
[[policy.egress]]
id = "syslog"
protocol = "udp"
cidr = ["10.77.0.1"]
ports = [5514]
"#;

/// Issue 13, "by protocol": only TCP used to be redirected, so under default deny any UDP
/// datagram left. Now UDP, ICMP and everything else, IPv4 and IPv6, is dropped unless a rule
/// allows it; DNS to the policy's resolver is relayed (and audited) by the companion; every
/// denial is counted and audited at a bounded rate.
#[test]
fn default_deny_drops_udp_icmp_and_ipv6_and_relays_dns_to_the_resolver() {
    let node = node(PACKETS);
    let c = node.named_container("edge-udp");
    let pid = c.pid();
    let peer = peer(&short("edged"), pid);
    let named = NamedNs::attach(&short("edgeo"), pid);
    peer.add_addr("fd77::1/64");
    add_workload_addr(pid, "fd77::2/64");
    let ns = container_ns(pid);
    let dns = dnsmasq(&peer, PEER_IP, &[("api.allowed.test", PEER_IP)], 60);
    let sink = udp_listener(&peer.path(), at(9999));
    let sink6 = udp_listener(&peer.path(), "[fd77::1]:9999".parse().unwrap());
    let syslog = udp_listener(&peer.path(), at(5514));
    // Reachable at all: the peer answers ICMP, and the veth carries IPv6.
    assert!(peer
        .exec("busybox", &["ping", "-c1", "-W2", "10.77.0.2"])
        .status
        .success());

    // UDP from a uid-1000 workload process (busybox tftp sends one datagram per try), from the
    // companion's uid, and from a plain socket in the namespace: none arrives.
    let companion_uid = {
        let u = node.companion_uid(&c.id);
        format!("{u}:{u}")
    };
    for user in ["1000:1000", companion_uid.as_str()] {
        let out = runc(
            &node.runc_root,
            &[
                "exec",
                "--user",
                user,
                &c.id,
                "timeout",
                "3",
                "tftp",
                "-g",
                "-r",
                "x",
                "10.77.0.1",
                "9999",
            ],
        );
        assert!(!out.status.success(), "{out:?}");
    }
    // The kernel drops them on the way out (the sender sees EPERM).
    for to in [at(9999), "[fd77::1]:9999".parse().unwrap()] {
        let e = udp_send(&ns, to, b"exfiltrate").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied, "{to}: {e}");
    }
    // ICMP too (IPv4 and IPv6).
    for (cmd, to) in [("ping", "10.77.0.1"), ("ping6", "fd77::1")] {
        let out = named.exec("busybox", &[cmd, "-c1", "-W2", to]);
        assert!(!out.status.success(), "{cmd} {to} got through: {out:?}");
    }
    // What a rule allows arrives.
    udp_send(&ns, at(5514), b"<14>allowed").unwrap();
    assert!(eventually(Duration::from_secs(5), || syslog
        .load(std::sync::atomic::Ordering::SeqCst)
        == 1));
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sink.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "UDP leaked"
    );
    assert_eq!(
        sink6.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "UDP over IPv6 leaked"
    );

    // DNS to the policy's resolver works for the workload (relayed by the companion, so the
    // query reaches dnsmasq from the companion's socket) and is audited.
    let out = runc(
        &node.runc_root,
        &[
            "exec",
            "--user",
            "1000:1000",
            &c.id,
            "nslookup",
            "api.allowed.test",
            "10.77.0.1",
        ],
    );
    // (dnsmasq, with no upstream, refuses the AAAA half of busybox's A+AAAA look-up.)
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("Name:\tapi.allowed.test\nAddress: 10.77.0.1"),
        "{out:?}"
    );
    assert!(
        dns.file("queries.log").contains("api.allowed.test"),
        "{}",
        dns.file("queries.log")
    );
    // Another resolver is just UDP: denied.
    let out = runc(
        &node.runc_root,
        &[
            "exec",
            "--user",
            "1000:1000",
            &c.id,
            "timeout",
            "5",
            "nslookup",
            "api.allowed.test",
            "10.77.0.3",
        ],
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("Address: 10.77.0.1"),
        "{out:?}"
    );

    let records = |kind: &str| -> Vec<serde_json::Value> {
        node.audit_records()
            .into_iter()
            .filter(|r| r["kind"] == kind)
            .collect()
    };
    assert!(
        eventually(Duration::from_secs(5), || records("dns").iter().any(|r| {
            r["destination"]["host"] == "api.allowed.test"
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("10.77.0.1"))
                && r["workload"]["container_id"] == c.id.as_str()
        })),
        "no dns record: {:?}",
        records("dns")
    );
    // Denials are audited one by one (within the rate limit), attributed to the workload.
    assert!(
        eventually(Duration::from_secs(5), || {
            let p = records("packet");
            let to = |a: &str| {
                p.iter()
                    .any(|r| r["destination"]["addr"] == a && r["decision"] == "deny")
            };
            to("10.77.0.1:9999") && to("[fd77::1]:9999") && to("10.77.0.1") && to("10.77.0.3:53")
        }),
        "packet records: {:?}",
        records("packet")
    );
    let counted = nft_in(&named);
    assert!(counted.contains("counter denied_udp"), "{counted}");

    // A flood is counted exactly but recorded at a bounded rate.
    let flood = 500;
    in_netns(&ns, move || {
        let s = std::net::UdpSocket::bind("0.0.0.0:0").unwrap();
        for _ in 0..flood {
            let _ = s.send_to(b"x", "10.77.0.1:9999");
        }
    });
    std::thread::sleep(Duration::from_millis(500));
    let logged = records("packet").len();
    assert!(
        logged < 100,
        "{logged} packet records for a flood of {flood}: not rate-limited"
    );
    // At detach the exact counts are written.
    c.delete();
    assert!(
        eventually(Duration::from_secs(5), || records("packet").iter().any(
            |r| r["detail"]
                .as_str()
                .is_some_and(|d| d.contains("packets denied by edge policy packets"))
        )),
        "no summary: {:?}",
        records("packet")
    );
    let summary = records("packet")
        .into_iter()
        .find_map(|r| {
            r["detail"]
                .as_str()
                .filter(|d| d.contains("while its rules"))
                .map(str::to_string)
        })
        .unwrap();
    let udp: u64 = summary
        .split("udp ")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{summary}"));
    assert!(udp >= flood + 4, "{summary}");
    assert_eq!(sink.load(std::sync::atomic::Ordering::SeqCst), 0);
}

const NAMES: &str = r#"
[[policy]]
id = "names"
spiffe_ids = ["spiffe://example.org/container/edge-names"]
default = "deny"
dns = ["10.77.0.1"]
[[policy.egress]]
id = "tls-by-name"
ports = [8443]
sni = "*.allowed.test"
[[policy.egress]]
id = "http-by-name"
ports = [8080]
host = "api.allowed.test"
"#;

/// Issue 13, "by name": an SNI or Host allow used to hold for whatever address the workload
/// dialed, so naming an allowed host towards an arbitrary server reached that server. Now the
/// name must resolve (at the policy's resolver) to the destination.
#[test]
fn an_allowed_name_sent_towards_an_unrelated_address_is_refused_and_audited() {
    let node = node(NAMES);
    let c = node.named_container("edge-names");
    let pid = c.pid();
    let peer = peer(&short("edgen"), pid);
    peer.add_addr("10.77.0.3/24");
    let ns = container_ns(pid);
    let _dns = dnsmasq(&peer, PEER_IP, &[("api.allowed.test", PEER_IP)], 60);
    let other = SocketAddr::new(OTHER_IP.into(), 8443);
    let (cert, key) = test_cert(&["api.allowed.test"]);
    let real = tls_server(listen_in(&peer.path(), at(8443)), cert.clone(), key.clone());
    let rogue = tls_server(listen_in(&peer.path(), other), cert.clone(), key);

    assert_eq!(
        tls_echo(&ns, at(8443), "api.allowed.test", cert.clone()).unwrap(),
        "hello over tls\n"
    );
    assert!(tls_echo(&ns, other, "api.allowed.test", cert).is_err());
    assert_eq!(real.connections(), 1);
    assert_eq!(
        rogue.connections(),
        0,
        "the unrelated server never got the connection"
    );

    let real_web = http_server(listen_in(&peer.path(), at(8080)));
    let rogue_web = http_server(listen_in(
        &peer.path(),
        SocketAddr::new(OTHER_IP.into(), 8080),
    ));
    // One request naming the allowed host (the kit's `http` sends its own Host line).
    let get = |to: SocketAddr| {
        in_netns(&ns, move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"GET /x HTTP/1.1\r\nHost: api.allowed.test\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut r = String::new();
            let _ = s.read_to_string(&mut r);
            r
        })
    };
    let ok = get(at(8080));
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    let refused = get(SocketAddr::new(OTHER_IP.into(), 8080));
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    assert!(
        refused.contains("does not resolve to 10.77.0.3"),
        "{refused}"
    );
    assert_eq!(real_web.requests().len(), 1);
    assert!(
        rogue_web.requests().is_empty(),
        "the unrelated server never got the request"
    );

    let audited = |kind: &'static str, addr: &'static str| {
        node.audit_records().into_iter().any(|r| {
            r["kind"] == kind
                && r["decision"] == "deny"
                && r["destination"]["addr"] == addr
                && r["detail"]
                    .as_str()
                    .is_some_and(|d| d.contains("api.allowed.test does not resolve to 10.77.0.3"))
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || audited(
            "connection",
            "10.77.0.3:8443"
        ) && audited(
            "http_request",
            "10.77.0.3:8080"
        )),
        "{:?}",
        node.audit_records()
    );
    c.delete();
}

const PATHS: &str = r#"
[[policy]]
id = "paths"
spiffe_ids = ["spiffe://example.org/container/edge-paths"]
default = "deny"
[[policy.egress]]
id = "no-admin"
action = "deny"
ports = [8080]
path_prefix = "/admin"
[[policy.egress]]
id = "no-secret"
action = "deny"
ports = [8080]
path_prefix = "/secret"
path_ignore_case = true
[[policy.egress]]
id = "get"
ports = [8080]
methods = ["GET"]
"#;

/// Issue 13, "by path spelling": with a deny `/admin` rule, `//admin`, `/./admin`,
/// `/x/../admin`, `/%61dmin` and `/%2e/admin` used to reach nginx's `/admin`. Now the proxy
/// compares (and forwards) the path as the upstream resolves it, and refuses ambiguous ones.
#[test]
fn every_spelling_of_a_denied_path_is_refused_in_front_of_a_real_nginx() {
    let node = node(PATHS);
    let c = node.named_container("edge-paths");
    let pid = c.pid();
    let peer = peer(&short("edgeh"), pid);
    let ns = container_ns(pid);
    let web = nginx(&peer, at(8080));
    // nginx itself serves each spelling as /admin (what the rule must stop).
    let direct = |path: &str| http(&peer.path(), at(8080), "GET", path, &[]).unwrap();
    assert_eq!(direct("//admin").1, "admin area\n", "nginx merges slashes");
    assert_eq!(direct("/%61dmin").1, "admin area\n", "nginx decodes");

    for path in [
        "/admin",
        "//admin",
        "/./admin",
        "/x/../admin",
        "/%61dmin",
        "/%2e/admin",
        "/%2E%2E/admin",
        "/%2Fadmin",
        "/x%2F..%2Fadmin",
        "/x/..;/admin",
        "///admin/users",
        "/SECRET/x",
        "/%53ecret",
    ] {
        let (status, body) = http(&ns, at(8080), "GET", path, &[]).unwrap();
        assert!(status == 403 || status == 400, "{path}: {status} {body}");
        assert!(!body.contains("admin area"), "{path}: {body}");
    }
    // Allowed requests are forwarded in the form that was checked.
    let (status, body) = http(&ns, at(8080), "GET", "/pub/./x//y/../z?q=%2e", &[]).unwrap();
    assert_eq!((status, body.as_str()), (200, "public\n"));
    // (nginx writes its access log line after the answer has gone out.)
    assert!(
        eventually(Duration::from_secs(3), || web
            .file("access.log")
            .lines()
            .any(|l| l == "/pub/x/z /pub/x/z?q=%2e")),
        "nginx saw: {}",
        web.file("access.log")
    );
    let log = web.file("access.log");
    let through: Vec<&str> = log.lines().filter(|l| !l.contains("admin")).collect();
    // Only the two direct probes reached /admin; nothing through the proxy did.
    assert_eq!(
        log.lines().filter(|l| l.starts_with("/admin")).count(),
        2,
        "{log}"
    );
    assert_eq!(through.len(), 1, "{log}");
    c.delete();
}
