//! Edge policy on `nhid`'s side: installs the kernel rules of an identity that has a policy in
//! its workload's network namespace (after its companion listens), reads the denials they log
//! (`crate::denials`), removes them at detach, and on SIGHUP reloads the policies, pushes them
//! to running companions and brings every namespace's rules in line. Without a policy nothing is
//! intercepted and `nft` is never run.

use std::sync::Arc;

use nhi_core::wire::Event;

use crate::agent::Agent;
use crate::identity::Identity;
use crate::netns::NetNs;
use crate::supervisor::Ctx;

/// Rules installed in a namespace: the handle that keeps it reachable, and the reader of its
/// logged denials.
pub(crate) struct Installed {
    pub(crate) ns: NetNs,
    _watch: Option<crate::denials::Watch>,
}

/// Installs (or replaces) the rules for `identity` in the namespace of `pid` if it has a policy.
/// `previous` (a reload) keeps its namespace handle and log reader; the counters of the table
/// being replaced are written to the audit log first.
pub(crate) async fn install(
    ctx: &Arc<Ctx>,
    identity: &Arc<Identity>,
    pid: i32,
    previous: Option<Installed>,
) -> Result<Option<Installed>, String> {
    let Some(policy) = ctx.policy_for(identity) else {
        if let Some(prev) = previous {
            remove(ctx, identity, prev).await;
        }
        return Ok(None);
    };
    let (ns, watch) = match previous {
        Some(Installed { ns, _watch }) => (ns, _watch),
        None => (
            NetNs::of_pid(pid).map_err(|e| format!("network namespace of pid {pid}: {e}"))?,
            None,
        ),
    };
    let script = crate::nft::ruleset(
        &policy,
        &ctx.config.egress,
        &ctx.cgroups.exempt_for(ns.inode),
    );
    let cgroup2 = ctx.cgroups.v2_mount().to_path_buf();
    let before = {
        let (c, id) = (ctx.clone(), identity.clone());
        move |ns: &NetNs| summarize(&c, &id, ns)
    };
    let ns = tokio::task::spawn_blocking(move || {
        before(&ns);
        crate::nft::apply(&ns.file, &script, &cgroup2).map(|_| ns)
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("installing edge policy {:?}: {e}", policy.id))?;
    let watch = match watch {
        Some(w) => Some(w),
        None => match crate::denials::watch(ctx.clone(), identity.clone(), &ns.file) {
            Ok(w) => Some(w),
            Err(e) => {
                // The rules hold regardless; only the per-packet records are missing (the
                // counters still reach the log as a summary).
                tracing::error!(spiffe_id = %identity.spiffe_id, netns = ns.inode, "denied packets will be counted but not recorded one by one: NFLOG: {e}");
                None
            }
        },
    };
    tracing::info!(spiffe_id = %identity.spiffe_id, policy = %policy.id, netns = ns.inode, "edge policy rules installed");
    Ok(Some(Installed { ns, _watch: watch }))
}

/// Writes the denial counters of the namespace's current table (if any, and non-zero) as one
/// audit record. Blocking (runs `nft`).
fn summarize(ctx: &Ctx, identity: &Identity, ns: &NetNs) {
    let Ok(counters) = crate::nft::counters(&ns.file) else {
        return; // no table yet
    };
    let policy = ctx.policy_for(identity).map(|p| p.id);
    if let Some(ev) = crate::denials::summary(&counters, policy.as_deref()) {
        crate::audit::ingest(ctx, identity, vec![ev], 0);
    }
}

/// Deletes our table from the namespace (if it still exists), after recording its counters.
pub(crate) async fn remove(ctx: &Arc<Ctx>, identity: &Arc<Identity>, installed: Installed) {
    let Installed { ns, _watch } = installed;
    drop(_watch);
    let inode = ns.inode;
    let (c, id) = (ctx.clone(), identity.clone());
    let cgroup2 = ctx.cgroups.v2_mount().to_path_buf();
    let res = tokio::task::spawn_blocking(move || {
        summarize(&c, &id, &ns);
        crate::nft::apply(&ns.file, &crate::nft::removal(), &cgroup2)
    })
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
            r.companion.notify(Event::Policy {
                policy: policy.clone().map(Box::new),
            });
            let previous = r.edge.take();
            match (policy.is_some(), pid, previous) {
                (true, Some(pid), previous) => {
                    match install(&self.ctx, &r.identity, pid, previous).await {
                        Ok(installed) => r.edge = installed,
                        Err(e) => tracing::error!(spiffe_id = %r.identity.spiffe_id, "reload: {e}"),
                    }
                }
                (true, None, previous) => {
                    r.edge = previous;
                    tracing::warn!(spiffe_id = %r.identity.spiffe_id, "reload: no live container to enter")
                }
                (false, _, Some(prev)) => remove(&self.ctx, &r.identity, prev).await,
                (false, _, None) => {}
            }
        }
        tracing::info!("edge policies reloaded");
    }
}
