//! SPIFFE ID syntax, per the SPIFFE-ID standard (section 2): a lowercase trust domain of
//! `[a-z0-9._-]`, a path of non-empty segments of `[A-Za-z0-9._-]` that are neither `.` nor `..`.

use std::fmt;

/// A validated `spiffe://<trust-domain>/<path>` identifier.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct SpiffeId(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpiffeIdError {
    #[error("trust domain must not be empty")]
    EmptyTrustDomain,
    #[error("trust domain {0:?} may only hold lowercase letters, digits, '.', '-' and '_'")]
    BadTrustDomain(String),
    #[error("SPIFFE ID {0:?} must start with spiffe://")]
    BadScheme(String),
    #[error("SPIFFE ID path {path:?}: {why}")]
    BadPath { path: String, why: &'static str },
    #[error("SPIFFE ID {0:?} is longer than 2048 bytes")]
    TooLong(String),
}

pub fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > 255
        || !td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
    {
        return Err(SpiffeIdError::BadTrustDomain(td.to_string()));
    }
    Ok(())
}

/// Whether `s` is a valid single path segment.
pub fn is_valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Validates a path such as `ns/default/sa/web` (no leading slash).
pub fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    let bad = |why| SpiffeIdError::BadPath {
        path: path.to_string(),
        why,
    };
    if path.is_empty() {
        return Err(bad("the path must not be empty"));
    }
    if path.starts_with('/') || path.ends_with('/') {
        return Err(bad("no leading or trailing '/'"));
    }
    for seg in path.split('/') {
        if seg.is_empty() {
            return Err(bad("empty segment ('//')"));
        }
        if seg == "." || seg == ".." {
            return Err(bad("'.' and '..' segments are not allowed"));
        }
        if !is_valid_segment(seg) {
            return Err(bad(
                "segments may only hold letters, digits, '.', '-' and '_'",
            ));
        }
    }
    Ok(())
}

impl SpiffeId {
    pub fn new(trust_domain: &str, path: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(trust_domain)?;
        validate_path(path)?;
        let id = format!("spiffe://{trust_domain}/{path}");
        if id.len() > 2048 {
            return Err(SpiffeIdError::TooLong(id));
        }
        Ok(SpiffeId(id))
    }

    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| SpiffeIdError::BadScheme(s.to_string()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        Self::new(td, path)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn trust_domain(&self) -> &str {
        let rest = &self.0["spiffe://".len()..];
        rest.split_once('/').map(|(td, _)| td).unwrap_or(rest)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        SpiffeId::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_ids() {
        let id = SpiffeId::new("example.org", "ns/default/sa/web-1").unwrap();
        assert_eq!(id.as_str(), "spiffe://example.org/ns/default/sa/web-1");
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(SpiffeId::parse(id.as_str()).unwrap(), id);
    }

    #[test]
    fn rejects_invalid_ids() {
        assert!(SpiffeId::new("Example.org", "a").is_err());
        assert!(SpiffeId::new("", "a").is_err());
        assert!(SpiffeId::new("td", "").is_err());
        assert!(SpiffeId::new("td", "a//b").is_err());
        assert!(SpiffeId::new("td", "a/../b").is_err());
        assert!(SpiffeId::new("td", "a/./b").is_err());
        assert!(SpiffeId::new("td", "a/b/").is_err());
        assert!(SpiffeId::new("td", "a b").is_err());
        assert!(SpiffeId::new("td", "a%2fb").is_err());
        assert!(SpiffeId::parse("http://td/a").is_err());
        assert!(SpiffeId::parse("spiffe://td").is_err());
    }
}
