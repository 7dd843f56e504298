//! Whom a `[[grant]]` or a `[[policy]]` covers: identities named by SPIFFE ID pattern and/or by
//! the selection rule that gave them. One definition of what such a list may hold and of what
//! it covers, so a secret grant and an edge policy can never disagree about the same words.

use crate::select::glob_match;

/// A borrowed view of a config entry's `spiffe_ids` and `rules` fields (kept as plain fields
/// in each entry so its `deny_unknown_fields` still names a misspelt key).
#[derive(Debug, Clone, Copy)]
pub struct Subjects<'a> {
    /// Full SPIFFE IDs or `*` globs over them, e.g. `spiffe://td/ns/prod/*`.
    pub spiffe_ids: &'a [String],
    /// Names of `[[rule]]`s whose identities are covered.
    pub rules: &'a [String],
}

impl Subjects<'_> {
    /// Load-time checks: something is named, every pattern lies in this node's trust domain,
    /// every rule exists.
    pub fn validate(
        &self,
        trust_domain: &str,
        rule_exists: impl Fn(&str) -> bool,
    ) -> Result<(), String> {
        if self.spiffe_ids.is_empty() && self.rules.is_empty() {
            return Err("needs `spiffe_ids` or `rules`: whom does it cover?".into());
        }
        let prefix = format!("spiffe://{trust_domain}/");
        if let Some(p) = self.spiffe_ids.iter().find(|p| !p.starts_with(&prefix)) {
            return Err(format!(
                "spiffe_ids pattern {p:?} must start with {prefix:?} (this node's trust domain)"
            ));
        }
        if let Some(r) = self.rules.iter().find(|r| !rule_exists(r)) {
            return Err(format!("names rule {r:?}, which is not defined"));
        }
        Ok(())
    }

    /// Whether the identity `spiffe_id`, selected by rule `rule`, is covered.
    pub fn covers(&self, spiffe_id: &str, rule: &str) -> bool {
        self.rules.iter().any(|r| r == rule)
            || self.spiffe_ids.iter().any(|p| glob_match(p, spiffe_id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn validates_and_covers() {
        let (ids, rules) = (v(&["spiffe://td/ns/*"]), v(&["web"]));
        let s = Subjects {
            spiffe_ids: &ids,
            rules: &rules,
        };
        assert!(s.validate("td", |r| r == "web").is_ok());
        assert!(s
            .validate("td", |_| false)
            .unwrap_err()
            .contains("\"web\", which is not defined"));
        assert!(s
            .validate("other", |_| true)
            .unwrap_err()
            .contains("must start with \"spiffe://other/\""));
        assert!(s.covers("spiffe://td/ns/a", "x"));
        assert!(s.covers("spiffe://td/elsewhere", "web"));
        assert!(!s.covers("spiffe://td/elsewhere", "db"));
        let none = Subjects {
            spiffe_ids: &[],
            rules: &[],
        };
        assert!(none.validate("td", |_| true).unwrap_err().contains("whom"));
        assert!(!none.covers("spiffe://td/ns/a", "web"));
    }
}
