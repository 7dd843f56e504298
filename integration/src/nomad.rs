//! Nomad tasks without a Nomad binary: the directories and the signed workload identity the
//! Nomad client lays out for a task (`<alloc_dir>/<alloc id>/alloc`, `<task>/local`,
//! `<task>/secrets/nomad_token`), the token signed by a test key as the Nomad servers sign it
//! (RS256, `kid`, no `exp` for the default identity), and the `[nomad]` config pointing at them.

use std::fs;
use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, EncodingKey, Header};

use crate::Node;

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../core/testdata")
        .join(name)
}

pub const KID: &str = "9f1c2a7e-nhi-test-key";

/// The node's Nomad client allocation directory.
pub fn alloc_dir(node: &Node) -> PathBuf {
    node.path("nomad/alloc")
}

/// Appends `[nomad]` with the test cluster's JWKS and the node's allocation directory.
pub fn configure(node: &Node) {
    let jwks = node.path("nomad-jwks.json");
    fs::copy(testdata("nomad-test-jwks.json"), &jwks).unwrap();
    node.append_config(&format!(
        "[nomad]\nalloc_dir = \"{}\"\njwks = \"{}\"\n",
        alloc_dir(node).display(),
        jwks.display()
    ));
}

/// A workload identity for `job`/`group`/`task` of allocation `alloc`, signed by the test key.
pub fn token(namespace: &str, job: &str, group: &str, task: &str, alloc: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "nomad_namespace": namespace,
        "nomad_job_id": job,
        "nomad_allocation_id": alloc,
        "nomad_task": task,
        "sub": format!("global:{namespace}:{job}:{group}:{task}:default"),
        "aud": ["nomadproject.io"],
        "iat": now, "nbf": now, "jti": format!("{alloc}-{task}"),
    });
    let mut h = Header::new(Algorithm::RS256);
    h.kid = Some(KID.into());
    let key = fs::read(testdata("nomad-test-key.pem")).unwrap();
    jsonwebtoken::encode(&h, &claims, &EncodingKey::from_rsa_pem(&key).unwrap()).unwrap()
}

/// One task's directories on the host, as the Nomad client makes them.
pub struct Task {
    pub alloc: PathBuf,
    pub local: PathBuf,
    pub secrets: PathBuf,
}

/// Lays out allocation `alloc`, task `task`, with `token` (if any) as its `nomad_token`.
pub fn task(node: &Node, alloc: &str, task: &str, token: Option<&str>) -> Task {
    let a = alloc_dir(node).join(alloc);
    let t = Task {
        alloc: a.join("alloc"),
        local: a.join(task).join("local"),
        secrets: a.join(task).join("secrets"),
    };
    for d in [&t.alloc, &t.local, &t.secrets] {
        fs::create_dir_all(d).unwrap();
    }
    if let Some(tok) = token {
        fs::write(t.secrets.join("nomad_token"), tok).unwrap();
    }
    t
}
