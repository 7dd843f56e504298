//! `nhictl token verify`: a JWT-SVID checked offline against a JWKS file, by `nhid` (which also
//! knows the deny list), or both.

use nhi_core::nhid_client::NhidClient;

/// Largest token input read.
pub const MAX_INPUT: u64 = 64 * 1024;

/// The token in `input`: a bare token, or the companion's `/v1/token` JSON answer.
pub fn from_input(input: &[u8]) -> Result<String, String> {
    let text = std::str::from_utf8(input).map_err(|_| "token is not UTF-8")?;
    let text = text.trim();
    Ok(serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_string))
        .unwrap_or_else(|| text.to_string()))
}

/// The token's claims once every check asked for passed: offline against `jwks` (the text of a
/// JWKS) when given, and by `nhid` when given. `nhid`'s verdict is the one shown when both ran.
pub fn verify(
    token: &str,
    audience: &str,
    jwks: Option<&str>,
    trust_domain: Option<&str>,
    nhid: Option<&NhidClient>,
) -> Result<serde_json::Value, String> {
    let mut claims = None;
    if let Some(jwks) = jwks {
        claims = Some(serde_json::Value::Object(crate::verify_token(
            token,
            jwks,
            audience,
            trust_domain,
        )?));
    }
    if let Some(nhid) = nhid {
        let v = nhid
            .validate(token, audience)
            .map_err(|e| format!("token rejected by nhid: {e}"))?;
        claims = Some(v.claims);
    }
    claims.ok_or_else(|| "nothing verified".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_a_bare_token_or_the_companions_answer() {
        assert_eq!(from_input(b"  a.b.c\n").unwrap(), "a.b.c");
        assert_eq!(
            from_input(br#"{"token":"a.b.c","expires_at":1}"#).unwrap(),
            "a.b.c"
        );
        assert!(from_input(&[0xff, 0xfe]).is_err());
        assert_eq!(
            verify("a.b.c", "x", None, None, None).unwrap_err(),
            "nothing verified"
        );
    }
}
