//! Edge policy with real containers under runc and real traffic: nhid's nftables rules in the
//! container's network namespace send its outbound TCP through the companion, which allows,
//! resets or answers 403 by L4, TLS SNI (real handshakes) and HTTP method/path; test upstreams
//! in a peer namespace (over a veth pair) count what reaches them. Brokered credentials reach
//! the upstream and never the workload; inbound rules demand a valid, unrevoked JWT-SVID from
//! an allowed identity; SIGHUP reloads policies for new connections without restarting anything.

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
[[policy.egress]]
id = "no-admin"
action = "deny"
ports = [8080]
path_prefix = "/admin"
[[policy.egress]]
id = "http-get"
action = "allow"
ports = [8080]
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

    // The rules are in the container's namespace, not the host's.
    let rules = nft_in(&named);
    assert!(rules.contains("redirect to :15001"), "{rules}");
    assert!(
        rules.contains(&format!("meta skuid {COMPANION_UID}")),
        "{rules}"
    );
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

    // SNI: a real TLS handshake through the proxy for an allowed name, none for another.
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
ports = [8080]
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
