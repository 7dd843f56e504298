//! The sealed on-disk cache of what OpenBao last gave this node, so `nhid` can start (a node
//! reboot, an upgrade) and keep serving while OpenBao is unreachable:
//!
//! - the issuer's trust material: the bundle and the cluster's JWKS (`issuer.sealed`);
//! - the revocation list (`revocations.sealed`): never start forgetting a revocation;
//! - each secret a workload read, with when it was fetched (`secrets/<name>.sealed`): served
//!   from here only while `store.secret_ttl` since that fetch has not run out, the same bound
//!   a companion has on serving a value without asking again. Expired entries are deleted.
//!
//! Every file is sealed with the node's master key (`crate::keystore`: XChaCha20-Poly1305,
//! associated data naming the file's purpose and, for secrets, the name, so a file renamed to
//! another name does not open), written atomically, under `<state_dir>/openbao-cache/` (0700).
//! Credentials issued to workloads are not cached here: companions hold theirs until they
//! expire; JWT-SVIDs are signed with the node's own JWT key (`node-jwt.sealed`), X.509-SVIDs
//! only by OpenBao (none can be issued while it is unreachable).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use nhi_core::wire::{Revocation, SecretInfo};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::keystore::{self, MasterKey};
use crate::store::Stored;
use nhi_core::clock::now_unix;

const DIR: &str = "openbao-cache";
const LABEL: &str = "nhi/openbao-cache/v1";

/// The issuer's state as last obtained from OpenBao: what verifiers need. No signing key: the
/// node has none for X.509-SVIDs (OpenBao signs them), and its JWT key is sealed on its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IssuerState {
    pub trust_domain: String,
    pub node: String,
    pub bundle_pem: String,
    /// Every node's published JWT keys, by node (the JWKS is their union minus the nodes cut
    /// off).
    #[serde(default)]
    pub keys_by_node: std::collections::BTreeMap<String, Vec<serde_json::Value>>,
    /// Nodes cut off the cluster (`nhictl node revoke`).
    #[serde(default)]
    pub revoked_nodes: Vec<String>,
    /// When this state was written (unix).
    pub saved_at: u64,
}

#[derive(Serialize, Deserialize)]
struct CachedSecret {
    version: u64,
    updated_at: u64,
    fetched_at: u64,
    value_b64: String,
}

impl Drop for CachedSecret {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.value_b64);
    }
}

pub struct BaoCache {
    dir: PathBuf,
    key: MasterKey,
    secret_ttl: Duration,
    /// Per secret, the version and fetch time last written: a secret read often is written
    /// again only when it changed or a quarter of its TTL went by.
    written: Mutex<HashMap<String, (u64, u64)>>,
}

impl BaoCache {
    /// Opens (creating) the cache of the state dir, with the node's master key.
    pub fn open(state_dir: &Path, key_file: &Path, secret_ttl: Duration) -> Result<Self, String> {
        let dir = state_dir.join(DIR);
        keystore::create_private_dir(&dir).map_err(|e| e.to_string())?;
        keystore::create_private_dir(&dir.join("secrets")).map_err(|e| e.to_string())?;
        let key = if key_file.exists() {
            MasterKey::load(key_file)
        } else {
            MasterKey::create(key_file)
        }
        .map_err(|e| e.to_string())?;
        Ok(BaoCache {
            dir,
            key,
            secret_ttl,
            written: Mutex::new(HashMap::new()),
        })
    }

    fn write(&self, rel: &str, label: &str, plain: &[u8]) {
        let path = self.dir.join(rel);
        if let Err(e) = keystore::write_atomic(&path, &self.key.seal(label, plain), 0o600) {
            tracing::warn!(
                "sealed cache {}: {e} (nhid may not start from it during an OpenBao outage)",
                path.display()
            );
        }
    }

    /// The plaintext of `rel`; `None` if absent. A file that does not open (tampered, another
    /// key, renamed) is reported and ignored (left for the operator: a wrong `key_file` must not
    /// destroy the cache).
    fn read(&self, rel: &str, label: &str) -> Option<Zeroizing<Vec<u8>>> {
        let path = self.dir.join(rel);
        let sealed = std::fs::read(&path).ok()?;
        match self.key.open(&path, label, &sealed) {
            Ok(p) => Some(Zeroizing::new(p)),
            Err(e) => {
                tracing::error!("ignoring sealed cache file: {e}");
                None
            }
        }
    }

    pub fn save_issuer(&self, s: &IssuerState) {
        let plain = Zeroizing::new(serde_json::to_vec(s).expect("serializes"));
        self.write("issuer.sealed", &format!("{LABEL}/issuer"), &plain);
    }

    pub fn issuer(&self) -> Option<IssuerState> {
        let plain = self.read("issuer.sealed", &format!("{LABEL}/issuer"))?;
        serde_json::from_slice(&plain)
            .map_err(|e| tracing::error!("sealed issuer cache: {e}"))
            .ok()
    }

    pub fn issuer_path(&self) -> PathBuf {
        self.dir.join("issuer.sealed")
    }

    pub fn save_revocations(&self, list: &[Revocation]) {
        let plain = serde_json::to_vec(list).expect("serializes");
        self.write(
            "revocations.sealed",
            &format!("{LABEL}/revocations"),
            &plain,
        );
    }

    pub fn revocations(&self) -> Option<Vec<Revocation>> {
        let plain = self.read("revocations.sealed", &format!("{LABEL}/revocations"))?;
        serde_json::from_slice(&plain)
            .map_err(|e| tracing::error!("sealed revocation cache: {e}"))
            .ok()
    }

    fn secret_file(name: &str) -> String {
        format!("secrets/{name}.sealed")
    }

    fn secret_label(name: &str) -> String {
        format!("{LABEL}/secret/{name}")
    }

    /// Keeps a secret just read from OpenBao (fetched now).
    pub fn save_secret(&self, name: &str, s: &Stored) {
        let now = now_unix();
        {
            let mut w = self.written.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((v, at)) = w.get(name) {
                if *v == s.version && now.saturating_sub(*at) < self.secret_ttl.as_secs() / 4 {
                    return;
                }
            }
            w.insert(name.to_string(), (s.version, now));
        }
        let c = CachedSecret {
            version: s.version,
            updated_at: s.updated_at,
            fetched_at: now,
            value_b64: B64.encode(&s.value[..]),
        };
        let plain = Zeroizing::new(serde_json::to_vec(&c).expect("serializes"));
        self.write(&Self::secret_file(name), &Self::secret_label(name), &plain);
    }

    /// The cached secret `name` if it was fetched less than `secret_ttl` ago (`fetched_at`
    /// says when); an expired copy is deleted.
    pub fn secret(&self, name: &str) -> Option<Stored> {
        let plain = self.read(&Self::secret_file(name), &Self::secret_label(name))?;
        let c: CachedSecret = serde_json::from_slice(&plain).ok()?;
        if c.fetched_at + self.secret_ttl.as_secs() <= now_unix() {
            self.remove_secret(name);
            return None;
        }
        Some(Stored {
            version: c.version,
            updated_at: c.updated_at,
            value: Zeroizing::new(B64.decode(&c.value_b64).ok()?),
            fetched_at: c.fetched_at,
            from_cache: true,
        })
    }

    pub fn remove_secret(&self, name: &str) {
        self.written
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
        let _ = std::fs::remove_file(self.dir.join(Self::secret_file(name)));
    }

    /// Names and versions of the secrets still servable from the cache.
    pub fn secrets(&self) -> Vec<SecretInfo> {
        let Ok(entries) = std::fs::read_dir(self.dir.join("secrets")) else {
            return Vec::new();
        };
        let mut out: Vec<SecretInfo> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.strip_suffix(".sealed")?.to_string();
                if !nhi_core::grant::valid_secret_name(&name) {
                    return None;
                }
                let s = self.secret(&name)?;
                Some(SecretInfo {
                    name,
                    version: s.version,
                    updated_at: s.updated_at,
                })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(version: u64, value: &[u8]) -> Stored {
        Stored {
            version,
            updated_at: 5,
            value: Zeroizing::new(value.to_vec()),
            fetched_at: now_unix(),
            from_cache: false,
        }
    }

    #[test]
    fn everything_is_sealed_bound_to_its_name_and_secrets_expire() {
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("master.key");
        let c = BaoCache::open(d.path(), &key, Duration::from_secs(60)).unwrap();
        c.save_secret("db", &stored(3, b"hunter2"));
        c.save_revocations(&[Revocation {
            spiffe_id: "spiffe://td/x".into(),
            revoked_at: 9,
            jtis: vec![],
            serials: vec![],
            ended: None,
        }]);
        let state = IssuerState {
            trust_domain: "td".into(),
            node: "n".into(),
            bundle_pem: "bundle-pem".into(),
            keys_by_node: Default::default(),
            revoked_nodes: vec!["n2".into()],
            saved_at: 2,
        };
        c.save_issuer(&state);
        // Nothing readable on disk.
        for f in ["secrets/db.sealed", "issuer.sealed", "revocations.sealed"] {
            let raw = std::fs::read(d.path().join(DIR).join(f)).unwrap();
            let raw = String::from_utf8_lossy(&raw);
            for plain in ["hunter2", "aHVudGVyMg", "spiffe://td/x", "bundle-pem"] {
                assert!(!raw.contains(plain), "{f} holds {plain}");
            }
        }
        // A second open (a restart) reads it all back.
        let c = BaoCache::open(d.path(), &key, Duration::from_secs(60)).unwrap();
        let s = c.secret("db").unwrap();
        assert_eq!(
            (&s.value[..], s.version, s.from_cache),
            (&b"hunter2"[..], 3, true)
        );
        assert_eq!(c.secrets().len(), 1);
        assert_eq!(c.revocations().unwrap()[0].spiffe_id, "spiffe://td/x");
        assert_eq!(c.issuer().unwrap().bundle_pem, "bundle-pem");
        assert_eq!(c.issuer().unwrap().revoked_nodes, ["n2"]);
        // A secret's file renamed to another name does not open.
        let dir = d.path().join(DIR).join("secrets");
        std::fs::copy(dir.join("db.sealed"), dir.join("other.sealed")).unwrap();
        assert!(c.secret("other").is_none());
        assert_eq!(c.secrets().len(), 1, "nor is it listed");
        // Past secret_ttl since the fetch: gone, from disk too.
        let short = BaoCache::open(d.path(), &key, Duration::from_secs(0)).unwrap();
        assert!(short.secret("db").is_none());
        assert!(!dir.join("db.sealed").exists());
        // Another master key opens nothing.
        let other = BaoCache::open(
            d.path(),
            &d.path().join("other.key"),
            Duration::from_secs(60),
        );
        assert!(other.unwrap().issuer().is_none());
    }

    #[test]
    fn a_secret_read_often_is_written_again_only_when_it_changes() {
        let d = tempfile::tempdir().unwrap();
        let c = BaoCache::open(d.path(), &d.path().join("k"), Duration::from_secs(600)).unwrap();
        let f = d.path().join(DIR).join("secrets/s.sealed");
        c.save_secret("s", &stored(1, b"a"));
        let first = std::fs::read(&f).unwrap();
        c.save_secret("s", &stored(1, b"a"));
        assert_eq!(
            std::fs::read(&f).unwrap(),
            first,
            "unchanged: not rewritten"
        );
        c.save_secret("s", &stored(2, b"b"));
        assert_eq!(&c.secret("s").unwrap().value[..], b"b");
    }
}
