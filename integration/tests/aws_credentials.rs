//! The AWS container-credential provider, proven with botocore (PyPI) and the AWS SDK for
//! JavaScript v3 (npm `@aws-sdk/credential-providers`): with only the two env pointers nhi-runc
//! sets, their default chains resolve the session credentials held in a granted secret; a
//! wrong token is refused; a rotated secret reaches botocore when it refreshes ahead of expiry;
//! every RFC 3339 spelling of `Expiration` reaches both SDKs as one they read, and a secret
//! without `Token` or with an unreadable `Expiration` is refused (502, audited).
//!
//! The SDKs run as host processes joined to the workload's network namespace (busybox has no
//! Python or Node.js), reading the token from the host side of the container's
//! `/run/nhi/aws-token`.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nhi_integration::py::{python, script};
use nhi_integration::*;

const JS: &str = "/opt/nhi-test/jsclients";

const RULES: &str = r#"
[[rule]]
name = "aws"
spiffe_id = "container/{container.name}"
aws_credentials = { secret = "aws-dev" }
[rule.match]
annotations = { "nhi.dev/aws" = "true" }

[[rule]]
name = "plain"
spiffe_id = "container/{container.name}"
[rule.match]
annotations = { "nhi.dev/inject" = "true" }

[[grant]]
secrets = ["aws-dev"]
rules = ["aws"]
"#;

fn rfc3339_in(secs: u64) -> String {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs;
    let out = Command::new("date")
        .args(["-u", "-d", &format!("@{t}"), "+%Y-%m-%dT%H:%M:%SZ"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn put_creds(node: &Node, key_id: &str, expires_in: u64) {
    put_value(
        node,
        serde_json::json!({
            "AccessKeyId": key_id,
            "SecretAccessKey": format!("secret-of-{key_id}"),
            "Token": format!("session-token-of-{key_id}"),
            "Expiration": rfc3339_in(expires_in),
        }),
    );
}

fn put_value(node: &Node, v: serde_json::Value) {
    let out = node.nhictl(
        &["secret", "put", "aws-dev", "--from-stdin"],
        v.to_string().as_bytes(),
    );
    assert!(out.status.success(), "{out:?}");
}

fn aws_container(node: &Node, name: &str) -> Container {
    let c = node
        .bundle(&unique_id(name))
        .inject()
        .annotation("nerdctl/name", name)
        .annotation("nhi.dev/aws", "true")
        .without_hooks()
        .write();
    c.start_with_nhi_runc(&node.config)
        .unwrap_or_else(|e| panic!("nhi-runc run {name}: {e}"));
    c
}

/// botocore in the container's netns with only the two AWS variables.
fn botocore(pid: i32, token_file: &Path, refresh: bool) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("--")
        .arg(python())
        .arg(script("botocore_client.py"))
        .args(if refresh { vec!["refresh"] } else { vec![] })
        .env_clear()
        .env(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://127.0.0.1:15100/v1/aws/credentials",
        )
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file);
    cmd
}

fn run_json(mut cmd: Command) -> serde_json::Value {
    let out = cmd.output().expect("botocore");
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

fn sha256(s: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Status of a GET to the companion from inside the netns, with an optional Authorization.
fn status_with_auth(pid: i32, path: &str, auth: Option<&str>) -> u16 {
    get_with_auth(pid, path, auth).0
}

/// Status and body of a GET to the companion from inside the netns.
fn get_with_auth(pid: i32, path: &str, auth: Option<&str>) -> (u16, String) {
    let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
    http_in_netns_with_headers(pid, "GET", path, &headers, "")
}

/// The AWS SDK for JavaScript v3 in the container's netns with only the two AWS variables;
/// `mode` picks the provider (see integration/js/aws_client.cjs).
fn js_sdk(pid: i32, token_file: &Path, mode: &str) -> serde_json::Value {
    assert!(
        Path::new(JS)
            .join("node_modules/@aws-sdk/credential-providers")
            .is_dir(),
        "{JS} is missing: run scripts/install-deps (it installs the AWS SDK for JavaScript)"
    );
    let node_bin = which("node").expect("node is not installed: run scripts/install-deps");
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net=/proc/{pid}/ns/net"))
        .arg("--")
        .arg(node_bin)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("js/aws_client.cjs"))
        .args([JS, mode])
        .env_clear()
        .env("HOME", "/nonexistent")
        .env(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "http://127.0.0.1:15100/v1/aws/credentials",
        )
        .env("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", token_file);
    run_json(cmd)
}

/// `Expiration` `secs` from now written the ways rotation jobs write it.
fn spellings(secs: u64) -> Vec<(String, &'static str)> {
    let t = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs;
    let date = |fmt: &str, at: u64| {
        let out = Command::new("date")
            .args(["-u", "-d", &format!("@{at}"), fmt])
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    vec![
        (date("+%Y-%m-%dT%H:%M:%SZ", t), "Z"),
        (date("+%Y-%m-%dT%H:%M:%S+00:00", t), "+00:00"),
        // Python's str(datetime) / isoformat(" ") of an aware UTC datetime.
        (
            date("+%Y-%m-%d %H:%M:%S.123456+00:00", t),
            "space, fraction",
        ),
        (date("+%Y-%m-%dT%H:%M:%S-05:00", t - 5 * 3600), "-05:00"),
        (date("+%Y-%m-%dt%H:%M:%Sz", t), "lower case"),
    ]
}

#[test]
fn botocore_resolves_credentials_from_the_companion_with_only_the_env_pointers() {
    let mut node = Node::new(RULES);
    node.start();
    put_creds(&node, "AKIAV1", 3600);
    let c = aws_container(&node, "awsapp");
    let pid = c.pid();
    let env = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/environ")).unwrap())
        .into_owned();
    assert!(
        env.contains(
            "AWS_CONTAINER_CREDENTIALS_FULL_URI=http://127.0.0.1:15100/v1/aws/credentials"
        ) && env.contains("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE=/run/nhi/aws-token"),
        "{env}"
    );
    assert!(
        !env.contains("AKIAV1") && !env.contains("secret-of"),
        "pointers only"
    );
    let ls = c.exec(&["ls", "-ln", "/run/nhi/aws-token"]);
    let ls = String::from_utf8_lossy(&ls.stdout).to_string();
    let f: Vec<&str> = ls.split_whitespace().collect();
    assert_eq!((f[0], f[2]), ("-r--------", "0"), "{ls}");

    let token_file = node.path("containers").join(&c.id).join("aws-token");
    let got = run_json(botocore(pid, &token_file, false));
    assert_eq!(got["first"]["method"], "container-role", "{got}");
    assert_eq!(got["first"]["access_key"], "AKIAV1", "{got}");
    assert_eq!(got["first"]["secret_sha256"], sha256("secret-of-AKIAV1"));
    assert_eq!(
        got["first"]["token_sha256"],
        sha256("session-token-of-AKIAV1")
    );

    // A wrong token file, and no Authorization at all, are refused.
    let wrong = node.path("wrong-token");
    std::fs::write(&wrong, "not-the-token").unwrap();
    let got = run_json(botocore(pid, &wrong, false));
    assert!(got["error"].is_string(), "{got}");
    assert_eq!(status_with_auth(pid, "/v1/aws/credentials", None), 401);
    assert_eq!(
        status_with_auth(pid, "/v1/aws/credentials", Some("not-the-token")),
        401
    );
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert_eq!(
        status_with_auth(pid, "/v1/aws/credentials", Some(&token)),
        200
    );

    // A workload whose rule names no AWS source has no such endpoint and no pointers.
    let other = node.named_container("noaws");
    assert_eq!(
        status_with_auth(other.pid(), "/v1/aws/credentials", Some(&token)),
        404
    );
    let env = std::fs::read(format!("/proc/{}/environ", other.pid())).unwrap();
    assert!(!String::from_utf8_lossy(&env).contains("AWS_CONTAINER"));
    other.delete();
    c.delete();
}

#[test]
fn botocore_refreshes_before_expiry_and_gets_the_rotated_credentials() {
    let mut node = Node::new(RULES);
    node.start();
    // Inside botocore's advisory refresh window (15 min) but valid: it refreshes on next use.
    put_creds(&node, "AKIAOLD", 12 * 60);
    let c = aws_container(&node, "awsrot");
    let token_file = node.path("containers").join(&c.id).join("aws-token");
    let mut child = botocore(c.pid(), &token_file, true)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready", "{line}");
    put_creds(&node, "AKIANEW", 3600);
    // Rotation reaches the companion within a moment (nhid pushes secret_changed): wait for it
    // rather than guess how long a loaded machine takes.
    let token = std::fs::read_to_string(&token_file).unwrap();
    assert!(eventually(Duration::from_secs(5), || {
        get_with_auth(c.pid(), "/v1/aws/credentials", Some(&token))
            .1
            .contains("\"AKIANEW\"")
    }));
    child.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{rest}");
    let got: serde_json::Value = serde_json::from_str(rest.trim()).unwrap();
    assert_eq!(got["first"]["access_key"], "AKIAOLD", "{got}");
    assert_eq!(got["second"]["access_key"], "AKIANEW", "{got}");
    assert_eq!(got["second"]["secret_sha256"], sha256("secret-of-AKIANEW"));
    c.delete();
}

#[test]
fn every_sdk_reads_each_expiration_spelling_and_bad_secrets_are_refused_and_audited() {
    let mut node = Node::new(RULES);
    node.start();
    put_creds(&node, "AKIAFIRST", 3600);
    let c = aws_container(&node, "awsjs");
    let pid = c.pid();
    let token_file = node.path("containers").join(&c.id).join("aws-token");
    let token = std::fs::read_to_string(&token_file).unwrap();

    for (i, (exp, what)) in spellings(3600).into_iter().enumerate() {
        let key = format!("AKIAJS{i}");
        put_value(
            &node,
            serde_json::json!({
                "AccessKeyId": key,
                "SecretAccessKey": format!("secret-of-{key}"),
                "Token": format!("session-token-of-{key}"),
                "Expiration": exp,
            }),
        );
        // What the companion serves once the rotation reached it (pushed asynchronously, within
        // 0.25 s: ARCHITECTURE, Rotation): Expiration in UTC with a Z, whole seconds.
        let (mut status, mut body) = (0, String::new());
        let rotated = eventually(Duration::from_secs(5), || {
            (status, body) = get_with_auth(pid, "/v1/aws/credentials", Some(&token));
            body.contains(&format!("\"{key}\""))
        });
        assert!(rotated, "{what}: the new value never arrived: {body}");
        assert_eq!(status, 200, "{what}: {body}");
        let served: serde_json::Value = serde_json::from_str(&body).unwrap();
        let z = served["Expiration"].as_str().unwrap().to_string();
        assert!(
            z.len() == 20 && z.ends_with('Z') && z.as_bytes()[10] == b'T',
            "{what}: {exp:?} served as {z:?}"
        );
        let z_ms = format!("{}.000Z", &z[..19]);
        for mode in ["chain", "http", "cmds-file"] {
            let got = js_sdk(pid, &token_file, mode);
            assert_eq!(got["access_key"], key.as_str(), "JS {mode}, {what}: {got}");
            assert_eq!(got["expiration"], z_ms.as_str(), "JS {mode}, {what}: {got}");
            assert_eq!(
                got["token_sha256"],
                sha256(&format!("session-token-of-{key}"))
            );
        }
        let got = run_json(botocore(pid, &token_file, false));
        assert_eq!(
            got["first"]["access_key"],
            key.as_str(),
            "botocore, {what}: {got}"
        );
    }

    // fromContainerMetadata alone reads only AWS_CONTAINER_AUTHORIZATION_TOKEN, which nhi never
    // puts in the environment: it is refused (docs/USING.md says so and shows the two lines
    // that make it work, tested above as "cmds-file").
    let got = js_sdk(pid, &token_file, "cmds");
    assert!(got["error"].is_string(), "{got}");

    // A secret without Token, or whose Expiration is no instant: 502 with the reason, never a
    // 200 the SDKs then trip over (botocore's KeyError: 'Token'); both SDKs report an error.
    for (value, why) in [
        (
            serde_json::json!({"AccessKeyId": "AKIANOTOKEN", "SecretAccessKey": "s",
                "Expiration": rfc3339_in(3600)}),
            "no Token",
        ),
        (
            serde_json::json!({"AccessKeyId": "AKIABADEXP", "SecretAccessKey": "s",
                "Token": "t", "Expiration": "tomorrow"}),
            "Expiration \"tomorrow\" is not an RFC 3339 date-time",
        ),
    ] {
        put_value(&node, value);
        // Once the rotation reached the companion (pushed asynchronously): the answer names
        // this value's fault, not the previous one's.
        let (mut status, mut body) = (0, String::new());
        eventually(Duration::from_secs(5), || {
            (status, body) = get_with_auth(pid, "/v1/aws/credentials", Some(&token));
            status != 200 && body.contains(why)
        });
        assert_eq!(status, 502, "{body}");
        let e: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(e["error"], "bad_secret", "{body}");
        assert!(e["message"].as_str().unwrap().contains(why), "{body}");
        let got = run_json(botocore(pid, &token_file, false));
        let err = got["error"].as_str().unwrap_or_else(|| panic!("{got}"));
        assert!(!err.contains("KeyError"), "{got}");
        let got = js_sdk(pid, &token_file, "chain");
        assert!(got["error"].is_string(), "{got}");
    }
    // Each refusal is on the audit log, attributed by nhid to the workload, without a value.
    let refused = |detail: &str| {
        node.audit_records().into_iter().any(|r| {
            r["kind"] == "credential"
                && r["decision"] == "error"
                && r["credential"]["name"] == "aws:aws-dev"
                && r["spiffe_id"] == format!("spiffe://{TRUST_DOMAIN}/container/awsjs")
                && r["detail"].as_str().is_some_and(|d| d.contains(detail))
        })
    };
    assert!(
        eventually(Duration::from_secs(5), || refused("no Token")
            && refused("Expiration \"tomorrow\"")),
        "{:#?}",
        node.audit_records()
    );
    let log = serde_json::to_string(&node.audit_records()).unwrap();
    assert!(!log.contains("secret-of-") && !log.contains("session-token-of-"));
    c.delete();
}
