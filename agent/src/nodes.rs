//! Cluster nodes cut off (`nhictl node revoke NODE`): the operator's command, and applying the
//! list every node follows in OpenBao (`<kv_prefix>/node-revocations/`). A node cut off has its
//! OpenBao entity disabled (OpenBao refuses every token it holds: no X.509-SVID, no read) and
//! its JWT keys dropped from the JWKS every other node serves and validates with, so its
//! JWT-SVIDs stop verifying within one `poll_interval`. Each change is audited on every node
//! that learns it.

use std::collections::BTreeSet;

use nhi_core::openbao_config::OpenBaoAuth;
use nhi_core::wire::{AgentResponse, NodeRevocation, Redacted};
use zeroize::Zeroizing;

use crate::agent::Agent;
use crate::store::Store;

impl Agent {
    /// The operator's command, on whichever node it runs: OpenBao first (with the operator's
    /// token), then this node at once; the others follow the entry within one poll.
    pub(crate) async fn node_revoke(
        &self,
        node: &str,
        undo: bool,
        operator_token: Redacted,
    ) -> Result<AgentResponse, String> {
        let token = Zeroizing::new(operator_token.0.clone());
        drop(operator_token);
        let Store::OpenBao(store) = &*self.ctx.store else {
            return Err(
                "node revocation is for cluster mode: this node's store is not OpenBao".into(),
            );
        };
        if !nhi_core::grant::valid_secret_name(node) {
            return Err(format!("{node:?} is not a node name"));
        }
        let cfg = self
            .ctx
            .config
            .openbao
            .as_ref()
            .ok_or("cluster mode without an [openbao] section")?;
        let mount = match &cfg.auth {
            OpenBaoAuth::AppRole { mount, .. } => mount.clone(),
            OpenBaoAuth::Token { .. } => {
                return Err("node revocation needs nodes logging in with AppRole (one role per node, named after it): this node logs in with a token file".into())
            }
        };
        let op = nhi_openbao::OperatorToken::new(token).map_err(|e| e.to_string())?;
        let entity_id = store
            .revoke_node(&op, &mount, node, undo)
            .await
            .map_err(|e| format!("node {node}: {e}"))?;
        let list = store.load_node_revocations().await.map_err(|e| {
            format!("node {node}: done in OpenBao, but re-reading the list failed: {e}")
        })?;
        self.apply_node_revocations(list, "nhictl node revoke on this node")
            .await?;
        tracing::warn!(node, undo, entity = %entity_id, "node revocation changed by an operator");
        Ok(AgentResponse::NodeRevoked {
            node: node.to_string(),
            undone: undo,
            entity_id,
            revoked_nodes: self.ctx.issuer.revoked_nodes().into_iter().collect(),
        })
    }

    /// Makes `list` the nodes cut off: their keys leave the JWKS (companions are told at once),
    /// and each change is audited here with `how` this node learnt it.
    pub(crate) async fn apply_node_revocations(
        &self,
        list: Vec<NodeRevocation>,
        how: &str,
    ) -> Result<(), String> {
        let now: BTreeSet<String> = list.into_iter().map(|r| r.node).collect();
        let before = self.ctx.issuer.revoked_nodes();
        if now == before {
            return Ok(());
        }
        let changed = self.ctx.issuer.set_revoked_nodes(&now)?;
        for n in now.difference(&before) {
            tracing::warn!(node = %n, "node cut off the cluster ({how})");
            crate::audit::node_revoked(&self.ctx.audit, &self.ctx.metrics, n, true, how);
        }
        for n in before.difference(&now) {
            tracing::warn!(node = %n, "node taken back into the cluster ({how})");
            crate::audit::node_revoked(&self.ctx.audit, &self.ctx.metrics, n, false, how);
        }
        if changed {
            self.push_trust().await;
        }
        self.push_denied_peers().await;
        Ok(())
    }
}
