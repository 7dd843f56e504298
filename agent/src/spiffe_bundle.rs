//! The trust domain's bundle in the SPIFFE bundle format (SPIFFE Trust Domain and Bundle
//! standard §4): one JWK Set holding the X.509 authorities (`use: "x509-svid"`, the CA
//! certificate in `x5c`) and the JWT authorities (`use: "jwt-svid"`, with `kid`), plus
//! `spiffe_sequence` and `spiffe_refresh_hint`. This is what SPIRE and other SPIFFE control
//! planes import to federate with the trust domain (`spire-server bundle set -format spiffe`).
//!
//! `nhid` builds it whenever its trust bundle or JWKS changes and hands it to companions
//! (`GET /v1/bundle.spiffe`) and to `nhictl bundle --format spiffe`.

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine;
use serde_json::{json, Map, Value};
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384, OID_NIST_EC_P521};
use x509_parser::prelude::*;
use x509_parser::public_key::PublicKey;

/// `spiffe_refresh_hint`: how often a consumer should fetch the bundle again, in seconds. The
/// standard suggests five minutes to clients that get no hint (§6.2); a key added or withdrawn
/// reaches a federated peer within this long.
pub const REFRESH_HINT_SECS: u64 = 300;

/// The JWK parameters a JWT authority may carry: those of RFC 7517/7518 for the key itself
/// (`kty`, `crv`, `x`, `y`, `n`, `e`) and those the SPIFFE standards define (`use`, `kid`).
/// The Trust Domain and Bundle standard §4.2: "Implementers SHOULD NOT include parameters
/// which are defined neither here nor in the respective SVID specification" (so no `alg`).
const JWT_AUTHORITY_PARAMS: &[&str] = &["kty", "crv", "x", "y", "n", "e", "kid", "use"];

/// The JWT authorities of `jwks`, reduced to the parameters the SPIFFE standards allow: every
/// entry with a `kid` (JWT-SVID standard: "the `kid` parameter of each JWK entry MUST be set")
/// and a `use` that is absent or `jwt-svid`, which it gets. Anything else is dropped, so a
/// parameter an older node published (e.g. `alg`) never reaches verifiers.
pub fn jwt_authorities(jwks: &Value) -> Vec<Value> {
    let keys = jwks.get("keys").and_then(Value::as_array);
    keys.into_iter()
        .flatten()
        .filter_map(Value::as_object)
        .filter(|k| {
            k.get("kid")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
                && k.get("use").is_none_or(|u| u.as_str() == Some("jwt-svid"))
        })
        .map(|k| {
            let mut out: Map<String, Value> = JWT_AUTHORITY_PARAMS
                .iter()
                .filter_map(|p| k.get(*p).map(|v| (p.to_string(), v.clone())))
                .collect();
            out.insert("use".into(), "jwt-svid".into());
            Value::Object(out)
        })
        .collect()
}

/// A JWKS of the JWT authorities with only the parameters the standards define.
pub fn clean_jwks(jwks: &Value) -> Value {
    json!({ "keys": jwt_authorities(jwks) })
}

/// The JWK of one X.509 authority (X509-SVID standard §6.1): `use` = `x509-svid`, no `kid`
/// ("the `kid` parameter of each JWK entry MUST NOT be set"), `x5c` holding exactly this one
/// certificate, and the public key's own parameters (RFC 7518 §6).
pub fn x509_authority(der: &[u8]) -> Result<Value, String> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("CA certificate: {e}"))?;
    let spki = cert.public_key();
    let mut k = Map::new();
    match spki.parsed().map_err(|e| format!("CA public key: {e}"))? {
        PublicKey::EC(point) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok())
                .ok_or("CA public key: EC key without a named curve")?;
            let (crv, len) = if curve == OID_EC_P256 {
                ("P-256", 32)
            } else if curve == OID_NIST_EC_P384 {
                ("P-384", 48)
            } else if curve == OID_NIST_EC_P521 {
                ("P-521", 66)
            } else {
                return Err(format!("CA public key: unsupported curve {curve}"));
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err(format!("CA public key: not an uncompressed {crv} point"));
            }
            k.insert("kty".into(), "EC".into());
            k.insert("crv".into(), crv.into());
            k.insert("x".into(), B64URL.encode(&data[1..1 + len]).into());
            k.insert("y".into(), B64URL.encode(&data[1 + len..]).into());
        }
        PublicKey::RSA(rsa) => {
            // base64urlUInt: big-endian without leading zero octets (RFC 7518 §2).
            let trim = |b: &[u8]| {
                let i = b
                    .iter()
                    .position(|x| *x != 0)
                    .unwrap_or(b.len().saturating_sub(1));
                B64URL.encode(&b[i..])
            };
            k.insert("kty".into(), "RSA".into());
            k.insert("n".into(), trim(rsa.modulus).into());
            k.insert("e".into(), trim(rsa.exponent).into());
        }
        _ => return Err("CA public key: neither EC nor RSA".into()),
    }
    k.insert("use".into(), "x509-svid".into());
    k.insert("x5c".into(), json!([B64.encode(der)]));
    Ok(Value::Object(k))
}

/// The DER certificates of a PEM bundle, in order.
pub fn pem_certificates(pem: &str) -> Result<Vec<Vec<u8>>, String> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| {
            let p = p.map_err(|e| format!("trust bundle PEM: {e}"))?;
            Ok(p.contents)
        })
        .collect()
}

/// The SPIFFE bundle of a trust domain whose X.509 authorities are `bundle_pem` and whose JWT
/// authorities are `jwks`.
pub fn build(bundle_pem: &str, jwks: &Value, sequence: u64) -> Result<Value, String> {
    let mut keys = pem_certificates(bundle_pem)?
        .iter()
        .map(|der| x509_authority(der))
        .collect::<Result<Vec<_>, _>>()?;
    keys.extend(jwt_authorities(jwks));
    Ok(json!({
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": REFRESH_HINT_SECS,
        "keys": keys,
    }))
}

/// `spiffe_sequence` bookkeeping (Trust Domain and Bundle standard §4.1.1: "its value MUST be a
/// monotonically increasing integer, and MUST be changed whenever the contents of the bundle
/// are updated"): the next value is the current Unix time, or one more than the last if the
/// clock has not moved past it. A restart counts as a change, which the standard allows.
pub fn next_sequence(previous: u64, now_unix: u64) -> u64 {
    now_unix.max(previous.saturating_add(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ec_ca() -> (rcgen::Certificate, rcgen::KeyPair) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = rcgen::CertificateParams::default();
        p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        (p.self_signed(&key).unwrap(), key)
    }

    #[test]
    fn x509_authorities_follow_x509_svid_section_6_1() {
        let (ca, key) = ec_ca();
        let jwks = json!({"keys": [{
            "kty": "EC", "crv": "P-256", "x": "AA", "y": "BB", "kid": "k1",
            "alg": "ES256", "use": "jwt-svid", "x5t": "junk"
        }]});
        let b = build(&ca.pem(), &jwks, 7).unwrap();
        // §4.1.1 / §4.1.2: sequence and refresh hint are set; §4.1.3: `keys` is present.
        assert_eq!(b["spiffe_sequence"], 7);
        assert_eq!(b["spiffe_refresh_hint"], REFRESH_HINT_SECS);
        let keys = b["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 2);
        let x = keys[0].as_object().unwrap();
        // X509-SVID §6.1: "The `use` parameter of each JWK entry MUST be set to `x509-svid`.
        // Additionally, the `kid` parameter of each JWK entry MUST NOT be set."
        assert_eq!(x["use"], "x509-svid");
        assert!(!x.contains_key("kid"));
        // "... MUST contain the `x5c` parameter with a value equal to the base64 encoded DER
        // CA certificate that the entry represents. The value MUST include exactly one CA
        // certificate" (standard base64, RFC 7517 §4.7).
        assert_eq!(x["x5c"], json!([B64.encode(ca.der())]));
        // Trust Domain and Bundle §4.2.1: `kty` MUST be set; the key is the certificate's.
        let raw = key.public_key_raw();
        assert_eq!(x["kty"], "EC");
        assert_eq!(x["crv"], "P-256");
        assert_eq!(x["x"], B64URL.encode(&raw[1..33]));
        assert_eq!(x["y"], B64URL.encode(&raw[33..65]));
        let mut names: Vec<&str> = x.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(
            names,
            ["crv", "kty", "use", "x", "x5c", "y"],
            "§4.2: nothing else"
        );
        // JWT-SVID authorities: `use` jwt-svid, `kid` set, no parameter outside the standards.
        let j = keys[1].as_object().unwrap();
        let mut names: Vec<&str> = j.keys().map(String::as_str).collect();
        names.sort();
        assert_eq!(names, ["crv", "kid", "kty", "use", "x", "y"]);
        assert_eq!(j["use"], "jwt-svid");
    }

    #[test]
    fn jwt_authorities_drop_what_the_standards_do_not_define() {
        let jwks = json!({"keys": [
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "BB", "kid": "a", "alg": "ES256", "use": "jwt-svid"},
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "BB", "kid": "b"},
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "BB", "use": "jwt-svid"},
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "BB", "kid": "c", "use": "sig"},
            "not an object"
        ]});
        let keys = jwt_authorities(&jwks);
        let kids: Vec<&str> = keys.iter().map(|k| k["kid"].as_str().unwrap()).collect();
        assert_eq!(
            kids,
            ["a", "b"],
            "no kid, or another use: not a JWT-SVID authority"
        );
        for k in &keys {
            assert!(k.get("alg").is_none(), "{k}");
            assert_eq!(k["use"], "jwt-svid");
        }
        assert_eq!(clean_jwks(&json!({})), json!({"keys": []}));
    }

    #[test]
    fn rsa_authorities_use_base64url_uints() {
        // A 2048-bit RSA CA, as an operator may create in OpenBao.
        let pem = include_str!("../testdata/rsa-ca.pem");
        let der = pem_certificates(pem).unwrap().remove(0);
        let k = x509_authority(&der).unwrap();
        assert_eq!(k["kty"], "RSA");
        assert_eq!(k["e"], "AQAB");
        let n = B64URL.decode(k["n"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), 256, "no leading zero octet");
        assert_ne!(n[0], 0);
    }

    #[test]
    fn the_sequence_only_grows() {
        assert_eq!(next_sequence(0, 1000), 1000);
        assert_eq!(next_sequence(1000, 1000), 1001);
        assert_eq!(next_sequence(5000, 1000), 5001, "a clock stepped back");
        assert_eq!(next_sequence(u64::MAX, 1), u64::MAX);
    }
}
