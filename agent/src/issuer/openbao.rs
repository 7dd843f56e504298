//! The cluster issuer on OpenBao: one trust domain root in OpenBao's PKI engine; each node has
//! the root sign an intermediate CA for a key that never leaves the node (short TTL, renewed at
//! half-life), and signs X.509-SVIDs with it locally, so leaves from every node chain to the
//! same root and issuance needs no round trip. Each node also has its own JWT signing key
//! (sealed in its state dir) and publishes the public half at `<kv_prefix>/nodes/<node>/jwks`;
//! the JWKS every node serves is the union, so a JWT-SVID from node A verifies on node B.
//! What it last had (intermediate and key, bundle, JWKS) is kept in the sealed cache
//! (`crate::store::sealed_cache`), so it starts while OpenBao is unreachable.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use nhi_core::config::Config;
use nhi_core::wire::{JwtSvid, X509Svid};
use nhi_core::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair,
    PKCS_ECDSA_P256_SHA256,
};
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use super::{now_unix, IssueError, Issuer, Signer, Upkeep};
use crate::keystore::{self, MasterKey};
use crate::store::sealed_cache::{BaoCache, IssuerState};
use nhi_openbao::{Bao, BaoError};

const JWT_KEY_FILE: &str = "node-jwt.sealed";
const JWT_KEY_LABEL: &str = "nhi/node-jwt-key/v1";

struct Current {
    signer: Arc<Signer>,
    issued_at: u64,
    bundle_pem: String,
    jwks: Value,
    spiffe_sequence: u64,
    spiffe_bundle: Value,
    /// The intermediate (PEM) and its key (PKCS#8 DER) behind `signer`, for the sealed cache.
    chain_pem: String,
    key_pkcs8: Zeroizing<Vec<u8>>,
}

pub struct BaoIssuer {
    bao: Bao,
    trust_domain: String,
    node: String,
    intermediate_ttl: Duration,
    jwt_ttl: Duration,
    x509_ttl: Duration,
    jwt_pkcs8: Zeroizing<Vec<u8>>,
    /// This node's public JWT key: always in the JWKS it serves.
    own_jwk: Value,
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

/// This node's JWT key: created once, sealed with the master key in the state dir.
fn node_jwt_key(cfg: &Config) -> Result<Zeroizing<Vec<u8>>, String> {
    keystore::create_private_dir(&cfg.state_dir).map_err(|e| e.to_string())?;
    let key_path = cfg.key_file();
    let mk = if key_path.exists() {
        MasterKey::load(&key_path)
    } else {
        MasterKey::create(&key_path)
    }
    .map_err(|e| e.to_string())?;
    let path = cfg.state_dir.join(JWT_KEY_FILE);
    if path.exists() {
        let sealed = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        return mk
            .open(&path, JWT_KEY_LABEL, &sealed)
            .map(Zeroizing::new)
            .map_err(|e| e.to_string());
    }
    let pair = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
    let der = Zeroizing::new(pair.serialize_der());
    keystore::write_atomic(&path, &mk.seal(JWT_KEY_LABEL, &der), 0o600)
        .map_err(|e| e.to_string())?;
    Ok(der)
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, String> {
    let body: String = pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect::<Vec<_>>()
        .concat();
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(body.trim())
        .map_err(|e| format!("PEM: {e}"))
}

/// `jwks` with `own` added if no key of its `kid` is in it.
fn with_own(mut jwks: Value, own: &Value) -> Value {
    if let Some(keys) = jwks.get_mut("keys").and_then(Value::as_array_mut) {
        if !keys.iter().any(|k| k.get("kid") == own.get("kid")) {
            keys.push(own.clone());
            keys.sort_by(|a, b| a["kid"].as_str().cmp(&b["kid"].as_str()));
        }
    }
    jwks
}

impl BaoIssuer {
    /// Publishes this node's JWT key, gets an intermediate and the shared JWKS from OpenBao.
    /// While OpenBao is unreachable it starts from the sealed cache of the last run instead
    /// (intermediate and key while valid, bundle, JWKS) and returns why it is degraded; without
    /// a cache it cannot start.
    pub async fn start(
        cfg: &Config,
        bao: Bao,
        cache: Arc<BaoCache>,
    ) -> Result<(Self, Option<String>), String> {
        let ob = cfg
            .openbao
            .as_ref()
            .ok_or("issuer.kind = \"openbao\" needs an [openbao] section")?;
        let jwt_pkcs8 = node_jwt_key(cfg)?;
        let own_jwk = KeyPair::try_from(&jwt_pkcs8[..])
            .map_err(|e| e.to_string())
            .and_then(|k| crate::issuer::jwk_of(&k))?
            .1;
        let node = cfg.node_name.clone();
        let (current, degraded) = match Self::online(
            &bao,
            &cfg.trust_domain,
            &node,
            ob.intermediate_ttl,
            &jwt_pkcs8,
            &own_jwk,
            (cfg.issuer.jwt_ttl, cfg.issuer.x509_ttl),
        )
        .await
        {
            Ok(c) => (c, None),
            Err(e) if e.outage => {
                let c = Self::cached(cfg, &cache, &jwt_pkcs8, &own_jwk)
                    .map_err(|why| format!("OpenBao is unreachable ({}) and {why}", e.message))?;
                let until = c.signer.ca_not_after();
                tracing::warn!(node = %node, intermediate_expires = until, "OpenBao unreachable ({}): starting from the sealed cache", e.message);
                let why = format!(
                    "issuer: started from the sealed cache (intermediate CA valid until {until}, unix), OpenBao unreachable: {}",
                    e.message
                );
                (c, Some(why))
            }
            Err(e) => return Err(e.message),
        };
        if degraded.is_none() {
            tracing::info!(node = %node, intermediate_expires = current.signer.ca_not_after(), "OpenBao issuer ready");
        }
        let issuer = BaoIssuer {
            bao,
            trust_domain: cfg.trust_domain.clone(),
            node,
            intermediate_ttl: ob.intermediate_ttl,
            jwt_ttl: cfg.issuer.jwt_ttl,
            x509_ttl: cfg.issuer.x509_ttl,
            jwt_pkcs8,
            own_jwk,
            current: RwLock::new(current),
            cache,
            from_cache: AtomicBool::new(degraded.is_some()),
        };
        if degraded.is_none() {
            issuer.save_cache();
        }
        Ok((issuer, degraded))
    }

    /// Everything from OpenBao: this node's JWT key published, a new intermediate, the root
    /// and every node's JWT keys.
    async fn online(
        bao: &Bao,
        trust_domain: &str,
        node: &str,
        intermediate_ttl: Duration,
        jwt_pkcs8: &[u8],
        own_jwk: &Value,
        ttls: (Duration, Duration),
    ) -> Result<Current, StartError> {
        let (signer, chain_pem, key_pkcs8) = Self::new_signer(
            bao,
            trust_domain,
            node,
            intermediate_ttl,
            jwt_pkcs8,
            ttls.0,
            ttls.1,
        )
        .await?;
        Self::publish(bao, node, own_jwk).await?;
        let bundle_pem = bao
            .pki_root_ca_pem()
            .await
            .map_err(StartError::bao("root CA"))?;
        let jwks = with_own(Self::fetch_jwks(bao).await?, own_jwk);
        let spiffe_sequence = crate::spiffe_bundle::next_sequence(0, now_unix());
        let spiffe_bundle = crate::spiffe_bundle::build(&bundle_pem, &jwks, spiffe_sequence)
            .map_err(StartError::local)?;
        Ok(Current {
            signer: Arc::new(signer),
            issued_at: now_unix(),
            bundle_pem,
            jwks,
            spiffe_sequence,
            spiffe_bundle,
            chain_pem,
            key_pkcs8,
        })
    }

    /// The issuer as the sealed cache holds it, for this trust domain and node.
    fn cached(
        cfg: &Config,
        cache: &BaoCache,
        jwt_pkcs8: &[u8],
        own_jwk: &Value,
    ) -> Result<Current, String> {
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
        use base64::Engine;
        let key_pkcs8 = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(&st.key_pkcs8)
                .map_err(|e| format!("{}: key: {e}", path.display()))?,
        );
        let key = KeyPair::try_from(&key_pkcs8[..])
            .map_err(|e| format!("{}: key: {e}", path.display()))?;
        let der = pem_to_der(&st.chain_pem)?;
        let signer = Signer::new(
            &cfg.trust_domain,
            &der,
            key,
            st.chain_pem.clone(),
            st.bundle_pem.clone(),
            jwt_pkcs8,
            cfg.issuer.jwt_ttl,
            cfg.issuer.x509_ttl,
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
        let jwks = with_own(st.jwks.clone(), own_jwk);
        let spiffe_sequence = crate::spiffe_bundle::next_sequence(0, now_unix());
        let spiffe_bundle = crate::spiffe_bundle::build(&st.bundle_pem, &jwks, spiffe_sequence)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Current {
            signer: Arc::new(signer),
            issued_at: st.issued_at,
            bundle_pem: st.bundle_pem.clone(),
            jwks,
            spiffe_sequence,
            spiffe_bundle,
            chain_pem: st.chain_pem.clone(),
            key_pkcs8,
        })
    }

    /// Writes the current state to the sealed cache.
    fn save_cache(&self) {
        use base64::Engine;
        let c = self.current.read().unwrap_or_else(|p| p.into_inner());
        self.cache.save_issuer(&IssuerState {
            trust_domain: self.trust_domain.clone(),
            node: self.node.clone(),
            chain_pem: c.chain_pem.clone(),
            key_pkcs8: base64::engine::general_purpose::STANDARD.encode(&c.key_pkcs8[..]),
            bundle_pem: c.bundle_pem.clone(),
            jwks: c.jwks.clone(),
            issued_at: c.issued_at,
            saved_at: now_unix(),
        });
    }

    /// Publishes this node's public JWT key at `<kv_prefix>/nodes/<node>/jwks`.
    async fn publish(bao: &Bao, node: &str, own_jwk: &Value) -> Result<(), StartError> {
        let mut published = Map::new();
        published.insert("keys".into(), json!([own_jwk.clone()]));
        published.insert("updated_at".into(), json!(now_unix()));
        bao.kv_write(&format!("nodes/{node}/jwks"), published, None)
            .await
            .map(|_| ())
            .map_err(StartError::bao("publishing this node's JWT key"))
    }

    /// A fresh key signed by the root as this node's intermediate; also returns the
    /// intermediate's PEM and the key's PKCS#8 DER.
    #[allow(clippy::too_many_arguments)]
    async fn new_signer(
        bao: &Bao,
        trust_domain: &str,
        node: &str,
        ttl: Duration,
        jwt_pkcs8: &[u8],
        jwt_ttl: Duration,
        x509_ttl: Duration,
    ) -> Result<(Signer, String, Zeroizing<Vec<u8>>), StartError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
            .map_err(|e| StartError::local(e.to_string()))?;
        let key_pkcs8 = Zeroizing::new(key.serialize_der());
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("nhi {trust_domain} node {node}"),
        );
        p.distinguished_name = dn;
        p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let csr = p
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(|e| StartError::local(format!("CSR: {e}")))?;
        let signed = bao
            .pki_sign_intermediate(
                &csr,
                &format!("nhi {trust_domain} node {node}"),
                ttl,
                &[format!("spiffe://{trust_domain}")],
            )
            .await
            .map_err(StartError::bao("intermediate CA"))?;
        let der = pem_to_der(&signed.certificate_pem).map_err(StartError::local)?;
        let bundle = signed.issuing_ca_pem.clone();
        let mut chain = signed.certificate_pem.trim_end().to_string();
        chain.push('\n');
        let signer = Signer::new(
            trust_domain,
            &der,
            key,
            chain.clone(),
            bundle,
            jwt_pkcs8,
            jwt_ttl,
            x509_ttl,
        )
        .map_err(StartError::local)?;
        Ok((signer, chain, key_pkcs8))
    }

    /// The union of every node's published JWT keys, each reduced to the parameters the SPIFFE
    /// standards define (a node of an older version may have published `alg`).
    async fn fetch_jwks(bao: &Bao) -> Result<Value, StartError> {
        let nodes = bao
            .kv_list("nodes/")
            .await
            .map_err(StartError::bao("listing nodes"))?;
        let mut keys: Vec<Value> = Vec::new();
        for n in nodes {
            let n = n.trim_end_matches('/');
            let what = format!("node {n}");
            if let Some(s) = bao
                .kv_read(&format!("nodes/{n}/jwks"))
                .await
                .map_err(StartError::bao(&what))?
            {
                for k in s
                    .data
                    .get("keys")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    if !keys.iter().any(|x| x.get("kid") == k.get("kid")) {
                        keys.push(k.clone());
                    }
                }
            }
        }
        keys.sort_by(|a, b| a["kid"].as_str().cmp(&b["kid"].as_str()));
        Ok(crate::spiffe_bundle::clean_jwks(&json!({ "keys": keys })))
    }

    /// Renews the intermediate at half-life and refreshes the bundle and JWKS (after a start
    /// from the sealed cache, publishes this node's JWT key first). Returns whether what
    /// verifiers need (bundle, JWKS) changed.
    async fn renew_and_refresh(&self) -> Result<bool, String> {
        let recovering = self.from_cache.load(Ordering::SeqCst);
        if recovering {
            Self::publish(&self.bao, &self.node, &self.own_jwk)
                .await
                .map_err(|e| e.message)?;
        }
        let (issued_at, not_after) = {
            let c = self.current.read().unwrap_or_else(|p| p.into_inner());
            (c.issued_at, c.signer.ca_not_after())
        };
        let now = now_unix();
        let renew = now >= issued_at + not_after.saturating_sub(issued_at) / 2;
        let new_signer = if renew {
            let s = Self::new_signer(
                &self.bao,
                &self.trust_domain,
                &self.node,
                self.intermediate_ttl,
                &self.jwt_pkcs8,
                self.jwt_ttl,
                self.x509_ttl,
            )
            .await
            .map_err(|e| e.message)?;
            tracing::info!(node = %self.node, expires = s.0.ca_not_after(), "intermediate CA renewed");
            Some(s)
        } else {
            None
        };
        let bundle_pem = self
            .bao
            .pki_root_ca_pem()
            .await
            .map_err(|e| e.to_string())?;
        let jwks = with_own(
            Self::fetch_jwks(&self.bao).await.map_err(|e| e.message)?,
            &self.own_jwk,
        );
        let changed = {
            let mut c = self.current.write().unwrap_or_else(|p| p.into_inner());
            if let Some((signer, chain_pem, key_pkcs8)) = new_signer {
                c.signer = Arc::new(signer);
                c.issued_at = now;
                c.chain_pem = chain_pem;
                c.key_pkcs8 = key_pkcs8;
            }
            let changed = c.bundle_pem != bundle_pem || c.jwks != jwks;
            if changed {
                let seq = crate::spiffe_bundle::next_sequence(c.spiffe_sequence, now);
                c.spiffe_bundle = crate::spiffe_bundle::build(&bundle_pem, &jwks, seq)?;
                c.spiffe_sequence = seq;
            }
            c.bundle_pem = bundle_pem;
            c.jwks = jwks;
            changed
        };
        if changed || renew || recovering {
            self.save_cache();
        }
        if recovering {
            self.from_cache.store(false, Ordering::SeqCst);
            tracing::info!(node = %self.node, "OpenBao reachable again: issuer refreshed, no longer serving from the sealed cache");
        }
        Ok(changed)
    }

    /// Why the issuer is degraded while it still runs on the sealed cache.
    fn on_cache(&self) -> Option<String> {
        self.from_cache.load(Ordering::SeqCst).then(|| {
            let until = self
                .current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .signer
                .ca_not_after();
            format!(
                "issuer: serving from the sealed cache until OpenBao answers (intermediate CA valid until {until}, unix)"
            )
        })
    }

    fn signer(&self) -> Arc<Signer> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .signer
            .clone()
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
        self.signer().issue_jwt(id, audience)
    }

    fn issue_x509(&self, id: &SpiffeId) -> Result<X509Svid, IssueError> {
        self.signer().issue_x509(id)
    }

    fn maintain(&self) -> Upkeep<'_> {
        Box::pin(self.renew_and_refresh())
    }

    fn degraded(&self) -> Option<String> {
        self.on_cache()
    }
}
