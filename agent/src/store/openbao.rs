//! The cluster store on OpenBao/Vault KV v2 (under `<kv_mount>/<kv_prefix>/`):
//! `secrets/<name>` holds `{"value": text}` (or `{"value_base64": ...}` for bytes), its version
//! is KV's; `revocations/<sha256(spiffe id)>` holds one revocation each, so nodes revoking
//! different identities at once never overwrite each other. An operator may write secrets
//! directly in OpenBao (`bao kv put secret/nhi/secrets/db value=...`): nodes notice on their
//! next poll.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use nhi_core::wire::{NodeRevocation, Revocation, SecretInfo};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use std::sync::Arc;

use super::{StoreError, Stored};
use crate::store::sealed_cache::BaoCache;
use nhi_openbao::{Bao, BaoError};

pub struct BaoStore {
    bao: Bao,
    /// What OpenBao last gave, sealed on disk, for its outages.
    cache: Arc<BaoCache>,
    /// The revocation list last written to the cache (rewritten only when it changes).
    cached_revocations: std::sync::Mutex<Option<Vec<Revocation>>>,
}

fn unavailable(e: BaoError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Writes of secrets are the operators' in the default policy: say what to do instead.
fn write_error(name: &str, e: BaoError) -> StoreError {
    match e {
        BaoError::Denied { .. } => StoreError::Io(format!(
            "this node's OpenBao policy does not allow writing secrets (docs/OPENBAO.md); write it in OpenBao: bao kv put -mount=<kv_mount> <kv_prefix>/secrets/{name} value=@FILE ({e})"
        )),
        e => unavailable(e),
    }
}

fn secret_path(name: &str) -> String {
    format!("secrets/{name}")
}

/// A deny-list entry's path, by its key (`Revocation::key`).
fn revocation_path(key: &str) -> String {
    let h = Sha256::digest(key.as_bytes());
    let hex: String = h[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("revocations/{hex}")
}

/// RFC 3339 (as KV reports times) to unix seconds; 0 if unparsable.
fn unix(rfc3339: &str) -> u64 {
    humantime::parse_rfc3339_weak(rfc3339.trim_end_matches('Z'))
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

impl BaoStore {
    pub fn new(bao: Bao, cache: Arc<BaoCache>) -> Self {
        BaoStore {
            bao,
            cache,
            cached_revocations: std::sync::Mutex::new(None),
        }
    }

    pub fn bao(&self) -> &Bao {
        &self.bao
    }

    pub fn cache(&self) -> &BaoCache {
        &self.cache
    }

    /// [`get`](Self::get), keeping what OpenBao answers in the sealed cache and falling back
    /// to it while OpenBao is unreachable (within `secret_ttl` of the cached fetch).
    pub async fn get_or_cached(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        match self.get(name).await {
            Ok(Some(s)) => {
                self.cache.save_secret(name, &s);
                Ok(Some(s))
            }
            Ok(None) => {
                self.cache.remove_secret(name);
                Ok(None)
            }
            Err(StoreError::Unavailable(e)) => match self.cache.secret(name) {
                Some(s) => {
                    tracing::warn!(secret = %name, version = s.version, fetched_at = s.fetched_at, "OpenBao unavailable ({e}); serving the sealed cache's copy");
                    Ok(Some(s))
                }
                None => Err(StoreError::Unavailable(e)),
            },
            Err(e) => Err(e),
        }
    }

    /// The revocation list as last loaded from OpenBao (sealed cache), for a start during an
    /// outage.
    pub fn cached_revocations(&self) -> Option<Vec<Revocation>> {
        self.cache.revocations()
    }

    pub async fn get(&self, name: &str) -> Result<Option<Stored>, StoreError> {
        let Some(s) = self
            .bao
            .kv_read(&secret_path(name))
            .await
            .map_err(unavailable)?
        else {
            return Ok(None);
        };
        let value = match (s.data.get("value"), s.data.get("value_base64")) {
            (Some(Value::String(v)), _) => Zeroizing::new(v.as_bytes().to_vec()),
            (_, Some(Value::String(b))) => Zeroizing::new(
                B64.decode(b)
                    .map_err(|e| StoreError::Io(format!("secret {name:?}: value_base64: {e}")))?,
            ),
            _ => {
                return Err(StoreError::Io(format!(
                "secret {name:?} in OpenBao has neither a \"value\" nor a \"value_base64\" string"
            )))
            }
        };
        let mut data = s.data;
        for (_, v) in data.iter_mut() {
            if let Value::String(st) = v {
                zeroize::Zeroize::zeroize(st);
            }
        }
        Ok(Some(Stored {
            version: s.version,
            updated_at: unix(&s.created_time),
            value,
            fetched_at: nhi_core::clock::now_unix(),
            from_cache: false,
        }))
    }

    pub async fn put(
        &self,
        name: &str,
        value: Zeroizing<Vec<u8>>,
        must_exist: bool,
    ) -> Result<u64, StoreError> {
        let path = secret_path(name);
        if must_exist
            && self
                .bao
                .kv_metadata(&path)
                .await
                .map_err(unavailable)?
                .is_none()
        {
            return Err(StoreError::NotFound(name.into()));
        }
        let mut data = Map::new();
        match std::str::from_utf8(&value) {
            Ok(text) => data.insert("value".into(), Value::String(text.to_string())),
            Err(_) => data.insert("value_base64".into(), Value::String(B64.encode(&value[..]))),
        };
        let res = self.bao.kv_write(&path, data, None).await;
        res.map_err(|e| write_error(name, e))
    }

    /// Names and versions (one metadata read per secret).
    pub async fn list(&self) -> Result<Vec<SecretInfo>, StoreError> {
        let names = self.bao.kv_list("secrets/").await.map_err(unavailable)?;
        let mut out = Vec::with_capacity(names.len());
        for name in names {
            if name.ends_with('/') || !nhi_core::grant::valid_secret_name(&name) {
                continue;
            }
            if let Some(m) = self
                .bao
                .kv_metadata(&secret_path(&name))
                .await
                .map_err(unavailable)?
            {
                if m.current_version > 0 {
                    out.push(SecretInfo {
                        name,
                        version: m.current_version,
                        updated_at: unix(&m.updated_time),
                    });
                }
            }
        }
        Ok(out)
    }

    pub async fn remove(&self, name: &str) -> Result<(), StoreError> {
        let path = secret_path(name);
        if self
            .bao
            .kv_metadata(&path)
            .await
            .map_err(unavailable)?
            .is_none()
        {
            return Err(StoreError::NotFound(name.into()));
        }
        self.bao
            .kv_delete(&path)
            .await
            .map_err(|e| write_error(name, e))
    }

    pub async fn load_revocations(&self) -> Result<Vec<Revocation>, StoreError> {
        let keys = self
            .bao
            .kv_list("revocations/")
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            if k.ends_with('/') {
                continue;
            }
            let Some(s) = self
                .bao
                .kv_read(&format!("revocations/{k}"))
                .await
                .map_err(unavailable)?
            else {
                continue;
            };
            match serde_json::from_value::<Revocation>(Value::Object(s.data)) {
                Ok(r) => out.push(r),
                Err(e) => {
                    tracing::error!(key = %k, "ignoring a malformed revocation in OpenBao: {e}")
                }
            }
        }
        out.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        let mut last = self
            .cached_revocations
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if last.as_ref() != Some(&out) {
            self.cache.save_revocations(&out);
            *last = Some(out.clone());
        }
        Ok(out)
    }

    /// The nodes cut off the cluster (`<kv_prefix>/node-revocations/<node>`), written only
    /// with an operator's token.
    pub async fn load_node_revocations(&self) -> Result<Vec<NodeRevocation>, StoreError> {
        let keys = self
            .bao
            .kv_list("node-revocations/")
            .await
            .map_err(unavailable)?;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys.iter().filter(|k| !k.ends_with('/')) {
            let Some(s) = self
                .bao
                .kv_read(&format!("node-revocations/{k}"))
                .await
                .map_err(unavailable)?
            else {
                continue;
            };
            match serde_json::from_value::<NodeRevocation>(Value::Object(s.data)) {
                Ok(r) if &r.node == k => out.push(r),
                Ok(r) => {
                    tracing::error!(key = %k, node = %r.node, "ignoring a node revocation stored under another node's name")
                }
                Err(e) => {
                    tracing::error!(key = %k, "ignoring a malformed node revocation in OpenBao: {e}")
                }
            }
        }
        out.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(out)
    }

    /// Cuts `node` off (or, `undo`, takes it back) with the operator's token: OpenBao's entity
    /// of the node first (so OpenBao refuses the node at once), then the entry every node
    /// follows. Returns the node's entity id.
    pub async fn revoke_node(
        &self,
        op: &nhi_openbao::OperatorToken,
        approle_mount: &str,
        node: &str,
        undo: bool,
    ) -> Result<String, StoreError> {
        let cut = |e: BaoError| StoreError::Io(format!("OpenBao: {e}"));
        let entity = self
            .bao
            .set_node_disabled(op, approle_mount, node, !undo)
            .await
            .map_err(cut)?;
        let path = format!("node-revocations/{node}");
        if undo {
            self.bao.kv_delete_as(op, &path).await.map_err(cut)?;
        } else {
            let r = NodeRevocation {
                node: node.to_string(),
                revoked_at: nhi_core::clock::now_unix(),
            };
            let Value::Object(data) = serde_json::to_value(&r).expect("serializes") else {
                unreachable!("a struct serializes to an object")
            };
            self.bao.kv_write_as(op, &path, data).await.map_err(cut)?;
        }
        Ok(entity.entity_id)
    }

    pub async fn put_revocation(&self, r: &Revocation) -> Result<(), StoreError> {
        let Value::Object(data) = serde_json::to_value(r).expect("serializes") else {
            unreachable!("a struct serializes to an object")
        };
        self.bao
            .kv_write(&revocation_path(&r.key()), data, None)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    pub async fn remove_revocation(&self, key: &str) -> Result<(), StoreError> {
        self.bao
            .kv_delete(&revocation_path(key))
            .await
            .map_err(unavailable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_times() {
        assert_eq!(secret_path("db"), "secrets/db");
        let p = revocation_path("spiffe://td/a");
        assert!(p.starts_with("revocations/") && p.len() == "revocations/".len() + 32);
        assert_ne!(p, revocation_path("spiffe://td/b"));
        assert_eq!(unix("1970-01-01T00:00:10Z"), 10);
        assert_eq!(unix("2024-05-01T12:00:00.123456789Z"), 1_714_564_800);
        assert_eq!(unix("nope"), 0);
    }
}
