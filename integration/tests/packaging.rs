//! The node packages (issue 7): `scripts/package` builds a .deb and an .rpm with exactly the
//! expected files; lintian finds no errors; the .deb installs, upgrades, is removed and purged
//! cleanly in a clean Debian root (mmdebstrap minbase, cached under /var/cache/nhi-test) and the
//! .rpm's scriptlets run there too; and on this machine the installed binaries, wired in by the
//! installed `nhictl configure containerd`, give a container started through the installed
//! shim a companion running as the package's `nhi-companion` user, with nhid confined to the
//! capability bounding set of the shipped systemd unit.
//!
//! One package build (the dev profile, which reuses the workspace's build; `scripts/package`'s
//! default for users is release) is shared by every test here.
//!
//! Size: one test binary per capability (the packages), sharing one built .deb/.rpm pair.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use nhi_integration::kube::CriContainerd;
use nhi_integration::*;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .into()
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn lines(s: &str) -> BTreeSet<String> {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
}

/// Builds both packages once for all tests of this file.
fn packages() -> &'static Packages {
    static P: OnceLock<Packages> = OnceLock::new();
    P.get_or_init(|| {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the packaging tests install packages: run them as root (scripts/test)"
        );
        let out_dir = bin_dir().join("packages-test");
        let _ = fs::remove_dir_all(&out_dir);
        let t = Instant::now();
        let stdout = ok(Command::new(repo().join("scripts/package"))
            .args(["--profile", "dev", "--out"])
            .arg(&out_dir)
            .stderr(Stdio::inherit()));
        eprintln!("scripts/package --profile dev: {:.1?}", t.elapsed());
        let arch = ok(Command::new("dpkg").arg("--print-architecture"));
        let deb = out_dir.join(format!("nhi_{VERSION}-1_{}.deb", arch.trim()));
        let rpm = out_dir.join(format!("nhi-{VERSION}-1.{}.rpm", std::env::consts::ARCH));
        for p in [&deb, &rpm] {
            assert!(
                p.is_file(),
                "{} not built; scripts/package said {stdout}",
                p.display()
            );
            assert!(stdout.contains(p.to_str().unwrap()), "{stdout}");
        }
        Packages { deb, rpm }
    })
}

/// Every path the packages hold besides their format-specific ones.
const COMMON: &[&str] = &[
    "/etc/nhi",
    "/etc/nhi/nhi.toml",
    "/usr/bin/containerd-shim-nhi-v2",
    "/usr/bin/nhi-hook",
    "/usr/bin/nhi-runc",
    "/usr/bin/nhictl",
    "/usr/libexec/nhi",
    "/usr/libexec/nhi/nhi-companion",
    "/usr/sbin/nhid",
    "/usr/share/doc/nhi",
    "/usr/share/doc/nhi/examples",
    "/usr/share/doc/nhi/examples/hooks-runc.json",
    "/usr/share/doc/nhi/examples/kubernetes",
    "/usr/share/doc/nhi/examples/kubernetes/runtimeclass.yaml",
    "/usr/share/doc/nhi/examples/nomad",
    "/usr/share/doc/nhi/examples/nomad/client.hcl",
    "/usr/share/man/man1/containerd-shim-nhi-v2.1.gz",
    "/usr/share/man/man1/nhi-hook.1.gz",
    "/usr/share/man/man1/nhi-runc.1.gz",
    "/usr/share/man/man1/nhictl.1.gz",
    "/usr/share/man/man8/nhid.8.gz",
    "/usr/share/nhi",
    "/usr/share/nhi/hooks.d",
    "/usr/share/nhi/hooks.d/nhi-createRuntime.json",
    "/usr/share/nhi/hooks.d/nhi-poststop.json",
];

/// Directories a .deb lists that other packages own too.
const DEB_SHARED_DIRS: &[&str] = &[
    "/",
    "/etc",
    "/lib",
    "/lib/systemd",
    "/lib/systemd/system",
    "/usr",
    "/usr/bin",
    "/usr/libexec",
    "/usr/sbin",
    "/usr/share",
    "/usr/share/doc",
    "/usr/share/man",
    "/usr/share/man/man1",
    "/usr/share/man/man8",
];

fn expected(extra: &[&str]) -> BTreeSet<String> {
    COMMON.iter().chain(extra).map(|s| s.to_string()).collect()
}

#[test]
fn packages_hold_exactly_the_expected_files() {
    let p = packages();
    // dpkg-deb -c: "drwxr-xr-x root/root 0 2026-01-01 00:00 ./etc/nhi/"
    let listing = ok(Command::new("dpkg-deb").arg("-c").arg(&p.deb));
    let mut modes = std::collections::BTreeMap::new();
    let deb: BTreeSet<String> = listing
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(f[1], "root/root", "owner of {l}");
            let path = f[5].trim_start_matches('.').trim_end_matches('/');
            let path = if path.is_empty() { "/" } else { path }.to_string();
            modes.insert(path.clone(), f[0].to_string());
            path
        })
        .collect();
    let mut want = expected(&[
        "/lib/systemd/system/nhid.service",
        "/usr/share/doc/nhi/copyright",
        "/usr/share/doc/nhi/changelog.Debian.gz",
    ]);
    want.extend(DEB_SHARED_DIRS.iter().map(|s| s.to_string()));
    assert_eq!(deb, want, "files of {}", p.deb.display());
    for (path, mode) in &modes {
        let want = if mode.starts_with('d') {
            "drwxr-xr-x"
        } else if path.contains("libexec/") {
            // Exec-only: companions start non-dumpable (nhid refuses a readable binary).
            "-rwx--x--x"
        } else if path.contains("/bin/") || path.contains("/sbin/") {
            "-rwxr-xr-x"
        } else {
            "-rw-r--r--"
        };
        assert_eq!(mode, want, "mode of {path}");
    }
    let info = ok(Command::new("dpkg-deb")
        .arg("-I")
        .arg(&p.deb)
        .arg("conffiles"));
    assert_eq!(info.trim(), "/etc/nhi/nhi.toml", "the only conffile");
    let control = ok(Command::new("dpkg-deb").arg("-f").arg(&p.deb));
    assert!(
        control.contains(&format!("Version: {VERSION}-1\n")),
        "{control}"
    );
    assert!(control.contains("Depends: libc6"), "{control}");
    // Edge policy: nhid runs nft inside workload network namespaces.
    assert!(
        control.contains("Recommends: runc | crun, nftables"),
        "{control}"
    );

    let rpm = lines(&ok(Command::new("rpm").arg("-qpl").arg(&p.rpm)));
    let want = expected(&[
        "/usr/lib/systemd/system/nhid.service",
        "/usr/share/licenses/nhi",
        "/usr/share/licenses/nhi/copyright",
    ]);
    assert_eq!(rpm, want, "files of {}", p.rpm.display());
    let recommends = ok(Command::new("rpm")
        .args(["-qp", "--recommends"])
        .arg(&p.rpm));
    assert!(recommends.contains("nftables"), "{recommends}");
    let config = ok(Command::new("rpm").args(["-qpc"]).arg(&p.rpm));
    assert_eq!(config.trim(), "/etc/nhi/nhi.toml", "the only config file");
    let noreplace = ok(Command::new("rpm")
        .args(["-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"])
        .arg(&p.rpm));
    assert!(
        noreplace.contains("/etc/nhi/nhi.toml cn"),
        "nhi.toml is %config(noreplace): {noreplace}"
    );
    assert_eq!(
        ok(Command::new("rpm")
            .args(["-qp", "--qf", "%{VERSION}-%{RELEASE}"])
            .arg(&p.rpm)),
        format!("{VERSION}-1")
    );
}

/// The companion uid range the packages reserve in /etc/subuid and /etc/subgid
/// (`first:count`): `companion.uid_range`'s default.
const RESERVED_RANGE: &str = "1879048192:65536";

/// Lintian tags accepted on the .deb, each justified in docs/PACKAGING.md.
const ACCEPTED_LINTIAN: &[&str] = &[
    "initial-upload-closes-no-bugs",
    "hardening-no-fortify-functions",
    "package-supports-alternative-init-but-no-init.d-script",
    "spelling-error-in-binary",
    // The companion is exec-only (0711) so the kernel starts it non-dumpable.
    "executable-is-not-world-readable",
    "non-standard-executable-perm",
    "maintainer-script-calls-systemctl",
];

#[test]
fn lintian_finds_no_errors_and_only_accepted_warnings() {
    let p = packages();
    let out = run(Command::new("lintian")
        .args(["--pedantic", "--display-info", "--no-tag-display-limit"])
        .arg(&p.deb));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut tags = BTreeSet::new();
    for l in text.lines() {
        let Some((kind, rest)) = l.split_once(": nhi") else {
            continue;
        };
        let tag = rest
            .trim_start_matches([':', ' '])
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_string();
        assert_ne!(kind, "E", "lintian error: {l}");
        assert!(
            ACCEPTED_LINTIAN.contains(&tag.as_str()),
            "lintian tag {tag} is not accepted (docs/PACKAGING.md): {l}"
        );
        tags.insert(tag);
    }
    // lintian exits 0 when it found no errors (and 1 with errors, 2 when it could not run).
    assert!(
        out.status.success(),
        "lintian: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("hardening-no-fortify-functions"),
        "lintian ran on the package and reported its info tags: {text}"
    );
}

// ---------------------------------------------------------------------------------------------
// A clean Debian root.

const CACHE_DIR: &str = "/var/cache/nhi-test";
const SUITE: &str = "bookworm";
const MIRROR: &str = "http://deb.debian.org/debian";

/// A Debian minbase tarball: made with mmdebstrap once and reused for a week (a fresh one is
/// made when it is missing or older). Each test unpacks its own copy.
fn minbase_tarball() -> PathBuf {
    // Tests of this file share one bootstrap.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cache = Path::new(CACHE_DIR);
    fs::create_dir_all(cache).unwrap();
    let tarball = cache.join(format!("{SUITE}-minbase.tar"));
    let fresh = fs::metadata(&tarball)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < Duration::from_secs(7 * 24 * 3600));
    if !fresh {
        assert!(
            which("mmdebstrap").is_some(),
            "mmdebstrap is not installed: run scripts/install-deps"
        );
        // mmdebstrap picks the output format from the name: keep ".tar" last.
        let tmp = cache.join(format!("{SUITE}-minbase.{}.tar", std::process::id()));
        let t = Instant::now();
        ok(Command::new("mmdebstrap")
            .args(["--variant=minbase", "--quiet", SUITE])
            .arg(&tmp)
            .arg(MIRROR));
        eprintln!("mmdebstrap --variant=minbase {SUITE}: {:.1?}", t.elapsed());
        fs::rename(&tmp, &tarball).unwrap();
    }
    tarball
}

/// A Debian root unpacked in a temp dir, with /proc mounted while it lives.
struct Chroot {
    dir: tempfile::TempDir,
    proc_mounted: bool,
}

impl Chroot {
    fn new() -> Chroot {
        let tarball = minbase_tarball();
        let dir = tempfile::Builder::new()
            .prefix("nhi-pkg-root-")
            .tempdir()
            .unwrap();
        ok(Command::new("tar")
            .args(["--numeric-owner", "-xpf"])
            .arg(&tarball)
            .arg("-C")
            .arg(dir.path()));
        Chroot {
            dir,
            proc_mounted: false,
        }
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.root().join(p.trim_start_matches('/'))
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(self.root())
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C");
        c
    }

    /// `/proc`, and the host's cgroup hierarchies at `/sys/fs/cgroup` as on a booted host
    /// (nhid gives each companion a cgroup and refuses to start without them).
    fn mount_proc(&mut self) {
        ok(Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(self.path("/proc")));
        fs::create_dir_all(self.path("/sys/fs/cgroup")).unwrap();
        ok(Command::new("mount")
            .args(["--rbind", "/sys/fs/cgroup"])
            .arg(self.path("/sys/fs/cgroup")));
        ok(Command::new("mount")
            .arg("--make-rslave")
            .arg(self.path("/sys/fs/cgroup")));
        self.proc_mounted = true;
    }

    fn umount_proc(&mut self) {
        if self.proc_mounted {
            ok(Command::new("umount").arg(self.path("/proc")));
            ok(Command::new("umount")
                .arg("-R")
                .arg(self.path("/sys/fs/cgroup")));
            self.proc_mounted = false;
            // The shipped config's companion cgroup parent, made by the nhid that ran here.
            for dir in cgroup_dirs(nhi_core::config::DEFAULT_CGROUP_PARENT) {
                let _ = fs::remove_dir(dir);
            }
        }
    }

    /// Every path in the root but the pseudo and scratch file systems, with its type.
    fn snapshot(&self) -> BTreeSet<String> {
        let out = ok(Command::new("find")
            .arg(".")
            .args(["-xdev", "-printf", "%y %p\n"])
            .current_dir(self.root()));
        out.lines()
            .filter(|l| {
                let p = &l[2..];
                !["./proc/", "./dev/", "./sys/", "./tmp/", "./run/"]
                    .iter()
                    .any(|pre| p.starts_with(pre))
            })
            .map(String::from)
            .collect()
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        if self.proc_mounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.path("/proc"))
                .status();
            let _ = Command::new("umount")
                .args(["-R", "-l"])
                .arg(self.path("/sys/fs/cgroup"))
                .status();
        }
    }
}

/// Files dpkg, useradd and userdel may leave behind as bookkeeping (logs, backups).
fn bookkeeping(entry: &str) -> bool {
    let p = &entry[2..];
    [
        "./var/log/dpkg.log",
        "./var/lib/dpkg/status-old",
        "./var/lib/dpkg/diversions-old",
        "./var/lib/dpkg/statoverride-old",
        "./etc/passwd-",
        "./etc/group-",
        "./etc/shadow-",
        "./etc/gshadow-",
        "./etc/subuid-",
        "./etc/subgid-",
        "./var/log/faillog",
        "./var/log/lastlog",
    ]
    .contains(&p)
}

#[test]
fn deb_installs_upgrades_and_purges_cleanly_in_a_clean_debian_root() {
    let p = packages();
    let mut root = Chroot::new();
    let before = root.snapshot();
    let passwd_before = fs::read_to_string(root.path("/etc/passwd")).unwrap();
    let group_before = fs::read_to_string(root.path("/etc/group")).unwrap();
    let shadow_before = fs::read_to_string(root.path("/etc/shadow")).unwrap();
    let subids_before: Vec<Option<String>> = ["/etc/subuid", "/etc/subgid"]
        .map(|f| fs::read_to_string(root.path(f)).ok())
        .to_vec();
    fs::copy(&p.deb, root.path("/tmp/nhi.deb")).unwrap();

    // Install: maintainer scripts run; no systemd here, so nothing is enabled or started.
    let out = ok(&mut root.cmd(&["dpkg", "-i", "/tmp/nhi.deb"]));
    for line in [
        "nhictl configure containerd",
        "nhictl configure docker",
        "nhictl configure crio",
        "nhictl configure podman",
        "systemd is not running",
    ] {
        assert!(out.contains(line), "postinst output lacks {line:?}: {out}");
    }
    assert_eq!(
        ok(&mut root.cmd(&["nhictl", "--version"])).trim(),
        format!("nhictl {VERSION}")
    );
    assert_eq!(
        ok(&mut root.cmd(&["nhid", "--version"])).trim(),
        format!("nhid {VERSION}")
    );
    let user = ok(&mut root.cmd(&["getent", "passwd", "nhi-companion"]));
    let f: Vec<&str> = user.trim().split(':').collect();
    assert!(f[2].parse::<u32>().unwrap() < 1000, "a system uid: {user}");
    assert_eq!(&f[5..], ["/nonexistent", "/usr/sbin/nologin"], "{user}");
    assert!(!root.path("/nonexistent").exists(), "no home created");
    for f in ["/etc/subuid", "/etc/subgid"] {
        let text = fs::read_to_string(root.path(f)).unwrap();
        assert!(
            text.contains(&format!("nhi-companion:{RESERVED_RANGE}\n")),
            "{f} reserves the companion range: {text}"
        );
    }
    let state = fs::metadata(root.path("/var/lib/nhi")).unwrap();
    assert!(state.is_dir());
    assert_eq!(state.permissions().mode() & 0o7777, 0o700);
    assert_eq!((state.uid(), state.gid()), (0, 0));
    assert_eq!(
        fs::read_to_string(root.path("/etc/nhi/nhi.toml")).unwrap(),
        fs::read_to_string(repo().join("config/nhi.toml")).unwrap()
    );
    assert!(
        !root
            .path("/etc/systemd/system/multi-user.target.wants/nhid.service")
            .exists(),
        "nhid is not enabled where systemd does not run"
    );

    // nhid starts with the shipped configuration (placeholder trust domain) as installed.
    root.mount_proc();
    let nhid = root
        .cmd(&["nhid"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let up = eventually(Duration::from_secs(20), || {
        root.cmd(&["nhictl", "status"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let status = run(&mut root.cmd(&["nhictl", "status"]));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(nhid.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let nhid_out = nhid.wait_with_output().unwrap();
    root.umount_proc();
    assert!(
        up,
        "installed nhid did not come up with the shipped config: {}",
        String::from_utf8_lossy(&nhid_out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("cluster.example.org"),
        "{status:?}"
    );
    assert!(
        root.path("/var/lib/nhi/master.key").is_file(),
        "sealed keys in /var/lib/nhi"
    );

    // Upgrade (reinstall): an edited conffile is kept without a prompt; scripts run again.
    let edited = fs::read_to_string(root.path("/etc/nhi/nhi.toml"))
        .unwrap()
        .replace("cluster.example.org", "edited.example.org");
    fs::write(root.path("/etc/nhi/nhi.toml"), &edited).unwrap();
    let out = ok(&mut root.cmd(&["dpkg", "-i", "/tmp/nhi.deb"]));
    assert!(
        !out.contains("nhictl configure"),
        "upgrade does not repeat the install notes: {out}"
    );
    assert_eq!(
        fs::read_to_string(root.path("/etc/nhi/nhi.toml")).unwrap(),
        edited,
        "the package manager never overwrites /etc/nhi/nhi.toml"
    );

    // Remove: binaries go; configuration, state and the user stay.
    ok(&mut root.cmd(&["dpkg", "-r", "nhi"]));
    for gone in ["/usr/bin/nhictl", "/usr/sbin/nhid", "/usr/libexec/nhi"] {
        assert!(!root.path(gone).exists(), "{gone} left after remove");
    }
    assert!(root.path("/etc/nhi/nhi.toml").is_file());
    assert!(root.path("/var/lib/nhi/master.key").is_file());
    ok(&mut root.cmd(&["getent", "passwd", "nhi-companion"]));

    // Purge: nothing of nhi is left.
    ok(&mut root.cmd(&["dpkg", "--purge", "nhi"]));
    assert!(!run(&mut root.cmd(&["getent", "passwd", "nhi-companion"]))
        .status
        .success());
    assert!(!run(&mut root.cmd(&["getent", "group", "nhi-companion"]))
        .status
        .success());
    let _ = fs::remove_file(root.path("/tmp/nhi.deb"));
    let after = root.snapshot();
    let added: Vec<_> = after
        .difference(&before)
        .filter(|e| !bookkeeping(e))
        .collect();
    let removed: Vec<_> = before.difference(&after).collect();
    assert!(
        added.is_empty() && removed.is_empty(),
        "purge left the root different: added {added:?}, removed {removed:?}"
    );
    assert!(!root.path("/run/nhi").exists());
    assert_eq!(
        fs::read_to_string(root.path("/etc/passwd")).unwrap(),
        passwd_before
    );
    assert_eq!(
        fs::read_to_string(root.path("/etc/group")).unwrap(),
        group_before
    );
    assert_eq!(
        fs::read_to_string(root.path("/etc/shadow")).unwrap(),
        shadow_before
    );
    let subids_after: Vec<Option<String>> = ["/etc/subuid", "/etc/subgid"]
        .map(|f| fs::read_to_string(root.path(f)).ok())
        .to_vec();
    assert_eq!(
        subids_after, subids_before,
        "the reserved range is released"
    );
}

#[test]
fn rpm_scriptlets_create_the_user_and_state_dir_and_erase_keeps_state() {
    let p = packages();
    let root = Chroot::new();
    let rpm = |args: &[&str]| {
        let mut c = Command::new("rpm");
        c.arg("--root").arg(root.root()).args(args);
        c
    };
    // The Debian root has no rpm database of its libc etc.: --nodeps. Scriptlets run chrooted.
    ok(rpm(&["-i", "--nodeps"]).arg(&p.rpm));
    assert_eq!(
        ok(&mut root.cmd(&["nhictl", "--version"])).trim(),
        format!("nhictl {VERSION}")
    );
    ok(&mut root.cmd(&["getent", "passwd", "nhi-companion"]));
    let subuid = fs::read_to_string(root.path("/etc/subuid")).unwrap();
    assert!(
        subuid.contains(&format!("nhi-companion:{RESERVED_RANGE}\n")),
        "{subuid}"
    );
    let companion = fs::metadata(root.path("/usr/libexec/nhi/nhi-companion")).unwrap();
    assert_eq!(companion.permissions().mode() & 0o7777, 0o711);
    let state = fs::metadata(root.path("/var/lib/nhi")).unwrap();
    assert_eq!(state.permissions().mode() & 0o7777, 0o700);
    assert!(root.path("/usr/lib/systemd/system/nhid.service").is_file());
    let listed = lines(&ok(&mut rpm(&["-ql", "nhi"])));
    assert!(listed.contains("/usr/libexec/nhi/nhi-companion"));

    // An edited config survives erase as .rpmsave; state and the user stay (rpm has no purge).
    fs::write(
        root.path("/etc/nhi/nhi.toml"),
        "trust_domain = \"edited.example.org\"\n",
    )
    .unwrap();
    ok(&mut rpm(&["-e", "--nodeps", "nhi"]));
    for gone in [
        "/usr/bin/nhictl",
        "/usr/sbin/nhid",
        "/usr/libexec/nhi",
        "/usr/share/nhi",
    ] {
        assert!(!root.path(gone).exists(), "{gone} left after erase");
    }
    assert!(root.path("/etc/nhi/nhi.toml.rpmsave").is_file());
    assert!(root.path("/var/lib/nhi").is_dir());
    ok(&mut root.cmd(&["getent", "passwd", "nhi-companion"]));
}

// ---------------------------------------------------------------------------------------------
// This machine.

const CONFIGURE_NOTE: &str = "nhictl configure containerd";

/// Installs the .deb on this machine; purges it when dropped, whatever happened.
struct HostInstall {
    purged: bool,
}

impl HostInstall {
    fn new(deb: &Path) -> (HostInstall, String) {
        let installed = run(Command::new("dpkg-query").args(["-W", "-f=${Status}", "nhi"]));
        assert!(
            !String::from_utf8_lossy(&installed.stdout).contains("installed")
                && !Path::new("/etc/nhi").exists()
                && !Path::new("/var/lib/nhi").exists(),
            "nhi is already installed on this machine (or /etc/nhi, /var/lib/nhi exist); this \
             test installs and purges it: `dpkg --purge nhi` first"
        );
        let guard = HostInstall { purged: false };
        let out = ok(Command::new("dpkg")
            .arg("-i")
            .arg(deb)
            .env("DEBIAN_FRONTEND", "noninteractive"));
        (guard, out)
    }

    fn purge(&mut self) -> Output {
        self.purged = true;
        run(Command::new("dpkg")
            .args(["--purge", "nhi"])
            .env("DEBIAN_FRONTEND", "noninteractive"))
    }
}

impl Drop for HostInstall {
    fn drop(&mut self) {
        if !self.purged {
            let _ = self.purge();
        }
    }
}

/// `CapabilityBoundingSet=` of the installed unit, as setpriv's `--bounding-set` argument.
fn unit_bounding_set(unit: &str) -> String {
    let caps: Vec<String> = unit
        .lines()
        .filter_map(|l| l.strip_prefix("CapabilityBoundingSet="))
        .flat_map(|l| l.split_whitespace())
        .map(|c| {
            format!(
                "+{}",
                c.strip_prefix("CAP_").expect("CAP_ name").to_lowercase()
            )
        })
        .collect();
    assert!(!caps.is_empty(), "no CapabilityBoundingSet in the unit");
    format!("-all,{}", caps.join(","))
}

#[test]
fn installed_package_runs_a_container_through_the_installed_shim() {
    let p = packages();
    assert!(which("setpriv").is_some(), "setpriv (util-linux) missing");
    // Declared first, dropped last: containers, containerd and nhid go before the purge.
    let (mut install, out) = HostInstall::new(&p.deb);
    assert!(out.contains(CONFIGURE_NOTE), "{out}");
    assert!(
        !Path::new("/run/nhi/nhid.sock").exists(),
        "no systemd here: the package started no nhid"
    );

    let nhictl = Path::new("/usr/bin/nhictl");
    assert_eq!(
        ok(Command::new(nhictl).arg("--version")).trim(),
        format!("nhictl {VERSION}")
    );
    let uid = nix::unistd::User::from_name("nhi-companion")
        .unwrap()
        .expect("postinst created nhi-companion")
        .uid
        .as_raw();

    // The shipped oci-hooks(5) files are what the installed nhictl writes for podman/CRI-O.
    let hooks = tempfile::tempdir().unwrap();
    ok(Command::new(nhictl)
        .args(["configure", "podman", "--hooks-dir"])
        .arg(hooks.path()));
    for f in ["nhi-createRuntime.json", "nhi-poststop.json"] {
        assert_eq!(
            fs::read_to_string(hooks.path().join(f)).unwrap(),
            fs::read_to_string(Path::new("/usr/share/nhi/hooks.d").join(f)).unwrap(),
            "{f}"
        );
    }

    let mut node = Node::new(
        r#"
[[rule]]
name = "containerd"
spiffe_id = "ctr/{container.id}"
"#,
    );
    node.set_companion(Path::new("/usr/libexec/nhi/nhi-companion"));
    node.append_config(&format!(
        "[runtime]\nshim_bin_dir = \"{}\"",
        node.path("runtime-bin").display()
    ));
    let mut ctd = CriContainerd::new(&node);
    ctd.path_prefix = "/usr/bin".into();

    // The installed nhictl points containerd at the installed binaries.
    let dry = ok(Command::new(nhictl)
        .args(["configure", "containerd", "--dry-run", "--file"])
        .arg(&ctd.config));
    assert!(
        dry.contains("BinaryName = \"/usr/bin/nhi-runc\""),
        "dry run: {dry}"
    );
    let before = fs::read_to_string(&ctd.config).unwrap();
    ok(Command::new(nhictl)
        .args(["configure", "containerd", "--file"])
        .arg(&ctd.config));
    let after = fs::read_to_string(&ctd.config).unwrap();
    assert_ne!(before, after);
    assert!(dry.contains(&after), "the dry run showed what was written");

    // nhid as the unit runs it: the installed binary, the unit's bounding set, no_new_privs.
    let unit = fs::read_to_string("/lib/systemd/system/nhid.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/sbin/nhid --config /etc/nhi/nhi.toml"));
    assert!(unit.contains("\nKillMode=process\n"));
    assert!(unit.contains("\nNoNewPrivileges=yes\n"));
    let mut nhid = Command::new("setpriv");
    nhid.arg("--bounding-set")
        .arg(unit_bounding_set(&unit))
        .arg("--no-new-privs")
        .arg("/usr/sbin/nhid");
    node.try_start_with(nhid).unwrap_or_else(|e| panic!("{e}"));
    ctd.start(&node.rootfs);

    let id = unique_id("pkg");
    let rootfs = node.rootfs.to_str().unwrap().to_string();
    let out = ctd.ctr(&[
        "run",
        "-d",
        "--runtime",
        "io.containerd.nhi.v2",
        "--env",
        "PATH=/bin",
        "--rootfs",
        &rootfs,
        &id,
        "/bin/sleep",
        "600",
    ]);
    assert!(out.status.success(), "ctr run: {out:?}\n{}", node.log());
    let exec = |exec_id: &str, url: &str| {
        let out = ctd.ctr(&[
            "task",
            "exec",
            "--exec-id",
            exec_id,
            &id,
            "/bin/wget",
            "-qO-",
            "--header",
            PROOF_HEADER,
            url,
        ]);
        assert!(out.status.success(), "{out:?}\n{}", node.log());
        String::from_utf8(out.stdout).unwrap()
    };
    let tok: serde_json::Value =
        serde_json::from_str(&exec("tok", "http://127.0.0.1:15100/v1/token?audience=pkg")).unwrap();
    let jwks = exec("jwks", "http://127.0.0.1:15100/v1/jwks");
    let claims = nhi_ctl::verify_token(
        tok["token"].as_str().unwrap(),
        &jwks,
        "pkg",
        Some(TRUST_DOMAIN),
    )
    .unwrap();
    assert_eq!(claims["sub"], format!("spiffe://{TRUST_DOMAIN}/ctr/{id}"));

    // Every piece on the path was the installed one.
    assert_eq!(
        fs::read_link(node.path("runtime-bin/runc")).unwrap(),
        Path::new("/usr/bin/nhi-runc"),
        "the installed shim linked the installed nhi-runc"
    );
    let cp = node.companion_pid(&id).expect("companion attached");
    assert_eq!(
        fs::read_link(format!("/proc/{cp}/exe")).unwrap(),
        Path::new("/usr/libexec/nhi/nhi-companion")
    );
    // Its own uid from the range (the test node's block), never the account's; started
    // non-dumpable from the exec-only installed binary.
    let companion_uid = node.companion_uid(&id);
    assert!(node.uids.contains(companion_uid), "{companion_uid}");
    assert_ne!(companion_uid, uid);
    assert_eq!(
        fs::metadata("/usr/libexec/nhi/nhi-companion")
            .unwrap()
            .permissions()
            .mode()
            & 0o7777,
        0o711
    );
    assert_eq!(proc_status(cp, "CapEff"), "0000000000000000");
    let bundle = ctd.dir.join(format!(
        "state/io.containerd.runtime.v2.task/default/{id}/config.json"
    ));
    let spec: serde_json::Value = serde_json::from_slice(&fs::read(&bundle).unwrap()).unwrap();
    assert_eq!(
        spec["hooks"]["createRuntime"][0]["path"], "/usr/bin/nhi-hook",
        "the installed nhi-runc injected the installed hook"
    );

    let ctr_ok = |args: &[&str]| {
        let out = ctd.ctr(args);
        assert!(out.status.success(), "ctr {args:?}: {out:?}");
    };
    ctr_ok(&["task", "kill", "-s", "KILL", &id]);
    assert!(eventually(Duration::from_secs(10), || {
        !String::from_utf8_lossy(&ctd.ctr(&["task", "ls"]).stdout).contains("RUNNING")
    }));
    ctr_ok(&["task", "rm", &id]);
    assert!(
        eventually(Duration::from_secs(5), || !alive(cp)),
        "companion outlived ctr task rm"
    );
    ctr_ok(&["container", "rm", &id]);
    drop(ctd);
    drop(node);

    // Purge leaves nothing of the package behind.
    let listed = lines(&ok(Command::new("dpkg").args(["-L", "nhi"])));
    let out = install.purge();
    assert!(out.status.success(), "dpkg --purge: {out:?}");
    for path in &listed {
        let p = Path::new(path);
        if p.is_dir() {
            assert!(!path.contains("nhi"), "{path} left after purge");
        } else {
            assert!(!p.exists(), "{path} left after purge");
        }
    }
    for gone in [
        "/etc/nhi",
        "/var/lib/nhi",
        "/usr/libexec/nhi",
        "/usr/share/nhi",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert!(nix::unistd::User::from_name("nhi-companion")
        .unwrap()
        .is_none());
}
