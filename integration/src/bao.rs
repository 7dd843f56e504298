//! Real OpenBao for tests: a dev server ([`BaoDev`]) or a raft cluster ([`BaoCluster`]) on
//! private loopback ports and temp dirs, killed on drop, plus [`setup_nhi`]: what an operator
//! does to make an OpenBao ready for nhi (docs/OPENBAO.md describes the same steps).
//!
//! The `bao` binary comes from `scripts/install-deps`. Missing binary → the test fails with
//! what to run; it never skips. The harness talks to OpenBao with a blocking HTTP client: call
//! it from plain `#[test]` code, not from inside an async runtime.

use std::fs;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The OpenBao release `scripts/install-deps` installs.
pub const OPENBAO_VERSION: &str = "2.7.2";

/// The `bao` binary: `NHI_BAO_BIN` if set, else where `scripts/install-deps` puts it.
pub fn bao_bin() -> PathBuf {
    let p = std::env::var_os("NHI_BAO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| format!("/opt/nhi-test/openbao/{OPENBAO_VERSION}/bao").into());
    assert!(
        p.is_file(),
        "OpenBao binary {} is missing: run scripts/install-deps (as root), or set NHI_BAO_BIN",
        p.display()
    );
    p
}

/// A loopback port nobody listens on (and, with `pair`, the one after it too: a dev server
/// takes the API port + 1 for its cluster listener).
fn free_port(pair: bool) -> u16 {
    for _ in 0..100 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = l.local_addr().unwrap().port();
        if !pair || (port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok()) {
            return port;
        }
    }
    panic!("no free loopback port pair found");
}

/// Blocking calls to OpenBao's HTTP API with one token, for test setup and inspection.
#[derive(Clone)]
pub struct BaoApi {
    http: reqwest::blocking::Client,
    pub addr: String,
    token: Option<String>,
}

impl BaoApi {
    /// `ca_file`: PEM bundle to trust for `https://` addresses.
    pub fn new(addr: &str, token: Option<&str>, ca_file: Option<&Path>) -> BaoApi {
        let mut b = reqwest::blocking::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10));
        if let Some(ca) = ca_file {
            for c in reqwest::Certificate::from_pem_bundle(&fs::read(ca).unwrap()).unwrap() {
                b = b.add_root_certificate(c);
            }
        }
        BaoApi {
            http: b.build().unwrap(),
            addr: addr.trim_end_matches('/').to_string(),
            token: token.map(str::to_string),
        }
    }

    /// One request; the HTTP status and the JSON body (`Null` when empty or not JSON).
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value), String> {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self
            .http
            .request(method.clone(), format!("{}/v1/{path}", self.addr));
        if let Some(t) = &self.token {
            req = req.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .map_err(|e| format!("{method} {}/v1/{path}: {e}", self.addr))?;
        let status = resp.status().as_u16();
        let text = resp.text().unwrap_or_default();
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// Like [`call`](Self::call) but panics unless the answer is 2xx.
    pub fn must(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        match self.call(method, path, body) {
            Ok((s, v)) if (200..300).contains(&s) => v,
            Ok((s, v)) => panic!("{method} {}/v1/{path}: HTTP {s}: {v}", self.addr),
            Err(e) => panic!("{e}"),
        }
    }

    /// `sys/health` status code: 200 active, 429 standby, 501 not initialized, 503 sealed.
    pub fn health(&self) -> Option<u16> {
        self.call("GET", "sys/health", None).ok().map(|(s, _)| s)
    }

    /// Revokes every token issued by AppRole logins (as an operator would after a leak).
    pub fn revoke_approle_tokens(&self) {
        self.must(
            "POST",
            &format!("sys/leases/revoke-prefix/auth/{NODES_APPROLE_MOUNT}/login"),
            None,
        );
    }
}

fn spawn_bao(args: &[&str], dir: &Path, log: &Path) -> Child {
    let out = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(bao_bin())
        .args(args)
        // Keep the CLI's token helper and any inherited settings away from the user's.
        .env("HOME", dir)
        .env_remove("BAO_ADDR")
        .env_remove("VAULT_ADDR")
        .env_remove("BAO_TOKEN")
        .env_remove("VAULT_TOKEN")
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", bao_bin().display()))
}

fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn wait_for(what: &str, timeout: Duration, log: &Path, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        if Instant::now() > deadline {
            panic!(
                "OpenBao: timed out after {timeout:?} waiting for {what}; log {}:\n{}",
                log.display(),
                tail(log)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tail(log: &Path) -> String {
    let s = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// A `bao server -dev`: in memory, unsealed, KV v2 at `secret/`, root token known.
pub struct BaoDev {
    pub addr: String,
    pub root_token: String,
    /// CA of the server's certificate in TLS mode ([`BaoDev::start_tls`]).
    pub ca_file: Option<PathBuf>,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl BaoDev {
    pub fn start() -> BaoDev {
        Self::start_with(false)
    }

    /// With `-dev-tls`: HTTPS with a generated CA (in [`BaoDev::ca_file`]).
    pub fn start_tls() -> BaoDev {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> BaoDev {
        let dir = tempfile::Builder::new()
            .prefix("nhi-bao-")
            .tempdir()
            .unwrap();
        let root_token = format!("root-{}", std::process::id());
        let log = dir.path().join("bao.log");
        // A port can be taken between our probe and bao's bind: retry with fresh ports.
        for _ in 0..3 {
            let port = free_port(true);
            let listen = format!("-dev-listen-address=127.0.0.1:{port}");
            let token = format!("-dev-root-token-id={root_token}");
            let certs = dir.path().join("certs");
            let cert_dir = format!("-dev-tls-cert-dir={}", certs.display());
            let mut args = vec!["server", "-dev", "-dev-no-store-token", &listen, &token];
            if tls {
                fs::create_dir_all(&certs).unwrap();
                args.extend(["-dev-tls", &cert_dir]);
            }
            let mut child = spawn_bao(&args, dir.path(), &log);
            let scheme = if tls { "https" } else { "http" };
            let addr = format!("{scheme}://127.0.0.1:{port}");
            let ca_file = tls.then(|| certs.join("vault-ca.pem"));
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited: port clash or worse; retry, the log keeps both runs
                }
                if ca_file.as_ref().is_none_or(|c| c.is_file()) {
                    let api = BaoApi::new(&addr, None, ca_file.as_deref());
                    if api.health() == Some(200) {
                        return BaoDev {
                            addr,
                            root_token,
                            ca_file,
                            dir,
                            child,
                        };
                    }
                }
                if Instant::now() > deadline {
                    kill(&mut child);
                    panic!("bao dev server did not come up:\n{}", tail(&log));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("bao dev server failed to start 3 times:\n{}", tail(&log));
    }

    /// The API as root.
    pub fn root(&self) -> BaoApi {
        BaoApi::new(&self.addr, Some(&self.root_token), self.ca_file.as_deref())
    }

    /// [`setup_nhi_with`] on this server (its CA trusted in TLS mode).
    pub fn setup_nhi(&self, trust_domain: &str, opts: &NhiRoleOptions) -> BaoNhiSetup {
        setup_nhi_with(&self.root(), trust_domain, self.dir.path(), opts)
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("bao.log")).unwrap_or_default()
    }

    /// SIGSTOP: the server hangs (the kernel still accepts connections, nothing answers), as
    /// a partitioned or overloaded OpenBao looks to a client. [`resume`](Self::resume) undoes it.
    pub fn pause(&self) {
        self.signal(nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn resume(&self) {
        self.signal(nix::sys::signal::Signal::SIGCONT);
    }

    fn signal(&self, s: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), s)
            .unwrap_or_else(|e| panic!("{s} to bao: {e}"));
    }
}

impl Drop for BaoDev {
    fn drop(&mut self) {
        kill(&mut self.child);
    }
}

struct ClusterNode {
    api_port: u16,
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

/// `n` OpenBao nodes with raft storage on loopback, initialized (1 key share), unsealed, all
/// voters. Plain HTTP.
pub struct BaoCluster {
    pub dir: tempfile::TempDir,
    nodes: Vec<ClusterNode>,
    root_token: String,
    unseal_key: String,
}

impl BaoCluster {
    pub fn start(n: usize) -> BaoCluster {
        assert!(n >= 1);
        let dir = tempfile::Builder::new()
            .prefix("nhi-bao-raft-")
            .tempdir()
            .unwrap();
        let ports: Vec<(u16, u16)> = (0..n)
            .map(|_| (free_port(false), free_port(false)))
            .collect();
        let mut nodes = Vec::new();
        for (i, &(api_port, cluster_port)) in ports.iter().enumerate() {
            let ndir = dir.path().join(format!("n{i}"));
            fs::create_dir_all(ndir.join("raft")).unwrap();
            // Followers join whichever node leads; node 0 is initialized and bootstraps.
            let joins: String = ports
                .iter()
                .enumerate()
                .filter(|&(j, _)| i > 0 && j != i)
                .map(|(_, (p, _))| {
                    format!(
                        "  retry_join {{\n    leader_api_addr = \"http://127.0.0.1:{p}\"\n  }}\n"
                    )
                })
                .collect();
            let config = ndir.join("bao.hcl");
            fs::write(
                &config,
                format!(
                    r#"storage "raft" {{
  path = "{raft}"
  node_id = "n{i}"
  performance_multiplier = 1
{joins}}}
listener "tcp" {{
  address = "127.0.0.1:{api_port}"
  cluster_address = "127.0.0.1:{cluster_port}"
  tls_disable = true
}}
api_addr = "http://127.0.0.1:{api_port}"
cluster_addr = "https://127.0.0.1:{cluster_port}"
disable_mlock = true
"#,
                    raft = ndir.join("raft").display()
                ),
            )
            .unwrap();
            nodes.push(ClusterNode {
                api_port,
                config,
                log: ndir.join("bao.log"),
                child: None,
            });
        }
        let mut c = BaoCluster {
            dir,
            nodes,
            root_token: String::new(),
            unseal_key: String::new(),
        };
        for i in 0..n {
            c.spawn(i);
        }
        let first = c.api(0, false);
        wait_for(
            "node 0 to answer",
            Duration::from_secs(20),
            &c.nodes[0].log,
            || first.health().is_some(),
        );
        let init = first.must(
            "PUT",
            "sys/init",
            Some(json!({"secret_shares": 1, "secret_threshold": 1})),
        );
        c.unseal_key = init["keys_base64"][0].as_str().unwrap().to_string();
        c.root_token = init["root_token"].as_str().unwrap().to_string();
        c.unseal(0);
        wait_for(
            "node 0 to become active",
            Duration::from_secs(20),
            &c.nodes[0].log,
            || first.health() == Some(200),
        );
        // Autopilot promotes a joined node to voter only after it was healthy this long
        // (default 10 s); on loopback a second is plenty.
        c.api(0, true).must(
            "POST",
            "sys/storage/raft/autopilot/configuration",
            Some(json!({"server_stabilization_time": "1s", "cleanup_dead_servers": false})),
        );
        for i in 1..n {
            c.unseal(i);
        }
        let root = c.api(0, true);
        wait_for(
            "every node to be a raft voter",
            Duration::from_secs(30),
            &c.nodes[0].log,
            || match root.call("GET", "sys/storage/raft/configuration", None) {
                Ok((200, v)) => v["data"]["config"]["servers"]
                    .as_array()
                    .is_some_and(|s| s.len() == n && s.iter().all(|s| s["voter"] == true)),
                _ => false,
            },
        );
        for i in 0..n {
            c.wait_unsealed(i);
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        assert!(node.child.is_none(), "node {i} is running");
        let config = node.config.display().to_string();
        let child = spawn_bao(
            &["server", "-config", &config],
            node.config.parent().unwrap(),
            &node.log,
        );
        node.child = Some(child);
    }

    /// Sends the unseal key (again, until it sticks: a follower first has to join) and waits
    /// until the node answers as active or standby.
    fn unseal(&self, i: usize) {
        let api = self.api(i, false);
        let log = &self.nodes[i].log;
        wait_for(
            &format!("node {i} to answer"),
            Duration::from_secs(20),
            log,
            || api.health().is_some(),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let _ = api.call("PUT", "sys/unseal", Some(json!({"key": self.unseal_key})));
            let t = Instant::now() + Duration::from_secs(2);
            while Instant::now() < t {
                if matches!(api.health(), Some(200 | 429)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if Instant::now() > deadline {
                panic!("node {i} did not unseal:\n{}", tail(log));
            }
        }
    }

    fn wait_unsealed(&self, i: usize) {
        let api = self.api(i, false);
        wait_for(
            &format!("node {i} to be active or standby"),
            Duration::from_secs(20),
            &self.nodes[i].log,
            || matches!(api.health(), Some(200 | 429)),
        );
    }

    fn api(&self, i: usize, root: bool) -> BaoApi {
        BaoApi::new(
            &self.address(i),
            root.then_some(self.root_token.as_str()),
            None,
        )
    }

    pub fn address(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.nodes[i].api_port)
    }

    pub fn addresses(&self) -> Vec<String> {
        (0..self.nodes.len()).map(|i| self.address(i)).collect()
    }

    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// The API of node `i` as root.
    pub fn root(&self, i: usize) -> BaoApi {
        self.api(i, true)
    }

    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// Index of the active node, waiting (up to 30 s) for an election if there is none.
    pub fn leader_index(&self) -> usize {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            for i in 0..self.nodes.len() {
                if self.is_running(i) && self.api(i, false).health() == Some(200) {
                    return i;
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "no OpenBao node became active:\n{}",
                    tail(&self.nodes[0].log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills node `i` (SIGKILL: a crash, no leadership hand-off).
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].child.take() {
            kill(&mut c);
        }
    }

    /// Starts node `i` again (after [`stop`](Self::stop)) with its data and unseals it;
    /// returns once it is active or standby. (`start(n)` is the cluster's constructor.)
    pub fn restart(&mut self, i: usize) {
        self.spawn(i);
        self.unseal(i);
    }

    /// [`setup_nhi_with`] through the active node; returns once the KV mount is ready on every
    /// running node. Standbys answer KV reads themselves and report a new KV v2 mount as
    /// "upgrading" (HTTP 400) for a while after the active node has finished; a failover in
    /// that window is not something a real deployment sees (mounts are made long before).
    pub fn setup_nhi(&self, trust_domain: &str, opts: &NhiRoleOptions) -> BaoNhiSetup {
        let leader = self.leader_index();
        let setup = setup_nhi_with(&self.root(leader), trust_domain, self.dir.path(), opts);
        for i in (0..self.nodes.len()).filter(|&i| self.is_running(i)) {
            let api = self.root(i);
            wait_for(
                &format!("KV v2 at secret/ to be ready on node {i}"),
                Duration::from_secs(30),
                &self.nodes[i].log,
                || matches!(api.call("GET", "secret/config", None), Ok((200, _))),
            );
        }
        setup
    }

    pub fn log(&self, i: usize) -> String {
        fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }
}

impl Drop for BaoCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            if let Some(mut c) = n.child.take() {
                kill(&mut c);
            }
        }
    }
}

/// The AppRole mount nodes log in at: one role per node, named after it (`node_name`), so
/// OpenBao knows which node is asking (`role_name` in the login's alias metadata).
pub const NODES_APPROLE_MOUNT: &str = "nhi-nodes";
/// The PKI role a node's own token signs with: only `spiffe://<td>/node/<node>/...`.
pub const NODE_PKI_ROLE: &str = "nhi-node";

/// What [`setup_nhi_with`] leaves: the cluster's side, and a way to enrol nodes.
#[derive(Clone)]
pub struct BaoNhiSetup {
    root: BaoApi,
    dir: PathBuf,
    opts: NhiRoleOptions,
}

/// What one node logs in with (its `[openbao.auth]`).
#[derive(Debug, Clone)]
pub struct NodeLogin {
    pub node: String,
    pub role_id: String,
    /// 0600 file holding the AppRole secret_id.
    pub secret_id_file: PathBuf,
}

impl NodeLogin {
    /// The `[openbao.auth]` table for this node, as TOML.
    pub fn auth_toml(&self) -> String {
        format!(
            "[openbao.auth]\nmethod = \"approle\"\nmount = \"{NODES_APPROLE_MOUNT}\"\nrole_id = \"{}\"\nsecret_id_file = \"{}\"\n",
            self.role_id,
            self.secret_id_file.display()
        )
    }
}

impl BaoNhiSetup {
    /// Enrols node `name` (docs/OPENBAO.md, "AppRole for nodes"): its own AppRole role named
    /// after it with the `nhi-node` policy, and a secret_id in `<dir>/<name>.secret-id` (0600).
    pub fn node(&self, name: &str) -> NodeLogin {
        let role = format!("auth/{NODES_APPROLE_MOUNT}/role/{name}");
        self.root.must(
            "POST",
            &role,
            Some(json!({
                "token_policies": ["nhi-node"],
                "token_ttl": format!("{}s", self.opts.token_ttl.as_secs()),
                "token_max_ttl": format!("{}s", self.opts.token_max_ttl.as_secs()),
                "token_type": "service",
                "secret_id_num_uses": 0,
            })),
        );
        let role_id = self.root.must("GET", &format!("{role}/role-id"), None)["data"]["role_id"]
            .as_str()
            .unwrap()
            .to_string();
        let secret = self.root.must("POST", &format!("{role}/secret-id"), None);
        let secret_id_file = self.dir.join(format!("{name}.secret-id"));
        let mut f = fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&secret_id_file)
            .unwrap();
        f.write_all(secret["data"]["secret_id"].as_str().unwrap().as_bytes())
            .unwrap();
        NodeLogin {
            node: name.into(),
            role_id,
            secret_id_file,
        }
    }

    /// The API as root, for the tests' own setup and inspection.
    pub fn root(&self) -> &BaoApi {
        &self.root
    }
}

/// Token lifetimes of the nodes' AppRole roles.
#[derive(Debug, Clone)]
pub struct NhiRoleOptions {
    pub token_ttl: Duration,
    pub token_max_ttl: Duration,
}

impl Default for NhiRoleOptions {
    fn default() -> Self {
        NhiRoleOptions {
            token_ttl: Duration::from_secs(3600),
            token_max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// The `nhi-node` policy for the default mounts (`secret`, `pki`) and prefix (`nhi`), with
/// `ACCESSOR` standing for the accessor of the nodes' AppRole mount; the same text is in
/// docs/OPENBAO.md. A node reads what the cluster shares, writes only its own entry under
/// `nodes/` (its JWT key), signs SVIDs only under the node-scoped role, and keeps its token
/// alive. It cannot sign an intermediate CA or any other identity.
pub const NHI_NODE_POLICY: &str = r#"# nhid on every node. ACCESSOR: the accessor of the nodes' AppRole mount (nhi-nodes/).
path "secret/data/nhi/*" {
  capabilities = ["read"]
}
path "secret/metadata/nhi" {
  capabilities = ["list"]
}
path "secret/metadata/nhi/*" {
  capabilities = ["read", "list"]
}
path "secret/data/nhi/nodes/{{identity.entity.aliases.ACCESSOR.metadata.role_name}}/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/nhi/nodes/{{identity.entity.aliases.ACCESSOR.metadata.role_name}}/*" {
  capabilities = ["read", "list", "delete"]
}
path "secret/data/nhi/revocations/*" {
  capabilities = ["create", "read", "update"]
}
path "secret/metadata/nhi/revocations/*" {
  capabilities = ["read", "list", "delete"]
}
path "pki/sign/nhi-node" {
  capabilities = ["update"]
}
path "pki/ca/pem" {
  capabilities = ["read"]
}
path "pki/issuers" {
  capabilities = ["list"]
}
path "pki/issuer/+/json" {
  capabilities = ["read"]
}
path "auth/token/renew-self" {
  capabilities = ["update"]
}
path "auth/token/lookup-self" {
  capabilities = ["read"]
}
"#;

/// What an operator's token needs for `nhictl node revoke` (default mounts and prefix, the
/// nodes' AppRole at `nhi-nodes/`); the same text is in docs/OPENBAO.md.
pub const NHI_OPERATOR_POLICY: &str = r#"# nhictl node revoke NODE [--undo]: find the node's OpenBao entity, disable or enable it,
# and write the list every node follows.
path "auth/nhi-nodes/role/+/role-id" {
  capabilities = ["read"]
}
path "sys/auth" {
  capabilities = ["read"]
}
path "identity/lookup/entity" {
  capabilities = ["update"]
}
path "identity/entity/id/*" {
  capabilities = ["update"]
}
path "identity/entity/name/nhi-node-*" {
  capabilities = ["create", "read", "update"]
}
path "identity/entity-alias" {
  capabilities = ["create", "update"]
}
path "secret/data/nhi/node-revocations/*" {
  capabilities = ["create", "update"]
}
path "secret/metadata/nhi/node-revocations/*" {
  capabilities = ["delete"]
}
"#;

impl BaoNhiSetup {
    /// A token with only [`NHI_OPERATOR_POLICY`], as an operator would use for
    /// `nhictl node revoke`.
    pub fn operator_token(&self) -> String {
        self.root.must(
            "POST",
            "auth/token/create",
            Some(json!({"policies": ["nhi-operator"], "ttl": "1h", "no_default_policy": true})),
        )["auth"]["client_token"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

/// [`setup_nhi_with`] with the default role options, over plain HTTP.
pub fn setup_nhi(addr: &str, root_token: &str, trust_domain: &str, dir: &Path) -> BaoNhiSetup {
    setup_nhi_with(
        &BaoApi::new(addr, Some(root_token), None),
        trust_domain,
        dir,
        &NhiRoleOptions::default(),
    )
}

/// The accessor of auth mount `mount` (e.g. for identity templates).
pub fn auth_accessor(root: &BaoApi, mount: &str) -> String {
    let auths = root.must("GET", "sys/auth", None);
    let key = format!("{mount}/");
    auths["data"][&key]["accessor"]
        .as_str()
        .or_else(|| auths[&key]["accessor"].as_str())
        .unwrap_or_else(|| panic!("auth mount {mount}/ has no accessor: {auths}"))
        .to_string()
}

/// Enables auth method `kind` at `mount` unless something is mounted there; returns its
/// accessor.
fn enable_auth(root: &BaoApi, mount: &str, kind: &str) -> String {
    let auths = root.must("GET", "sys/auth", None);
    let key = format!("{mount}/");
    if auths["data"][&key].is_null() && auths[&key].is_null() {
        root.must(
            "POST",
            &format!("sys/auth/{mount}"),
            Some(json!({ "type": kind })),
        );
    }
    auth_accessor(root, mount)
}

/// A PKI role for SPIFFE leaves (URI SAN only, EC P-256, client and server auth, not stored)
/// whose allowed URI SANs are `uri_template` (an identity template).
fn spiffe_pki_role(root: &BaoApi, role: &str, uri_template: &str) {
    root.must(
        "POST",
        &format!("pki/roles/{role}"),
        Some(json!({
            "allowed_uri_sans": [uri_template],
            "allowed_uri_sans_template": true,
            "allow_any_name": false,
            "allowed_domains": [],
            "allow_bare_domains": false,
            "allow_subdomains": false,
            "allow_localhost": false,
            "allow_ip_sans": false,
            "enforce_hostnames": false,
            "require_cn": false,
            "use_csr_common_name": false,
            "use_csr_sans": false,
            "server_flag": true,
            "client_flag": true,
            "key_type": "ec",
            "key_bits": 256,
            "key_usage": ["DigitalSignature"],
            // X509-SVID standard 4.1: a leaf's basicConstraints says cA=false (py-spiffe
            // refuses a leaf without the extension); OpenBao leaves it out unless asked.
            "basic_constraints_valid_for_non_ca": true,
            "ttl": "1h",
            "max_ttl": "1h",
            "no_store": true,
        })),
    );
}

/// What an operator does once for nhi (docs/OPENBAO.md): KV v2 at `secret/`, PKI at `pki/`
/// with a root CA for the trust domain, AppRole at `nhi-nodes/` (nodes are enrolled with
/// [`BaoNhiSetup::node`]), the `nhi-node` policy and the `nhi-node` PKI role, which signs only
/// `spiffe://<td>/node/<the node's role name>/...`. Idempotent for the mounts.
pub fn setup_nhi_with(
    root: &BaoApi,
    trust_domain: &str,
    dir: &Path,
    opts: &NhiRoleOptions,
) -> BaoNhiSetup {
    let mounts = root.must("GET", "sys/mounts", None);
    if mounts["data"]["secret/"].is_null() && mounts["secret/"].is_null() {
        root.must(
            "POST",
            "sys/mounts/secret",
            Some(json!({"type": "kv", "options": {"version": "2"}})),
        );
        // A new KV v2 mount answers 400 "Waiting for the primary to upgrade ..." for a moment.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match root.call("GET", "secret/config", None) {
                Ok((200, _)) => break,
                other if Instant::now() > deadline => {
                    panic!("KV v2 at secret/ did not become ready: {other:?}")
                }
                _ => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    if mounts["data"]["pki/"].is_null() && mounts["pki/"].is_null() {
        root.must(
            "POST",
            "sys/mounts/pki",
            Some(json!({"type": "pki", "config": {"max_lease_ttl": "87600h"}})),
        );
        root.must(
            "POST",
            "pki/root/generate/internal",
            Some(json!({
                "common_name": format!("nhi {trust_domain} root CA"),
                "uri_sans": format!("spiffe://{trust_domain}"),
                "exclude_cn_from_sans": true,
                "key_type": "ec",
                "key_bits": 256,
                "ttl": "87600h",
            })),
        );
    }
    let accessor = enable_auth(root, NODES_APPROLE_MOUNT, "approle");
    root.must(
        "PUT",
        "sys/policies/acl/nhi-node",
        Some(json!({"policy": NHI_NODE_POLICY.replace("ACCESSOR", &accessor)})),
    );
    root.must(
        "PUT",
        "sys/policies/acl/nhi-operator",
        Some(json!({ "policy": NHI_OPERATOR_POLICY })),
    );
    spiffe_pki_role(
        root,
        NODE_PKI_ROLE,
        &format!(
            "spiffe://{trust_domain}/node/{{{{identity.entity.aliases.{accessor}.metadata.role_name}}}}/*"
        ),
    );
    BaoNhiSetup {
        root: root.clone(),
        dir: dir.to_path_buf(),
        opts: opts.clone(),
    }
}

/// The policy of a workload's short-lived OpenBao token (JWT login with its service-account
/// token): it may only have a CSR signed under the `nhi-workload` PKI role, whose URI SAN
/// template admits exactly the identity its token proves.
pub const NHI_WORKLOAD_POLICY: &str = r#"# A workload's token, from a JWT login with its service-account token: one SVID for the
# identity that token proves, nothing else.
path "pki/sign/nhi-workload" {
  capabilities = ["update"]
}
"#;

/// nhid's `[openbao]` section for a node logging in with `login`, default mounts and roles.
pub fn node_config(
    addresses: Vec<String>,
    login: &NodeLogin,
    ca_file: Option<&Path>,
) -> nhi_core::openbao_config::OpenBaoConfig {
    use nhi_core::openbao_config::{OpenBaoAuth, OpenBaoConfig};
    OpenBaoConfig {
        addresses,
        ca_file: ca_file.map(Path::to_path_buf),
        namespace: None,
        auth: OpenBaoAuth::AppRole {
            role_id: login.role_id.clone(),
            secret_id_file: login.secret_id_file.clone(),
            mount: NODES_APPROLE_MOUNT.into(),
        },
        kv_mount: "secret".into(),
        kv_prefix: "nhi".into(),
        pki_mount: "pki".into(),
        intermediate_ttl: None,
        workload_auth_mount: "nhi-k8s".into(),
        workload_auth_role: "nhi-workload".into(),
        workload_pki_role: "nhi-workload".into(),
        node_pki_role: NODE_PKI_ROLE.into(),
        poll_interval: Duration::from_secs(2),
        request_timeout: Duration::from_secs(2),
    }
}

/// Where [`setup_workload_issuance`] put things.
pub struct WorkloadIssuance {
    /// Mount of the JWT auth method that verifies service-account tokens.
    pub jwt_mount: String,
    /// Its role, and the PKI role of the same name.
    pub role: String,
}

/// Issue 17's one-time OpenBao setup (docs/OPENBAO.md, "Workload identities proven to
/// OpenBao"): a JWT auth method at `nhi-k8s/` that verifies the cluster's service-account
/// tokens (`sa_public_key_pem`, issuer `sa_issuer`, audience `audience`) and maps their
/// namespace and service-account name to entity-alias metadata; a PKI role `nhi-workload`
/// whose only allowed URI SAN is the template
/// `spiffe://<td>/ns/{{...metadata.ns}}/sa/{{...metadata.sa}}`; the `nhi-workload` policy,
/// which allows nothing but signing under that role. Needs [`setup_nhi_with`] first (the PKI
/// mount and its root).
pub fn setup_workload_issuance(
    root: &BaoApi,
    trust_domain: &str,
    sa_issuer: &str,
    sa_public_key_pem: &str,
    audience: &str,
) -> WorkloadIssuance {
    let (mount, role) = ("nhi-k8s", "nhi-workload");
    let accessor = enable_auth(root, mount, "jwt");
    root.must(
        "POST",
        &format!("auth/{mount}/config"),
        Some(json!({
            "jwt_validation_pubkeys": [sa_public_key_pem],
            "bound_issuer": sa_issuer,
        })),
    );
    root.must(
        "POST",
        &format!("auth/{mount}/role/{role}"),
        Some(json!({
            "role_type": "jwt",
            "bound_audiences": [audience],
            "user_claim": "sub",
            "claim_mappings": {
                "/kubernetes.io/namespace": "ns",
                "/kubernetes.io/serviceaccount/name": "sa",
            },
            "token_policies": ["nhi-workload"],
            "token_ttl": "5m",
            "token_max_ttl": "5m",
            "token_type": "service",
        })),
    );
    let meta = |k: &str| format!("{{{{identity.entity.aliases.{accessor}.metadata.{k}}}}}");
    spiffe_pki_role(
        root,
        role,
        &format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            meta("ns"),
            meta("sa")
        ),
    );
    root.must(
        "PUT",
        "sys/policies/acl/nhi-workload",
        Some(json!({"policy": NHI_WORKLOAD_POLICY})),
    );
    WorkloadIssuance {
        jwt_mount: mount.into(),
        role: role.into(),
    }
}
