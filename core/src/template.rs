//! Identity templates: the path of a SPIFFE ID, written with `{variable}` placeholders that are
//! filled from attested workload metadata only (see [`crate::workload::Workload::var`]).

use crate::spiffe::{is_valid_segment, SpiffeId};
use crate::workload::{Workload, TEMPLATE_VARS};

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Lit(String),
    Var(&'static str),
}

/// A parsed, load-time validated identity template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    source: String,
    parts: Vec<Part>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TemplateError {
    #[error("template {template:?}: unknown variable {{{var}}} (known: {known})")]
    UnknownVar {
        template: String,
        var: String,
        known: String,
    },
    #[error("template {template:?}: unbalanced '{{' or '}}'")]
    Unbalanced { template: String },
    #[error("template {template:?} cannot produce a valid SPIFFE ID: {why}")]
    Invalid { template: String, why: String },
    #[error("identity template {template:?} needs {{{var}}}, which this workload does not have")]
    Missing { template: String, var: String },
    #[error(
        "identity template {template:?}: the value of {{{var}}} ({value:?}) is not a valid SPIFFE ID path segment"
    )]
    BadValue {
        template: String,
        var: String,
        value: String,
    },
}

impl Template {
    /// Parses `source` and checks that it yields a valid SPIFFE ID in `trust_domain` for any
    /// metadata whose values are valid path segments.
    pub fn parse(source: &str, trust_domain: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut rest = source;
        while !rest.is_empty() {
            match rest.find(['{', '}']) {
                None => {
                    parts.push(Part::Lit(rest.to_string()));
                    rest = "";
                }
                Some(i) if rest.as_bytes()[i] == b'}' => {
                    return Err(TemplateError::Unbalanced {
                        template: source.to_string(),
                    })
                }
                Some(i) => {
                    if i > 0 {
                        parts.push(Part::Lit(rest[..i].to_string()));
                    }
                    let end = rest[i..]
                        .find('}')
                        .ok_or_else(|| TemplateError::Unbalanced {
                            template: source.to_string(),
                        })?
                        + i;
                    let name = &rest[i + 1..end];
                    if name.contains('{') {
                        return Err(TemplateError::Unbalanced {
                            template: source.to_string(),
                        });
                    }
                    let var = TEMPLATE_VARS.iter().find(|v| **v == name).ok_or_else(|| {
                        TemplateError::UnknownVar {
                            template: source.to_string(),
                            var: name.to_string(),
                            known: TEMPLATE_VARS.join(", "),
                        }
                    })?;
                    parts.push(Part::Var(var));
                    rest = &rest[end + 1..];
                }
            }
        }
        // At most one variable per path segment: values may hold every character a literal
        // between two variables could (`.`, `-`, `_`), so `{a}-{b}` would give `a=x-y, b=z` and
        // `a=x, b=y-z` the same identity.
        let mut vars_in_segment = 0;
        for p in &parts {
            match p {
                Part::Lit(l) if l.contains('/') => {
                    vars_in_segment = 0;
                }
                Part::Lit(_) => {}
                Part::Var(_) => {
                    vars_in_segment += 1;
                    if vars_in_segment > 1 {
                        return Err(TemplateError::Invalid {
                            template: source.to_string(),
                            why: "two variables in one path segment make identities ambiguous; put each variable in its own segment".into(),
                        });
                    }
                }
            }
        }
        let t = Template {
            source: source.to_string(),
            parts,
        };
        // A placeholder value that is itself a valid segment shows whether the literal parts
        // and the layout can ever produce a valid ID.
        let sample: String = t
            .parts
            .iter()
            .map(|p| match p {
                Part::Lit(s) => s.as_str(),
                Part::Var(_) => "x",
            })
            .collect();
        SpiffeId::new(trust_domain, &sample).map_err(|e| TemplateError::Invalid {
            template: source.to_string(),
            why: e.to_string(),
        })?;
        Ok(t)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Variables this template reads.
    pub fn vars(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.parts.iter().filter_map(|p| match p {
            Part::Var(v) => Some(*v),
            Part::Lit(_) => None,
        })
    }

    /// Renders the SPIFFE ID for `workload`. Values are never escaped or rewritten: a value
    /// that is not a valid path segment is an error, so two workloads can't collide on one ID.
    pub fn render(
        &self,
        trust_domain: &str,
        workload: &Workload,
    ) -> Result<SpiffeId, TemplateError> {
        let mut path = String::new();
        for p in &self.parts {
            match p {
                Part::Lit(s) => path.push_str(s),
                Part::Var(v) => {
                    let value = workload.var(v).ok_or_else(|| TemplateError::Missing {
                        template: self.source.clone(),
                        var: v.to_string(),
                    })?;
                    if !is_valid_segment(value) {
                        return Err(TemplateError::BadValue {
                            template: self.source.clone(),
                            var: v.to_string(),
                            value: value.to_string(),
                        });
                    }
                    path.push_str(value);
                }
            }
        }
        SpiffeId::new(trust_domain, &path).map_err(|e| TemplateError::Invalid {
            template: self.source.clone(),
            why: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::{K8s, Workload};

    fn wl() -> Workload {
        Workload {
            container_id: "abc123".into(),
            k8s: Some(K8s {
                namespace: Some("prod".into()),
                pod: Some("web-0".into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn renders_from_metadata() {
        let t = Template::parse("ns/{k8s.namespace}/pod/{k8s.pod}", "td").unwrap();
        assert_eq!(
            t.render("td", &wl()).unwrap().as_str(),
            "spiffe://td/ns/prod/pod/web-0"
        );
        let t = Template::parse("c-{container.id}", "td").unwrap();
        assert_eq!(
            t.render("td", &wl()).unwrap().as_str(),
            "spiffe://td/c-abc123"
        );
        assert_eq!(t.vars().collect::<Vec<_>>(), vec!["container.id"]);
    }

    #[test]
    fn one_variable_per_segment() {
        for t in [
            "{k8s.namespace}-{k8s.pod}",
            "ns/{k8s.namespace}{k8s.pod}",
            "x/{nomad.job}.{nomad.task}/y",
        ] {
            let e = Template::parse(t, "td").unwrap_err();
            assert!(
                e.to_string().contains("two variables in one path segment"),
                "{t}: {e}"
            );
        }
        assert!(Template::parse("ns-{k8s.namespace}/pod-{k8s.pod}", "td").is_ok());
    }

    #[test]
    fn invalid_templates_fail_at_load() {
        assert!(matches!(
            Template::parse("ns/{k8s.nope}", "td"),
            Err(TemplateError::UnknownVar { .. })
        ));
        assert!(matches!(
            Template::parse("ns/{k8s.namespace", "td"),
            Err(TemplateError::Unbalanced { .. })
        ));
        assert!(matches!(
            Template::parse("ns}/x", "td"),
            Err(TemplateError::Unbalanced { .. })
        ));
        for bad in [
            "/ns/{k8s.pod}",
            "ns//{k8s.pod}",
            "ns/{k8s.pod}/",
            "a b/{k8s.pod}",
            "../{k8s.pod}",
            "",
        ] {
            assert!(
                matches!(
                    Template::parse(bad, "td"),
                    Err(TemplateError::Invalid { .. })
                ),
                "{bad:?} should be invalid"
            );
        }
        assert!(Template::parse("x", "Bad_TD!").is_err());
    }

    #[test]
    fn missing_or_unsafe_values_are_errors() {
        let t = Template::parse("nomad/{nomad.job}", "td").unwrap();
        assert!(matches!(
            t.render("td", &wl()),
            Err(TemplateError::Missing { .. })
        ));
        let mut w = wl();
        w.k8s.as_mut().unwrap().pod = Some("../etc".into());
        let t = Template::parse("pod/{k8s.pod}", "td").unwrap();
        assert!(matches!(
            t.render("td", &w),
            Err(TemplateError::BadValue { .. })
        ));
        w.k8s.as_mut().unwrap().pod = Some("a/b".into());
        assert!(matches!(
            t.render("td", &w),
            Err(TemplateError::BadValue { .. })
        ));
    }
}
