//! The embedded issuer: a trust-domain root CA (ECDSA P-256) and a JWT signing key (ES256),
//! created on first start and sealed at rest with the master key (see [`crate::keystore`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use nhi_core::config::Config;
use nhi_core::wire::{JwtSvid, X509Svid};
use nhi_core::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, PKCS_ECDSA_P256_SHA256,
};
use serde::{Deserialize, Serialize};

use super::{
    not_after, now_unix, pem_encode, random_serial, zeroizing, IssueError, Issuer, Issuing, Proof,
    Signer,
};
use crate::keystore::{self, KeystoreError, MasterKey};

#[derive(Debug, thiserror::Error)]
pub enum IssuerInitError {
    #[error(transparent)]
    Keystore(#[from] KeystoreError),
    #[error("{path} holds keys for trust domain {found:?}, but the config says {expected:?}; use another state_dir or restore the old trust_domain")]
    TrustDomainMismatch {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("{sealed} exists but the master key {key} does not: refusing to create new keys over the old ones (restore the key file, or move the state away to start a new trust domain)")]
    MissingMasterKey { sealed: PathBuf, key: PathBuf },
    #[error("{path}: corrupt issuer keys: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("generating keys: {0}")]
    Generate(String),
}

const SEALED_FILE: &str = "issuer.sealed";
const BUNDLE_FILE: &str = "bundle.pem";
const SEAL_LABEL: &str = "nhi/embedded-issuer/v1";

/// The sealed content.
#[derive(Serialize, Deserialize)]
struct IssuerKeys {
    trust_domain: String,
    ca_cert_der: String,
    ca_key_pkcs8: String,
    jwt_key_pkcs8: String,
    created_at: u64,
}

pub struct EmbeddedIssuer {
    signer: Signer,
    jwks: serde_json::Value,
    spiffe_bundle: serde_json::Value,
}

impl EmbeddedIssuer {
    /// Loads the sealed keys from the state dir, or creates them on first start.
    pub fn load_or_create(cfg: &Config) -> Result<Self, IssuerInitError> {
        keystore::create_private_dir(&cfg.state_dir)?;
        let sealed_path = cfg.state_dir.join(SEALED_FILE);
        let key_path = cfg.key_file();
        let keys = if sealed_path.exists() {
            if !key_path.exists() {
                return Err(IssuerInitError::MissingMasterKey {
                    sealed: sealed_path,
                    key: key_path,
                });
            }
            let mk = MasterKey::load(&key_path)?;
            let sealed = std::fs::read(&sealed_path).map_err(|source| KeystoreError::Io {
                path: sealed_path.clone(),
                source,
            })?;
            let plain = zeroizing(mk.open(&sealed_path, SEAL_LABEL, &sealed)?);
            let keys: IssuerKeys =
                serde_json::from_slice(&plain).map_err(|e| IssuerInitError::Corrupt {
                    path: sealed_path.clone(),
                    message: e.to_string(),
                })?;
            if keys.trust_domain != cfg.trust_domain {
                return Err(IssuerInitError::TrustDomainMismatch {
                    path: sealed_path,
                    found: keys.trust_domain,
                    expected: cfg.trust_domain.clone(),
                });
            }
            keys
        } else {
            let mk = if key_path.exists() {
                MasterKey::load(&key_path)?
            } else {
                MasterKey::create(&key_path)?
            };
            let keys = generate(&cfg.trust_domain, cfg.issuer.ca_ttl)?;
            let plain = zeroizing(serde_json::to_vec(&keys).expect("keys serialize"));
            keystore::write_atomic(&sealed_path, &mk.seal(SEAL_LABEL, &plain), 0o600)?;
            keys
        };
        let issuer = Self::from_keys(&sealed_path, keys, cfg)?;
        // The public bundle, for operators and tools; never read back as a source of trust.
        keystore::write_atomic(
            &cfg.state_dir.join(BUNDLE_FILE),
            issuer.signer.bundle_pem.as_bytes(),
            0o644,
        )?;
        Ok(issuer)
    }

    fn from_keys(path: &Path, keys: IssuerKeys, cfg: &Config) -> Result<Self, IssuerInitError> {
        let corrupt = |message: String| IssuerInitError::Corrupt {
            path: path.into(),
            message,
        };
        let d = |s: &str| B64.decode(s).map_err(|e| corrupt(e.to_string()));
        let ca_der = d(&keys.ca_cert_der)?;
        let ca_key = KeyPair::try_from(zeroizing(d(&keys.ca_key_pkcs8)?).as_slice())
            .map_err(|e| corrupt(format!("CA key: {e}")))?;
        let jwt_pkcs8 = zeroizing(d(&keys.jwt_key_pkcs8)?);
        let ca_not_after = not_after(&ca_der).map_err(corrupt)?;
        if ca_not_after <= now_unix() {
            return Err(IssuerInitError::Generate(format!(
                "the trust domain's CA in {} expired at {} (unix); rotate it (move the state dir's sealed keys away to create a new one) and redistribute the bundle",
                path.display(),
                ca_not_after
            )));
        }
        let signer = Signer::new(
            &keys.trust_domain,
            &ca_der,
            ca_key,
            String::new(),
            pem_encode("CERTIFICATE", &ca_der),
            &jwt_pkcs8,
            cfg.issuer.jwt_ttl,
            cfg.issuer.x509_ttl,
        )
        .map_err(corrupt)?;
        let jwks = serde_json::json!({ "keys": [signer.jwk().clone()] });
        // The content never changes for the life of these keys: their creation time is the
        // sequence, the same across restarts.
        let spiffe_bundle = crate::spiffe_bundle::build(&signer.bundle_pem, &jwks, keys.created_at)
            .map_err(corrupt)?;
        Ok(EmbeddedIssuer {
            signer,
            jwks,
            spiffe_bundle,
        })
    }
}

fn generate(trust_domain: &str, ca_ttl: Duration) -> Result<IssuerKeys, IssuerInitError> {
    let g = |e: rcgen::Error| IssuerInitError::Generate(e.to_string());
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let jwt_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let mut p = CertificateParams::default();
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + ca_ttl;
    p.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nhi");
    dn.push(DnType::CommonName, format!("nhi {trust_domain} root CA"));
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // X509-SVID standard, appendix A: keyCertSign "must be set if and only if the SVID is a
    // signing certificate", cRLSign "may be set if and only if", digitalSignature "must be set
    // if and only if the SVID is a leaf certificate": so not here.
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    // A signing certificate may carry the trust domain's SPIFFE ID (X509-SVID standard, 4.1).
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{trust_domain}").try_into().map_err(g)?,
    )];
    let cert = p.self_signed(&ca_key).map_err(g)?;
    Ok(IssuerKeys {
        trust_domain: trust_domain.into(),
        ca_cert_der: B64.encode(cert.der()),
        ca_key_pkcs8: B64.encode(ca_key.serialize_der()),
        jwt_key_pkcs8: B64.encode(jwt_key.serialize_der()),
        created_at: now_unix(),
    })
}

impl Issuer for EmbeddedIssuer {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn trust_domain(&self) -> &str {
        &self.signer.trust_domain
    }

    fn bundle_pem(&self) -> String {
        self.signer.bundle_pem.clone()
    }

    fn jwks(&self) -> serde_json::Value {
        self.jwks.clone()
    }

    fn spiffe_bundle(&self) -> serde_json::Value {
        self.spiffe_bundle.clone()
    }

    fn issue_jwt(&self, id: &SpiffeId, audience: &[String]) -> Result<JwtSvid, IssueError> {
        self.signer.issue_jwt(id, audience)
    }

    /// Signed here, with the trust domain's own root: the node is the authority, so the proof
    /// was checked when the workload was attached and there is no one else to show it to.
    fn issue_x509<'a>(&'a self, id: &'a SpiffeId, _proof: Proof<'a>) -> Issuing<'a, X509Svid> {
        let x = self.signer.issue_x509(id);
        Box::pin(async move { x })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn cfg(dir: &Path, td: &str) -> Config {
        Config::parse(
            Path::new("t.toml"),
            &format!(
                "trust_domain = \"{td}\"\nstate_dir = \"{}\"\n",
                dir.display()
            ),
        )
        .unwrap()
    }

    #[test]
    fn keys_survive_restart_and_are_sealed() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "example.org");
        let a = EmbeddedIssuer::load_or_create(&c).unwrap();
        let b = EmbeddedIssuer::load_or_create(&c).unwrap();
        assert_eq!(a.bundle_pem(), b.bundle_pem());
        assert_eq!(a.jwks(), b.jwks());
        let sealed = std::fs::read(dir.path().join(SEALED_FILE)).unwrap();
        // The P-256 OID inside every PKCS#8 EC key must not appear in the sealed file.
        let oid = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
        assert!(!sealed.windows(oid.len()).any(|w| w == oid));
        assert!(!String::from_utf8_lossy(&sealed).contains("PRIVATE KEY"));

        let other = cfg(dir.path(), "other.org");
        assert!(matches!(
            EmbeddedIssuer::load_or_create(&other),
            Err(IssuerInitError::TrustDomainMismatch { .. })
        ));
        std::fs::remove_file(c.key_file()).unwrap();
        assert!(matches!(
            EmbeddedIssuer::load_or_create(&c),
            Err(IssuerInitError::MissingMasterKey { .. })
        ));
    }

    /// X509-SVID standard, appendix A ("X.509 Field Reference"), row by row, for the CA the
    /// embedded issuer creates and a leaf it signs; and the JWKS per the Trust Domain and
    /// Bundle standard §4.2 and the JWT-SVID standard.
    #[test]
    fn certificates_and_jwks_follow_the_spiffe_standards() {
        use x509_parser::prelude::*;
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "example.org");
        let iss = EmbeddedIssuer::load_or_create(&c).unwrap();
        let ders = crate::spiffe_bundle::pem_certificates(&iss.bundle_pem()).unwrap();
        assert_eq!(ders.len(), 1);
        let (_, ca) = X509Certificate::from_der(&ders[0]).unwrap();
        let id = SpiffeId::new("example.org", "container/web").unwrap();
        let x = iss.signer.issue_x509(&id).unwrap();
        let leaf_der = crate::spiffe_bundle::pem_certificates(&x.cert_chain_pem)
            .unwrap()
            .remove(0);
        let (_, leaf) = X509Certificate::from_der(&leaf_der).unwrap();
        let uris = |c: &X509Certificate| -> Vec<String> {
            c.subject_alternative_name()
                .unwrap()
                .map(|s| {
                    s.value
                        .general_names
                        .iter()
                        .filter_map(|g| match g {
                            GeneralName::URI(u) => Some(u.to_string()),
                            _ => None,
                        })
                        .collect()
                })
                .unwrap_or_default()
        };
        // "Subject Alternate Name | uniformResourceIdentifier | This field is set equal to the
        // SPIFFE ID. Only one instance of this field is permitted."
        assert_eq!(uris(&leaf), [id.to_string()]);
        assert_eq!(uris(&ca), ["spiffe://example.org"]);
        // "Basic Constraints | CA | This field must be set to `true` if and only if the SVID is
        // a signing certificate."
        assert!(ca.is_ca());
        assert!(!leaf.is_ca());
        let ca_ku = ca.key_usage().unwrap().expect("CA key usage").value;
        let leaf_ku = leaf.key_usage().unwrap().expect("leaf key usage").value;
        // "Key Usage | keyCertSign | This field must be set if and only if the SVID is a
        // signing certificate."
        assert!(ca_ku.key_cert_sign() && !leaf_ku.key_cert_sign());
        // "Key Usage | cRLSign | This field may be set if and only if the SVID is a signing
        // certificate."
        assert!(!leaf_ku.crl_sign());
        // "Key Usage | digitalSignature | This field must be set if and only if the SVID is a
        // leaf certificate."
        assert!(leaf_ku.digital_signature());
        assert!(
            !ca_ku.digital_signature(),
            "the CA must not set digitalSignature"
        );
        // "Key Usage | keyAgreement / keyEncipherment | ... may be set if and only if the SVID
        // is a leaf certificate."
        assert!(!ca_ku.key_agreement() && !ca_ku.key_encipherment());
        // §4.4 / appendix A: leaves carry serverAuth and clientAuth.
        let eku = leaf.extended_key_usage().unwrap().expect("EKU").value;
        assert!(eku.server_auth && eku.client_auth);

        // Trust Domain and Bundle §4.2: "Implementers SHOULD NOT include parameters which are
        // defined neither here nor in the respective SVID specification"; §4.2.1 `kty` and
        // §4.2.2 `use` MUST be set; JWT-SVID: `use` is `jwt-svid` and `kid` MUST be set.
        let jwks = iss.jwks();
        let key = jwks["keys"][0].as_object().unwrap();
        let mut names: Vec<&str> = key.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            ["crv", "kid", "kty", "use", "x", "y"],
            "no alg: {key:?}"
        );
        assert_eq!(key["use"], "jwt-svid");
        // The SPIFFE bundle carries the same authorities, and its sequence is stable across
        // restarts while the keys are the same.
        let b = iss.spiffe_bundle();
        assert_eq!(b["keys"][1], jwks["keys"][0]);
        assert_eq!(
            EmbeddedIssuer::load_or_create(&c).unwrap().spiffe_bundle(),
            b
        );
    }

    #[test]
    fn issues_verifiable_svids() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "example.org");
        let iss = EmbeddedIssuer::load_or_create(&c).unwrap();
        let id = SpiffeId::new("example.org", "container/web").unwrap();
        let jwt = iss.issue_jwt(&id, &["svc".into()]).unwrap();
        let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(iss.jwks().clone()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwks.keys[0]).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        v.set_audience(&["svc"]);
        v.set_required_spec_claims(&["exp", "sub", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(&jwt.token, &key, &v).unwrap();
        assert_eq!(data.claims["sub"], id.as_str());
        assert_eq!(
            data.header.kid.as_deref(),
            jwks.keys[0].common.key_id.as_deref()
        );
        assert_eq!(jwt.expires_at - jwt.issued_at, 300);
        assert!(iss.issue_jwt(&id, &[]).is_err());
        let foreign = SpiffeId::new("evil.org", "x").unwrap();
        assert!(iss.issue_jwt(&foreign, &["a".into()]).is_err());
        assert!(iss.signer.issue_x509(&foreign).is_err());

        let x = iss.signer.issue_x509(&id).unwrap();
        assert!(x.cert_chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(x.key_pem.contains("PRIVATE KEY"));
        assert_eq!(x.expires_at - x.issued_at, 3600);
    }
}
