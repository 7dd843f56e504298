//! The embedded issuer: a trust-domain root CA (ECDSA P-256) and a JWT signing key (ES256),
//! created on first start and sealed at rest with the master key (see [`crate::keystore`]).
//! The CA rotates without downtime (`nhictl ca rotate`, or by itself with a third of `ca_ttl`
//! left): a new CA enters the bundle before it signs anything, and the old one leaves once the
//! last SVID it signed has expired.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
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
    Signer, Upkeep,
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
    /// The one CA of an older version: read, then written as the first of `cas`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_cert_der: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ca_key_pkcs8: Option<String>,
    /// The CAs in the bundle, oldest first: each signs from `signs_from` until the next does.
    #[serde(default)]
    cas: Vec<CaKeys>,
    jwt_key_pkcs8: String,
    created_at: u64,
    /// `spiffe_sequence` of the bundle: the keys' creation time, moved on by every change.
    #[serde(default)]
    sequence: u64,
}

#[derive(Clone, Serialize, Deserialize)]
struct CaKeys {
    cert_der: String,
    key_pkcs8: String,
    signs_from: u64,
}

impl Drop for IssuerKeys {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        self.jwt_key_pkcs8.zeroize();
        if let Some(k) = &mut self.ca_key_pkcs8 {
            k.zeroize();
        }
        for c in &mut self.cas {
            c.key_pkcs8.zeroize();
        }
    }
}

/// What a rotation did (`nhictl ca rotate`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaRotation {
    /// Unix time the new CA signs from (it is in every bundle from now).
    pub signs_from: u64,
    /// Unix time the previous CA leaves the bundle (its last SVID has expired by then).
    pub old_leaves_at: u64,
    pub not_after: u64,
}

/// The signers and what verifiers need, rebuilt at every change of the CAs.
struct Loaded {
    /// (signs_from, signer), oldest first; every signer carries the whole bundle.
    signers: Vec<(u64, Arc<Signer>)>,
    bundle_pem: String,
    jwks: serde_json::Value,
    spiffe_bundle: serde_json::Value,
}

pub struct EmbeddedIssuer {
    trust_domain: String,
    sealed_path: PathBuf,
    bundle_path: PathBuf,
    master_key: MasterKey,
    jwt_ttl: Duration,
    x509_ttl: Duration,
    ca_ttl: Duration,
    keys: Mutex<IssuerKeys>,
    loaded: RwLock<Arc<Loaded>>,
}

impl EmbeddedIssuer {
    /// Loads the sealed keys from the state dir, or creates them on first start.
    pub fn load_or_create(cfg: &Config) -> Result<Self, IssuerInitError> {
        keystore::create_private_dir(&cfg.state_dir)?;
        let sealed_path = cfg.state_dir.join(SEALED_FILE);
        let key_path = cfg.key_file();
        let (mk, mut keys) = if sealed_path.exists() {
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
                    found: keys.trust_domain.clone(),
                    expected: cfg.trust_domain.clone(),
                });
            }
            (mk, keys)
        } else {
            let mk = if key_path.exists() {
                MasterKey::load(&key_path)?
            } else {
                MasterKey::create(&key_path)?
            };
            let keys = generate(&cfg.trust_domain, cfg.issuer.ca_ttl)?;
            let plain = zeroizing(serde_json::to_vec(&keys).expect("keys serialize"));
            keystore::write_atomic(&sealed_path, &mk.seal(SEAL_LABEL, &plain), 0o600)?;
            (mk, keys)
        };
        // An older version's single CA becomes the first of the list.
        if let (Some(cert_der), Some(key_pkcs8)) =
            (keys.ca_cert_der.take(), keys.ca_key_pkcs8.take())
        {
            keys.cas.insert(
                0,
                CaKeys {
                    cert_der,
                    key_pkcs8,
                    signs_from: 0,
                },
            );
        }
        if keys.sequence == 0 {
            keys.sequence = keys.created_at;
        }
        let loaded = load(&sealed_path, &keys, cfg.issuer.jwt_ttl, cfg.issuer.x509_ttl)?;
        let issuer = EmbeddedIssuer {
            trust_domain: keys.trust_domain.clone(),
            sealed_path,
            bundle_path: cfg.state_dir.join(BUNDLE_FILE),
            master_key: mk,
            jwt_ttl: cfg.issuer.jwt_ttl,
            x509_ttl: cfg.issuer.x509_ttl,
            ca_ttl: cfg.issuer.ca_ttl,
            keys: Mutex::new(keys),
            loaded: RwLock::new(Arc::new(loaded)),
        };
        issuer.write_bundle_file()?;
        Ok(issuer)
    }

    /// The public bundle, for operators and tools; never read back as a source of trust.
    fn write_bundle_file(&self) -> Result<(), KeystoreError> {
        keystore::write_atomic(
            &self.bundle_path,
            self.loaded().bundle_pem.as_bytes(),
            0o644,
        )
    }

    fn loaded(&self) -> Arc<Loaded> {
        self.loaded
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The CA that signs now: the newest whose `signs_from` has come.
    fn signer(&self) -> Arc<Signer> {
        let now = now_unix();
        let l = self.loaded();
        l.signers
            .iter()
            .rev()
            .find(|(from, _)| *from <= now)
            .or(l.signers.first())
            .map(|(_, s)| s.clone())
            .expect("at least one CA")
    }

    /// Seals `keys`, rebuilds the signers and bundle from them and rewrites the bundle file.
    fn commit(&self, keys: &mut IssuerKeys) -> Result<(), String> {
        keys.sequence = crate::spiffe_bundle::next_sequence(keys.sequence, now_unix());
        let loaded = load(&self.sealed_path, keys, self.jwt_ttl, self.x509_ttl)
            .map_err(|e| e.to_string())?;
        let plain = zeroizing(serde_json::to_vec(&*keys).expect("keys serialize"));
        keystore::write_atomic(
            &self.sealed_path,
            &self.master_key.seal(SEAL_LABEL, &plain),
            0o600,
        )
        .map_err(|e| e.to_string())?;
        *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(loaded);
        self.write_bundle_file().map_err(|e| e.to_string())
    }

    /// A new CA for the trust domain: in every bundle from now, signing from
    /// `activate_after` later (default: half an X.509-SVID's life, by when every workload has
    /// fetched its renewal and the bundle with it). The previous CA leaves the bundle once the
    /// last SVID it signed has expired. One rotation at a time.
    pub fn rotate(&self, activate_after: Option<Duration>) -> Result<CaRotation, String> {
        let now = now_unix();
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pending) = keys.cas.last().filter(|c| c.signs_from > now) {
            return Err(format!(
                "a new CA is already in the bundle and signs from {} (unix); rotate again after that",
                pending.signs_from
            ));
        }
        let signs_from = now + activate_after.unwrap_or(self.x509_ttl / 2).as_secs();
        let ca = new_ca(&self.trust_domain, self.ca_ttl, Some(now)).map_err(|e| e.to_string())?;
        let not_after = not_after(&B64.decode(&ca.0).map_err(|e| e.to_string())?)?;
        keys.cas.push(CaKeys {
            cert_der: ca.0,
            key_pkcs8: ca.1,
            signs_from,
        });
        self.commit(&mut keys)?;
        let old_leaves_at = signs_from + self.x509_ttl.as_secs() + RETIRE_SKEW;
        tracing::warn!(
            signs_from,
            old_leaves_at,
            "trust domain CA rotation: new CA in the bundle"
        );
        Ok(CaRotation {
            signs_from,
            old_leaves_at,
            not_after,
        })
    }

    /// Drops CAs whose successor has signed for an X.509-SVID's life (and expired ones), and
    /// starts a rotation when the signing CA has a third of `ca_ttl` left. True when the
    /// bundle changed.
    fn upkeep(&self) -> Result<bool, String> {
        let now = now_unix();
        let x509 = self.x509_ttl.as_secs();
        let signing_left = {
            let s = self.signer();
            s.ca_not_after().saturating_sub(now)
        };
        let pending = {
            let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            keys.cas.last().is_some_and(|c| c.signs_from > now)
        };
        let mut changed = false;
        if !pending && signing_left < self.ca_ttl.as_secs() / 3 {
            let r = self.rotate(None)?;
            tracing::warn!(
                signs_from = r.signs_from,
                "the trust domain's CA has a third of its life left: rotated"
            );
            changed = true;
        }
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let before = keys.cas.len();
        let mut i = 0;
        while i + 1 < keys.cas.len() {
            let successor_from = keys.cas[i + 1].signs_from;
            let expired = B64
                .decode(&keys.cas[i].cert_der)
                .ok()
                .and_then(|d| not_after(&d).ok())
                .is_some_and(|t| t <= now);
            // Only once its successor signs: an expired CA whose successor is still pending
            // stays, so the pending one never signs before its time.
            if successor_from <= now && (now >= successor_from + x509 + RETIRE_SKEW || expired) {
                keys.cas.remove(i);
            } else {
                i += 1;
            }
        }
        if keys.cas.len() != before {
            tracing::info!(
                removed = before - keys.cas.len(),
                "retired CA left the trust bundle"
            );
            self.commit(&mut keys)?;
            changed = true;
        }
        Ok(changed)
    }
}

/// Seconds an old CA stays in the bundle past the expiry of the last SVID it could sign
/// (clock skew between verifiers).
const RETIRE_SKEW: u64 = 60;

/// Signers for every CA of `keys`, the bundle (all of them) and the JWKS.
fn load(
    path: &Path,
    keys: &IssuerKeys,
    jwt_ttl: Duration,
    x509_ttl: Duration,
) -> Result<Loaded, IssuerInitError> {
    let corrupt = |message: String| IssuerInitError::Corrupt {
        path: path.into(),
        message,
    };
    let d = |s: &str| B64.decode(s).map_err(|e| corrupt(e.to_string()));
    let jwt_pkcs8 = zeroizing(d(&keys.jwt_key_pkcs8)?);
    let now = now_unix();
    let mut ders = Vec::new();
    for c in &keys.cas {
        ders.push(d(&c.cert_der)?);
    }
    if ders.is_empty() {
        return Err(corrupt("no CA".into()));
    }
    if ders
        .iter()
        .all(|der| not_after(der).is_ok_and(|t| t <= now))
    {
        return Err(IssuerInitError::Generate(format!(
            "every CA of the trust domain in {} has expired; move the state dir's sealed keys away to create a new trust domain and redistribute the bundle",
            path.display()
        )));
    }
    let bundle_pem: String = ders
        .iter()
        .map(|der| pem_encode("CERTIFICATE", der))
        .collect();
    let mut signers = Vec::new();
    for (c, der) in keys.cas.iter().zip(&ders) {
        let ca_key = KeyPair::try_from(zeroizing(d(&c.key_pkcs8)?).as_slice())
            .map_err(|e| corrupt(format!("CA key: {e}")))?;
        let signer = Signer::new(
            &keys.trust_domain,
            der,
            ca_key,
            String::new(),
            bundle_pem.clone(),
            &jwt_pkcs8,
            jwt_ttl,
            x509_ttl,
        )
        .map_err(corrupt)?;
        signers.push((c.signs_from, Arc::new(signer)));
    }
    let jwks = serde_json::json!({ "keys": [signers[0].1.jwk().clone()] });
    let spiffe_bundle =
        crate::spiffe_bundle::build(&bundle_pem, &jwks, keys.sequence).map_err(corrupt)?;
    Ok(Loaded {
        signers,
        bundle_pem,
        jwks,
        spiffe_bundle,
    })
}

/// A self-signed CA for the trust domain (certificate DER and PKCS#8 key, base64). `made_at`
/// names a rotated CA apart from the first.
fn new_ca(
    trust_domain: &str,
    ca_ttl: Duration,
    made_at: Option<u64>,
) -> Result<(String, String), IssuerInitError> {
    let g = |e: rcgen::Error| IssuerInitError::Generate(e.to_string());
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let mut p = CertificateParams::default();
    let now = time::OffsetDateTime::now_utc();
    p.not_before = now - time::Duration::minutes(5);
    p.not_after = now + ca_ttl;
    p.serial_number = Some(random_serial());
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "nhi");
    dn.push(
        DnType::CommonName,
        match made_at {
            None => format!("nhi {trust_domain} root CA"),
            Some(t) => format!("nhi {trust_domain} root CA {t}"),
        },
    );
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
    Ok((B64.encode(cert.der()), B64.encode(ca_key.serialize_der())))
}

fn generate(trust_domain: &str, ca_ttl: Duration) -> Result<IssuerKeys, IssuerInitError> {
    let g = |e: rcgen::Error| IssuerInitError::Generate(e.to_string());
    let (cert_der, key_pkcs8) = new_ca(trust_domain, ca_ttl, None)?;
    let jwt_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(g)?;
    let now = now_unix();
    Ok(IssuerKeys {
        trust_domain: trust_domain.into(),
        ca_cert_der: None,
        ca_key_pkcs8: None,
        cas: vec![CaKeys {
            cert_der,
            key_pkcs8,
            signs_from: 0,
        }],
        jwt_key_pkcs8: B64.encode(jwt_key.serialize_der()),
        created_at: now,
        sequence: now,
    })
}

impl Issuer for EmbeddedIssuer {
    fn kind(&self) -> &'static str {
        "embedded"
    }

    fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn bundle_pem(&self) -> String {
        self.loaded().bundle_pem.clone()
    }

    fn jwks(&self) -> serde_json::Value {
        self.loaded().jwks.clone()
    }

    fn spiffe_bundle(&self) -> serde_json::Value {
        self.loaded().spiffe_bundle.clone()
    }

    fn issue_jwt(&self, id: &SpiffeId, audience: &[String]) -> Result<JwtSvid, IssueError> {
        self.signer().issue_jwt(id, audience)
    }

    /// Signed here, with the trust domain's own root: the node is the authority, so the proof
    /// was checked when the workload was attached and there is no one else to show it to.
    fn issue_x509<'a>(&'a self, id: &'a SpiffeId, _proof: Proof<'a>) -> Issuing<'a, X509Svid> {
        let x = self.signer().issue_x509(id);
        Box::pin(async move { x })
    }

    fn maintain(&self) -> Upkeep<'_> {
        let r = self.upkeep();
        Box::pin(async move { r })
    }

    fn rotate_ca(&self, activate_after: Option<Duration>) -> Result<CaRotation, String> {
        self.rotate(activate_after)
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
        let x = iss.signer().issue_x509(&id).unwrap();
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

    /// CN of the CA that signed the leaf of `x`.
    fn issuer_cn(x: &X509Svid) -> String {
        use x509_parser::prelude::*;
        let der = crate::spiffe_bundle::pem_certificates(&x.cert_chain_pem)
            .unwrap()
            .remove(0);
        let (_, leaf) = X509Certificate::from_der(&der).unwrap();
        let cn = leaf
            .issuer()
            .iter_common_name()
            .next()
            .unwrap()
            .as_str()
            .unwrap()
            .to_string();
        cn
    }

    #[test]
    fn a_rotated_ca_is_in_the_bundle_before_it_signs_and_the_old_one_leaves_after_its_last_svid() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path(), "example.org");
        let iss = EmbeddedIssuer::load_or_create(&c).unwrap();
        let id = SpiffeId::new("example.org", "container/web").unwrap();
        let seq0 = iss.spiffe_bundle()["spiffe_sequence"].as_u64().unwrap();
        let old_cn = issuer_cn(&iss.signer().issue_x509(&id).unwrap());
        // Pending: both CAs are anchors, the old one still signs.
        let r = iss.rotate(Some(Duration::from_secs(3600))).unwrap();
        assert_eq!(r.old_leaves_at, r.signs_from + 3600 + RETIRE_SKEW);
        let bundle = iss.bundle_pem();
        assert_eq!(
            crate::spiffe_bundle::pem_certificates(&bundle)
                .unwrap()
                .len(),
            2
        );
        assert!(iss.spiffe_bundle()["spiffe_sequence"].as_u64().unwrap() > seq0);
        let x = iss.signer().issue_x509(&id).unwrap();
        assert_eq!(issuer_cn(&x), old_cn);
        assert_eq!(x.bundle_pem, bundle, "SVIDs carry the whole bundle");
        assert!(iss.rotate(None).unwrap_err().contains("already"));
        // Its time comes: the new CA signs; the old one stays an anchor.
        let now = now_unix();
        {
            let mut keys = iss.keys.lock().unwrap();
            keys.cas[1].signs_from = now;
            iss.commit(&mut keys).unwrap();
        }
        let new_cn = issuer_cn(&iss.signer().issue_x509(&id).unwrap());
        assert_ne!(new_cn, old_cn);
        assert!(!iss.upkeep().unwrap(), "the old CA's SVIDs still live");
        assert_eq!(
            crate::spiffe_bundle::pem_certificates(&iss.bundle_pem())
                .unwrap()
                .len(),
            2
        );
        // A restart keeps both and the schedule.
        let again = EmbeddedIssuer::load_or_create(&c).unwrap();
        assert_eq!(again.bundle_pem(), iss.bundle_pem());
        assert_eq!(issuer_cn(&again.signer().issue_x509(&id).unwrap()), new_cn);
        // An X.509-SVID's life (and the skew) after the switch, the old CA leaves.
        {
            let mut keys = iss.keys.lock().unwrap();
            keys.cas[1].signs_from = now - 3600 - RETIRE_SKEW;
            iss.commit(&mut keys).unwrap();
        }
        assert!(iss.upkeep().unwrap());
        let left = crate::spiffe_bundle::pem_certificates(&iss.bundle_pem()).unwrap();
        assert_eq!(left.len(), 1);
        assert_eq!(issuer_cn(&iss.signer().issue_x509(&id).unwrap()), new_cn);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(BUNDLE_FILE)).unwrap(),
            iss.bundle_pem(),
            "the public bundle file follows"
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
        assert!(iss.signer().issue_x509(&foreign).is_err());

        let x = iss.signer().issue_x509(&id).unwrap();
        assert!(x.cert_chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(x.key_pem.contains("PRIVATE KEY"));
        assert_eq!(x.expires_at - x.issued_at, 3600);
    }
}
