//! The single-node store: each secret sealed with the node's master key in
//! `<state_dir>/secrets/<name>.sealed` (XChaCha20-Poly1305, the file's label binds the name, so
//! a sealed file renamed to another secret's name fails to open), the revocation list in
//! `<state_dir>/revocations.json`. Values are held in memory only while in use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use nhi_core::wire::{Revocation, SecretInfo};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use super::{StoreError, Stored};
use crate::keystore::{self, MasterKey};
use nhi_core::clock::now_unix;

const SECRETS_DIR: &str = "secrets";
const REVOCATIONS_FILE: &str = "revocations.json";

#[derive(Serialize, Deserialize)]
struct Sealed {
    version: u64,
    updated_at: u64,
    value_b64: String,
}

pub struct EmbeddedStore {
    dir: PathBuf,
    revocations: PathBuf,
    key: MasterKey,
    /// Name → (version, updated_at), so listing needs no decryption; writes are serialized.
    index: Mutex<BTreeMap<String, (u64, u64)>>,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Io(format!("{}: {e}", path.display()))
}

fn label(name: &str) -> String {
    format!("nhi secret {name}")
}

impl EmbeddedStore {
    /// Opens (creating if needed) the store under `state_dir`, sealed with the key at `key_file`.
    pub fn open(state_dir: &Path, key_file: &Path) -> Result<Self, StoreError> {
        let key = MasterKey::load(key_file).map_err(|e| StoreError::Io(e.to_string()))?;
        let dir = state_dir.join(SECRETS_DIR);
        keystore::create_private_dir(&dir).map_err(|e| StoreError::Io(e.to_string()))?;
        let store = EmbeddedStore {
            revocations: state_dir.join(REVOCATIONS_FILE),
            dir,
            key,
            index: Mutex::new(BTreeMap::new()),
        };
        let mut index = BTreeMap::new();
        for entry in std::fs::read_dir(&store.dir).map_err(io(&store.dir))? {
            let entry = entry.map_err(io(&store.dir))?;
            let file = entry.file_name();
            let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".sealed")) else {
                continue; // temp files of an interrupted write
            };
            if !nhi_core::grant::valid_secret_name(name) {
                continue;
            }
            let s = store.read(name)?;
            index.insert(name.to_string(), (s.version, s.updated_at));
        }
        *store.index.lock().unwrap_or_else(|p| p.into_inner()) = index;
        Ok(store)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.sealed"))
    }

    fn read(&self, name: &str) -> Result<Stored, StoreError> {
        let path = self.path(name);
        let sealed = std::fs::read(&path).map_err(io(&path))?;
        let plain = Zeroizing::new(
            self.key
                .open(&path, &label(name), &sealed)
                .map_err(|e| StoreError::Io(e.to_string()))?,
        );
        let s: Sealed = serde_json::from_slice(&plain)
            .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?;
        let value = Zeroizing::new(
            B64.decode(&s.value_b64)
                .map_err(|e| StoreError::Io(format!("{}: {e}", path.display())))?,
        );
        let _wipe = Zeroizing::new(s.value_b64);
        Ok(Stored {
            version: s.version,
            updated_at: s.updated_at,
            value,
            fetched_at: nhi_core::clock::now_unix(),
            from_cache: false,
        })
    }

    pub fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        if !self.lock().contains_key(name) {
            return Ok(None);
        }
        self.read(name).map(Some)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, (u64, u64)>> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn put(
        &self,
        name: &str,
        value: Zeroizing<Vec<u8>>,
        must_exist: bool,
    ) -> Result<u64, StoreError> {
        let mut index = self.lock();
        let current = index.get(name).map(|(v, _)| *v);
        if must_exist && current.is_none() {
            return Err(StoreError::NotFound(name.into()));
        }
        let version = current.unwrap_or(0) + 1;
        let updated_at = now_unix();
        let plain = Zeroizing::new(
            serde_json::to_vec(&Sealed {
                version,
                updated_at,
                value_b64: B64.encode(&value[..]),
            })
            .expect("serializes"),
        );
        let path = self.path(name);
        keystore::write_atomic(&path, &self.key.seal(&label(name), &plain), 0o600)
            .map_err(|e| StoreError::Io(e.to_string()))?;
        index.insert(name.into(), (version, updated_at));
        Ok(version)
    }

    pub fn list(&self) -> Vec<SecretInfo> {
        self.lock()
            .iter()
            .map(|(name, (version, updated_at))| SecretInfo {
                name: name.clone(),
                version: *version,
                updated_at: *updated_at,
            })
            .collect()
    }

    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let mut index = self.lock();
        if index.remove(name).is_none() {
            return Err(StoreError::NotFound(name.into()));
        }
        let path = self.path(name);
        std::fs::remove_file(&path).map_err(io(&path))
    }

    pub fn load_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        match std::fs::read(&self.revocations) {
            Ok(b) => serde_json::from_slice(&b)
                .map_err(|e| StoreError::Io(format!("{}: {e}", self.revocations.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io(&self.revocations)(e)),
        }
    }

    pub fn save_revocations(&self, list: &[Revocation]) -> Result<(), StoreError> {
        let data = serde_json::to_vec_pretty(list).expect("serializes");
        keystore::write_atomic(&self.revocations, &data, 0o600)
            .map_err(|e| StoreError::Io(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(dir: &Path) -> EmbeddedStore {
        let key = dir.join("master.key");
        if !key.exists() {
            MasterKey::create(&key).unwrap();
        }
        EmbeddedStore::open(dir, &key).unwrap()
    }

    #[test]
    fn versions_survive_reopen_and_values_are_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert_eq!(
            s.put("db", Zeroizing::new(b"hunter2".to_vec()), false)
                .unwrap(),
            1
        );
        assert_eq!(
            s.put("db", Zeroizing::new(b"hunter3".to_vec()), false)
                .unwrap(),
            2
        );
        assert!(matches!(
            s.put("nope", Zeroizing::new(b"x".to_vec()), true),
            Err(StoreError::NotFound(_))
        ));
        let raw = std::fs::read(dir.path().join("secrets/db.sealed")).unwrap();
        assert!(!raw.windows(7).any(|w| w == b"hunter3"), "sealed at rest");
        drop(s);

        let s = store(dir.path());
        let got = s.get("db").unwrap().unwrap();
        assert_eq!((got.version, &got.value[..]), (2, &b"hunter3"[..]));
        assert_eq!(s.list().len(), 1);
        assert!(!format!("{got:?}").contains("hunter"));
        // A sealed file copied under another name does not open as that secret.
        std::fs::copy(
            dir.path().join("secrets/db.sealed"),
            dir.path().join("secrets/other.sealed"),
        )
        .unwrap();
        assert!(EmbeddedStore::open(dir.path(), &dir.path().join("master.key")).is_err());
        std::fs::remove_file(dir.path().join("secrets/other.sealed")).unwrap();

        s.remove("db").unwrap();
        assert!(s.get("db").unwrap().is_none());
        assert!(s.remove("db").is_err());
    }

    #[test]
    fn revocations_persist() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert!(s.load_revocations().unwrap().is_empty());
        let r = Revocation {
            spiffe_id: "spiffe://td/x".into(),
            revoked_at: 5,
            jtis: vec!["j".into()],
            serials: vec![],
            ended: None,
        };
        s.save_revocations(std::slice::from_ref(&r)).unwrap();
        assert_eq!(store(dir.path()).load_revocations().unwrap(), vec![r]);
    }
}
