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

/// Public-key algorithms accepted for tokens signed by someone else (Kubernetes service
/// accounts, Nomad workload identities): never `none` or an HMAC, whose key would be public.
pub const ASYMMETRIC: &[Algorithm] = &[
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// What a token signed by an orchestrator must also satisfy.
#[derive(Debug, Clone, Default)]
pub struct ForeignCheck<'a> {
    /// Who signed it (`iss`), if the operator configured it.
    pub issuer: Option<&'a str>,
    /// An audience `aud` must contain; `None`: audiences are not checked.
    pub audience: Option<&'a str>,
    /// Whether the token must carry `exp` (a present `exp` and `nbf` are always checked).
    pub require_exp: bool,
    /// Clock skew tolerated, in seconds.
    pub leeway: u64,
}

/// Verifies `token`, signed by an orchestrator, against its JWKS (`jwks`, read from `what`):
/// a public-key algorithm, a signature by the key its `kid` names (or the only key), and the
/// checks of `check`. Returns the claims.
pub fn verify_foreign(
    token: &str,
    jwks: &str,
    what: &str,
    check: &ForeignCheck<'_>,
) -> Result<Claims, String> {
    let set: JwkSet = serde_json::from_str(jwks).map_err(|e| format!("{what}: not a JWKS: {e}"))?;
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("token: {e}"))?;
    if !ASYMMETRIC.contains(&header.alg) {
        return Err(format!(
            "token signed with {:?}, not a public-key algorithm",
            header.alg
        ));
    }
    let jwk = match &header.kid {
        Some(kid) => set
            .find(kid)
            .ok_or_else(|| format!("no key {kid:?} in {what}"))?,
        None if set.keys.len() == 1 => &set.keys[0],
        None => return Err(format!("the token has no kid and {what} has several keys")),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{what}: key: {e}"))?;
    let mut v = Validation::new(header.alg);
    v.leeway = check.leeway;
    v.validate_nbf = true;
    match check.audience {
        Some(aud) => v.set_audience(&[aud]),
        None => v.validate_aud = false,
    }
    // A configured issuer or audience must be present, not only right when present.
    let mut required = Vec::new();
    if check.require_exp {
        required.push("exp");
    }
    if let Some(iss) = check.issuer {
        v.set_issuer(&[iss]);
        required.push("iss");
    }
    if check.audience.is_some() {
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    jsonwebtoken::decode::<Claims>(token, &key, &v)
        .map(|d| d.claims)
        .map_err(|e| format!("token rejected: {e}"))
}
