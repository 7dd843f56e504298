//! Following the central store: every `poll_interval` (±20 % jitter, so nodes spread out) a
//! node with OpenBao looks for new secret versions (including ones written directly in
//! OpenBao), revocations made on other nodes, nodes cut off, and refreshes the bundle and the
//! shared JWKS. What fails is reported as degraded in `nhictl status` (so is an issuer still
//! running on the sealed cache it started from); companions keep serving what they hold until
//! it expires, and everything resumes by itself when OpenBao answers.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::Agent;
use crate::store::Store;

fn jittered(base: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = getrandom::fill(&mut b);
    let r = u16::from_le_bytes(b) as f64 / u16::MAX as f64; // 0..=1
    base.mul_f64(0.8 + 0.4 * r)
}

pub async fn run(agent: Arc<Agent>, interval: Duration) {
    let mut seen: Option<BTreeMap<String, u64>> = None;
    loop {
        tokio::time::sleep(jittered(interval)).await;
        let mut degraded = Vec::new();
        // Nodes cut off first, and whatever else fails: never trust a revoked node longer
        // because the secrets could not be listed.
        if let Err(e) = node_revocations(&agent).await {
            degraded.push(e);
        }
        if let Err(e) = poll_once(&agent, &mut seen).await {
            degraded.push(e);
        }
        let issuer = &agent.ctx.issuer;
        match issuer.maintain().await {
            Ok(true) => agent.push_trust().await,
            Ok(false) => {}
            Err(e) => degraded.push(format!("issuer: {e}")),
        }
        degraded.extend(issuer.degraded());
        if issuer.revoked_nodes().contains(&agent.ctx.config.node_name) {
            degraded.push(format!(
                "this node ({}) is cut off the cluster (nhictl node revoke): OpenBao refuses it, other nodes reject its JWT-SVIDs",
                agent.ctx.config.node_name
            ));
        }
        if let Store::OpenBao(s) = &*agent.ctx.store {
            let h = s.bao().health();
            if !h.logged_in {
                degraded.push(format!(
                    "OpenBao: not logged in ({})",
                    h.last_error.as_deref().unwrap_or("no session")
                ));
            }
        }
        let mut d = agent.degraded.lock().unwrap_or_else(|p| p.into_inner());
        if *d != degraded {
            if degraded.is_empty() {
                tracing::info!("central store healthy again");
            } else {
                tracing::warn!(degraded = ?degraded, "central store degraded");
            }
            *d = degraded;
        }
    }
}

/// New secret versions and the revocation list, from an OpenBao store.
async fn poll_once(agent: &Agent, seen: &mut Option<BTreeMap<String, u64>>) -> Result<(), String> {
    if !matches!(&*agent.ctx.store, Store::OpenBao(_)) {
        return Ok(());
    }
    let now: BTreeMap<String, u64> = agent
        .ctx
        .store
        .list()
        .await
        .map_err(|e| format!("secrets: {e}"))?
        .into_iter()
        .map(|s| (s.name, s.version))
        .collect();
    if let Some(before) = seen.as_ref() {
        let changed: Vec<&String> = now
            .iter()
            .filter(|(n, v)| before.get(*n) != Some(v))
            .map(|(n, _)| n)
            .chain(before.keys().filter(|n| !now.contains_key(*n)))
            .collect();
        for name in changed {
            tracing::info!(secret = %name, version = now.get(name), "secret changed in the central store");
            agent.propagate(name).await;
        }
    }
    *seen = Some(now);

    let _sync = agent.revocation_sync.lock().await;
    let list = agent
        .ctx
        .store
        .load_revocations()
        .await
        .map_err(|e| format!("revocations: {e}"))?;
    let (added, removed) = agent.ctx.revocations.replace(list);
    drop(_sync);
    for id in added {
        tracing::warn!(spiffe_id = %id, "revoked (central store)");
        agent.apply_revocation(&id, true).await;
    }
    for id in removed {
        tracing::warn!(spiffe_id = %id, "revocation lifted (central store)");
        agent.apply_revocation(&id, false).await;
    }
    Ok(())
}

/// The nodes cut off, from an OpenBao store (also called once at start, before serving).
pub async fn node_revocations(agent: &Agent) -> Result<(), String> {
    let Store::OpenBao(s) = &*agent.ctx.store else {
        return Ok(());
    };
    let nodes = s
        .load_node_revocations()
        .await
        .map_err(|e| format!("node revocations: {e}"))?;
    agent
        .apply_node_revocations(nodes, "central store")
        .await
        .map_err(|e| format!("node revocations: {e}"))
}
