//! Signature check of a Kubernetes service-account token against the cluster's JWKS, when the
//! operator configured one (`kubernetes.service_account_jwks`). Closes what the path and claim
//! checks of `nhi_core::k8s` cannot: a pod projecting one of its own Secrets under the name
//! `token` in a projected volume.

use std::path::Path;

pub fn verify(token: &str, jwks_path: &Path, issuer: Option<&str>) -> Result<(), String> {
    let text =
        std::fs::read_to_string(jwks_path).map_err(|e| format!("{}: {e}", jwks_path.display()))?;
    let check = nhi_core::jwt::ForeignCheck {
        issuer,
        // Audiences are the API server's business.
        audience: None,
        require_exp: true,
        leeway: 60,
    };
    nhi_core::jwt::verify_foreign(
        token.trim(),
        &text,
        &jwks_path.display().to_string(),
        &check,
    )
    .map(|_| ())
    .map_err(|e| format!("service-account {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};

    // A P-256 key made for these tests only.
    const KEY: &str = include_str!("../testdata/sa-test-key.pem");

    fn jwks_file(dir: &Path) -> std::path::PathBuf {
        let p = dir.join("jwks.json");
        std::fs::write(&p, include_str!("../testdata/sa-test-jwks.json")).unwrap();
        p
    }

    fn token(claims: serde_json::Value, kid: Option<&str>) -> String {
        let mut h = Header::new(Algorithm::ES256);
        h.kid = kid.map(Into::into);
        jsonwebtoken::encode(
            &h,
            &claims,
            &EncodingKey::from_ec_pem(KEY.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn exp_in(secs: i64) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
            + secs
    }

    #[test]
    fn signed_tokens_pass_forged_ones_do_not() {
        let d = tempfile::tempdir().unwrap();
        let jwks = jwks_file(d.path());
        let good = token(
            serde_json::json!({"iss": "https://k8s", "exp": exp_in(3600)}),
            Some("test-key"),
        );
        verify(&good, &jwks, Some("https://k8s")).unwrap();
        assert!(
            verify(&good, &jwks, Some("https://other")).is_err(),
            "issuer"
        );
        let expired = token(serde_json::json!({"exp": exp_in(-3600)}), Some("test-key"));
        assert!(verify(&expired, &jwks, None).is_err());
        let unknown_kid = token(serde_json::json!({"exp": exp_in(60)}), Some("other"));
        assert!(verify(&unknown_kid, &jwks, None).is_err());
        // Same claims, signature of something else.
        let mut parts: Vec<&str> = good.split('.').collect();
        let other = token(serde_json::json!({"exp": exp_in(99)}), Some("test-key"));
        parts[2] = other.rsplit('.').next().unwrap();
        assert!(verify(&parts.join("."), &jwks, None).is_err());
        // Unsigned ("alg": "none"-like) and symmetric tokens are refused outright.
        assert!(verify("eyJhbGciOiJIUzI1NiJ9.e30.c2ln", &jwks, None).is_err());
    }
}
