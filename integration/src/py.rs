//! The Python clients the tests drive (py-spiffe, botocore) from the venv
//! `scripts/install-deps` makes, and the scripts in `integration/py/`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The venv's interpreter.
pub const PYTHON: &str = "/opt/nhi-test/pyclients/bin/python";

/// [`PYTHON`], after checking it is there.
pub fn python() -> &'static str {
    assert!(
        Path::new(PYTHON).is_file(),
        "{PYTHON} is missing: run scripts/install-deps (it creates the py-spiffe/botocore venv)"
    );
    PYTHON
}

/// `integration/py/<name>`.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Starts `ca_rotation_verifier.py`: two py-spiffe X509Sources on the Workload API sockets
/// `a` and `b` (host paths) verify each other's X.509-SVID with their own bundle every 50 ms
/// for `seconds`; its stdout is one JSON object (checks, failures, signers, max_authorities).
pub fn ca_rotation_verifier(a: &Path, b: &Path, trust_domain: &str, seconds: u32) -> Child {
    Command::new(python())
        .arg(script("ca_rotation_verifier.py"))
        .arg(format!("unix://{}", a.display()))
        .arg(format!("unix://{}", b.display()))
        .arg(trust_domain)
        .arg(seconds.to_string())
        .env_clear()
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python verifier")
}

/// The JSON object a finished script printed; panics with its output unless it succeeded.
pub fn json_of(out: &std::process::Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}
