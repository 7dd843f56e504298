//! Edge policy on `nhid`'s side: installs the kernel rules of an identity that has a policy in
//! its workload's network namespace (after its companion listens), reads the denials they log
//! (`crate::denials`), removes them at detach, and replaces them when a reload (SIGHUP,
//! `crate::agent`) changed the policy. Without a policy nothing is
//! intercepted and `nft` is never run.

use std::sync::Arc;

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
        crate::audit::ingest(&ctx.audit, &ctx.metrics, identity, vec![ev], 0);
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
