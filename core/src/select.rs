//! Selection: which rule, if any, applies to a workload. Rules are tried in file order and the
//! first that accepts the workload's source (`sources`) and whose every listed condition holds
//! wins. Within one condition list any entry may match. An operator's `nhi.dev/inject = "false"`
//! annotation opts a container out of every rule, and `nhi.dev/rule = NAME` restricts selection
//! to that one rule, only if the operator marked it `selectable` (its conditions and sources must
//! still hold): annotations pick among the rules the operator offered, they never name an
//! identity. Naming a rule that does not exist or is not selectable is an error (the container
//! does not start), never a silent fallback to another rule.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::config::{Config, Rule};
use crate::workload::{Workload, INJECT_ANNOTATION, RULE_ANNOTATION};

/// Conditions of a rule. Empty lists don't constrain.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Match {
    /// Annotation key → glob on its value (`*` for "present").
    pub annotations: BTreeMap<String, String>,
    pub images: Vec<String>,
    pub container_names: Vec<String>,
    pub k8s_namespaces: Vec<String>,
    pub nomad_namespaces: Vec<String>,
    pub nomad_jobs: Vec<String>,
}

impl Match {
    pub fn validate(&self) -> Result<(), String> {
        for k in self.annotations.keys() {
            if !k.starts_with(crate::workload::NHI_ANNOTATION_PREFIX) {
                return Err(format!(
                    "match.annotations may only use nhi.dev/* keys (got {k:?}): other annotations are not kept as workload metadata"
                ));
            }
        }
        Ok(())
    }

    pub fn matches(&self, w: &Workload) -> bool {
        let any = |globs: &[String], value: Option<&str>| {
            globs.is_empty() || value.is_some_and(|v| globs.iter().any(|g| glob_match(g, v)))
        };
        self.annotations
            .iter()
            .all(|(k, g)| w.annotation(k).is_some_and(|v| glob_match(g, v)))
            && any(&self.images, w.image.as_deref())
            && any(&self.container_names, Some(w.name()))
            && any(&self.k8s_namespaces, w.var("k8s.namespace"))
            && any(&self.nomad_namespaces, w.var("nomad.namespace"))
            && any(&self.nomad_jobs, w.var("nomad.job"))
    }
}

/// Whether the operator opted this container out.
pub fn opted_out(w: &Workload) -> bool {
    w.annotation(INJECT_ANNOTATION)
        .is_some_and(|v| v.eq_ignore_ascii_case("false"))
}

/// The rule that selects `w`, if any; an error when `w` names a rule with `nhi.dev/rule` that
/// it may not pick (no such rule, or not `selectable`).
pub fn select<'c>(config: &'c Config, w: &Workload) -> Result<Option<&'c Rule>, String> {
    if opted_out(w) {
        return Ok(None);
    }
    let applies = |r: &&Rule| r.accepts(w.source()) && r.matcher.matches(w);
    let Some(name) = w.annotation(RULE_ANNOTATION) else {
        return Ok(config.rules.iter().find(applies));
    };
    let Some(rule) = config.rules.iter().find(|r| r.name == name) else {
        return Err(format!(
            "annotation {RULE_ANNOTATION} names rule {name:?}, which does not exist"
        ));
    };
    if !rule.selectable {
        return Err(format!(
            "annotation {RULE_ANNOTATION} names rule {name:?}, which is not selectable (the operator must set selectable = true on it)"
        ));
    }
    Ok(Some(rule).filter(applies))
}

/// `*` matches any run of characters (also none); everything else is literal.
pub fn glob_match(pattern: &str, value: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == value;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !value.starts_with(first) || value.len() < first.len() + last.len() || !value.ends_with(last)
    {
        return false;
    }
    let mut rest = &value[first.len()..value.len() - last.len()];
    for mid in &parts[1..parts.len() - 1] {
        match rest.find(mid) {
            Some(i) => rest = &rest[i + mid.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::K8s;
    use std::path::Path;

    #[test]
    fn globs() {
        assert!(glob_match("*", ""));
        assert!(glob_match("busybox*", "busybox:1.36"));
        assert!(glob_match("*/pause:*", "registry.k8s.io/pause:3.6"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXcYYb"));
        assert!(!glob_match("ab*ba", "aba"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    fn cfg() -> Config {
        Config::parse(
            Path::new("t.toml"),
            r#"
trust_domain = "td"
[[rule]]
name = "prod"
spiffe_id = "ns/{k8s.namespace}"
[rule.match]
k8s_namespaces = ["prod"]
[[rule]]
name = "annotated"
spiffe_id = "container/{container.name}"
selectable = true
[rule.match]
annotations = { "nhi.dev/inject" = "true" }
images = ["busybox*"]
[[rule]]
name = "by-name"
spiffe_id = "name/{container.name}"
sources = ["container"]
[rule.match]
annotations = { "nhi.dev/inject" = "true" }
"#,
        )
        .unwrap()
    }

    #[test]
    fn first_matching_rule_wins_and_opt_out_is_respected() {
        let c = cfg();
        let mut w = Workload {
            container_id: "x".into(),
            k8s: Some(K8s {
                namespace: Some("prod".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(select(&c, &w).unwrap().unwrap().name, "prod");
        w.annotations
            .insert(INJECT_ANNOTATION.into(), "false".into());
        assert!(select(&c, &w).unwrap().is_none());

        let mut w = Workload {
            container_id: "y".into(),
            image: Some("busybox:latest".into()),
            ..Default::default()
        };
        assert!(
            select(&c, &w).unwrap().is_none(),
            "needs the annotation too"
        );
        w.annotations
            .insert(INJECT_ANNOTATION.into(), "true".into());
        assert_eq!(select(&c, &w).unwrap().unwrap().name, "annotated");
        w.image = Some("alpine".into());
        assert_eq!(select(&c, &w).unwrap().unwrap().name, "by-name");
    }

    #[test]
    fn rule_annotation_picks_among_rules_only() {
        let c = cfg();
        let mut w = Workload {
            container_id: "z".into(),
            image: Some("busybox".into()),
            k8s: Some(K8s {
                namespace: Some("prod".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        w.annotations
            .insert(INJECT_ANNOTATION.into(), "true".into());
        assert_eq!(
            select(&c, &w).unwrap().unwrap().name,
            "prod",
            "first match by default"
        );
        w.annotations
            .insert(RULE_ANNOTATION.into(), "annotated".into());
        assert_eq!(select(&c, &w).unwrap().unwrap().name, "annotated");
        w.annotations
            .insert(RULE_ANNOTATION.into(), "no-such-rule".into());
        let e = select(&c, &w).unwrap_err();
        assert!(
            e.contains("\"no-such-rule\"") && e.contains("does not exist"),
            "{e}"
        );
        w.image = Some("alpine".into());
        w.annotations
            .insert(RULE_ANNOTATION.into(), "annotated".into());
        assert!(
            select(&c, &w).unwrap().is_none(),
            "the picked rule's conditions still apply"
        );
    }

    #[test]
    fn a_pod_cannot_pick_a_rule_that_is_not_selectable_or_not_for_its_source() {
        let c = cfg();
        let pod = |rule: Option<&str>| {
            let mut w = Workload {
                container_id: "p".into(),
                image: Some("alpine".into()),
                k8s: Some(K8s {
                    namespace: Some("dev".into()),
                    ..Default::default()
                }),
                ..Default::default()
            };
            w.annotations
                .insert(INJECT_ANNOTATION.into(), "true".into());
            if let Some(r) = rule {
                w.annotations.insert(RULE_ANNOTATION.into(), r.into());
            }
            w
        };
        // "by-name" would match by its conditions, but takes plain containers only.
        assert!(select(&c, &pod(None)).unwrap().is_none());
        let e = select(&c, &pod(Some("by-name"))).unwrap_err();
        assert!(
            e.contains("\"by-name\"") && e.contains("not selectable"),
            "{e}"
        );
        let e = select(&c, &pod(Some("prod"))).unwrap_err();
        assert!(e.contains("not selectable"), "{e}");
        // The same conditions on a plain container: "by-name" selects it.
        let mut plain = pod(None);
        plain.k8s = None;
        assert_eq!(select(&c, &plain).unwrap().unwrap().name, "by-name");
    }

    #[test]
    fn only_nhi_annotations_can_be_matched() {
        let m = Match {
            annotations: [("io.kubernetes.foo".to_string(), "*".to_string())].into(),
            ..Default::default()
        };
        assert!(m.validate().is_err());
    }
}
