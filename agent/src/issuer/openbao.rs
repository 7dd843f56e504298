//! The cluster issuer on OpenBao. OpenBao, not the node, decides which X.509-SVID a workload
//! gets, so a compromised node cannot mint the rest of the cluster's identities:
//!
//! - a Kubernetes pod proves itself with its kubelet-projected service-account token: nhid logs
//!   it in through OpenBao's JWT auth method (which checks the token against the cluster's
//!   keys) and has a CSR signed with the short-lived token that login returns, under a PKI role
//!   whose URI SAN template derives the SPIFFE ID from the token's claims. The OpenBao token is
//!   cached per service account until shortly before it expires;
//! - a workload without such a proof is signed with the node's own AppRole token under a role
//!   whose template admits only the node's path (`spiffe://<td>/node/<node>/...`).
//!
//! The private key of every SVID is made here and never leaves the node (CSR). The node has no
//! CA key; the bundle is OpenBao's root. JWT-SVIDs are still signed with a per-node key (sealed
//! in the state dir) whose public half is published at `<kv_prefix>/nodes/<node>/jwks`; the
//! JWKS every node serves is the union, so a JWT-SVID from node A verifies on node B (what that
//! lets a compromised node do: docs/OPENBAO.md, "Threat model"). The bundle and JWKS are kept
//! in the sealed cache (`crate::store::sealed_cache`) so nhid starts while OpenBao is
//! unreachable; X.509-SVIDs then wait for OpenBao (companions keep serving theirs until they
//! expire).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use nhi_core::config::Config;
use nhi_core::wire::{JwtSvid, X509Svid};
use nhi_core::SpiffeId;
use rcgen::{KeyPair, PublicKeyData};
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use super::node_keys::{NodeKey, NodeKeys, Schedule};
use super::{
    check_domain, key_and_csr, now_unix, IssueError, Issuer, Issuing, JwtSigner, Proof, Upkeep,
};
use crate::keystore::{self, MasterKey};
use crate::store::sealed_cache::{BaoCache, IssuerState};
use nhi_openbao::{Bao, BaoError, SignedLeaf, WorkloadToken};

/// A cached workload token is not used closer than this to its expiry.
const TOKEN_MARGIN: u64 = 30;

/// What verifiers need, as last obtained.
struct Current {
    bundle_pem: String,
    /// Every node's published JWT keys, by node.
    by_node: BTreeMap<String, Vec<Value>>,
    /// Nodes cut off (`nhictl node revoke`): their keys are not in `jwks`.
    revoked: BTreeSet<String>,
    /// The keys of every node not cut off.
    jwks: Value,
    spiffe_sequence: u64,
    spiffe_bundle: Value,
}

impl Current {
    fn new(
        bundle_pem: String,
        by_node: BTreeMap<String, Vec<Value>>,
        revoked: BTreeSet<String>,
    ) -> Result<Current, String> {
        let jwks = union(&by_node, &revoked);
        let spiffe_sequence = crate::spiffe_bundle::next_sequence(0, now_unix());
        let spiffe_bundle = crate::spiffe_bundle::build(&bundle_pem, &jwks, spiffe_sequence)?;
        Ok(Current {
            bundle_pem,
            by_node,
            revoked,
            jwks,
            spiffe_sequence,
            spiffe_bundle,
        })
    }

    /// Replaces what changed; true when what verifiers see (bundle, JWKS) changed.
    fn update(
        &mut self,
        bundle_pem: Option<String>,
        by_node: Option<BTreeMap<String, Vec<Value>>>,
        revoked: Option<BTreeSet<String>>,
    ) -> Result<bool, String> {
        if let Some(b) = by_node {
            self.by_node = b;
        }
        if let Some(r) = revoked {
            self.revoked = r;
        }
        let bundle_pem = bundle_pem.unwrap_or_else(|| self.bundle_pem.clone());
        let jwks = union(&self.by_node, &self.revoked);
        let changed = self.bundle_pem != bundle_pem || self.jwks != jwks;
        if changed {
            let seq = crate::spiffe_bundle::next_sequence(self.spiffe_sequence, now_unix());
            self.spiffe_bundle = crate::spiffe_bundle::build(&bundle_pem, &jwks, seq)?;
            self.spiffe_sequence = seq;
        }
        self.bundle_pem = bundle_pem;
        self.jwks = jwks;
        Ok(changed)
    }
}

/// Whether `key`, published under node `node`, may stand in the JWKS: its `kid` is
/// `<node>:<the key's own thumbprint>` (or, from a node of a version before issue 17, the bare
/// thumbprint), so no node can publish a key under another node's `kid` or name.
fn key_of_node(key: &Value, node: &str) -> bool {
    let (Some(kid), Some(thumb)) = (key["kid"].as_str(), super::jwk_thumbprint(key)) else {
        return false;
    };
    kid == thumb || kid.strip_prefix(node).and_then(|r| r.strip_prefix(':')) == Some(&thumb)
}

/// The JWKS of every node not cut off: each key once, sorted by `kid`, reduced to what the
/// SPIFFE standards define (a node of an older version may have published `alg`).
fn union(by_node: &BTreeMap<String, Vec<Value>>, revoked: &BTreeSet<String>) -> Value {
    let mut keys: Vec<Value> = Vec::new();
    for (_, ks) in by_node.iter().filter(|(n, _)| !revoked.contains(*n)) {
        for k in ks {
            if !keys.iter().any(|x| x.get("kid") == k.get("kid")) {
                keys.push(k.clone());
            }
        }
    }
    keys.sort_by(|a, b| a["kid"].as_str().cmp(&b["kid"].as_str()));
    crate::spiffe_bundle::clean_jwks(&json!({ "keys": keys }))
}

/// Where in OpenBao proofs are checked and SVIDs signed (`[openbao]`).
struct Roles {
    auth_mount: String,
    auth_role: String,
    workload_pki: String,
    node_pki: String,
}

pub struct BaoIssuer {
    bao: Bao,
    trust_domain: String,
    node: String,
    x509_ttl: Duration,
    jwt_ttl: Duration,
    /// The key that signs JWT-SVIDs now (one of `keys`).
    jwt: RwLock<Arc<JwtSigner>>,
    keys: Mutex<NodeKeys>,
    /// What OpenBao last accepted of this node's keys, and when each `kid` was first
    /// published: a key signs only `activation_delay` after that (every node has it by then).
    published: Mutex<(Vec<Value>, HashMap<String, u64>)>,
    schedule: Schedule,
    master_key: MasterKey,
    roles: Roles,
    kubelet_root: PathBuf,
    /// Workload tokens from JWT logins, by the SHA-256 of the service-account token that
    /// logged in: only a pod presenting that very token (which OpenBao accepted) reuses one.
    tokens: Mutex<HashMap<[u8; 32], Arc<WorkloadToken>>>,
    current: RwLock<Current>,
    cache: Arc<BaoCache>,
    /// Started from the sealed cache and not refreshed from OpenBao since (its JWT key is
    /// published at the first refresh).
    from_cache: AtomicBool,
}

/// Why the issuer could not be set up from OpenBao; an outage allows the sealed cache.
struct StartError {
    outage: bool,
    message: String,
}

impl StartError {
    fn bao(what: &str) -> impl FnOnce(BaoError) -> StartError + '_ {
        move |e| StartError {
            outage: e.is_outage(),
            message: format!("{what}: {e}"),
        }
    }

    fn local(message: String) -> StartError {
        StartError {
            outage: false,
            message,
        }
    }
}

/// OpenBao's answer to a signing or login request, as an issuance error: a refusal keeps
/// OpenBao's reason; an outage says the authority could not be asked.
fn authority(what: &str, e: BaoError) -> IssueError {
    match e {
        e if e.is_outage() => IssueError::Unavailable(format!("{what}: {e}")),
        // OpenBao checked the proof or the identity and said no.
        BaoError::Denied { .. } | BaoError::Status { code: 400, .. } => {
            IssueError::Refused(format!("{what}: {e}"))
        }
        // A missing mount or role, a server error: the setup, not the workload.
        e @ BaoError::Status { .. } => IssueError::Sign(format!(
            "{what}: {e} (check the OpenBao setup in docs/OPENBAO.md)"
        )),
        e => IssueError::Sign(format!("{what}: {e}")),
    }
}

/// The node's master key (made on first start), which seals its JWT keys.
fn master_key(cfg: &Config) -> Result<MasterKey, String> {
    keystore::create_private_dir(&cfg.state_dir).map_err(|e| e.to_string())?;
    let key_path = cfg.key_file();
    if key_path.exists() {
        MasterKey::load(&key_path)
    } else {
        MasterKey::create(&key_path)
    }
    .map_err(|e| e.to_string())
}

/// The JWT signer of `key`, its `kid` naming `node`.
fn signer_of(
    cfg_td: &str,
    node: &str,
    key: &NodeKey,
    jwt_ttl: Duration,
) -> Result<JwtSigner, String> {
    Ok(JwtSigner::new(cfg_td, &key.pkcs8, jwt_ttl)?.named(node))
}

/// The public JWKs of every key of the node, as published (a key of a version before rotation
/// also under its bare thumbprint `kid`, for the tokens it signed then).
fn published(
    td: &str,
    node: &str,
    keys: &NodeKeys,
    jwt_ttl: Duration,
) -> Result<Vec<Value>, String> {
    let mut out = Vec::new();
    for k in keys.all() {
        let jwk = signer_of(td, node, k, jwt_ttl)?.jwk().clone();
        if k.legacy {
            let mut bare = jwk.clone();
            bare["kid"] = json!(super::jwk_thumbprint(&jwk).ok_or("node JWT key is not P-256")?);
            out.push(bare);
        }
        out.push(jwk);
    }
    Ok(out)
}

/// Checks that OpenBao signed what was asked (exactly `id`, for `key`) and builds the SVID:
/// the leaf, then any CA certificate of OpenBao's chain not already an anchor in `bundle_pem`.
fn svid_of(
    id: &SpiffeId,
    key: &KeyPair,
    leaf: SignedLeaf,
    bundle_pem: &str,
    issued_at: u64,
) -> Result<X509Svid, IssueError> {
    let bad = |why: String| IssueError::Sign(format!("OpenBao's certificate for {id}: {why}"));
    let ders = crate::spiffe_bundle::pem_certificates(&leaf.certificate_pem).map_err(bad)?;
    let der = ders.first().ok_or_else(|| bad("no certificate".into()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| bad(format!("parse: {e}")))?;
    let uris: Vec<String> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| {
            san.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::URI(u) => u.to_string(),
                    other => format!("{other:?}"),
                })
                .collect()
        })
        .unwrap_or_default();
    if uris != [id.as_str()] {
        return Err(bad(format!("names {uris:?}, not only {id}")));
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad("signed another key than this node's CSR".into()));
    }
    let serial = cert
        .serial
        .to_bytes_be()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    let anchors = crate::spiffe_bundle::pem_certificates(bundle_pem).unwrap_or_default();
    let mut chain = leaf.certificate_pem.trim_end().to_string();
    chain.push('\n');
    for ca in &leaf.ca_chain_pem {
        let is_anchor = crate::spiffe_bundle::pem_certificates(ca)
            .map(|d| d.iter().all(|c| anchors.contains(c)))
            .unwrap_or(true);
        if !is_anchor {
            chain.push_str(ca.trim_end());
            chain.push('\n');
        }
    }
    Ok(X509Svid {
        spiffe_id: id.to_string(),
        cert_chain_pem: chain,
        key_pem: key.serialize_pem(),
        bundle_pem: bundle_pem.to_string(),
        serial,
        issued_at,
        expires_at: leaf.expiration,
    })
}

impl BaoIssuer {
    /// Publishes this node's JWT key and gets the bundle and the shared JWKS from OpenBao.
    /// While OpenBao is unreachable it starts from the sealed cache of the last run instead
    /// and returns why it is degraded; without a cache it cannot start.
    pub async fn start(
        cfg: &Config,
        bao: Bao,
        cache: Arc<BaoCache>,
    ) -> Result<(Self, Option<String>), String> {
        let ob = cfg
            .openbao
            .as_ref()
            .ok_or("issuer.kind = \"openbao\" needs an [openbao] section")?;
        if ob.intermediate_ttl.is_some() {
            tracing::warn!("openbao.intermediate_ttl is no longer used: OpenBao signs every X.509-SVID and nodes hold no intermediate CA; remove it from the config");
        }
        let node = cfg.node_name.clone();
        let master_key = master_key(cfg)?;
        let now = now_unix();
        let keys = NodeKeys::load_or_create(&cfg.state_dir, &master_key, now)?;
        let schedule = Schedule {
            rotation: cfg.issuer.jwt_key_rotation.as_secs(),
            // Every other node has polled a new key by then.
            activation_delay: 2 * ob.poll_interval.as_secs().max(1) + 1,
            // The last JWT-SVID an old key signed has expired (with validation leeway).
            grace: cfg.issuer.jwt_ttl.as_secs() + 60,
        };
        let jwt = signer_of(
            &cfg.trust_domain,
            &node,
            keys.signing(schedule, now),
            cfg.issuer.jwt_ttl,
        )?;
        let own = published(&cfg.trust_domain, &node, &keys, cfg.issuer.jwt_ttl)?;
        let (current, degraded) = match Self::online(&bao, &node, &own, &cache).await {
            Ok(c) => (c, None),
            Err(e) if e.outage => {
                let c = Self::cached(cfg, &cache, &own)
                    .map_err(|why| format!("OpenBao is unreachable ({}) and {why}", e.message))?;
                tracing::warn!(node = %node, "OpenBao unreachable ({}): starting from the sealed cache; X.509-SVIDs wait for OpenBao", e.message);
                let why = format!(
                    "issuer: started from the sealed cache (bundle, JWKS), OpenBao unreachable: {}; no X.509-SVID can be issued until it answers",
                    e.message
                );
                (c, Some(why))
            }
            Err(e) => return Err(e.message),
        };
        if degraded.is_none() {
            tracing::info!(node = %node, "OpenBao issuer ready");
        }
        let issuer = BaoIssuer {
            bao,
            trust_domain: cfg.trust_domain.clone(),
            node,
            x509_ttl: cfg.issuer.x509_ttl,
            jwt_ttl: cfg.issuer.jwt_ttl,
            jwt: RwLock::new(Arc::new(jwt)),
            keys: Mutex::new(keys),
            published: Mutex::new(match &degraded {
                // Published by `online`: every key counts as known since then.
                None => (
                    own.clone(),
                    own.iter()
                        .filter_map(|k| k["kid"].as_str())
                        .map(|kid| {
                            (
                                kid.to_string(),
                                now.saturating_sub(schedule.activation_delay),
                            )
                        })
                        .collect(),
                ),
                Some(_) => (Vec::new(), HashMap::new()),
            }),
            schedule,
            master_key,
            roles: Roles {
                auth_mount: ob.workload_auth_mount.clone(),
                auth_role: ob.workload_auth_role.clone(),
                workload_pki: ob.workload_pki_role.clone(),
                node_pki: ob.node_pki_role.clone(),
            },
            kubelet_root: cfg.kubernetes.kubelet_root.clone(),
            tokens: Mutex::new(HashMap::new()),
            current: RwLock::new(current),
            cache,
            from_cache: AtomicBool::new(degraded.is_some()),
        };
        if degraded.is_none() {
            issuer.save_cache();
        }
        Ok((issuer, degraded))
    }

    /// Everything from OpenBao: this node's JWT key published, the root and every node's JWT
    /// keys (the nodes cut off come from the sync loop; until then, those the sealed cache
    /// remembers).
    async fn online(
        bao: &Bao,
        node: &str,
        own: &[Value],
        cache: &BaoCache,
    ) -> Result<Current, StartError> {
        Self::publish(bao, node, own).await?;
        let bundle_pem = bao
            .pki_bundle_pem()
            .await
            .map_err(StartError::bao("the PKI mount's issuers"))?;
        let mut by_node = Self::fetch_keys(bao).await?;
        by_node.insert(node.to_string(), own.to_vec());
        let revoked = cache
            .issuer()
            .map(|st| st.revoked_nodes.into_iter().collect())
            .unwrap_or_default();
        Current::new(bundle_pem, by_node, revoked).map_err(StartError::local)
    }

    /// The bundle and JWKS as the sealed cache holds them, for this trust domain and node.
    fn cached(cfg: &Config, cache: &BaoCache, own: &[Value]) -> Result<Current, String> {
        let path = cache.issuer_path();
        let st = cache.issuer().ok_or_else(|| {
            format!(
                "there is no usable sealed cache of this node's issuer ({}) from an earlier run: nhid needs OpenBao at its first start",
                path.display()
            )
        })?;
        if st.trust_domain != cfg.trust_domain || st.node != cfg.node_name {
            return Err(format!(
                "the sealed cache {} is for trust domain {:?} node {:?}, not {:?} node {:?}",
                path.display(),
                st.trust_domain,
                st.node,
                cfg.trust_domain,
                cfg.node_name
            ));
        }
        let mut by_node = st.keys_by_node.clone();
        by_node.insert(cfg.node_name.clone(), own.to_vec());
        Current::new(
            st.bundle_pem.clone(),
            by_node,
            st.revoked_nodes.iter().cloned().collect(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Writes the current state to the sealed cache.
    fn save_cache(&self) {
        let c = self.current.read().unwrap_or_else(|p| p.into_inner());
        self.cache.save_issuer(&IssuerState {
            trust_domain: self.trust_domain.clone(),
            node: self.node.clone(),
            bundle_pem: c.bundle_pem.clone(),
            keys_by_node: c.by_node.clone(),
            revoked_nodes: c.revoked.iter().cloned().collect(),
            saved_at: now_unix(),
        });
    }

    /// Publishes this node's public JWT keys at `<kv_prefix>/nodes/<node>/jwks`.
    async fn publish(bao: &Bao, node: &str, own: &[Value]) -> Result<(), StartError> {
        let mut published = Map::new();
        published.insert("keys".into(), json!(own));
        published.insert("updated_at".into(), json!(now_unix()));
        bao.kv_write(&format!("nodes/{node}/jwks"), published, None)
            .await
            .map(|_| ())
            .map_err(StartError::bao("publishing this node's JWT key"))
    }

    /// Every node's published JWT keys, by node.
    async fn fetch_keys(bao: &Bao) -> Result<BTreeMap<String, Vec<Value>>, StartError> {
        let nodes = bao
            .kv_list("nodes/")
            .await
            .map_err(StartError::bao("listing nodes"))?;
        let mut by_node = BTreeMap::new();
        for n in nodes {
            let n = n.trim_end_matches('/');
            let what = format!("node {n}");
            if let Some(s) = bao
                .kv_read(&format!("nodes/{n}/jwks"))
                .await
                .map_err(StartError::bao(&what))?
            {
                let keys: Vec<Value> = s
                    .data
                    .get("keys")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter(|k| {
                        let ok = key_of_node(k, n);
                        if !ok {
                            tracing::warn!(node = n, kid = %k["kid"], "ignoring a JWT key published under node {n} whose kid is not {n}:<its own thumbprint>");
                        }
                        ok
                    })
                    .cloned()
                    .collect();
                by_node.insert(n.to_string(), keys);
            }
        }
        Ok(by_node)
    }

    /// Refreshes the bundle and JWKS (after a start from the sealed cache, publishes this
    /// node's JWT key first). Returns whether what verifiers need changed.
    async fn refresh(&self) -> Result<bool, String> {
        let recovering = self.from_cache.load(Ordering::SeqCst);
        let now = now_unix();
        let (rotated, own, signer) = {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let rotated = keys.maintain(self.schedule, now, &self.master_key)?;
            let own = published(&self.trust_domain, &self.node, &keys, self.jwt_ttl)?;
            let signer = signer_of(
                &self.trust_domain,
                &self.node,
                keys.signing(self.schedule, now),
                self.jwt_ttl,
            )?;
            (rotated, own, signer)
        };
        // Published until OpenBao has exactly this node's keys (a failed publish is retried
        // at the next refresh, never forgotten).
        let stale = {
            let p = self.published.lock().unwrap_or_else(|p| p.into_inner());
            p.0 != own
        };
        if recovering || stale {
            Self::publish(&self.bao, &self.node, &own)
                .await
                .map_err(|e| e.message)?;
            let mut p = self.published.lock().unwrap_or_else(|p| p.into_inner());
            p.0 = own.clone();
            for kid in own.iter().filter_map(|k| k["kid"].as_str()) {
                p.1.entry(kid.to_string()).or_insert(now);
            }
            p.1.retain(|kid, _| own.iter().any(|k| k["kid"] == kid.as_str()));
            tracing::info!(node = %self.node, keys = own.len(), rotated, "JWT keys published");
        }
        // The next key signs only once every node has had time to poll it.
        let ready = {
            let p = self.published.lock().unwrap_or_else(|p| p.into_inner());
            signer.jwk()["kid"]
                .as_str()
                .and_then(|kid| p.1.get(kid))
                .is_some_and(|t| now >= t + self.schedule.activation_delay)
        };
        let switched = ready && {
            let mut jwt = self.jwt.write().unwrap_or_else(|p| p.into_inner());
            let switched = jwt.jwk() != signer.jwk();
            if switched {
                *jwt = Arc::new(signer);
            }
            switched
        };
        if switched {
            tracing::info!(node = %self.node, kid = %self.jwt().jwk()["kid"], "signing JWT-SVIDs with the next key");
        }
        let bundle_pem = self.bao.pki_bundle_pem().await.map_err(|e| e.to_string())?;
        let mut by_node = Self::fetch_keys(&self.bao).await.map_err(|e| e.message)?;
        by_node.insert(self.node.clone(), own);
        let changed = self
            .current
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .update(Some(bundle_pem), Some(by_node), None)?;
        self.prune_tokens();
        if changed || recovering {
            self.save_cache();
        }
        if recovering {
            self.from_cache.store(false, Ordering::SeqCst);
            tracing::info!(node = %self.node, "OpenBao reachable again: issuer refreshed, no longer serving from the sealed cache");
        }
        Ok(changed)
    }

    /// A cached workload token of `key` still good for a while.
    fn cached_token(&self, key: &[u8; 32]) -> Option<Arc<WorkloadToken>> {
        let tokens = self.tokens.lock().unwrap_or_else(|p| p.into_inner());
        tokens
            .get(key)
            .filter(|t| t.expires_at.is_none_or(|e| e > now_unix() + TOKEN_MARGIN))
            .cloned()
    }

    /// Drops workload tokens about to expire (and so the entries of pods long gone).
    fn prune_tokens(&self) {
        let now = now_unix();
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, t| t.expires_at.is_none_or(|e| e > now + TOKEN_MARGIN));
    }

    /// The pod's service-account token, re-read beneath the kubelet root and checked to still
    /// name the identity's namespace, pod and service account.
    fn pod_token(
        &self,
        token_path: &Path,
        namespace: &str,
        pod_uid: &str,
        service_account: &str,
    ) -> Result<Zeroizing<String>, IssueError> {
        let refused = |why: String| {
            IssueError::Refused(format!(
                "service-account token of pod {pod_uid} ({namespace}/{service_account}): {why}"
            ))
        };
        let jwt = Zeroizing::new(
            nhi_core::k8s::read_projected_token(&self.kubelet_root, token_path, pod_uid)
                .map_err(refused)?,
        );
        let sa = nhi_core::k8s::service_account(&jwt, namespace, pod_uid).map_err(refused)?;
        if sa != service_account {
            return Err(refused(format!(
                "the token now names service account {sa:?}"
            )));
        }
        Ok(jwt)
    }

    /// OpenBao signs `csr` for a pod under the workload role, with the pod's own OpenBao token:
    /// the one a JWT login with this very service-account token got (kept until shortly before
    /// it expires, so renewals skip the login while kubelet's token is unchanged), else a new
    /// login. A cached token OpenBao no longer accepts is replaced once.
    async fn sign_for_pod(
        &self,
        id: &SpiffeId,
        csr: &str,
        proof: (&Path, &str, &str, &str),
    ) -> Result<SignedLeaf, IssueError> {
        let (token_path, namespace, pod_uid, service_account) = proof;
        let jwt = self.pod_token(token_path, namespace, pod_uid, service_account)?;
        let key: [u8; 32] = {
            use sha2::Digest;
            sha2::Sha256::digest(jwt.trim().as_bytes()).into()
        };
        let mut cached = self.cached_token(&key);
        loop {
            let was_cached = cached.is_some();
            let token = match cached.take() {
                Some(t) => t,
                None => {
                    let t = self
                        .bao
                        .login_jwt(&self.roles.auth_mount, &self.roles.auth_role, jwt.trim())
                        .await
                        .map_err(|e| {
                            authority("OpenBao login with the pod's service-account token", e)
                        })?;
                    let t = Arc::new(t);
                    self.tokens
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(key, t.clone());
                    t
                }
            };
            match self
                .bao
                .pki_sign(
                    &token,
                    &self.roles.workload_pki,
                    csr,
                    id.as_str(),
                    self.x509_ttl,
                )
                .await
            {
                Err(BaoError::Denied { .. }) if was_cached => {
                    // Revoked or expired early: log in again.
                    self.tokens
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&key);
                }
                other => {
                    return other.map_err(|e| {
                        authority(
                            &format!("OpenBao signing {id} for the pod's service account"),
                            e,
                        )
                    })
                }
            }
        }
    }

    async fn sign_x509(&self, id: &SpiffeId, proof: Proof<'_>) -> Result<X509Svid, IssueError> {
        check_domain(&self.trust_domain, id)?;
        let (key, csr) = key_and_csr(id)?;
        let issued_at = now_unix();
        let leaf = match proof {
            Proof::Node => self
                .bao
                .pki_sign_as_node(&self.roles.node_pki, &csr, id.as_str(), self.x509_ttl)
                .await
                .map_err(|e| {
                    authority(
                        &format!("OpenBao signing {id} on node {}'s word alone", self.node),
                        e,
                    )
                })?,
            Proof::ServiceAccount {
                token_path,
                namespace,
                pod_uid,
                service_account,
            } => {
                self.sign_for_pod(id, &csr, (token_path, namespace, pod_uid, service_account))
                    .await?
            }
        };
        let bundle = self.bundle_pem();
        svid_of(id, &key, leaf, &bundle, issued_at)
    }

    fn jwt(&self) -> Arc<JwtSigner> {
        self.jwt.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Why the issuer is degraded while it still runs on the sealed cache.
    fn on_cache(&self) -> Option<String> {
        self.from_cache.load(Ordering::SeqCst).then(|| {
            "issuer: serving the bundle and JWKS from the sealed cache until OpenBao answers; no X.509-SVID can be issued until then".to_string()
        })
    }
}

impl Issuer for BaoIssuer {
    fn kind(&self) -> &'static str {
        "openbao"
    }

    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn bundle_pem(&self) -> String {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .bundle_pem
            .clone()
    }

    fn jwks(&self) -> Value {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .jwks
            .clone()
    }

    fn spiffe_bundle(&self) -> Value {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .spiffe_bundle
            .clone()
    }

    fn issue_jwt(&self, id: &SpiffeId, audience: &[String]) -> Result<JwtSvid, IssueError> {
        self.jwt().issue_jwt(id, audience)
    }

    fn issue_x509<'a>(&'a self, id: &'a SpiffeId, proof: Proof<'a>) -> Issuing<'a, X509Svid> {
        Box::pin(self.sign_x509(id, proof))
    }

    fn maintain(&self) -> Upkeep<'_> {
        Box::pin(self.refresh())
    }

    fn degraded(&self) -> Option<String> {
        self.on_cache()
    }

    fn set_revoked_nodes(&self, nodes: &BTreeSet<String>) -> Result<bool, String> {
        let changed = {
            let mut c = self.current.write().unwrap_or_else(|p| p.into_inner());
            if &c.revoked == nodes {
                return Ok(false);
            }
            c.update(None, None, Some(nodes.clone()))?
        };
        // Never start forgetting a cut-off node, even while OpenBao is unreachable.
        self.save_cache();
        Ok(changed)
    }

    fn revoked_nodes(&self) -> BTreeSet<String> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .revoked
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_can_publish_only_its_own_keys_under_its_own_name() {
        let pair = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (thumb, jwk) = crate::issuer::jwk_of(&pair).unwrap();
        let named = |kid: &str| {
            let mut k = jwk.clone();
            k["kid"] = json!(kid);
            k
        };
        assert!(key_of_node(&named(&format!("a:{thumb}")), "a"));
        assert!(
            key_of_node(&named(&thumb), "a"),
            "a node of an older version"
        );
        // Node a publishing under b's name, or its key under another key's thumbprint.
        assert!(!key_of_node(&named(&format!("b:{thumb}")), "a"));
        let other = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (other_thumb, _) = crate::issuer::jwk_of(&other).unwrap();
        assert!(!key_of_node(&named(&format!("a:{other_thumb}")), "a"));
        assert!(!key_of_node(&named(&other_thumb), "a"));
        assert!(!key_of_node(&json!({"kty": "RSA", "kid": "a:x"}), "a"));
        // So in the JWKS: b's key, even first by name, cannot be shadowed by a's claim.
        let mut by_node = BTreeMap::new();
        by_node.insert("a".to_string(), vec![named(&format!("b:{thumb}"))]);
        assert!(by_node["a"].iter().all(|k| !key_of_node(k, "a")));
    }
}
