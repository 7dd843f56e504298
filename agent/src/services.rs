//! The services every part of `nhid` shares: the config, the issuer, the secret store, the
//! revocations, the audit sink, the metrics and the edge policies. One struct, passed where it
//! is needed; nothing in it starts or stops processes (that is `crate::supervisor::Ctx`, which
//! adds the companion uids, cgroups and re-adoption records).

use std::sync::Arc;

use nhi_core::wire::Validated;

use crate::identity::Identity;
use crate::issuer::Issuer;
use crate::revoke::Revocations;
use crate::store::Store;

pub struct Services {
    /// The config as loaded, except its `[[policy]]`s: they live in `policies`, the one copy
    /// a reload replaces.
    pub config: nhi_core::Config,
    pub audit: Arc<crate::audit::AuditSink>,
    pub metrics: Arc<crate::metrics::Metrics>,
    pub issuer: Arc<dyn Issuer>,
    pub store: Arc<Store>,
    pub revocations: Arc<Revocations>,
    /// Edge policies: from the config at start, replaced on SIGHUP.
    pub policies: std::sync::RwLock<Arc<Vec<nhi_core::policy::Policy>>>,
    /// The cluster's service-account keys from OIDC discovery, when that is on.
    pub sa_keys: Option<Arc<crate::sa_keys::SaKeys>>,
}

impl Services {
    pub fn new(
        mut config: nhi_core::Config,
        audit: Arc<crate::audit::AuditSink>,
        metrics: Arc<crate::metrics::Metrics>,
        issuer: Arc<dyn Issuer>,
        store: Arc<Store>,
        revocations: Arc<Revocations>,
    ) -> Self {
        let policies = std::mem::take(&mut config.policies);
        let sa_keys = crate::sa_keys::SaKeys::from_config(&config.kubernetes).map(Arc::new);
        Services {
            sa_keys,
            config,
            audit,
            metrics,
            issuer,
            store,
            revocations,
            policies: std::sync::RwLock::new(Arc::new(policies)),
        }
    }

    /// The peers every companion's mutual TLS refuses: revoked identities (not ended
    /// workloads: their identity lives on in others) and the nodes cut off.
    pub fn denied_peers(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .revocations
            .snapshot()
            .into_iter()
            .filter(|r| r.ended.is_none())
            .map(|r| r.spiffe_id)
            .collect();
        let td = self.issuer.trust_domain();
        v.extend(
            self.issuer
                .revoked_nodes()
                .into_iter()
                .map(|n| format!("spiffe://{td}/node/{n}/*")),
        );
        v.sort();
        v.dedup();
        v
    }

    /// The edge policy of an identity now (the first `[[policy]]` that covers it).
    pub fn policy_for(&self, identity: &Identity) -> Option<nhi_core::policy::Policy> {
        let all = self
            .policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        nhi_core::policy::policy_for(&all, identity.spiffe_id.as_str(), &identity.rule).cloned()
    }

    /// A JWT-SVID of this trust domain: signature by one of its keys, audience, expiry, and not
    /// on the deny list.
    pub fn validate(&self, token: &str, audience: &str) -> Result<Validated, String> {
        let jwks = serde_json::to_string(&self.issuer.jwks()).expect("jwks serializes");
        let claims =
            nhi_core::jwt::verify_token(token, &jwks, audience, Some(self.issuer.trust_domain()))?;
        let sub = claims.get("sub").and_then(|v| v.as_str()).unwrap_or("");
        let jti = claims.get("jti").and_then(|v| v.as_str());
        let iat = claims.get("iat").and_then(|v| v.as_u64());
        if let Some(why) = self.revocations.denies_jwt(sub, jti, iat) {
            return Err(format!("token revoked: {why}"));
        }
        Ok(Validated {
            spiffe_id: sub.to_string(),
            claims: serde_json::Value::Object(claims),
        })
    }
}
