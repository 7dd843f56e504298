//! Edge policy on `nhid`'s side: installs the interception rules of an identity that has a
//! policy in its workload's network namespace (after its companion listens), removes them at
//! detach, and on SIGHUP reloads the policies, pushes them to running companions and brings
//! every namespace's rules in line. Without a policy nothing is intercepted and `nft` is never run.

use std::sync::Arc;

use nhi_core::wire::CompanionResponse;

use crate::agent::Agent;
use crate::netns::NetNs;
use crate::supervisor::{Ctx, Identity};

/// Installs the rules for `identity` (whose companion runs as `companion_uid`) in the namespace
/// of `pid` if it has a policy; the returned handle keeps the namespace reachable for removal
/// and reloads.
pub(crate) async fn install(
    ctx: &Ctx,
    identity: &Identity,
    pid: i32,
    companion_uid: u32,
) -> Result<Option<NetNs>, String> {
    let Some(policy) = ctx.policy_for(identity) else {
        return Ok(None);
    };
    let ns = NetNs::of_pid(pid).map_err(|e| format!("network namespace of pid {pid}: {e}"))?;
    let script = crate::nft::ruleset(&policy, &ctx.config.egress, companion_uid);
    let ns = tokio::task::spawn_blocking(move || crate::nft::apply(&ns.file, &script).map(|_| ns))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("installing edge policy {:?}: {e}", policy.id))?;
    tracing::info!(spiffe_id = %identity.spiffe_id, policy = %policy.id, netns = ns.inode, "edge policy rules installed");
    Ok(Some(ns))
}

/// Deletes our table from the namespace (if it still exists).
pub(crate) async fn remove(ns: NetNs) {
    let inode = ns.inode;
    let res =
        tokio::task::spawn_blocking(move || crate::nft::apply(&ns.file, &crate::nft::removal()))
            .await;
    match res {
        Ok(Ok(())) => tracing::info!(netns = inode, "edge policy rules removed"),
        Ok(Err(e)) => tracing::warn!(netns = inode, "removing edge policy rules: {e}"),
        Err(e) => tracing::warn!(netns = inode, "removing edge policy rules: {e}"),
    }
}

impl Agent {
    /// SIGHUP: re-reads `[[policy]]` from the config file. A config that no longer loads keeps
    /// the current policies. Running companions get their new policy (for new connections) and
    /// namespaces their new rules; workloads are never restarted.
    pub async fn reload_policies(&self) {
        let cfg = match nhi_core::Config::load(&self.ctx.config.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("reload: keeping the current policies: {e}");
                return;
            }
        };
        if cfg.egress != self.ctx.config.egress {
            tracing::warn!("reload: [egress] ports only change with an nhid restart");
        }
        *self.ctx.policies.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg.policies);
        let mut reg = self.registry.lock().await;
        let reg = &mut *reg;
        for a in reg.by_netns.values_mut() {
            let pid = a.containers.values().find(|p| p.alive()).map(|p| p.pid);
            let Some(r) = a.running.as_mut() else {
                continue;
            };
            let policy = self.ctx.policy_for(&r.identity);
            r.companion.notify(CompanionResponse::Policy {
                policy: policy.clone().map(Box::new),
            });
            match (policy.is_some(), r.edge.take()) {
                (true, _) => match pid {
                    Some(pid) => {
                        match install(&self.ctx, &r.identity, pid, r.companion.uid()).await {
                            Ok(ns) => r.edge = ns,
                            Err(e) => {
                                tracing::error!(spiffe_id = %r.identity.spiffe_id, "reload: {e}")
                            }
                        }
                    }
                    None => {
                        tracing::warn!(spiffe_id = %r.identity.spiffe_id, "reload: no live container to enter")
                    }
                },
                (false, Some(ns)) => remove(ns).await,
                (false, None) => {}
            }
        }
        tracing::info!("edge policies reloaded");
    }
}
