//! The operator side of the agent API: secrets (put, rotate, get, list, rm), revocation, and
//! pushing their effects to attached workloads: companions are told to drop what they cached,
//! secret files are rewritten or removed.

use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use nhi_core::grant::granted;
use nhi_core::wire::{AgentResponse, Event, RevokeTarget, SecretValue, StoreStatus};
use nhi_core::SpiffeId;
use zeroize::Zeroizing;

use crate::agent::Agent;
use crate::identity::Identity;
use crate::secrets;

/// A container of an attached workload, where its secret files go.
struct Target {
    identity: Arc<Identity>,
    /// Container id, its init pid and who its process runs as.
    containers: Vec<(String, i32, Option<nhi_core::workload::HostUser>)>,
}

impl Agent {
    /// Running identities matching `filter`, with their containers; `act` runs on each
    /// companion under the registry lock (it must not block).
    async fn targets(
        &self,
        filter: impl Fn(&Identity) -> bool,
        act: impl Fn(&crate::supervisor::CompanionHandle),
    ) -> Vec<Target> {
        let reg = self.registry.lock().await;
        reg.by_netns
            .values()
            .filter_map(|a| {
                let r = a.running.as_ref()?;
                if !filter(&r.identity) {
                    return None;
                }
                act(&r.companion);
                Some(Target {
                    identity: r.identity.clone(),
                    containers: a
                        .containers
                        .iter()
                        .map(|(c, p)| (c.clone(), p.pid, a.users.get(c).copied()))
                        .collect(),
                })
            })
            .collect()
    }

    fn is_granted(&self, identity: &Identity, name: &str) -> bool {
        granted(
            &self.ctx.config.grants,
            identity.spiffe_id.as_str(),
            &identity.rule,
            name,
        )
    }

    /// Writes every secret granted to the container's identity into its secret directory, if
    /// the injection path gave it one.
    pub(crate) async fn deliver_files(&self, container_id: &str, pid: i32) {
        let containers_dir = &self.ctx.config.store.containers_dir;
        let Some(dir) = secrets::container_dir(containers_dir, container_id) else {
            return;
        };
        let found = {
            let reg = self.registry.lock().await;
            reg.attachment_of(container_id).and_then(|a| {
                let r = a.running.as_ref()?;
                Some((r.identity.clone(), a.users.get(container_id).copied()))
            })
        };
        let Some((identity, user)) = found else {
            return;
        };
        if self.ctx.revocations.is_revoked(identity.spiffe_id.as_str()) {
            return;
        }
        let names = match self.ctx.store.list_for_workload().await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(container = %container_id, "secret files: {e}");
                return;
            }
        };
        for info in names {
            if self.is_granted(&identity, &info.name) {
                self.write_file(&dir, container_id, pid, user, &info.name)
                    .await;
            }
        }
    }

    async fn write_file(
        &self,
        dir: &std::path::Path,
        container_id: &str,
        pid: i32,
        user: Option<nhi_core::workload::HostUser>,
        name: &str,
    ) {
        let res = async {
            let owner = secrets::owner(user, pid).map_err(|e| e.to_string())?;
            match self
                .ctx
                .store
                .get_for_workload(name)
                .await
                .map_err(|e| e.to_string())?
            {
                Some(s) => secrets::write(dir, name, &s.value, owner).map_err(|e| e.to_string()),
                None => {
                    secrets::remove(dir, name);
                    Ok(())
                }
            }
        }
        .await;
        if let Err(e) = res {
            tracing::error!(container = %container_id, secret = %name, "writing secret file: {e}");
        }
    }

    /// A secret changed (new version or removed): companions of granted identities drop their
    /// cached copy; files are replaced.
    pub(crate) async fn propagate(&self, name: &str) {
        let targets = self
            .targets(
                |i| {
                    self.is_granted(i, name)
                        && !self.ctx.revocations.is_revoked(i.spiffe_id.as_str())
                },
                |c| {
                    c.notify(Event::SecretChanged { name: name.into() });
                },
            )
            .await;
        let containers_dir = &self.ctx.config.store.containers_dir;
        for t in targets {
            for (cid, pid, user) in &t.containers {
                if let Some(dir) = secrets::container_dir(containers_dir, cid) {
                    self.write_file(&dir, cid, *pid, *user, name).await;
                }
            }
            tracing::info!(spiffe_id = %t.identity.spiffe_id, secret = %name, "secret change pushed");
        }
    }

    pub(crate) async fn secret_put(
        &self,
        name: &str,
        value_b64: Option<String>,
        must_exist: bool,
    ) -> Result<AgentResponse, String> {
        let value = match value_b64 {
            Some(v) => Zeroizing::new(B64.decode(v).map_err(|e| format!("value: {e}"))?),
            None => {
                // A fresh random value: 256 bits, as URL-safe base64 text.
                let mut raw = Zeroizing::new([0u8; 32]);
                getrandom::fill(&mut raw[..]).map_err(|e| e.to_string())?;
                Zeroizing::new(B64URL.encode(&raw[..]).into_bytes())
            }
        };
        let version = self
            .ctx
            .store
            .put(name, value, must_exist)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(secret = %name, version, "secret stored");
        self.propagate(name).await;
        Ok(AgentResponse::SecretStored {
            name: name.into(),
            version,
        })
    }

    pub(crate) async fn secret_get(&self, name: &str) -> Result<AgentResponse, String> {
        match self.ctx.store.get(name).await.map_err(|e| e.to_string())? {
            Some(s) => Ok(AgentResponse::Secret(SecretValue {
                name: name.into(),
                version: s.version,
                value_b64: B64.encode(&s.value[..]),
                expires_at: 0,
            })),
            None => Err(format!("no secret named {name:?}")),
        }
    }

    pub(crate) async fn secret_list(&self) -> Result<AgentResponse, String> {
        let secrets = self.ctx.store.list().await.map_err(|e| e.to_string())?;
        Ok(AgentResponse::Secrets { secrets })
    }

    pub(crate) async fn secret_rm(&self, name: &str) -> Result<AgentResponse, String> {
        self.ctx
            .store
            .remove(name)
            .await
            .map_err(|e| e.to_string())?;
        tracing::info!(secret = %name, "secret removed");
        self.propagate(name).await;
        Ok(AgentResponse::SecretRemoved { name: name.into() })
    }

    pub(crate) async fn revoke(
        &self,
        target: RevokeTarget,
        undo: bool,
    ) -> Result<AgentResponse, String> {
        let spiffe_id = match target {
            RevokeTarget::SpiffeId(s) => SpiffeId::parse(&s).map_err(|e| e.to_string())?,
            RevokeTarget::Workload(cid) => {
                let reg = self.registry.lock().await;
                reg.serving(&cid)
                    .map(|r| r.identity.spiffe_id.clone())
                    .ok_or_else(|| {
                        format!("container {cid} is not attached or has no identity yet")
                    })?
            }
        };
        let id = spiffe_id.as_str();
        let _sync = self.revocation_sync.lock().await;
        let persisted = if undo {
            if !self.ctx.revocations.undo(id) {
                return Err(format!("{id} is not revoked"));
            }
            self.ctx.store.remove_revocation(id).await
        } else {
            let r = self.ctx.revocations.revoke(id);
            self.ctx.store.put_revocation(&r).await
        };
        self.apply_revocation(id, !undo).await;
        persisted.map_err(|e| {
            format!(
                "{id}: in effect on this node, but not saved (it would not survive a restart): {e}"
            )
        })?;
        let r = self
            .ctx
            .revocations
            .snapshot()
            .into_iter()
            .find(|r| r.spiffe_id == id);
        tracing::warn!(spiffe_id = %id, undo, "revocation changed");
        Ok(AgentResponse::Revoked {
            spiffe_id: id.into(),
            jtis: r.as_ref().map_or(0, |r| r.jtis.len()),
            serials: r.as_ref().map_or(0, |r| r.serials.len()),
            undone: undo,
        })
    }

    /// Tells the identity's companions and fixes its secret files after a revocation change.
    /// Tells every companion the peers its mutual TLS refuses now.
    pub(crate) async fn push_denied_peers(&self) {
        let peers = self.ctx.denied_peers();
        self.targets(
            |_| true,
            |c| {
                c.notify(Event::DeniedPeers {
                    peers: peers.clone(),
                })
            },
        )
        .await;
    }

    pub(crate) async fn apply_revocation(&self, spiffe_id: &str, revoked: bool) {
        self.push_denied_peers().await;
        let targets = self
            .targets(
                |i| i.spiffe_id.as_str() == spiffe_id,
                |c| {
                    c.notify(if revoked {
                        Event::Revoked {
                            message: format!("{spiffe_id} is revoked"),
                        }
                    } else {
                        Event::Restored
                    })
                },
            )
            .await;
        let containers_dir = &self.ctx.config.store.containers_dir;
        for t in targets {
            for (cid, pid, _) in &t.containers {
                if revoked {
                    if let Some(dir) = secrets::container_dir(containers_dir, cid) {
                        secrets::clear(&dir);
                    }
                } else {
                    self.deliver_files(cid, *pid).await;
                }
            }
        }
    }

    /// `nhictl ca rotate`: the issuer puts a new CA in the bundle, and every companion gets
    /// it at once (before the new CA signs anything).
    pub(crate) async fn ca_rotate(
        &self,
        activate_after_secs: Option<u64>,
    ) -> Result<AgentResponse, String> {
        let r = self
            .ctx
            .issuer
            .rotate_ca(activate_after_secs.map(std::time::Duration::from_secs))?;
        self.push_trust().await;
        Ok(AgentResponse::CaRotated {
            signs_from: r.signs_from,
            old_leaves_at: r.old_leaves_at,
            not_after: r.not_after,
        })
    }

    /// Tells every companion the current trust bundle and JWKS (after a CA renewal or when
    /// another node's signing key appeared or went).
    pub async fn push_trust(&self) {
        let bundle_pem = self.ctx.issuer.bundle_pem();
        let jwks = self.ctx.issuer.jwks();
        let bundle_spiffe = self.ctx.issuer.spiffe_bundle();
        self.targets(
            |_| true,
            |c| {
                c.notify(Event::Trust {
                    bundle_pem: bundle_pem.clone(),
                    jwks: jwks.clone(),
                    bundle_spiffe: bundle_spiffe.clone(),
                })
            },
        )
        .await;
    }

    pub(crate) async fn store_status(&self) -> StoreStatus {
        StoreStatus {
            kind: self.ctx.store.kind().into(),
            degraded: self
                .degraded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        }
    }
}
