//! The AWS container-credential provider (`GET /v1/aws/credentials`), what every AWS SDK reads
//! through `AWS_CONTAINER_CREDENTIALS_FULL_URI` + `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`
//! (ECS, EKS Pod Identity). The source is a secret granted to the workload that holds session
//! credentials as JSON; the caller must present the per-workload token `nhid` wrote to the
//! token file (compared in constant time). Credentials close to their `Expiration` are fetched
//! again from `nhid` rather than served from the cache.

use nhi_core::wire::AwsProvider;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

/// Credentials expiring within this many seconds are re-fetched from nhid before serving.
pub const REFRESH_MARGIN: u64 = 60;

/// The session credentials as stored in the secret and as served (the SDKs' field names).
/// Debug never shows the secret parts.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct SessionCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// RFC 3339, e.g. `2026-11-23T12:00:00Z`.
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
    /// Parses the secret's value; `Expiration` must be RFC 3339 (UTC `Z` or an offset).
    pub fn parse(value: &[u8]) -> Result<(Self, u64), String> {
        let c: SessionCredentials = serde_json::from_slice(value).map_err(|e| {
            format!("the AWS credentials secret is not {{\"AccessKeyId\", \"SecretAccessKey\", \"Token\", \"Expiration\"}} JSON: {}", e.classify_name())
        })?;
        if c.access_key_id.is_empty() || c.secret_access_key.is_empty() {
            return Err("the AWS credentials secret has an empty key".into());
        }
        let exp = parse_rfc3339(&c.expiration)
            .ok_or_else(|| format!("Expiration {:?} is not RFC 3339", c.expiration))?;
        Ok((c, exp))
    }
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

/// Unix time of an RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())?
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':' =>
        {
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            let o = oh * 3600 + om * 60;
            if rest.starts_with('-') {
                -o
            } else {
                o
            }
        }
        _ => return None,
    };
    // Days from civil (Howard Hinnant's algorithm).
    let (y, m) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * m + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let t = days * 86_400 + h * 3600 + mi * 60 + sec - offset;
    u64::try_from(t).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-11-23T12:00:00Z"), Some(1_795_435_200));
        assert_eq!(
            parse_rfc3339("2026-11-23T12:00:00.123Z"),
            Some(1_795_435_200)
        );
        assert_eq!(
            parse_rfc3339("2026-11-23T13:30:00+01:30"),
            Some(1_795_435_200)
        );
        assert_eq!(parse_rfc3339("2000-02-29T00:00:00Z"), Some(951_782_400));
        for bad in [
            "",
            "2026-11-23",
            "2026-13-01T00:00:00Z",
            "2026-11-23T12:00:00",
            "x026-11-23T12:00:00Z",
            "2026-11-23T12:00:00.Z",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn secret_parsing_and_token_check() {
        let (c, exp) = SessionCredentials::parse(
            br#"{"AccessKeyId":"AKIA1","SecretAccessKey":"s","Token":"t","Expiration":"2026-11-23T12:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(exp, 1_795_435_200);
        assert!(!format!("{c:?}").contains("\"s\""));
        let out = serde_json::to_value(&c).unwrap();
        assert_eq!(out["AccessKeyId"], "AKIA1");
        assert_eq!(out["Token"], "t");
        let e = SessionCredentials::parse(br#"{"AccessKeyId":"SECRETVALUE"}"#).unwrap_err();
        assert!(!e.contains("SECRETVALUE"), "{e}");
        assert!(SessionCredentials::parse(
            br#"{"AccessKeyId":"a","SecretAccessKey":"s","Expiration":"soon"}"#
        )
        .is_err());
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
