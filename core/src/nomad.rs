//! The Nomad task of a container, from the workload identity Nomad signed for it.
//!
//! Nomad (1.7 and later) gives every task a workload identity: a JWT signed by the Nomad
//! servers (verifiable against the cluster's JWKS, `/.well-known/jwks.json`) whose claims name
//! the task's namespace (`nomad_namespace`), job (`nomad_job_id`), allocation
//! (`nomad_allocation_id`) and task (`nomad_task`); its `sub` is
//! `<region>:<namespace>:<job>:<group>:<task>:<identity>`. With `identity { file = true }` the
//! Nomad client writes it to the task's secrets directory,
//! `<alloc_dir>/<alloc id>/<task>/secrets/nomad_token` (a named identity:
//! `nomad_<name>.jwt`), which its task drivers bind-mount at `/secrets`.
//!
//! That token is the proof, like the kubelet-projected service-account token for Kubernetes:
//! - the file is found from the container's `/secrets` mount *source*, which must lie in the
//!   configured `nomad.alloc_dir` as `<alloc id>/<task>/secrets` (a `/alloc` mount, if any, must
//!   name the same allocation), and is read with [`crate::untrusted_fs::read_beneath`] below
//!   `alloc_dir` only (no symlink, no FIFO, bounded): never a path the task chooses;
//! - its signature must verify against `nomad.jwks` (public-key algorithms only), and a present
//!   `exp`/`nbf` must hold (Nomad's default identity has no `exp`);
//! - its `nomad_allocation_id` and `nomad_task` must be the allocation and task whose directory
//!   it was read from, so a task that writes another task's token into its own secrets
//!   directory gets nothing.
//!
//! The `NOMAD_*` variables of the task's environment are *not* a proof: Nomad applies the job's
//! `env` block after its own variables (`client/taskenv/env.go`), so a job author can set
//! `NOMAD_JOB_NAME = "payments"`. They are used only with `nomad.trust_env = true`, which the
//! operator sets knowing that every job author can then pick any Nomad identity.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

use oci_spec::runtime::Spec;
use serde::Deserialize;

use crate::workload::{Nomad, Workload};

/// Where the Nomad client keeps allocations by default (`data_dir` `/opt/nomad/data`).
pub const DEFAULT_ALLOC_DIR: &str = "/opt/nomad/data/alloc";
/// The audience of Nomad's default workload identity.
pub const DEFAULT_AUDIENCE: &str = "nomadproject.io";
/// Largest token file read.
const MAX_TOKEN: u64 = 64 * 1024;

/// `[nomad]` in `nhi.toml`.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct NomadConfig {
    /// The Nomad client's allocation directory (`client { alloc_dir }`, by default
    /// `<data_dir>/alloc`). Tokens are read below it only.
    pub alloc_dir: PathBuf,
    /// The cluster's workload-identity signing keys (a JWKS file, e.g. saved from
    /// `nomad operator api /.well-known/jwks.json`). Setting it makes the workload identity the
    /// proof of a task's `nomad.*` metadata.
    pub jwks: Option<PathBuf>,
    /// The `iss` tokens must carry (the Nomad servers' `oidc_issuer`), if set.
    pub issuer: Option<String>,
    /// Which of the task's workload identities to read: `default` (file `nomad_token`) or a
    /// named `identity` block (file `nomad_<name>.jwt`).
    pub identity: String,
    /// An audience the token must carry. Default: `nomadproject.io` for the default identity,
    /// none for a named one.
    pub audience: Option<String>,
    /// Take `nomad.*` from the task's `NOMAD_*` environment instead. Spoofable: any job author
    /// can set those variables in the job's `env` block and so choose any Nomad identity.
    pub trust_env: bool,
}

impl Default for NomadConfig {
    fn default() -> Self {
        NomadConfig {
            alloc_dir: DEFAULT_ALLOC_DIR.into(),
            jwks: None,
            issuer: None,
            identity: "default".into(),
            audience: None,
            trust_env: false,
        }
    }
}

impl NomadConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !self.alloc_dir.is_absolute() {
            return Err("nomad.alloc_dir must be an absolute path".into());
        }
        if self.jwks.is_some() && self.trust_env {
            return Err("nomad.jwks and nomad.trust_env = true exclude each other: the workload identity is the proof, or the (spoofable) environment is; pick one".into());
        }
        let ok = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if self.identity.is_empty() || self.identity.len() > 128 || !self.identity.chars().all(ok) {
            return Err(format!(
                "nomad.identity {:?} is not a Nomad identity name ([a-zA-Z0-9-_]{{1,128}})",
                self.identity
            ));
        }
        Ok(())
    }

    /// Whether anything can give a workload Nomad metadata.
    pub fn enabled(&self) -> bool {
        self.jwks.is_some() || self.trust_env
    }

    /// The token file's name in the task's secrets directory.
    pub fn token_file(&self) -> String {
        if self.identity == "default" {
            "nomad_token".into()
        } else {
            format!("nomad_{}.jwt", self.identity)
        }
    }

    fn audience(&self) -> Option<&str> {
        match &self.audience {
            Some(a) => Some(a),
            None if self.identity == "default" => Some(DEFAULT_AUDIENCE),
            None => None,
        }
    }
}

/// Fills `w.nomad` from what proves it: the signed workload identity (with `nomad.jwks`) or,
/// only with `nomad.trust_env`, the task's environment. Kubernetes containers never get Nomad
/// metadata. `Err` says why a container laid out as a Nomad task has no proven identity
/// (`w.nomad` stays `None`); a container that is no Nomad task is `Ok` with `None`.
pub fn attach(cfg: &NomadConfig, spec: &Spec, w: &mut Workload) -> Result<(), String> {
    w.nomad = None;
    if w.k8s.is_some() {
        return Ok(());
    }
    if cfg.jwks.is_some() {
        w.nomad = from_identity(cfg, spec)?;
    } else if cfg.trust_env {
        w.nomad = from_env(spec);
    }
    Ok(())
}

/// The task directory `(alloc id, task)` of a container from its `/secrets` mount, if it is
/// laid out as a task of the Nomad client whose allocations live in `alloc_dir`.
pub fn task_dir(spec: &Spec, alloc_dir: &Path) -> Result<Option<(String, String)>, String> {
    let mounts = spec.mounts().as_deref().unwrap_or_default();
    let at = |dest: &str| -> Vec<PathBuf> {
        mounts
            .iter()
            .filter(|m| m.destination() == Path::new(dest))
            .filter_map(|m| m.source().clone())
            .collect()
    };
    let secrets = at("/secrets");
    let ours: Vec<(String, String)> = secrets
        .iter()
        .filter_map(|s| below(s, alloc_dir))
        .filter_map(|parts| match parts.as_slice() {
            [alloc, task, secrets] if secrets == "secrets" => Some((alloc.clone(), task.clone())),
            _ => None,
        })
        .collect();
    let Some((alloc, task)) = ours.first().cloned() else {
        return Ok(None);
    };
    if secrets.len() > 1 {
        return Err(format!(
            "{} mounts at /secrets: Nomad mounts exactly one, the task's own",
            secrets.len()
        ));
    }
    for a in at("/alloc") {
        if below(&a, alloc_dir) != Some(vec![alloc.clone(), "alloc".into()]) {
            return Err(format!(
                "the /alloc mount {} is not the allocation directory of {alloc}",
                a.display()
            ));
        }
    }
    Ok(Some((alloc, task)))
}

/// The normal components of `path` below `base` (lexically: `..` and `.` refuse).
fn below(path: &Path, base: &Path) -> Option<Vec<String>> {
    let rest = path.strip_prefix(base).ok()?;
    rest.components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str().map(str::to_string),
            _ => None,
        })
        .collect()
}

/// The Nomad metadata the task's signed workload identity proves.
fn from_identity(cfg: &NomadConfig, spec: &Spec) -> Result<Option<Nomad>, String> {
    let Some((alloc, task)) = task_dir(spec, &cfg.alloc_dir)? else {
        return Ok(None);
    };
    let jwks_path = cfg.jwks.as_ref().expect("checked by the caller");
    let rel: PathBuf = [alloc.as_str(), task.as_str(), "secrets", &cfg.token_file()]
        .iter()
        .collect();
    let (raw, _) = crate::untrusted_fs::read_beneath(&cfg.alloc_dir, &rel, MAX_TOKEN).map_err(
        |e| {
            format!(
                "no Nomad workload identity ({e}); give the task `identity {{ file = true }}` (Nomad 1.7 or later)"
            )
        },
    )?;
    let token = String::from_utf8(raw).map_err(|_| "the Nomad workload identity is not UTF-8")?;
    let jwks = std::fs::read_to_string(jwks_path)
        .map_err(|e| format!("nomad.jwks {}: {e}", jwks_path.display()))?;
    let check = crate::jwt::ForeignCheck {
        issuer: cfg.issuer.as_deref(),
        audience: cfg.audience(),
        require_exp: false,
        leeway: 60,
    };
    let claims = crate::jwt::verify_foreign(
        token.trim(),
        &jwks,
        &format!("nomad.jwks {}", jwks_path.display()),
        &check,
    )
    .map_err(|e| format!("Nomad workload identity: {e}"))?;
    claims_to_nomad(&claims, &alloc, &task, &cfg.identity).map(Some)
}

/// The verified claims as Nomad metadata, after checking they are those of the allocation and
/// task the token was read for.
pub fn claims_to_nomad(
    claims: &crate::jwt::Claims,
    alloc: &str,
    task: &str,
    identity: &str,
) -> Result<Nomad, String> {
    let claim = |k: &str| {
        claims
            .get(k)
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let required =
        |k: &str| claim(k).ok_or_else(|| format!("the Nomad workload identity has no {k}"));
    let (token_alloc, token_task) = (required("nomad_allocation_id")?, required("nomad_task")?);
    if token_alloc != alloc || token_task != task {
        return Err(format!(
            "the Nomad workload identity in the secrets of allocation {alloc} task {task} is for allocation {token_alloc} task {token_task}"
        ));
    }
    let namespace = required("nomad_namespace")?;
    let job = required("nomad_job_id")?;
    let group = claim("sub").and_then(|s| group_of(s, namespace, job, task, identity));
    Ok(Nomad {
        namespace: Some(namespace.into()),
        job: Some(job.into()),
        group: group.map(str::to_string),
        task: Some(task.into()),
        alloc_id: Some(alloc.into()),
    })
}

/// The task group from `sub` = `<region>:<namespace>:<job>:<group>:<task>:<identity>`, when it
/// can be read unambiguously (a job id, dispatched `<job>/dispatch-...` or periodic
/// `<job>/periodic-...`, and a group without `:`).
fn group_of<'a>(
    sub: &'a str,
    namespace: &str,
    job: &str,
    task: &str,
    identity: &str,
) -> Option<&'a str> {
    let rest = sub.strip_suffix(&format!(":{task}:{identity}"))?;
    let parts: Vec<&str> = rest.split(':').collect();
    let [_region, ns, sub_job, group] = parts.as_slice() else {
        return None;
    };
    let same_job = *sub_job == job || sub_job.starts_with(&format!("{job}/"));
    (*ns == namespace && same_job && !group.is_empty()).then_some(*group)
}

/// The `NOMAD_*` variables Nomad writes into every task's environment.
const NOMAD_VARS: &[&str] = &[
    "NOMAD_NAMESPACE",
    "NOMAD_JOB_NAME",
    "NOMAD_GROUP_NAME",
    "NOMAD_TASK_NAME",
    "NOMAD_ALLOC_ID",
];

/// Nomad metadata from the task environment (`nomad.trust_env = true` only: job authors can
/// set these variables). Believed only when consistent with what the Nomad client does: every
/// variable at most once, the allocation id set, and the allocation directory Nomad
/// bind-mounts at `/alloc` being `<...>/alloc/<NOMAD_ALLOC_ID>/alloc`.
pub fn from_env(spec: &Spec) -> Option<Nomad> {
    let env: &[String] = spec
        .process()
        .as_ref()
        .and_then(|p| p.env().as_deref())
        .unwrap_or_default();
    let mut vals: BTreeMap<&str, &str> = BTreeMap::new();
    for kv in env {
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        if NOMAD_VARS.contains(&k) && vals.insert(k, v).is_some() {
            return None;
        }
    }
    let var = |name: &str| {
        vals.get(name)
            .filter(|v| !v.is_empty())
            .map(|v| v.to_string())
    };
    let alloc_id = var("NOMAD_ALLOC_ID")?;
    let alloc_dir_suffix = format!("/alloc/{alloc_id}/alloc");
    let mounted = spec
        .mounts()
        .as_deref()
        .unwrap_or_default()
        .iter()
        .any(|m| {
            m.destination().as_os_str() == "/alloc"
                && m.source().as_ref().is_some_and(|s| {
                    let s = s.to_string_lossy();
                    s.starts_with('/') && s.ends_with(&alloc_dir_suffix) && !s.contains("/../")
                })
        });
    if !mounted || alloc_id.contains('/') {
        return None;
    }
    Some(Nomad {
        namespace: var("NOMAD_NAMESPACE"),
        job: var("NOMAD_JOB_NAME"),
        group: var("NOMAD_GROUP_NAME"),
        task: var("NOMAD_TASK_NAME"),
        alloc_id: Some(alloc_id),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    use std::fs;

    const KEY: &str = include_str!("../testdata/nomad-test-key.pem");
    const JWKS: &str = include_str!("../testdata/nomad-test-jwks.json");
    const KID: &str = "9f1c2a7e-nhi-test-key";
    const ALLOC: &str = "5e0f6a55-6c4b-4b8b-9c1e-6f0a2a7b7c11";

    fn now() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64
    }

    /// A workload identity as the Nomad servers sign it (RS256, `kid`, no `exp` for the
    /// default identity).
    fn token(claims: serde_json::Value) -> String {
        let mut h = Header::new(Algorithm::RS256);
        h.kid = Some(KID.into());
        jsonwebtoken::encode(
            &h,
            &claims,
            &EncodingKey::from_rsa_pem(KEY.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn claims(job: &str, alloc: &str, task: &str) -> serde_json::Value {
        serde_json::json!({
            "nomad_namespace": "default",
            "nomad_job_id": job,
            "nomad_allocation_id": alloc,
            "nomad_task": task,
            "sub": format!("global:default:{job}:api:{task}:default"),
            "aud": ["nomadproject.io"],
            "iat": now(), "nbf": now(), "jti": "j1",
        })
    }

    struct Layout {
        dir: tempfile::TempDir,
        cfg: NomadConfig,
    }

    impl Layout {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let jwks = dir.path().join("jwks.json");
            fs::write(&jwks, JWKS).unwrap();
            let cfg = NomadConfig {
                alloc_dir: dir.path().join("alloc"),
                jwks: Some(jwks),
                ..Default::default()
            };
            Layout { dir, cfg }
        }

        /// Lays out allocation `alloc` task `task` as the Nomad client does, with `token` in
        /// its secrets directory.
        fn task(&self, alloc: &str, task: &str, token: &str) -> PathBuf {
            let a = self.cfg.alloc_dir.join(alloc);
            fs::create_dir_all(a.join("alloc")).unwrap();
            let secrets = a.join(task).join("secrets");
            fs::create_dir_all(&secrets).unwrap();
            fs::write(secrets.join("nomad_token"), token).unwrap();
            a
        }

        fn spec(&self, mounts: &[(&str, PathBuf)], env: &[&str]) -> Spec {
            let mounts: Vec<serde_json::Value> = mounts
                .iter()
                .map(|(d, s)| serde_json::json!({"destination": d, "source": s, "type": "bind"}))
                .collect();
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}, "env": env},
                "mounts": mounts,
            }))
            .unwrap()
        }

        fn nomad_spec(&self, alloc: &str, task: &str, env: &[&str]) -> Spec {
            let a = self.cfg.alloc_dir.join(alloc);
            self.spec(
                &[
                    ("/alloc", a.join("alloc")),
                    ("/local", a.join(task).join("local")),
                    ("/secrets", a.join(task).join("secrets")),
                ],
                env,
            )
        }

        fn attach(&self, spec: &Spec) -> Result<Option<Nomad>, String> {
            let mut w = Workload::default();
            attach(&self.cfg, spec, &mut w).map(|()| w.nomad)
        }
    }

    #[test]
    fn the_signed_workload_identity_is_the_proof_and_the_env_is_ignored() {
        let l = Layout::new();
        l.task(ALLOC, "server", &token(claims("billing", ALLOC, "server")));
        // The job's env block says "payments": Nomad applies it after its own variables.
        let env = [
            "NOMAD_NAMESPACE=default",
            "NOMAD_JOB_NAME=payments",
            "NOMAD_TASK_NAME=server",
            &format!("NOMAD_ALLOC_ID={ALLOC}"),
        ];
        let n = l
            .attach(&l.nomad_spec(ALLOC, "server", &env))
            .unwrap()
            .unwrap();
        assert_eq!(
            n.job.as_deref(),
            Some("billing"),
            "from the token, not the env"
        );
        assert_eq!(n.namespace.as_deref(), Some("default"));
        assert_eq!(n.group.as_deref(), Some("api"), "from sub");
        assert_eq!(n.task.as_deref(), Some("server"));
        assert_eq!(n.alloc_id.as_deref(), Some(ALLOC));
        // The same env with trust_env: what the job author wrote (spoofable, opt-in only).
        let mut trusting = l.cfg.clone();
        trusting.jwks = None;
        trusting.trust_env = true;
        let mut w = Workload::default();
        attach(&trusting, &l.nomad_spec(ALLOC, "server", &env), &mut w).unwrap();
        assert_eq!(w.nomad.unwrap().job.as_deref(), Some("payments"));
        // Neither configured: no Nomad metadata at all.
        let mut w = Workload::default();
        attach(
            &NomadConfig::default(),
            &l.nomad_spec(ALLOC, "server", &env),
            &mut w,
        )
        .unwrap();
        assert!(w.nomad.is_none());
    }

    #[test]
    fn forged_foreign_and_misplaced_tokens_are_refused() {
        let l = Layout::new();
        let other = "0a0a0a0a-0000-4000-8000-000000000000";
        // Another task's token (a valid one) copied into this task's secrets.
        l.task(ALLOC, "server", &token(claims("payments", other, "server")));
        let e = l.attach(&l.nomad_spec(ALLOC, "server", &[])).unwrap_err();
        assert!(e.contains("is for allocation"), "{e}");
        l.task(ALLOC, "server", &token(claims("payments", ALLOC, "worker")));
        let e = l.attach(&l.nomad_spec(ALLOC, "server", &[])).unwrap_err();
        assert!(e.contains("task worker"), "{e}");
        // Signed by another key (same kid), or not signed at all.
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some(KID.into());
        let hs = jsonwebtoken::encode(
            &h,
            &claims("billing", ALLOC, "server"),
            &EncodingKey::from_secret(b"k"),
        )
        .unwrap();
        l.task(ALLOC, "server", &hs);
        let e = l.attach(&l.nomad_spec(ALLOC, "server", &[])).unwrap_err();
        assert!(e.contains("not a public-key algorithm"), "{e}");
        let good = token(claims("billing", ALLOC, "server"));
        let mut parts: Vec<&str> = good.split('.').collect();
        let forged_payload = base64::Engine::encode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            claims("payments", ALLOC, "server").to_string(),
        );
        parts[1] = &forged_payload;
        l.task(ALLOC, "server", &parts.join("."));
        assert!(l.attach(&l.nomad_spec(ALLOC, "server", &[])).is_err());
        // Expired, wrong audience, wrong issuer.
        let mut c = claims("billing", ALLOC, "server");
        c["exp"] = (now() - 3600).into();
        l.task(ALLOC, "server", &token(c));
        assert!(l.attach(&l.nomad_spec(ALLOC, "server", &[])).is_err());
        let mut c = claims("billing", ALLOC, "server");
        c["aud"] = serde_json::json!(["vault.io"]);
        l.task(ALLOC, "server", &token(c));
        assert!(l.attach(&l.nomad_spec(ALLOC, "server", &[])).is_err());
        l.task(ALLOC, "server", &good);
        let mut with_iss = l.cfg.clone();
        with_iss.issuer = Some("https://nomad.example".into());
        let mut w = Workload::default();
        assert!(attach(&with_iss, &l.nomad_spec(ALLOC, "server", &[]), &mut w).is_err());
        assert!(l
            .attach(&l.nomad_spec(ALLOC, "server", &[]))
            .unwrap()
            .is_some());

        // The token file is a symlink (to another task's token): refused, not followed.
        let victim = l.task(other, "db", &token(claims("payments", other, "db")));
        let secrets = l.cfg.alloc_dir.join(ALLOC).join("server/secrets");
        fs::remove_file(secrets.join("nomad_token")).unwrap();
        std::os::unix::fs::symlink(
            victim.join("db/secrets/nomad_token"),
            secrets.join("nomad_token"),
        )
        .unwrap();
        let e = l.attach(&l.nomad_spec(ALLOC, "server", &[])).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // No token file (identity without file = true): refused with the hint.
        fs::remove_file(secrets.join("nomad_token")).unwrap();
        let e = l.attach(&l.nomad_spec(ALLOC, "server", &[])).unwrap_err();
        assert!(e.contains("file = true"), "{e}");
    }

    #[test]
    fn only_nomads_own_mounts_lead_to_a_token() {
        let l = Layout::new();
        let other = "0a0a0a0a-0000-4000-8000-000000000000";
        let victim = l.task(other, "db", &token(claims("payments", other, "db")));
        l.task(ALLOC, "server", &token(claims("billing", ALLOC, "server")));
        let a = l.cfg.alloc_dir.join(ALLOC);
        // No /secrets mount, or one outside alloc_dir: not a Nomad task.
        assert_eq!(
            l.attach(&l.spec(&[("/alloc", a.join("alloc"))], &[]))
                .unwrap(),
            None
        );
        let elsewhere = l
            .dir
            .path()
            .join("x/alloc")
            .join(ALLOC)
            .join("server/secrets");
        assert_eq!(
            l.attach(&l.spec(&[("/secrets", elsewhere)], &[])).unwrap(),
            None
        );
        // `..` in the source, or a deeper path: not the layout.
        let dotted = l.cfg.alloc_dir.join(ALLOC).join("server/../server/secrets");
        assert_eq!(
            l.attach(&l.spec(&[("/secrets", dotted)], &[])).unwrap(),
            None
        );
        // A job that adds a second /secrets mount (another task's), or mounts another
        // allocation at /alloc: refused.
        let e = l
            .attach(&l.spec(
                &[
                    ("/secrets", a.join("server/secrets")),
                    ("/secrets", victim.join("db/secrets")),
                ],
                &[],
            ))
            .unwrap_err();
        assert!(e.contains("2 mounts at /secrets"), "{e}");
        let e = l
            .attach(&l.spec(
                &[
                    ("/alloc", victim.join("alloc")),
                    ("/secrets", a.join("server/secrets")),
                ],
                &[],
            ))
            .unwrap_err();
        assert!(e.contains("not the allocation directory"), "{e}");
        // A Kubernetes container never gets Nomad metadata.
        let mut w = Workload {
            k8s: Some(Default::default()),
            ..Default::default()
        };
        attach(&l.cfg, &l.nomad_spec(ALLOC, "server", &[]), &mut w).unwrap();
        assert!(w.nomad.is_none());
    }

    #[test]
    fn named_identities_and_groups() {
        let l = Layout::new();
        let mut cfg = l.cfg.clone();
        cfg.identity = "nhi".into();
        assert_eq!(cfg.token_file(), "nomad_nhi.jwt");
        assert_eq!(cfg.audience(), None);
        cfg.identity = "../x".into();
        assert!(cfg.validate().is_err());
        let both = NomadConfig {
            jwks: Some("/j".into()),
            trust_env: true,
            ..Default::default()
        };
        assert!(both.validate().is_err());
        assert_eq!(
            group_of(
                "global:default:web:api:server:default",
                "default",
                "web",
                "server",
                "default"
            ),
            Some("api")
        );
        assert_eq!(
            group_of(
                "eu:prod:batch/dispatch-1-abc:g:t:default",
                "prod",
                "batch",
                "t",
                "default"
            ),
            Some("g"),
            "dispatched job: the claim names the parent"
        );
        assert_eq!(
            group_of(
                "global:default:a:b:c:api:server:default",
                "default",
                "a:b",
                "server",
                "default"
            ),
            None,
            "ambiguous"
        );
        assert_eq!(
            group_of(
                "global:other:web:api:server:default",
                "default",
                "web",
                "server",
                "default"
            ),
            None
        );
    }

    #[test]
    fn env_metadata_needs_the_alloc_dir_nomad_mounts() {
        let spec = |env: &[&str], alloc: Option<&str>| -> Spec {
            let mounts: Vec<serde_json::Value> = alloc
                .map(|s| vec![serde_json::json!({"destination": "/alloc", "source": s})])
                .unwrap_or_default();
            serde_json::from_value(serde_json::json!({
                "ociVersion": "1.0.2",
                "process": {"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}, "env": env},
                "mounts": mounts,
            }))
            .unwrap()
        };
        let env = [
            "NOMAD_JOB_NAME=billing",
            "NOMAD_TASK_NAME=api",
            "NOMAD_NAMESPACE=",
            "NOMAD_ALLOC_ID=a1",
        ];
        let n = from_env(&spec(&env, Some("/var/lib/nomad/alloc/a1/alloc"))).unwrap();
        assert_eq!(n.job.as_deref(), Some("billing"));
        assert_eq!(n.namespace, None, "empty values count as absent");
        assert!(from_env(&spec(&env, None)).is_none());
        assert!(from_env(&spec(&env, Some("/var/lib/nomad/alloc/a2/alloc"))).is_none());
        let mut twice = env.to_vec();
        twice.push("NOMAD_JOB_NAME=payroll");
        assert!(from_env(&spec(&twice, Some("/var/lib/nomad/alloc/a1/alloc"))).is_none());
    }
}
