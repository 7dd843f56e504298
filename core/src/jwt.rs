//! JWT-SVID verification against a JWKS (SPIFFE JWT-SVID standard): shared by `nhid`'s
//! validation endpoint and `nhictl token verify`.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use crate::SpiffeId;

/// Claims of a verified JWT-SVID.
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// Verifies a JWT-SVID against a JWKS: ES256 signature by a key of the set (by `kid`), not
/// expired, `aud` containing `audience`, `sub` a valid SPIFFE ID (in `trust_domain` if given).
pub fn verify_token(
    token: &str,
    jwks: &str,
    audience: &str,
    trust_domain: Option<&str>,
) -> Result<Claims, String> {
    let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("JWKS: {e}"))?;
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("token header: {e}"))?;
    if header.alg != Algorithm::ES256 {
        return Err(format!("token alg {:?} is not ES256", header.alg));
    }
    let kid = header.kid.ok_or("token has no kid")?;
    let jwk = set
        .find(&kid)
        .ok_or_else(|| format!("no key {kid:?} in the JWKS"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("JWKS key {kid}: {e}"))?;
    let mut v = Validation::new(Algorithm::ES256);
    v.set_audience(&[audience]);
    v.set_required_spec_claims(&["exp", "sub", "aud"]);
    v.leeway = 30;
    let data = jsonwebtoken::decode::<Claims>(token, &key, &v)
        .map_err(|e| format!("token rejected: {e}"))?;
    let sub = data
        .claims
        .get("sub")
        .and_then(|s| s.as_str())
        .unwrap_or_default();
    let id = SpiffeId::parse(sub).map_err(|e| format!("sub: {e}"))?;
    if let Some(td) = trust_domain {
        if id.trust_domain() != td {
            return Err(format!("sub {id} is not in trust domain {td}"));
        }
    }
    Ok(data.claims)
}
