//! Secret grants: which identities may read which secrets. A grant names secrets (exact names or
//! `*` globs) and the identities it covers, by SPIFFE ID pattern or by the selection rule that
//! gave the identity. Nothing is readable without a grant.

use serde::Deserialize;

use crate::select::glob_match;
use crate::subjects::Subjects;

/// Longest secret name accepted.
pub const MAX_SECRET_NAME: usize = 128;

/// Secret names are file names under `/run/nhi/secrets/` and URL path segments: ASCII letters,
/// digits, `.`, `-`, `_`, not starting with `.`.
pub fn valid_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_SECRET_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// Secret names or `*` globs.
    pub secrets: Vec<String>,
    /// Full SPIFFE IDs or `*` globs over them, e.g. `spiffe://td/ns/prod/*`.
    #[serde(default)]
    pub spiffe_ids: Vec<String>,
    /// Names of `[[rule]]`s whose identities the grant covers.
    #[serde(default)]
    pub rules: Vec<String>,
}

impl Grant {
    /// Load-time checks; `rule_exists` tells whether a rule name is defined.
    pub fn validate(
        &self,
        trust_domain: &str,
        rule_exists: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        if self.secrets.is_empty() {
            return Err("a grant needs at least one secret in `secrets`".into());
        }
        for s in &self.secrets {
            if !valid_secret_name(&s.replace('*', "x")) {
                return Err(format!(
                    "secret pattern {s:?}: names use ASCII letters, digits, '.', '-', '_' (and '*' in patterns)"
                ));
            }
        }
        self.subjects()
            .validate(trust_domain, rule_exists)
            .map_err(|e| format!("a grant {e}"))?;
        Ok(())
    }

    /// Whether this grant covers the identity `spiffe_id` selected by rule `rule`.
    pub fn covers(&self, spiffe_id: &str, rule: &str) -> bool {
        self.subjects().covers(spiffe_id, rule)
    }

    pub fn subjects(&self) -> Subjects<'_> {
        Subjects {
            spiffe_ids: &self.spiffe_ids,
            rules: &self.rules,
        }
    }

    pub fn includes(&self, secret: &str) -> bool {
        self.secrets.iter().any(|p| glob_match(p, secret))
    }
}

/// Whether any grant lets `spiffe_id` (selected by `rule`) read `secret`.
pub fn granted(grants: &[Grant], spiffe_id: &str, rule: &str, secret: &str) -> bool {
    valid_secret_name(secret)
        && grants
            .iter()
            .any(|g| g.covers(spiffe_id, rule) && g.includes(secret))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(secrets: &[&str], ids: &[&str], rules: &[&str]) -> Grant {
        let v = |x: &[&str]| x.iter().map(|s| s.to_string()).collect();
        Grant {
            secrets: v(secrets),
            spiffe_ids: v(ids),
            rules: v(rules),
        }
    }

    #[test]
    fn names() {
        for ok in ["db-password", "a", "x.y_z-1", &"a".repeat(128)] {
            assert!(valid_secret_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", "é", &"a".repeat(129)] {
            assert!(!valid_secret_name(bad), "{bad}");
        }
    }

    #[test]
    fn grants_cover_identities_and_secrets() {
        let grants = [
            g(&["db-*"], &["spiffe://td/ns/prod/*"], &[]),
            g(&["stripe"], &[], &["billing"]),
        ];
        assert!(granted(
            &grants,
            "spiffe://td/ns/prod/sa/web",
            "k8s",
            "db-password"
        ));
        assert!(!granted(
            &grants,
            "spiffe://td/ns/dev/sa/web",
            "k8s",
            "db-password"
        ));
        assert!(!granted(
            &grants,
            "spiffe://td/ns/prod/sa/web",
            "k8s",
            "stripe"
        ));
        assert!(granted(
            &grants,
            "spiffe://td/anything",
            "billing",
            "stripe"
        ));
        assert!(!granted(
            &grants,
            "spiffe://td/anything",
            "billing",
            "db-password"
        ));
        assert!(!granted(&grants, "spiffe://td/ns/prod/x", "k8s", "db-../x"));
    }

    #[test]
    fn validation() {
        let exists = |r: &str| r == "k8s";
        assert!(g(&["a"], &["spiffe://td/x"], &[])
            .validate("td", exists)
            .is_ok());
        assert!(g(&[], &["spiffe://td/x"], &[])
            .validate("td", exists)
            .is_err());
        assert!(g(&["a"], &[], &[]).validate("td", exists).is_err());
        assert!(g(&["a/b"], &[], &["k8s"]).validate("td", exists).is_err());
        assert!(g(&["a"], &["spiffe://other/x"], &[])
            .validate("td", exists)
            .is_err());
        assert!(g(&["a"], &[], &["nope"]).validate("td", exists).is_err());
        assert!(g(&["db-*"], &[], &["k8s"]).validate("td", exists).is_ok());
    }
}
