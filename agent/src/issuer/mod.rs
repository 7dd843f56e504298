//! Issuing SVIDs. The [`Issuer`] trait is what `nhid` asks of a backend; [`Signer`] is the
//! signing both backends share (one CA key and one JWT key, SPIFFE X509-SVID and JWT-SVID
//! standards). The backends, one per file:
//!
//! - [`embedded`]: a trust-domain root CA and JWT key created on first start, sealed at rest.
//! - [`openbao`]: OpenBao's PKI engine signs each X.509-SVID against the workload's own proof
//!   (or, without one, only under the node's path), and a per-node JWT key whose public half
//!   every node trusts through OpenBao.

pub mod embedded;
pub mod node_keys;
pub mod openbao;

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

pub use nhi_core::clock::now_unix;

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use nhi_core::wire::{JwtSvid, X509Svid};
use nhi_core::SpiffeId;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer as CaIssuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use serde::Serialize;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use embedded::{CaRotation, EmbeddedIssuer, IssuerInitError};
pub use openbao::BaoIssuer;

/// What issuing an X.509-SVID returns (the OpenBao backend asks OpenBao).
pub type Issuing<'a, T> = Pin<Box<dyn Future<Output = Result<T, IssueError>> + Send + 'a>>;

/// What a workload proved about itself beyond nhid's own observation of its container: an
/// issuer that lets a third party decide (OpenBao) shows it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proof<'a> {
    /// Nothing: the node vouches alone (plain containers, Nomad). In cluster mode only IDs
    /// under the node's own path.
    Node,
    /// A Kubernetes pod's kubelet-projected service-account token, at this host path (re-read
    /// beneath the kubelet root each time it is shown).
    ServiceAccount {
        token_path: &'a std::path::Path,
        namespace: &'a str,
        pod_uid: &'a str,
        service_account: &'a str,
    },
}

impl<'a> Proof<'a> {
    /// What `w` proved: its service-account token when the hook read one for its rule.
    pub fn of(w: &'a nhi_core::Workload) -> Proof<'a> {
        let Some(k) = &w.k8s else {
            return Proof::Node;
        };
        match (&k.token_path, &k.namespace, &k.pod_uid, &k.service_account) {
            (Some(token_path), Some(namespace), Some(pod_uid), Some(service_account)) => {
                Proof::ServiceAccount {
                    token_path,
                    namespace,
                    pod_uid,
                    service_account,
                }
            }
            _ => Proof::Node,
        }
    }
}

/// What upkeep returns: `Ok(true)` when the trust material (bundle, JWKS) changed and must be
/// pushed to companions.
pub type Upkeep<'a> = Pin<Box<dyn Future<Output = Result<bool, String>> + Send + 'a>>;

/// What every issuer backend offers `nhid`.
pub trait Issuer: Send + Sync {
    fn kind(&self) -> &'static str;
    fn trust_domain(&self) -> &str;
    /// PEM of the trust anchors X.509-SVIDs chain to (may change: CA renewal, new nodes).
    fn bundle_pem(&self) -> String;
    /// JWKS of the keys JWT-SVIDs of this trust domain are signed with (every node's).
    fn jwks(&self) -> serde_json::Value;
    /// Both, as one SPIFFE bundle (JWK Set with `x509-svid` and `jwt-svid` keys,
    /// `spiffe_sequence`, `spiffe_refresh_hint`): see [`crate::spiffe_bundle`].
    fn spiffe_bundle(&self) -> serde_json::Value;
    fn issue_jwt(&self, id: &SpiffeId, audience: &[String]) -> Result<JwtSvid, IssueError>;
    /// An X.509-SVID for `id`, for a workload that proved `proof`.
    fn issue_x509<'a>(&'a self, id: &'a SpiffeId, proof: Proof<'a>) -> Issuing<'a, X509Svid>;
    /// Periodic upkeep (the OpenBao backend renews its intermediate and refreshes the shared
    /// JWKS); called by the sync loop. Nothing to do by default.
    fn maintain(&self) -> Upkeep<'_> {
        Box::pin(async { Ok(false) })
    }
    /// What is degraded right now (e.g. running on a sealed cache), for `nhictl status`.
    fn degraded(&self) -> Option<String> {
        None
    }
    /// The cluster's nodes cut off now (`nhictl node revoke`): their JWT keys leave the JWKS
    /// served and validated with. `Ok(true)` when the trust material changed. Only a cluster
    /// issuer has other nodes.
    fn set_revoked_nodes(
        &self,
        _nodes: &std::collections::BTreeSet<String>,
    ) -> Result<bool, String> {
        Ok(false)
    }
    fn revoked_nodes(&self) -> std::collections::BTreeSet<String> {
        Default::default()
    }
    /// Starts a CA rotation (`nhictl ca rotate`) where this node holds the CA.
    fn rotate_ca(&self, _activate_after: Option<Duration>) -> Result<CaRotation, String> {
        Err(format!(
            "the {} issuer's CA is not rotated from a node",
            self.kind()
        ))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("SPIFFE ID {0} is not in this issuer's trust domain")]
    ForeignTrustDomain(String),
    #[error("JWT-SVID needs at least one audience")]
    NoAudience,
    #[error("signing failed: {0}")]
    Sign(String),
    /// The authority that checks proofs (OpenBao) said no: its reason, as it gave it.
    #[error("refused by the issuing authority: {0}")]
    Refused(String),
    /// The authority could not be asked (OpenBao unreachable); an SVID already held stays
    /// valid until it expires.
    #[error("issuing authority unavailable: {0}")]
    Unavailable(String),
}

/// The JWT-SVID half of a signer: one P-256 key, its JWK and `kid`.
pub struct JwtSigner {
    trust_domain: String,
    jwt_key: EncodingKey,
    kid: String,
    jwk: serde_json::Value,
    jwt_ttl: Duration,
}

impl JwtSigner {
    pub fn new(trust_domain: &str, jwt_pkcs8: &[u8], jwt_ttl: Duration) -> Result<Self, String> {
        let jwt_pair = KeyPair::try_from(jwt_pkcs8).map_err(|e| format!("JWT key: {e}"))?;
        let (kid, jwk) = jwk_of(&jwt_pair)?;
        Ok(JwtSigner {
            trust_domain: trust_domain.into(),
            jwt_key: EncodingKey::from_ec_der(jwt_pkcs8),
            kid,
            jwk,
            jwt_ttl,
        })
    }

    /// This key's public JWK.
    pub fn jwk(&self) -> &serde_json::Value {
        &self.jwk
    }

    /// The same key with a `kid` naming `node` (`<node>:<thumbprint>`): a cluster node's key,
    /// so every JWT-SVID and JWKS entry says which node it belongs to.
    pub fn named(mut self, node: &str) -> Self {
        self.kid = format!("{node}:{}", self.kid);
        self.jwk["kid"] = serde_json::Value::String(self.kid.clone());
        self
    }
}

/// `id` must be in `trust_domain`.
pub fn check_domain(trust_domain: &str, id: &SpiffeId) -> Result<(), IssueError> {
    if id.trust_domain() != trust_domain {
        return Err(IssueError::ForeignTrustDomain(id.to_string()));
    }
    Ok(())
}

/// A fresh P-256 key for `id` and a CSR naming only `id` (URI SAN), for an authority that signs
/// elsewhere: the key never leaves this process.
pub fn key_and_csr(id: &SpiffeId) -> Result<(KeyPair, String), IssueError> {
    let s = |e: rcgen::Error| IssueError::Sign(e.to_string());
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(s)?;
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "SPIFFE");
    p.distinguished_name = dn;
    p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(s)?)];
    let csr = p.serialize_request(&key).and_then(|c| c.pem()).map_err(s)?;
    Ok((key, csr))
}

/// Signs SVIDs with one CA key (a root, or an intermediate under a shared root) and one JWT
/// key. Immutable: a renewed CA is a new `Signer`.
pub struct Signer {
    trust_domain: String,
    ca: CaIssuer<'static, KeyPair>,
    /// PEM of the certificates between leaves and the bundle (the intermediate); empty when the
    /// CA is itself the root.
    chain_pem: String,
    bundle_pem: String,
    jwt: JwtSigner,
    x509_ttl: Duration,
    /// Unix time the CA certificate expires; leaves never outlive it.
    ca_not_after: u64,
}

/// The public JWK (and its RFC 7638 thumbprint as `kid`) of a P-256 key, as a JWT-SVID
/// authority: `use` = `jwt-svid`, and no parameter the SPIFFE standards do not define (no
/// `alg`: the algorithm is in each token's header, ES256).
pub fn jwk_of(pair: &KeyPair) -> Result<(String, serde_json::Value), String> {
    let raw = pair.public_key_raw(); // 0x04 || X || Y
    if raw.len() != 65 || raw[0] != 4 {
        return Err("JWT key is not an uncompressed P-256 point".into());
    }
    let (x, y) = (B64URL.encode(&raw[1..33]), B64URL.encode(&raw[33..65]));
    let kid = ec_thumbprint(&x, &y);
    let jwk = serde_json::json!({
        "kty": "EC", "crv": "P-256", "x": x, "y": y,
        "kid": kid, "use": "jwt-svid",
    });
    Ok((kid, jwk))
}

/// RFC 7638 thumbprint of a P-256 public key given by its base64url `x` and `y`.
fn ec_thumbprint(x: &str, y: &str) -> String {
    B64URL.encode(Sha256::digest(format!(
        r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#
    )))
}

/// The RFC 7638 thumbprint of a published P-256 JWK, `None` for any other key.
pub fn jwk_thumbprint(jwk: &serde_json::Value) -> Option<String> {
    if jwk["kty"] != "EC" || jwk["crv"] != "P-256" {
        return None;
    }
    Some(ec_thumbprint(jwk["x"].as_str()?, jwk["y"].as_str()?))
}

/// Unix time a DER certificate expires.
pub fn not_after(der: &[u8]) -> Result<u64, String> {
    let (_, parsed) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("certificate: {e}"))?;
    Ok(u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0))
}

impl Signer {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        trust_domain: &str,
        ca_der: &[u8],
        ca_key: KeyPair,
        chain_pem: String,
        bundle_pem: String,
        jwt_pkcs8: &[u8],
        jwt_ttl: Duration,
        x509_ttl: Duration,
    ) -> Result<Self, String> {
        let ca_not_after = not_after(ca_der)?;
        let ca_cert_der = rustls_pki_types::CertificateDer::from(ca_der.to_vec());
        let ca = CaIssuer::from_ca_cert_der(&ca_cert_der, ca_key)
            .map_err(|e| format!("CA certificate: {e}"))?;
        Ok(Signer {
            trust_domain: trust_domain.into(),
            ca,
            chain_pem,
            bundle_pem,
            jwt: JwtSigner::new(trust_domain, jwt_pkcs8, jwt_ttl)?,
            x509_ttl,
            ca_not_after,
        })
    }

    pub fn ca_not_after(&self) -> u64 {
        self.ca_not_after
    }

    /// This signer's public JWK.
    pub fn jwk(&self) -> &serde_json::Value {
        self.jwt.jwk()
    }

    pub fn issue_jwt(&self, id: &SpiffeId, audience: &[String]) -> Result<JwtSvid, IssueError> {
        self.jwt.issue_jwt(id, audience)
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).expect("the OS random source failed");
    b
}

fn random_serial() -> SerialNumber {
    let mut b = random_bytes::<16>();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // and no leading zero byte to strip
    SerialNumber::from_slice(&b)
}

pub fn pem_encode(label: &str, der: &[u8]) -> String {
    let b = B64.encode(der);
    let mut s = format!("-----BEGIN {label}-----\n");
    for chunk in b.as_bytes().chunks(64) {
        s.push_str(std::str::from_utf8(chunk).expect("base64 is ascii"));
        s.push('\n');
    }
    s.push_str(&format!("-----END {label}-----\n"));
    s
}

/// Private key material in transit is wiped when dropped.
fn zeroizing(v: Vec<u8>) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(v)
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    aud: &'a [String],
    exp: u64,
    iat: u64,
    jti: String,
}

impl JwtSigner {
    pub fn issue_jwt(&self, id: &SpiffeId, audience: &[String]) -> Result<JwtSvid, IssueError> {
        check_domain(&self.trust_domain, id)?;
        if audience.is_empty() {
            return Err(IssueError::NoAudience);
        }
        let iat = now_unix();
        let exp = iat + self.jwt_ttl.as_secs();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        let jti = B64URL.encode(random_bytes::<16>());
        let claims = Claims {
            sub: id.as_str(),
            aud: audience,
            exp,
            iat,
            jti: jti.clone(),
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.jwt_key)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        Ok(JwtSvid {
            token,
            jti,
            spiffe_id: id.to_string(),
            audience: audience.to_vec(),
            issued_at: iat,
            expires_at: exp,
        })
    }
}

impl Signer {
    pub fn issue_x509(&self, id: &SpiffeId) -> Result<X509Svid, IssueError> {
        check_domain(&self.trust_domain, id)?;
        let s = |e: rcgen::Error| IssueError::Sign(e.to_string());
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(s)?;
        let iat = now_unix();
        let now = time::OffsetDateTime::now_utc();
        let mut p = CertificateParams::default();
        // Tolerate small clock skew between this node and verifiers.
        p.not_before = now - time::Duration::seconds(30);
        // Never past the CA: a leaf outliving its issuer fails verification anyway.
        let expires_at = (iat + self.x509_ttl.as_secs()).min(self.ca_not_after);
        if expires_at <= iat {
            return Err(IssueError::Sign("the trust domain's CA has expired".into()));
        }
        p.not_after = time::OffsetDateTime::from_unix_timestamp(expires_at as i64)
            .map_err(|e| IssueError::Sign(e.to_string()))?;
        let serial = random_serial();
        p.serial_number = Some(serial.clone());
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        p.distinguished_name = dn;
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(s)?)];
        let cert = p.signed_by(&key, &self.ca).map_err(s)?;
        Ok(X509Svid {
            spiffe_id: id.to_string(),
            cert_chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            key_pem: key.serialize_pem(),
            bundle_pem: self.bundle_pem.clone(),
            serial: serial.to_string(),
            issued_at: iat,
            expires_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nhi_core::workload::K8s;
    use nhi_core::Workload;

    #[test]
    fn only_a_pod_whose_hook_read_its_token_has_a_service_account_proof() {
        let mut w = Workload {
            container_id: "c".into(),
            ..Default::default()
        };
        assert_eq!(Proof::of(&w), Proof::Node, "plain container");
        w.k8s = Some(K8s {
            namespace: Some("prod".into()),
            pod_uid: Some("u1".into()),
            service_account: Some("web".into()),
            ..Default::default()
        });
        assert_eq!(Proof::of(&w), Proof::Node, "no token read for its rule");
        let path = std::path::PathBuf::from("/var/lib/kubelet/pods/u1/volumes/x/token");
        w.k8s.as_mut().unwrap().token_path = Some(path.clone());
        assert_eq!(
            Proof::of(&w),
            Proof::ServiceAccount {
                token_path: &path,
                namespace: "prod",
                pod_uid: "u1",
                service_account: "web",
            }
        );
        w.k8s.as_mut().unwrap().pod_uid = None;
        assert_eq!(Proof::of(&w), Proof::Node, "every part or nothing");
    }

    #[test]
    fn a_csr_names_exactly_the_identity_and_keeps_the_key() {
        let id = SpiffeId::new("td", "ns/prod/sa/web").unwrap();
        let (key, pem) = key_and_csr(&id).unwrap();
        let der = crate::spiffe_bundle::pem_certificates(
            &pem.replace("CERTIFICATE REQUEST", "CERTIFICATE"),
        )
        .unwrap()
        .remove(0);
        use x509_parser::prelude::FromDer;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&der).unwrap();
        use rcgen::PublicKeyData;
        assert_eq!(
            csr.certification_request_info.subject_pki.raw,
            key.subject_public_key_info().as_slice()
        );
        assert!(!pem.contains("PRIVATE"));
        let uris: Vec<String> = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .filter_map(|e| match e {
                x509_parser::extensions::ParsedExtension::SubjectAlternativeName(san) => Some(
                    san.general_names
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(uris, ["URI(spiffe://td/ns/prod/sa/web)"]);
    }
}
