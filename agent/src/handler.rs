//! Answering a companion's calls: authorization (revocation, grants, the brokering policy),
//! issuance or the store read, and one audit record per outcome. Takes only the shared
//! [`Services`], so it is tested here with an embedded issuer and store in a temp dir, without
//! processes or root.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use nhi_core::wire::{Call, Reply, SecretValue};

use crate::identity::Identity;
use crate::services::Services;

/// Answers one call of the companion serving `identity`: authorization (revocation, grants,
/// the brokering policy), issuance or the store read, and one audit record per outcome.
pub(crate) async fn answer(svc: &Services, identity: &Identity, call: Call) -> Reply {
    let id = identity.spiffe_id.as_str();
    let err = |e: crate::issuer::IssueError| Reply::Error {
        message: e.to_string(),
    };
    let revoked = || Reply::Denied {
        message: format!("{id} is revoked"),
    };
    // One audit record (and metric) per issuance outcome.
    let (started, requested) = (std::time::Instant::now(), crate::audit::requested(&call));
    let audit = |version: Option<String>, decision, detail: Option<String>| {
        crate::audit::credential(
            &svc.audit,
            &svc.metrics,
            identity,
            requested.clone(),
            version,
            decision,
            detail,
            started,
        )
    };
    use nhi_core::audit::Decision::{Allow, Deny, Error as Failed};
    match call {
        Call::Validate { token, audience } => match svc.validate(&token, &audience) {
            Ok(v) => Reply::Validated(v),
            Err(message) => Reply::Denied { message },
        },
        _ if svc.revocations.is_revoked(id) => {
            tracing::warn!(spiffe_id = %id, "refused: identity is revoked");
            audit(None, Deny, Some("identity is revoked".into()));
            revoked()
        }
        Call::Jwt { audience } => match svc.issuer.issue_jwt(&identity.spiffe_id, &audience) {
            Ok(j) => {
                svc.revocations.record_jwt(id, &j.jti, j.expires_at);
                identity.issued.record_jwt(&j.jti, j.expires_at);
                tracing::info!(spiffe_id = %id, audience = ?audience, jti = %j.jti, expires_at = j.expires_at, "issued JWT-SVID");
                audit(
                    Some(j.jti.clone()),
                    Allow,
                    Some(format!("audience={}", audience.join(","))),
                );
                Reply::Jwt(j)
            }
            Err(e) => {
                audit(None, Failed, Some(e.to_string()));
                err(e)
            }
        },
        Call::X509 => match svc
            .issuer
            .issue_x509(
                &identity.spiffe_id,
                crate::issuer::Proof::of(&identity.workload),
            )
            .await
        {
            Ok(x) => {
                svc.revocations.record_x509(id, &x.serial, x.expires_at);
                identity.issued.record_x509(&x.serial, x.expires_at);
                tracing::info!(spiffe_id = %id, serial = %x.serial, expires_at = x.expires_at, "issued X.509-SVID");
                audit(Some(x.serial.clone()), Allow, None);
                Reply::X509(Box::new(x))
            }
            // The authority that checks proofs said no: a denial, with its reason.
            Err(e @ crate::issuer::IssueError::Refused(_)) => {
                tracing::warn!(spiffe_id = %id, "X.509-SVID refused: {e}");
                audit(None, Deny, Some(e.to_string()));
                Reply::Denied {
                    message: e.to_string(),
                }
            }
            Err(e) => {
                audit(None, Failed, Some(e.to_string()));
                err(e)
            }
        },
        Call::BrokeredSecret { rule_id } => brokered_secret(svc, identity, &rule_id).await,
        Call::Secret { name } => {
            if !nhi_core::grant::granted(&svc.config.grants, id, &identity.rule, &name) {
                tracing::warn!(spiffe_id = %id, secret = %name, "refused: secret not granted");
                audit(None, Deny, Some("not granted".into()));
                return Reply::Denied {
                    message: format!("secret {name:?} is not granted to {id}"),
                };
            }
            read_secret(svc, id, name, "delivered secret", |v, d, why| {
                audit(v, d, why.map(str::to_string))
            })
            .await
        }
    }
}

/// A secret for the companion to inject upstream: only the one egress rule `rule_id` of the
/// identity's current policy names. Never a grant: the workload's `/v1/secrets` still refuses it.
async fn brokered_secret(svc: &Services, identity: &Identity, rule_id: &str) -> Reply {
    use nhi_core::audit::Decision::Deny;
    let id = identity.spiffe_id.as_str();
    let started = std::time::Instant::now();
    let name = svc
        .policy_for(identity)
        .and_then(|p| p.brokered_secret(rule_id).map(str::to_string));
    // One audit record per outcome, like every other issuance; the detail names the rule.
    let audit = |name: &str, version: Option<String>, decision, why: Option<&str>| {
        crate::audit::credential(
            &svc.audit,
            &svc.metrics,
            identity,
            Some(nhi_core::audit::CredentialRef {
                name: format!("secret:{name}"),
                version: None,
            }),
            version,
            decision,
            Some(match why {
                Some(why) => format!("brokered by rule {rule_id}: {why}"),
                None => format!("brokered by rule {rule_id}"),
            }),
            started,
        )
    };
    let Some(name) = name else {
        tracing::warn!(spiffe_id = %id, rule = %rule_id, "refused: no brokered secret in that rule");
        audit("?", None, Deny, Some("the rule brokers no secret"));
        return Reply::Denied {
            message: format!("no egress rule {rule_id:?} brokering a secret for {id}"),
        };
    };
    let (n, what) = (
        name.clone(),
        format!("delivered brokered secret (rule {rule_id})"),
    );
    read_secret(svc, id, name, &what, |v, d, why| audit(&n, v, d, why)).await
}

/// Reads secret `name` from the store for a companion that may have it (granted, or brokered
/// by its policy) and audits the outcome through `audit(version, decision, why)`: the version
/// when delivered, never the value.
async fn read_secret(
    svc: &Services,
    spiffe_id: &str,
    name: String,
    what: &str,
    audit: impl Fn(Option<String>, nhi_core::audit::Decision, Option<&str>),
) -> Reply {
    use nhi_core::audit::Decision::{Allow, Deny, Error as Failed};
    match svc.store.get_for_workload(&name).await {
        Ok(Some(s)) => {
            let cached = s
                .from_cache
                .then_some("from the sealed cache: OpenBao unreachable");
            tracing::info!(spiffe_id = %spiffe_id, secret = %name, version = s.version, from_cache = s.from_cache, "{what}");
            audit(Some(s.version.to_string()), Allow, cached);
            Reply::Secret(SecretValue {
                name,
                version: s.version,
                value_b64: B64.encode(&s.value[..]),
                // Never served longer than secret_ttl after it was read from the store.
                expires_at: s.fetched_at + svc.config.store.secret_ttl.as_secs(),
            })
        }
        Ok(None) => {
            audit(None, Deny, Some("not found"));
            Reply::NotFound {
                message: format!("no secret named {name:?}"),
            }
        }
        Err(e) => {
            audit(None, Failed, Some(&e.to_string()));
            Reply::Error {
                message: e.to_string(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::sync::Arc;

    use nhi_core::audit_log;

    const CONFIG: &str = r#"
trust_domain = "td"
[[rule]]
name = "web"
match = { annotations = { "nhi.dev/app" = "web" } }
spiffe_id = "web/{container.name}"
[[rule]]
name = "db"
match = { annotations = { "nhi.dev/app" = "db" } }
spiffe_id = "db/{container.name}"
[[grant]]
secrets = ["web-*"]
rules = ["web"]
[[policy]]
id = "p"
rules = ["web"]
[[policy.egress]]
id = "api"
ports = [8080]
cidr = ["10.0.0.0/8"]
broker = { secret = "api-token" }
[[policy.egress]]
id = "plain"
ports = [9000]
cidr = ["10.0.0.0/8"]
"#;

    /// The shared services of a node with the embedded issuer and store in `dir`.
    fn services(dir: &Path) -> Services {
        let text = format!("state_dir = \"{}\"\n{CONFIG}", dir.display());
        let config = nhi_core::Config::parse(Path::new("t.toml"), &text).unwrap();
        let issuer = crate::issuer::EmbeddedIssuer::load_or_create(&config).unwrap();
        let store =
            crate::store::EmbeddedStore::open(&config.state_dir, &config.key_file()).unwrap();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let audit = crate::audit::AuditSink::start(
            &config.audit_dir(),
            (&config.audit).into(),
            config.audit.queue,
            metrics.clone(),
        )
        .unwrap();
        Services::new(
            config,
            Arc::new(audit),
            metrics,
            Arc::new(issuer),
            Arc::new(crate::store::Store::Embedded(store)),
            Arc::new(crate::revoke::Revocations::new(vec![])),
        )
    }

    fn identity(id: &str, rule: &str) -> Identity {
        Identity::new(
            nhi_core::SpiffeId::parse(id).unwrap(),
            rule.into(),
            Default::default(),
        )
    }

    async fn put(svc: &Services, name: &str, value: &[u8]) {
        svc.store
            .put(name, zeroize::Zeroizing::new(value.to_vec()), false)
            .await
            .unwrap();
    }

    /// Every audit record written so far, as `(decision, credential name, version)`.
    fn audited(svc: &Services) -> Vec<(String, String, Option<String>)> {
        assert!(svc.audit.sync(std::time::Duration::from_secs(5)));
        audit_log::tail(&svc.config.audit_dir(), 1000, None)
            .unwrap()
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|r| r["kind"] == "credential")
            .map(|r| {
                (
                    r["decision"].as_str().unwrap().to_string(),
                    r["credential"]["name"].as_str().unwrap().to_string(),
                    r["credential"]["version"].as_str().map(str::to_string),
                )
            })
            .collect()
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn issues_svids_that_verify_and_records_them_for_the_identity() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let svc = services(dir.path());
            let web = identity("spiffe://td/web/a", "web");
            let call = Call::Jwt {
                audience: vec!["aud".into()],
            };
            let Reply::Jwt(j) = answer(&svc, &web, call).await else {
                panic!("no JWT-SVID")
            };
            assert_eq!(j.spiffe_id, "spiffe://td/web/a");
            let call = Call::Validate {
                token: j.token.clone(),
                audience: "aud".into(),
            };
            let Reply::Validated(v) = answer(&svc, &web, call).await else {
                panic!("the token does not verify")
            };
            assert_eq!(v.spiffe_id, "spiffe://td/web/a");
            let call = Call::Validate {
                token: j.token.clone(),
                audience: "other".into(),
            };
            assert!(matches!(
                answer(&svc, &web, call).await,
                Reply::Denied { .. }
            ));
            let Reply::X509(x) = answer(&svc, &web, Call::X509).await else {
                panic!("no X.509-SVID")
            };
            assert_eq!(x.spiffe_id, "spiffe://td/web/a");
            assert!(x.cert_chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
            // What the workload ends with goes on the deny list: the ledger has both.
            let live = web.issued.live();
            assert_eq!((live.jtis.len(), live.serials.len()), (1, 1));
            let got = audited(&svc);
            assert!(got.contains(&("allow".into(), "jwt-svid".into(), Some(j.jti.clone()))));
            assert!(got.contains(&("allow".into(), "x509-svid".into(), Some(x.serial.clone()))));
        });
    }

    #[test]
    fn secrets_need_a_grant_and_exist() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let svc = services(dir.path());
            put(&svc, "web-key", b"v1").await;
            put(&svc, "db-key", b"d1").await;
            let web = identity("spiffe://td/web/a", "web");
            let secret = |name: &str| Call::Secret { name: name.into() };
            let Reply::Secret(s) = answer(&svc, &web, secret("web-key")).await else {
                panic!("granted secret not served")
            };
            assert_eq!((s.name.as_str(), s.version), ("web-key", 1));
            assert_eq!(B64.decode(&s.value_b64).unwrap(), b"v1");
            let ttl = svc.config.store.secret_ttl.as_secs();
            assert!(s.expires_at <= nhi_core::clock::now_unix() + ttl);
            // Not granted to this rule, though it exists.
            let r = answer(&svc, &web, secret("db-key")).await;
            assert!(
                matches!(&r, Reply::Denied { message } if message.contains("not granted")),
                "{r:?}"
            );
            // Granted by pattern, but absent.
            assert!(matches!(
                answer(&svc, &web, secret("web-nope")).await,
                Reply::NotFound { .. }
            ));
            // Another identity's rule has no grant at all.
            let db = identity("spiffe://td/db/a", "db");
            assert!(matches!(
                answer(&svc, &db, secret("web-key")).await,
                Reply::Denied { .. }
            ));
            let got = audited(&svc);
            assert!(got.contains(&("allow".into(), "secret:web-key".into(), Some("1".into()))));
            assert!(got.contains(&("deny".into(), "secret:db-key".into(), None)));
            assert!(got.contains(&("deny".into(), "secret:web-nope".into(), None)));
        });
    }

    #[test]
    fn a_revoked_identity_gets_nothing_but_token_checks() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let svc = services(dir.path());
            put(&svc, "web-key", b"v1").await;
            let web = identity("spiffe://td/web/a", "web");
            let Reply::Jwt(before) = answer(
                &svc,
                &web,
                Call::Jwt {
                    audience: vec!["aud".into()],
                },
            )
            .await
            else {
                panic!()
            };
            svc.revocations.revoke("spiffe://td/web/a");
            for call in [
                Call::Jwt {
                    audience: vec!["aud".into()],
                },
                Call::X509,
                Call::Secret {
                    name: "web-key".into(),
                },
                Call::BrokeredSecret {
                    rule_id: "api".into(),
                },
            ] {
                let r = answer(&svc, &web, call).await;
                assert!(
                    matches!(&r, Reply::Denied { message } if message.contains("is revoked")),
                    "{r:?}"
                );
            }
            // A token issued before the revocation no longer verifies.
            let call = Call::Validate {
                token: before.token,
                audience: "aud".into(),
            };
            let r = answer(&svc, &web, call).await;
            assert!(
                matches!(&r, Reply::Denied { message } if message.contains("revoked")),
                "{r:?}"
            );
            // Others are unaffected.
            let other = identity("spiffe://td/web/b", "web");
            assert!(matches!(
                answer(&svc, &other, Call::X509).await,
                Reply::X509(_)
            ));
        });
    }

    #[test]
    fn a_brokered_secret_needs_the_identitys_policy_to_broker_it_in_that_rule() {
        rt().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let svc = services(dir.path());
            put(&svc, "api-token", b"t").await;
            let web = identity("spiffe://td/web/a", "web");
            let brokered = |rule_id: &str| Call::BrokeredSecret {
                rule_id: rule_id.into(),
            };
            // No grant names it: brokering is the only way, and only for the edge.
            let Reply::Secret(s) = answer(&svc, &web, brokered("api")).await else {
                panic!("brokered secret not served")
            };
            assert_eq!(s.name, "api-token");
            let r = answer(
                &svc,
                &web,
                Call::Secret {
                    name: "api-token".into(),
                },
            )
            .await;
            assert!(matches!(r, Reply::Denied { .. }), "{r:?}");
            // A rule that brokers nothing, an unknown rule, an identity no policy covers.
            assert!(matches!(
                answer(&svc, &web, brokered("plain")).await,
                Reply::Denied { .. }
            ));
            assert!(matches!(
                answer(&svc, &web, brokered("nope")).await,
                Reply::Denied { .. }
            ));
            let db = identity("spiffe://td/db/a", "db");
            assert!(matches!(
                answer(&svc, &db, brokered("api")).await,
                Reply::Denied { .. }
            ));
            let got = audited(&svc);
            assert!(got.contains(&("allow".into(), "secret:api-token".into(), Some("1".into()))));
        });
    }
}
