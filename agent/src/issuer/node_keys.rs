//! A cluster node's JWT-SVID signing keys and their rotation (`issuer.jwt_key_rotation`).
//!
//! Every key is published (in the node's JWKS entry) from the moment it is made, but signs only
//! from `activation_delay` later, by when every other node has polled it, so no token is ever
//! signed with a key another node does not know yet. A key replaced by a newer one stays
//! published for `grace` after the newer one took over (the last JWT-SVID it signed has expired
//! by then), then is dropped. Keys are sealed with the node's master key in the state dir.
//! Each key's `kid` names the node (`<node>:<RFC 7638 thumbprint>`), so a JWT-SVID says which
//! node signed it.

use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::keystore::{self, MasterKey};

const FILE: &str = "node-jwt.sealed";
const LABEL: &str = "nhi/node-jwt-key/v1";

/// One key: PKCS#8 DER, and when it was made (unix).
pub struct NodeKey {
    pub pkcs8: Zeroizing<Vec<u8>>,
    pub created_at: u64,
    /// The one key of a version before rotation: also published under its old, bare `kid`
    /// (the thumbprint), so tokens signed before the upgrade still verify.
    pub legacy: bool,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    pkcs8_b64: String,
    created_at: u64,
    #[serde(default)]
    legacy: bool,
}

impl Drop for Stored {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.pkcs8_b64);
    }
}

/// When keys are made, start signing and are dropped (seconds).
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub rotation: u64,
    pub activation_delay: u64,
    pub grace: u64,
}

/// The node's keys, oldest first, sealed at `path`.
pub struct NodeKeys {
    path: PathBuf,
    keys: Vec<NodeKey>,
}

impl NodeKeys {
    /// The keys sealed in `state_dir` (a file of an older version holds one bare key: it is
    /// kept, dated now), or a first key made now.
    pub fn load_or_create(state_dir: &Path, mk: &MasterKey, now: u64) -> Result<Self, String> {
        let path = state_dir.join(FILE);
        let keys = if path.exists() {
            let sealed = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let plain = Zeroizing::new(mk.open(&path, LABEL, &sealed).map_err(|e| e.to_string())?);
            match serde_json::from_slice::<Vec<Stored>>(&plain) {
                Ok(stored) => stored
                    .iter()
                    .map(|s| {
                        Ok(NodeKey {
                            pkcs8: Zeroizing::new(
                                B64.decode(&s.pkcs8_b64)
                                    .map_err(|e| format!("{}: {e}", path.display()))?,
                            ),
                            created_at: s.created_at,
                            legacy: s.legacy,
                        })
                    })
                    .collect::<Result<Vec<_>, String>>()?,
                Err(_) if KeyPair::try_from(&plain[..]).is_ok() => vec![NodeKey {
                    pkcs8: Zeroizing::new(plain.to_vec()),
                    created_at: now,
                    legacy: true,
                }],
                Err(e) => return Err(format!("{}: {e}", path.display())),
            }
        } else {
            Vec::new()
        };
        let mut k = NodeKeys { path, keys };
        let migrated = k.keys.iter().any(|k| k.legacy && k.created_at == now);
        if k.keys.is_empty() {
            k.keys.push(new_key(now)?);
        }
        if migrated || k.keys.len() == 1 && k.keys[0].created_at == now {
            // Saved in this format at once: the key's age must survive restarts, or it would
            // never be due for rotation.
            k.save(mk)?;
        }
        Ok(k)
    }

    fn save(&self, mk: &MasterKey) -> Result<(), String> {
        let stored: Vec<Stored> = self
            .keys
            .iter()
            .map(|k| Stored {
                pkcs8_b64: B64.encode(&k.pkcs8[..]),
                created_at: k.created_at,
                legacy: k.legacy,
            })
            .collect();
        let plain = Zeroizing::new(serde_json::to_vec(&stored).expect("serializes"));
        keystore::write_atomic(&self.path, &mk.seal(LABEL, &plain), 0o600)
            .map_err(|e| e.to_string())
    }

    /// Makes a new key when the newest is `rotation` old and drops the keys past their grace;
    /// saves when anything changed. Returns whether the published set changed.
    pub fn maintain(&mut self, s: Schedule, now: u64, mk: &MasterKey) -> Result<bool, String> {
        let mut changed = false;
        let newest = self.keys.last().map_or(0, |k| k.created_at);
        if now >= newest.saturating_add(s.rotation) {
            self.keys.push(new_key(now)?);
            changed = true;
        }
        let keep = self.keep_from(s, now);
        if keep > 0 {
            self.keys.drain(..keep);
            changed = true;
        }
        if changed {
            self.save(mk)?;
        }
        Ok(changed)
    }

    /// The key that signs now: the newest active one (the only key is active at once).
    pub fn signing(&self, s: Schedule, now: u64) -> &NodeKey {
        let i = self.signing_index(s, now);
        &self.keys[i]
    }

    fn signing_index(&self, s: Schedule, now: u64) -> usize {
        (1..self.keys.len())
            .rev()
            .find(|&i| now >= self.keys[i].created_at.saturating_add(s.activation_delay))
            .unwrap_or(0)
    }

    /// How many of the oldest keys are past their grace: replaced by a newer key that has been
    /// signing for `grace` already.
    fn keep_from(&self, s: Schedule, now: u64) -> usize {
        let signing = self.signing_index(s, now);
        (0..signing)
            .take_while(|&i| {
                let took_over = self.keys[i + 1]
                    .created_at
                    .saturating_add(s.activation_delay);
                now >= took_over.saturating_add(s.grace)
            })
            .count()
    }

    /// Every key, published.
    pub fn all(&self) -> &[NodeKey] {
        &self.keys
    }
}

fn new_key(now: u64) -> Result<NodeKey, String> {
    let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    Ok(NodeKey {
        pkcs8: Zeroizing::new(pair.serialize_der()),
        created_at: now,
        legacy: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Schedule = Schedule {
        rotation: 100,
        activation_delay: 4,
        grace: 30,
    };

    fn kids(k: &NodeKeys) -> Vec<u64> {
        k.all().iter().map(|k| k.created_at).collect()
    }

    #[test]
    fn a_new_key_is_published_before_it_signs_and_the_old_one_stays_for_the_grace() {
        let d = tempfile::tempdir().unwrap();
        let mk = MasterKey::create(&d.path().join("mk")).unwrap();
        let mut k = NodeKeys::load_or_create(d.path(), &mk, 1000).unwrap();
        assert_eq!(
            k.signing(S, 1000).created_at,
            1000,
            "the first key signs at once"
        );
        assert!(!k.maintain(S, 1099, &mk).unwrap());
        assert!(k.maintain(S, 1100, &mk).unwrap(), "rotation due");
        assert_eq!(kids(&k), [1000, 1100], "both published");
        assert_eq!(
            k.signing(S, 1103).created_at,
            1000,
            "not signing before the delay"
        );
        assert_eq!(k.signing(S, 1104).created_at, 1100);
        assert!(
            !k.maintain(S, 1133, &mk).unwrap(),
            "old key within its grace"
        );
        assert_eq!(kids(&k), [1000, 1100]);
        assert!(k.maintain(S, 1134, &mk).unwrap());
        assert_eq!(kids(&k), [1100], "old key dropped after the grace");
        // Survives a restart, sealed.
        let again = NodeKeys::load_or_create(d.path(), &mk, 5000).unwrap();
        assert_eq!(kids(&again), [1100]);
        assert_eq!(again.all()[0].pkcs8[..], k.all()[0].pkcs8[..]);
        let raw = std::fs::read(d.path().join(FILE)).unwrap();
        assert!(!String::from_utf8_lossy(&raw).contains("pkcs8_b64"));
    }

    #[test]
    fn a_bare_key_of_an_older_version_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let mk = MasterKey::create(&d.path().join("mk")).unwrap();
        let der = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .unwrap()
            .serialize_der();
        keystore::write_atomic(&d.path().join(FILE), &mk.seal(LABEL, &der), 0o600).unwrap();
        let k = NodeKeys::load_or_create(d.path(), &mk, 77).unwrap();
        assert_eq!(kids(&k), [77]);
        assert_eq!(k.all()[0].pkcs8[..], der[..]);
        assert!(k.all()[0].legacy);
        // Saved in the new format at once: its age survives a restart, so it rotates.
        let again = NodeKeys::load_or_create(d.path(), &mk, 5000).unwrap();
        assert_eq!(kids(&again), [77]);
        assert!(again.all()[0].legacy);
    }
}
