//! Test harness for nhi against real components: a private `nhid` per test (own temp dir,
//! state dir and socket), a busybox rootfs, OCI bundles with the nhi hooks, real `runc` with a
//! private `--root`. Used by the integration tests and by the benchmarks in `bench/`.
//!
//! Needs root and `runc` + `busybox` (installed by `scripts/install-deps`). It does not skip
//! itself when they are missing: it fails and says what to install.
//!
//! Size: one harness on purpose (a node, its containers and the clients of its APIs share
//! state and helpers); the kits for other runtimes live beside it (`kube.rs`, `edge.rs`, ...).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use nhi_core::wire::{call_agent, AgentRequest, AgentResponse, Status};

pub mod bao;
pub mod edge;
pub mod kube;
pub mod nomad;
pub mod py;

pub const TRUST_DOMAIN: &str = "example.org";
pub const COMPANION_URL: &str = "http://127.0.0.1:15100";
/// The header (and value) the companion's credential endpoints require: the workload's own
/// code sends it, a forged request cannot.
pub const PROOF_HEADER: &str = "Nhi-Request: true";

/// Companion uids in tests: each [`Node`] names its own block of [`UID_BLOCK`] ids from here
/// (its nhid allocates one per companion), so parallel tests and test binaries never share a
/// companion uid. Far above any account and above systemd's container range.
pub const UID_BASE: u32 = 1_900_000_000;
pub const UID_BLOCK: u32 = 64;
/// Blocks to choose from.
const UID_BLOCKS: u32 = 4096;

/// A companion uid block held for the life of a [`Node`]: an exclusive `flock` on
/// `/tmp/nhi-it-uids/<n>.lock` (released by the kernel when the test process ends, however it
/// ends), so two nodes never allocate from the same ids at once.
pub struct UidBlock {
    pub first: u32,
    pub last: u32,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl UidBlock {
    pub fn claim() -> UidBlock {
        let dir = Path::new("/tmp/nhi-it-uids");
        fs::create_dir_all(dir).expect("uid block lock dir");
        let start = std::process::id() % UID_BLOCKS;
        for i in 0..UID_BLOCKS {
            let n = (start + i) % UID_BLOCKS;
            let f = fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(dir.join(format!("{n}.lock")))
                .expect("uid block lock file");
            if let Ok(lock) =
                nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock)
            {
                let first = UID_BASE + n * UID_BLOCK;
                return UidBlock {
                    first,
                    last: first + UID_BLOCK - 1,
                    _lock: lock,
                };
            }
        }
        panic!("no free companion uid block in /tmp/nhi-it-uids");
    }

    pub fn contains(&self, uid: u32) -> bool {
        (self.first..=self.last).contains(&uid)
    }

    /// `companion.uid_range`'s value.
    pub fn range(&self) -> String {
        format!("{}-{}", self.first, self.last)
    }
}

/// Directory holding the built nhi binaries: `NHI_BIN_DIR`, else the cargo target dir this
/// test binary runs from (`target/<profile>/deps/..`).
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("NHI_BIN_DIR") {
        return d.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

pub fn bin(name: &str) -> PathBuf {
    bin_in(&bin_dir(), name)
}

fn bin_in(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins), or set NHI_BIN_DIR",
        p.display()
    );
    p
}

/// Fails the test (never skips) unless we are root with runc and busybox at hand.
pub fn require_runtime() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "integration tests need root (they run real containers); run scripts/test as root"
    );
    assert!(
        which("runc").is_some(),
        "runc is not installed: run scripts/install-deps"
    );
    busybox();
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(tool))
            .find(|p| p.is_file())
    })
}

fn busybox() -> PathBuf {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .expect("busybox is not installed: run scripts/install-deps (package busybox-static)")
}

/// A process-unique container id (cgroup paths are global, tests run in parallel).
pub fn unique_id(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A private node: config, nhid, runc root and a busybox rootfs, all in one temp dir.
pub struct Node {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub rootfs: PathBuf,
    pub runc_root: PathBuf,
    /// The companion uids of this node's nhid.
    pub uids: UidBlock,
    /// Where its nhi binaries come from.
    bins: PathBuf,
    /// `[companion.cgroup] parent` of this node: unique per node, removed on drop.
    pub cgroup_parent: String,
    nhid: Option<Child>,
}

/// The default test rule: containers annotated `nhi.dev/inject=true` get
/// `spiffe://example.org/container/<name>`.
pub const ANNOTATED_RULE: &str = r#"
[[rule]]
name = "annotated"
spiffe_id = "container/{container.name}"
[rule.match]
annotations = { "nhi.dev/inject" = "true" }
"#;

impl Node {
    /// Writes a config whose rules are `rules` (TOML `[[rule]]` tables) and `extra` settings.
    pub fn new(rules: &str) -> Node {
        Self::with_config(rules, "")
    }

    pub fn with_config(rules: &str, extra_top: &str) -> Node {
        Self::build(rules, extra_top, bin_dir(), false)
    }

    /// A node running an earlier nhi build from `bin_dir` (e.g. main's, for a benchmark
    /// against it in the same run). `legacy_user`: that build predates `companion.uid_range`
    /// and takes one `companion.user` (given the first uid of this node's block).
    pub fn with_bin_dir(rules: &str, bin_dir: &Path, legacy_user: bool) -> Node {
        Self::build(rules, "", bin_dir.to_path_buf(), legacy_user)
    }

    fn build(rules: &str, extra_top: &str, bins: PathBuf, legacy_user: bool) -> Node {
        require_runtime();
        let dir = tempfile::Builder::new()
            .prefix("nhi-it-")
            .tempdir()
            .expect("tempdir");
        // The companion runs as an unprivileged uid: it must be able to reach its binary, and
        // only execute it, like the packages install it (nhid refuses a readable one).
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let bin_copy = dir.path().join("bin");
        fs::create_dir(&bin_copy).unwrap();
        fs::set_permissions(&bin_copy, fs::Permissions::from_mode(0o755)).unwrap();
        let companion = bin_copy.join("nhi-companion");
        install_exec_only(&bin_in(&bins, "nhi-companion"), &companion);
        let uids = UidBlock::claim();
        let companion_uids = if legacy_user {
            format!("user = \"{}\"", uids.first)
        } else {
            format!("uid_range = \"{}\"", uids.range())
        };

        let state_dir = dir.path().join("state");
        let socket = dir.path().join("run/nhid.sock");
        let config = dir.path().join("nhi.toml");
        // Secret dirs stay inside the test's temp dir; a caller's own [store] table gets it too.
        let containers = format!(
            "containers_dir = \"{}\"\n",
            dir.path().join("containers").display()
        );
        let (extra_top, store) = if extra_top.contains("[store]\n") {
            (
                extra_top.replacen("[store]\n", &format!("[store]\n{containers}"), 1),
                String::new(),
            )
        } else {
            (extra_top.to_string(), format!("[store]\n{containers}"))
        };
        // Companion cgroups of parallel tests (and of their nhids' startup clean-ups) never meet.
        let cgroup_parent = format!("/nhi-it/{}", unique_id("node"));
        // An earlier build (legacy_user) predates [companion.cgroup].
        let cgroup = if legacy_user {
            String::new()
        } else {
            format!("[companion.cgroup]\nparent = \"{cgroup_parent}\"\n")
        };
        fs::write(
            &config,
            format!(
                "trust_domain = \"{TRUST_DOMAIN}\"\nstate_dir = \"{}\"\nsocket = \"{}\"\n{extra_top}\n[companion]\nbinary = \"{}\"\n{companion_uids}\n{cgroup}{store}{rules}",
                state_dir.display(),
                socket.display(),
                companion.display(),
            ),
        )
        .unwrap();
        let rootfs = dir.path().join("rootfs");
        make_rootfs(&rootfs);
        let runc_root = dir.path().join("runc");
        Node {
            config,
            socket,
            state_dir,
            rootfs,
            runc_root,
            dir,
            uids,
            bins,
            cgroup_parent,
            nhid: None,
        }
    }

    /// This node's binary `name`.
    pub fn bin(&self, name: &str) -> PathBuf {
        bin_in(&self.bins, name)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// A container annotated for injection and named `name` (so its identity is
    /// `container/<name>`), started through `nhi-runc` (which also mounts `/run/nhi`).
    pub fn named_container(&self, name: &str) -> Container {
        let c = self
            .bundle(&unique_id(name))
            .inject()
            .annotation("nerdctl/name", name)
            .without_hooks()
            .write();
        c.start_with_nhi_runc(&self.config)
            .unwrap_or_else(|e| panic!("nhi-runc run {name}: {e}"));
        c
    }

    /// Runs `nhictl --config <this node's config> args...` with `stdin`.
    pub fn nhictl(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(self.bin("nhictl"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("nhictl");
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().expect("nhictl")
    }

    /// Appends TOML (tables such as `[kubernetes]`) to the node's nhi config; before `start`.
    pub fn append_config(&self, toml: &str) {
        let cfg = fs::read_to_string(&self.config).unwrap();
        fs::write(&self.config, format!("{cfg}\n{toml}\n")).unwrap();
    }

    /// Runs companions from `binary` instead of the node's copy of the workspace's build
    /// (e.g. an installed package's). Before `start`.
    pub fn set_companion(&self, binary: &Path) {
        let cfg = fs::read_to_string(&self.config).unwrap();
        let old = format!(
            "[companion]\nbinary = \"{}\"\n",
            self.path("bin/nhi-companion").display()
        );
        assert!(cfg.contains(&old), "companion section not found in {cfg}");
        let new = format!("[companion]\nbinary = \"{}\"\n", binary.display());
        fs::write(&self.config, cfg.replace(&old, &new)).unwrap();
    }

    /// Adds `key = value` lines to the node's `[companion]` table. Before `start`.
    pub fn companion_config(&self, lines: &str) {
        let cfg = fs::read_to_string(&self.config).unwrap();
        let anchor = format!("uid_range = \"{}\"\n", self.uids.range());
        assert!(
            cfg.contains(&anchor),
            "companion section not found in {cfg}"
        );
        fs::write(
            &self.config,
            cfg.replacen(&anchor, &format!("{anchor}{lines}\n"), 1),
        )
        .unwrap();
    }

    /// The uid the companion serving `container_id` runs as.
    pub fn companion_uid(&self, container_id: &str) -> u32 {
        let pid = self
            .companion_pid(container_id)
            .unwrap_or_else(|| panic!("no companion serves {container_id}"));
        let uid = proc_status(pid, "Uid");
        uid.split_whitespace().next().unwrap().parse().unwrap()
    }

    /// Points nhi at a kubelet root inside the node's temp dir (see [`kube::kubelet_token`]).
    pub fn with_kubelet_root(&self) {
        let root = self.path("kubelet");
        self.append_config(&format!(
            "[kubernetes]\nkubelet_root = \"{}\"",
            root.display()
        ));
    }

    /// Starts nhid and waits until its socket answers.
    pub fn start(&mut self) {
        self.try_start().unwrap_or_else(|e| panic!("{e}"));
    }

    pub fn try_start(&mut self) -> Result<(), String> {
        self.try_start_with(Command::new(self.bin("nhid")))
    }

    /// Starts nhid through `nhid` (a command that ends in an nhid binary, e.g. an installed one
    /// under `setpriv`); `--config` and the log are added here.
    pub fn try_start_with(&mut self, mut nhid: Command) -> Result<(), String> {
        assert!(self.nhid.is_none(), "nhid already running");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("nhid.log"))
            .unwrap();
        let mut child = nhid
            .arg("--config")
            .arg(&self.config)
            .env("NHI_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn nhid");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("nhid exited with {status}: {}", self.log()));
            }
            if let Ok(AgentResponse::Status(_)) =
                call_agent(&self.socket, &AgentRequest::Status, Duration::from_secs(2))
            {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return Err(format!("nhid did not come up: {}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.nhid = Some(child);
        Ok(())
    }

    /// Stops nhid with SIGTERM, as systemd would (SIGKILL after 10 s).
    pub fn stop(&mut self) {
        if let Some(c) = self.nhid.as_ref() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            self.reap();
        }
    }

    /// Waits (up to 10 s) for nhid to exit by itself, e.g. after SIGUSR2.
    pub fn wait_exit(&mut self) {
        if !self.reap() {
            panic!("nhid did not exit within 10 s: {}", self.log());
        }
    }

    /// Waits up to 10 s for nhid to exit, then kills it; whether it exited in time.
    fn reap(&mut self) -> bool {
        let Some(mut c) = self.nhid.take() else {
            return true;
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
        false
    }

    /// SIGKILLs nhid: a crash, nothing of its shutdown runs.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.nhid.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// nhid's pid (the parent of every companion).
    pub fn nhid_pid(&self) -> i32 {
        self.nhid.as_ref().expect("nhid running").id() as i32
    }

    /// Adds `line` (e.g. `orphan_timeout = "2s"`) to the node's `[companion]` table; before
    /// `start`.
    pub fn set_companion_option(&self, line: &str) {
        let cfg = fs::read_to_string(&self.config).unwrap();
        let table = "\n[companion]\n";
        assert!(cfg.contains(table), "companion section not found in {cfg}");
        fs::write(
            &self.config,
            cfg.replacen(table, &format!("{table}{line}\n"), 1),
        )
        .unwrap();
    }

    /// Sends SIGHUP to nhid (reloads the edge policies).
    pub fn reload(&self) {
        self.signal(nix::sys::signal::Signal::SIGHUP);
    }

    /// Sends `sig` to nhid.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let c = self.nhid.as_ref().expect("nhid running");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig)
            .unwrap_or_else(|e| panic!("{sig} to nhid: {e}"));
    }

    /// Every record of this node's audit log (default `[audit] dir`), oldest first.
    pub fn audit_records(&self) -> Vec<serde_json::Value> {
        let dir = self.state_dir.join("audit");
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "jsonl"))
            .collect();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap()
                    .lines()
                    .map(|l| serde_json::from_str(l).unwrap())
                    .collect::<Vec<serde_json::Value>>()
            })
            .collect()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.path("nhid.log")).unwrap_or_default()
    }

    pub fn status(&self) -> Status {
        match call_agent(&self.socket, &AgentRequest::Status, Duration::from_secs(5)) {
            Ok(AgentResponse::Status(s)) => s,
            other => panic!("status: {other:?}"),
        }
    }

    pub fn agent(&self, req: &AgentRequest) -> AgentResponse {
        call_agent(&self.socket, req, Duration::from_secs(10)).expect("agent call")
    }

    /// Companion pid serving `container_id`, from nhid's status.
    pub fn companion_pid(&self, container_id: &str) -> Option<i32> {
        self.status()
            .workloads
            .into_iter()
            .find(|w| w.containers.iter().any(|c| c == container_id))
            .map(|w| w.companion_pid)
    }

    /// SIGKILLs the companion serving `container_id` (a crash, as nhid sees it); its pid.
    pub fn kill_companion(&self, container_id: &str) -> i32 {
        let pid = self
            .companion_pid(container_id)
            .unwrap_or_else(|| panic!("no companion serves {container_id}"));
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .expect("kill the companion");
        pid
    }

    pub fn bundle(&self, id: &str) -> BundleBuilder<'_> {
        BundleBuilder {
            node: self,
            id: id.to_string(),
            args: vec!["sleep".into(), "3600".into()],
            annotations: vec![],
            env: vec![],
            host_netns: false,
            join_netns: None,
            mounts: vec![],
            hooks: true,
            user: None,
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // Remove whatever containers a failing test left behind, then nhid.
        if let Ok(out) = Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["list", "-q"])
            .output()
        {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = runc(&self.runc_root, &["delete", "-f", id]);
            }
        }
        // For good: SIGUSR2 stops the companions too (SIGTERM would leave them running for a
        // next nhid that never comes), and whatever is left in the node's cgroups is killed.
        if let Some(c) = self.nhid.as_ref() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGUSR2,
            );
            self.reap();
        }
        kill_cgroup_tree(&self.cgroup_parent);
        remove_cgroup_tree(&self.cgroup_parent);
        // The shared parent goes with the last node (fails while others use it).
        for dir in cgroup_dirs("/nhi-it") {
            let _ = fs::remove_dir(dir);
        }
    }
}

/// The directories of cgroup `path` in every hierarchy nhid may use (v2, v1 memory and pids).
pub fn cgroup_dirs(path: &str) -> Vec<PathBuf> {
    let m = nhi_core::cgroupfs::own_mounts().expect("mountinfo");
    [m.v2, m.memory_v1, m.pids_v1]
        .into_iter()
        .flatten()
        .map(|mount| mount.join(path.trim_start_matches('/')))
        .collect()
}

/// SIGKILLs every process left in cgroup `path` and its children (v2 membership), and waits
/// (up to 5 s) until they are gone so the cgroups can be removed.
fn kill_cgroup_tree(path: &str) {
    let procs = |dir: &Path| -> Vec<i32> {
        let mut out = Vec::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            if let Ok(text) = fs::read_to_string(d.join("cgroup.procs")) {
                out.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
            }
            if let Ok(entries) = fs::read_dir(&d) {
                stack.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
            }
        }
        out
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    for dir in cgroup_dirs(path) {
        loop {
            let left = procs(&dir);
            if left.is_empty() || Instant::now() > deadline {
                break;
            }
            for pid in left {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Removes cgroup `path` and its (empty) children in every hierarchy.
fn remove_cgroup_tree(path: &str) {
    for dir in cgroup_dirs(path) {
        if let Ok(entries) = fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    let _ = fs::remove_dir(e.path());
                }
            }
        }
        let _ = fs::remove_dir(&dir);
    }
}

/// Copies `src` to `dst` as root-owned, mode 0711: executable but unreadable by companion
/// uids, as the packages install the companion (the kernel then starts it non-dumpable).
pub fn install_exec_only(src: &Path, dst: &Path) {
    fs::copy(src, dst).unwrap();
    std::os::unix::fs::chown(dst, Some(0), Some(0)).unwrap();
    fs::set_permissions(dst, fs::Permissions::from_mode(0o711)).unwrap();
}

fn make_rootfs(root: &Path) {
    let bin = root.join("bin");
    fs::create_dir_all(&bin).unwrap();
    for d in ["proc", "dev", "sys", "tmp", "etc", "run"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    fs::copy(busybox(), bin.join("busybox")).unwrap();
    for applet in [
        "sh", "wget", "ps", "sleep", "cat", "true", "ip", "echo", "kill", "ls", "id",
        // Edge-policy tests: UDP (tftp), DNS (nslookup), bounded waits, mount attempts.
        "timeout", "tftp", "nslookup", "mount",
    ] {
        std::os::unix::fs::symlink("busybox", bin.join(applet)).unwrap();
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\n").unwrap();
}

pub fn runc(root: &Path, args: &[&str]) -> Output {
    Command::new("runc")
        .arg("--root")
        .arg(root)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run runc")
}

pub struct BundleBuilder<'n> {
    node: &'n Node,
    id: String,
    args: Vec<String>,
    annotations: Vec<(String, String)>,
    env: Vec<String>,
    host_netns: bool,
    join_netns: Option<i32>,
    mounts: Vec<(String, PathBuf)>,
    hooks: bool,
    user: Option<(u32, u32)>,
}

impl<'n> BundleBuilder<'n> {
    /// The container's process runs as `uid`:`gid` (`process.user`).
    pub fn user(mut self, uid: u32, gid: u32) -> Self {
        self.user = Some((uid, gid));
        self
    }
    /// Join the network namespace of `pid` (as a pod's app container joins its sandbox's).
    pub fn join_netns(mut self, pid: i32) -> Self {
        self.join_netns = Some(pid);
        self
    }
    /// Read-only bind mount of host `source` at `dest`.
    pub fn mount(mut self, dest: &str, source: &Path) -> Self {
        self.mounts.push((dest.into(), source.into()));
        self
    }
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args = args.iter().map(|s| s.to_string()).collect();
        self
    }
    pub fn annotation(mut self, k: &str, v: &str) -> Self {
        self.annotations.push((k.into(), v.into()));
        self
    }
    /// Shorthand for `nhi.dev/inject=true`.
    pub fn inject(self) -> Self {
        self.annotation("nhi.dev/inject", "true")
    }
    pub fn env(mut self, kv: &str) -> Self {
        self.env.push(kv.into());
        self
    }
    pub fn host_netns(mut self) -> Self {
        self.host_netns = true;
        self
    }
    pub fn without_hooks(mut self) -> Self {
        self.hooks = false;
        self
    }

    /// Writes `<dir>/bundles/<id>/config.json` and returns the container handle (not started).
    pub fn write(self) -> Container {
        let bundle = self.node.path(&format!("bundles/{}", self.id));
        fs::create_dir_all(&bundle).unwrap();
        let out = Command::new("runc")
            .arg("spec")
            .current_dir(&bundle)
            .output()
            .expect("runc spec");
        assert!(out.status.success(), "runc spec: {out:?}");
        let path = bundle.join("config.json");
        let mut spec: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        spec["root"]["path"] = self.node.rootfs.display().to_string().into();
        spec["root"]["readonly"] = true.into();
        spec["process"]["terminal"] = false.into();
        spec["process"]["args"] = self.args.into();
        let mut env: Vec<serde_json::Value> = spec["process"]["env"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        env.extend(self.env.into_iter().map(Into::into));
        spec["process"]["env"] = env.into();
        spec["hostname"] = "workload".into();
        if let Some((uid, gid)) = self.user {
            spec["process"]["user"] = serde_json::json!({"uid": uid, "gid": gid});
        }
        let ann: serde_json::Map<String, serde_json::Value> = self
            .annotations
            .into_iter()
            .map(|(k, v)| (k, v.into()))
            .collect();
        spec["annotations"] = ann.into();
        if self.host_netns {
            let ns = spec["linux"]["namespaces"].as_array_mut().unwrap();
            ns.retain(|n| n["type"] != "network");
        }
        if let Some(pid) = self.join_netns {
            for n in spec["linux"]["namespaces"].as_array_mut().unwrap() {
                if n["type"] == "network" {
                    n["path"] = format!("/proc/{pid}/ns/net").into();
                }
            }
        }
        for (dest, src) in self.mounts {
            spec["mounts"]
                .as_array_mut()
                .unwrap()
                .push(serde_json::json!({
                    "destination": dest, "type": "bind", "source": src, "options": ["rbind", "ro"],
                }));
        }
        if self.hooks {
            let hook = self.node.bin("nhi-hook").display().to_string();
            let cfg = self.node.config.display().to_string();
            spec["hooks"] = serde_json::json!({
                "createRuntime": [{"path": hook, "args": ["nhi-hook", "createRuntime", "--config", cfg]}],
                "poststop": [{"path": hook, "args": ["nhi-hook", "poststop", "--config", cfg]}],
            });
        }
        fs::write(&path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
        Container {
            id: self.id,
            bundle,
            runc_root: self.node.runc_root.clone(),
        }
    }
}

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    runc_root: PathBuf,
}

impl Container {
    fn runc(&self, args: &[&str]) -> Output {
        runc(&self.runc_root, args)
    }

    /// `runc run -d`: returns once the container runs (hooks done), or runc's stderr.
    pub fn start(&self) -> Result<(), String> {
        self.detached(&["run", "-d"])
    }

    /// `nhi-runc run -d` with the node's config (write the bundle `without_hooks()`): the
    /// injection path that also mounts `/run/nhi`.
    pub fn start_with_nhi_runc(&self, config: &Path) -> Result<(), String> {
        let mut cmd = Command::new(bin("nhi-runc"));
        cmd.env("NHI_CONFIG", config);
        self.detached_with(cmd, &["run", "-d"])
    }

    /// `runc create`: the container exists, its process waits for `runc start`.
    pub fn create(&self) -> Result<(), String> {
        self.detached(&["create"])
    }

    /// The container inherits runc's stdio, so never hand it a pipe we wait on.
    fn detached(&self, verb: &[&str]) -> Result<(), String> {
        self.detached_with(Command::new("runc"), verb)
    }

    /// `cmd` (runc or a wrapper) with `--root`, `verb`, the bundle and the id.
    fn detached_with(&self, mut cmd: Command, verb: &[&str]) -> Result<(), String> {
        let err_path = self.bundle.join("runc.stderr");
        let err = fs::File::create(&err_path).unwrap();
        let status = cmd
            .arg("--root")
            .arg(&self.runc_root)
            .args(verb)
            .arg("--bundle")
            .arg(&self.bundle)
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .status()
            .expect("runtime");
        if status.success() {
            Ok(())
        } else {
            Err(fs::read_to_string(&err_path).unwrap_or_default())
        }
    }

    /// `runc run` in the foreground: the container's output and runc's exit status.
    pub fn run(&self) -> Output {
        Command::new("runc")
            .arg("--root")
            .arg(&self.runc_root)
            .args(["run", "--bundle"])
            .arg(&self.bundle)
            .arg(&self.id)
            .stdin(Stdio::null())
            .output()
            .expect("runc run")
    }

    pub fn exec(&self, args: &[&str]) -> Output {
        let mut a = vec!["exec", &self.id];
        a.extend_from_slice(args);
        self.runc(&a)
    }

    /// `runc exec --user uid:gid`.
    pub fn exec_as(&self, uid: u32, gid: u32, args: &[&str]) -> Output {
        let user = format!("{uid}:{gid}");
        let mut a = vec!["exec", "--user", &user, &self.id];
        a.extend_from_slice(args);
        self.runc(&a)
    }

    /// GET from the companion with busybox wget inside the container, as the workload's own
    /// code does (with the proof header); the body on 2xx.
    pub fn get(&self, path: &str) -> Result<String, String> {
        let url = format!("{COMPANION_URL}{path}");
        let out = self.exec(&["wget", "-qO-", "--header", PROOF_HEADER, &url]);
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    pub fn get_json(&self, path: &str) -> serde_json::Value {
        let body = self
            .get(path)
            .unwrap_or_else(|e| panic!("GET {path} in {}: {e}", self.id));
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    pub fn pid(&self) -> i32 {
        let out = self.runc(&["state", &self.id]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("runc state {}: {e}: {out:?}", self.id));
        v["pid"].as_i64().expect("pid") as i32
    }

    /// `runc delete -f`: kills the container and runs the poststop hooks.
    pub fn delete(&self) {
        let out = self.runc(&["delete", "-f", &self.id]);
        assert!(out.status.success(), "runc delete {}: {out:?}", self.id);
    }
}

/// A `/proc/<pid>/ns/<kind>` identity (the link text, e.g. `net:[4026532181]`).
pub fn ns_of(pid: i32, kind: &str) -> String {
    fs::read_link(format!("/proc/{pid}/ns/{kind}"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/ns/{kind}: {e}"))
        .display()
        .to_string()
}

/// A field of /proc/<pid>/status, e.g. `CapEff`.
pub fn proc_status(pid: i32, field: &str) -> String {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

pub fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(true)
}

/// Waits up to `timeout` for `cond`.
/// HTTP/1.1 `GET`s of `paths`, in order, over the one keep-alive connection `s` (each request
/// in a single write: pieces would meet Nagle). Returns each answer's status; bodies are read
/// and dropped.
pub fn keep_alive_gets(
    s: std::net::TcpStream,
    host: &str,
    paths: impl IntoIterator<Item = String>,
) -> Vec<u16> {
    use std::io::{BufRead, Read, Write};
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut statuses = Vec::new();
    for path in paths {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\n{PROOF_HEADER}\r\nContent-Length: 0\r\n\r\n"
        );
        w.write_all(req.as_bytes()).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no HTTP status line: {line:?}"));
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            r.read_line(&mut h).unwrap();
            if h == "\r\n" || h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0; len];
        r.read_exact(&mut body).unwrap();
        statuses.push(status);
    }
    statuses
}

pub fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    cond()
}

/// Plain HTTP/1.1 request to the companion (with the proof header, as the workload's own code
/// sends it) from a thread that joined the network namespace of `pid` (and nothing else), to
/// see status codes and error bodies busybox wget hides.
pub fn http_in_netns(pid: i32, method: &str, path: &str) -> (u16, String) {
    http_in_netns_with(pid, method, path, "")
}

/// [`http_in_netns`] with a JSON request body.
pub fn http_in_netns_with(pid: i32, method: &str, path: &str, body: &str) -> (u16, String) {
    http_in_netns_with_headers(pid, method, path, &[], body)
}

/// [`http_in_netns_with`] plus request headers.
pub fn http_in_netns_with_headers(
    pid: i32,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{PROOF_HEADER}\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_http_in_netns(pid, 15100, &req)
}

/// Sends `request` as is to `127.0.0.1:<port>` from a thread in the network namespace of
/// `pid`; the status and the body of the answer.
pub fn raw_http_in_netns(pid: i32, port: u16, request: &str) -> (u16, String) {
    let ns = fs::File::open(format!("/proc/{pid}/ns/net")).expect("open netns");
    let req = request.to_string();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        raw_request(port, &req).unwrap_or_else(|e| panic!("{e}"))
    })
    .join()
    .expect("netns client thread")
}

/// One plain HTTP/1.1 request (with the proof header) to the companion at `127.0.0.1:15100` of
/// the network namespace the calling thread is in: its status and body, or why there was no
/// answer.
pub fn companion_request(method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{PROOF_HEADER}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    raw_request(15100, &req)
}

/// Sends `request` as is to `127.0.0.1:<port>` of the network namespace the calling thread is
/// in: the status and body of the answer, or why there was none.
pub fn raw_request(port: u16, request: &str) -> Result<(u16, String), String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))
        .map_err(|e| format!("connect 127.0.0.1:{port}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)
        .map_err(|e| format!("read: {e}"))?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer: {resp:?}"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}
