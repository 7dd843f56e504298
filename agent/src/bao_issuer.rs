//! The cluster issuer on OpenBao: one trust domain root in OpenBao's PKI engine; each node has
//! the root sign an intermediate CA for a key that never leaves the node (short TTL, renewed at
//! half-life), and signs X.509-SVIDs with it locally, so leaves from every node chain to the
//! same root and issuance needs no round trip. Each node also has its own JWT signing key
//! (sealed in its state dir) and publishes the public half at `<kv_prefix>/nodes/<node>/jwks`;
//! the JWKS every node serves is the union, so a JWT-SVID from node A verifies on node B.

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

use crate::issuer::{now_unix, IssueError, Issuer, Signer};
use crate::keystore::{self, MasterKey};
use crate::openbao::Bao;

const JWT_KEY_FILE: &str = "node-jwt.sealed";
const JWT_KEY_LABEL: &str = "nhi/node-jwt-key/v1";

struct Current {
    signer: Arc<Signer>,
    issued_at: u64,
    bundle_pem: String,
    jwks: Value,
    spiffe_sequence: u64,
    spiffe_bundle: Value,
}

pub struct BaoIssuer {
    bao: Bao,
    trust_domain: String,
    node: String,
    intermediate_ttl: Duration,
    jwt_ttl: Duration,
    x509_ttl: Duration,
    jwt_pkcs8: Zeroizing<Vec<u8>>,
    current: RwLock<Current>,
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

impl BaoIssuer {
    /// Publishes this node's JWT key, gets an intermediate and the shared JWKS. Needs OpenBao.
    pub async fn start(cfg: &Config, bao: Bao) -> Result<Self, String> {
        let ob = cfg
            .openbao
            .as_ref()
            .ok_or("issuer.kind = \"openbao\" needs an [openbao] section")?;
        let jwt_pkcs8 = node_jwt_key(cfg)?;
        let node = cfg.node_name.clone();
        let signer = Self::new_signer(
            &bao,
            &cfg.trust_domain,
            &node,
            ob.intermediate_ttl,
            &jwt_pkcs8,
            cfg.issuer.jwt_ttl,
            cfg.issuer.x509_ttl,
        )
        .await?;
        let mut published = Map::new();
        published.insert("keys".into(), json!([signer.jwk().clone()]));
        published.insert("updated_at".into(), json!(now_unix()));
        bao.kv_write(&format!("nodes/{node}/jwks"), published, None)
            .await
            .map_err(|e| format!("publishing this node's JWT key: {e}"))?;
        let bundle_pem = bao.pki_root_ca_pem().await.map_err(|e| e.to_string())?;
        let jwks = Self::fetch_jwks(&bao).await?;
        let spiffe_sequence = crate::spiffe_bundle::next_sequence(0, now_unix());
        let spiffe_bundle = crate::spiffe_bundle::build(&bundle_pem, &jwks, spiffe_sequence)?;
        tracing::info!(node = %node, intermediate_expires = signer.ca_not_after(), "OpenBao issuer ready");
        Ok(BaoIssuer {
            bao,
            trust_domain: cfg.trust_domain.clone(),
            node,
            intermediate_ttl: ob.intermediate_ttl,
            jwt_ttl: cfg.issuer.jwt_ttl,
            x509_ttl: cfg.issuer.x509_ttl,
            jwt_pkcs8,
            current: RwLock::new(Current {
                signer: Arc::new(signer),
                issued_at: now_unix(),
                bundle_pem,
                jwks,
                spiffe_sequence,
                spiffe_bundle,
            }),
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn new_signer(
        bao: &Bao,
        trust_domain: &str,
        node: &str,
        ttl: Duration,
        jwt_pkcs8: &[u8],
        jwt_ttl: Duration,
        x509_ttl: Duration,
    ) -> Result<Signer, String> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
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
            .map_err(|e| format!("CSR: {e}"))?;
        let signed = bao
            .pki_sign_intermediate(
                &csr,
                &format!("nhi {trust_domain} node {node}"),
                ttl,
                &[format!("spiffe://{trust_domain}")],
            )
            .await
            .map_err(|e| format!("intermediate CA: {e}"))?;
        let der = pem_to_der(&signed.certificate_pem)?;
        let bundle = signed.issuing_ca_pem.clone();
        let mut chain = signed.certificate_pem.trim_end().to_string();
        chain.push('\n');
        Signer::new(
            trust_domain,
            &der,
            key,
            chain,
            bundle,
            jwt_pkcs8,
            jwt_ttl,
            x509_ttl,
        )
    }

    /// The union of every node's published JWT keys, each reduced to the parameters the SPIFFE
    /// standards define (a node of an older version may have published `alg`).
    async fn fetch_jwks(bao: &Bao) -> Result<Value, String> {
        let nodes = bao
            .kv_list("nodes/")
            .await
            .map_err(|e| format!("listing nodes: {e}"))?;
        let mut keys: Vec<Value> = Vec::new();
        for n in nodes {
            let n = n.trim_end_matches('/');
            if let Some(s) = bao
                .kv_read(&format!("nodes/{n}/jwks"))
                .await
                .map_err(|e| format!("node {n}: {e}"))?
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

    /// Renews the intermediate at half-life and refreshes the bundle and JWKS. Returns whether
    /// what verifiers need (bundle, JWKS) changed.
    pub async fn maintain(&self) -> Result<bool, String> {
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
            .await?;
            tracing::info!(node = %self.node, expires = s.ca_not_after(), "intermediate CA renewed");
            Some(s)
        } else {
            None
        };
        let bundle_pem = self
            .bao
            .pki_root_ca_pem()
            .await
            .map_err(|e| e.to_string())?;
        let jwks = Self::fetch_jwks(&self.bao).await?;
        let mut c = self.current.write().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = new_signer {
            c.signer = Arc::new(s);
            c.issued_at = now;
        }
        let changed = c.bundle_pem != bundle_pem || c.jwks != jwks;
        if changed {
            let seq = crate::spiffe_bundle::next_sequence(c.spiffe_sequence, now);
            c.spiffe_bundle = crate::spiffe_bundle::build(&bundle_pem, &jwks, seq)?;
            c.spiffe_sequence = seq;
        }
        c.bundle_pem = bundle_pem;
        c.jwks = jwks;
        Ok(changed)
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

    fn maintainer(&self) -> Option<&BaoIssuer> {
        Some(self)
    }
}
