//! The AWS container-credential provider (`GET /v1/aws/credentials`), what every AWS SDK reads
//! through `AWS_CONTAINER_CREDENTIALS_FULL_URI` + `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`
//! (ECS, EKS Pod Identity). The source is a secret granted to the workload that holds session
//! credentials as JSON; the caller must present the per-workload token `nhid` wrote to the
//! token file (compared in constant time). Credentials close to their `Expiration` are fetched
//! again from `nhid` rather than served from the cache.
//!
//! What the SDKs accept differs, so the companion serves one shape all of them read: every
//! field a string, `Token` present (botocore raises `KeyError: 'Token'` without it; the
//! JavaScript SDK v3's `fromHttp` refuses the response), and `Expiration` as RFC 3339 in UTC
//! with a `Z` and whole seconds (the JavaScript SDK rejects `+00:00` and a space separator with
//! "Invalid RFC-3339 date-time value"; Python's `str(datetime)` writes both). A secret whose
//! `Expiration` names an instant in any RFC 3339 spelling is normalised; one that cannot be
//! read as an instant, or lacks `Token`, is refused (502 with the reason, audited), never
//! passed through.

use nhi_core::wire::AwsProvider;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Credentials expiring within this many seconds are re-fetched from nhid before serving.
pub const REFRESH_MARGIN: u64 = 60;

/// The session credentials as stored in the secret and as served (the SDKs' field names).
/// Debug never shows the secret parts.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct SessionCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Required: every SDK's container provider expects a session token.
    #[serde(default)]
    pub token: Option<String>,
    /// RFC 3339 as stored; after [`SessionCredentials::parse`], `YYYY-MM-DDTHH:MM:SSZ`.
    pub expiration: String,
}

impl std::fmt::Debug for SessionCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionCredentials")
            .field("access_key_id", &self.access_key_id)
            .field("expiration", &self.expiration)
            .finish_non_exhaustive()
    }
}

impl Drop for SessionCredentials {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.secret_access_key);
        if let Some(t) = &mut self.token {
            zeroize::Zeroize::zeroize(t);
        }
    }
}

impl SessionCredentials {
    /// Parses the secret's value and normalises it to what every SDK reads: the unix time of
    /// `Expiration` comes back with it. The error never quotes a secret part.
    pub fn parse(value: &[u8]) -> Result<(Self, u64), String> {
        let mut c: SessionCredentials = serde_json::from_slice(value).map_err(|e| {
            format!("the AWS credentials secret is not {{\"AccessKeyId\", \"SecretAccessKey\", \"Token\", \"Expiration\"}} JSON: {}", e.classify_name())
        })?;
        if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
            return Err(
                "the AWS credentials secret has an empty AccessKeyId or SecretAccessKey".into(),
            );
        }
        if c.token.as_deref().is_none_or(str::is_empty) {
            return Err("the AWS credentials secret has no Token: the AWS SDKs' container provider needs session credentials (AccessKeyId, SecretAccessKey, Token, Expiration), e.g. from STS AssumeRole".into());
        }
        let (normalised, exp) = normalise_expiration(&c.expiration)?;
        c.expiration = normalised;
        Ok((c, exp))
    }
}

/// `Expiration` in any RFC 3339 spelling (`T`, `t` or a space between date and time, `Z`, `z`
/// or a numeric offset, fractional seconds) as `YYYY-MM-DDTHH:MM:SSZ` in UTC, with its unix
/// time. Fractions are dropped (rounding down never extends a credential's life).
pub fn normalise_expiration(s: &str) -> Result<(String, u64), String> {
    let t = OffsetDateTime::parse(s.trim(), &Rfc3339).map_err(|e| {
        format!(
            "Expiration {s:?} is not an RFC 3339 date-time with a UTC offset ({e}); write it like 2026-11-23T12:00:00Z"
        )
    })?;
    let unix = u64::try_from(t.unix_timestamp())
        .map_err(|_| format!("Expiration {s:?} is before 1970"))?;
    let utc = OffsetDateTime::from_unix_timestamp(unix as i64).expect("in range");
    let out = utc
        .format(&Rfc3339)
        .map_err(|e| format!("Expiration {s:?}: {e}"))?;
    Ok((out, unix))
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    /// Never echo the error's context: it may quote the secret.
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "I/O error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "missing or mistyped field",
            serde_json::error::Category::Eof => "truncated",
        }
    }
}

/// Whether the request's `Authorization` value is the workload's token (constant time).
pub fn authorized(provider: &AwsProvider, authorization: Option<&[u8]>) -> bool {
    match authorization {
        Some(a) => a.ct_eq(provider.token.as_bytes()).into(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiration_spellings_normalise_to_utc_z() {
        let z = "2026-11-23T12:00:00Z";
        for s in [
            z,
            "2026-11-23T12:00:00.123Z",
            "2026-11-23t12:00:00z",
            "2026-11-23T12:00:00+00:00",
            "2026-11-23 12:00:00+00:00", // Python str(datetime) / isoformat(" ")
            "2026-11-23 12:00:00.999999+00:00",
            "2026-11-23T13:30:00+01:30",
            "2026-11-23T07:00:00-05:00",
        ] {
            assert_eq!(
                normalise_expiration(s).unwrap(),
                (z.to_string(), 1_795_435_200),
                "{s}"
            );
        }
        assert_eq!(
            normalise_expiration("2000-02-29T00:00:00Z").unwrap().1,
            951_782_400
        );
        for bad in [
            "",
            "soon",
            "2026-11-23",
            "2026-13-01T00:00:00Z",
            "2026-11-23T12:00:00", // no offset: which zone?
            "2026-11-23 12:00:00",
            "x026-11-23T12:00:00Z",
            "2026-11-23T12:00:00.Z",
            "1969-12-31T23:59:59Z",
            "1795435200",
        ] {
            let e = normalise_expiration(bad).unwrap_err();
            assert!(e.contains("Expiration"), "{bad}: {e}");
        }
    }

    #[test]
    fn secret_parsing_and_token_check() {
        let (c, exp) = SessionCredentials::parse(
            br#"{"AccessKeyId":"AKIA1","SecretAccessKey":"s","Token":"t","Expiration":"2026-11-23 12:00:00+00:00"}"#,
        )
        .unwrap();
        assert_eq!(exp, 1_795_435_200);
        assert!(!format!("{c:?}").contains("\"s\""));
        let out = serde_json::to_value(&c).unwrap();
        assert_eq!(
            out,
            serde_json::json!({"AccessKeyId":"AKIA1","SecretAccessKey":"s","Token":"t","Expiration":"2026-11-23T12:00:00Z"})
        );
        let e = SessionCredentials::parse(br#"{"AccessKeyId":"SECRETVALUE"}"#).unwrap_err();
        assert!(!e.contains("SECRETVALUE"), "{e}");
        assert!(SessionCredentials::parse(
            br#"{"AccessKeyId":"a","SecretAccessKey":"s","Token":"t","Expiration":"soon"}"#
        )
        .is_err());
        // No Token (long-term keys), or an empty one: refused with the reason.
        for v in [
            &br#"{"AccessKeyId":"a","SecretAccessKey":"s","Expiration":"2026-11-23T12:00:00Z"}"#[..],
            br#"{"AccessKeyId":"a","SecretAccessKey":"s","Token":"","Expiration":"2026-11-23T12:00:00Z"}"#,
        ] {
            let e = SessionCredentials::parse(v).unwrap_err();
            assert!(e.contains("no Token"), "{e}");
        }
        let p = AwsProvider {
            secret: "aws".into(),
            token: "tok".into(),
        };
        assert!(authorized(&p, Some(b"tok")));
        assert!(!authorized(&p, Some(b"tok2")));
        assert!(!authorized(&p, Some(b"")));
        assert!(!authorized(&p, None));
    }
}
