//! The Kubernetes service account of a container, from the token kubelet projects into it.
//!
//! The token file is read on the host at the mount's *source* (a kubelet-written path), never
//! through the container. Because a pod author can mount their own Secret at the token's usual
//! destination, a token is only believed when
//! - its host path lies under kubelet's projected volumes of *this* pod
//!   (`<kubelet_root>/pods/<pod uid>/volumes/kubernetes.io~projected/`), and
//! - its claims name the pod's namespace (CRI annotation) and the pod's uid (bound tokens only).
//!
//! The signature is not checked here (the cluster's signing keys are not on the node);
//! see docs/ARCHITECTURE.md for the residual risk.

use std::path::{Component, Path, PathBuf};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Where kubelet mounts the service-account token directory in every container.
pub const SA_MOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";

/// The host path of the token file among the spec's mounts, if any.
pub fn token_source(spec: &oci_spec::runtime::Spec) -> Option<PathBuf> {
    let mounts = spec.mounts().as_ref()?;
    mounts.iter().rev().find_map(|m| {
        let dest = m.destination();
        let src = m.source().as_ref()?;
        if dest == Path::new(SA_MOUNT_DIR)
            || dest == Path::new("/run/secrets/kubernetes.io/serviceaccount")
        {
            Some(src.join("token"))
        } else if *dest == Path::new(SA_MOUNT_DIR).join("token") {
            Some(src.clone())
        } else {
            None
        }
    })
}

/// Whether `path` is inside kubelet's projected volumes of pod `pod_uid` (lexically: no `..`).
pub fn is_kubelet_projected(path: &Path, kubelet_root: &Path, pod_uid: &str) -> bool {
    if path
        .components()
        .any(|c| matches!(c, Component::ParentDir | Component::CurDir))
        || pod_uid.is_empty()
    {
        return false;
    }
    let base = kubelet_root
        .join("pods")
        .join(pod_uid)
        .join("volumes")
        .join("kubernetes.io~projected");
    path.starts_with(&base) && path.components().count() > base.components().count() + 1
}

#[derive(Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
    pub pod_uid: Option<String>,
}

/// Reads namespace / service account / pod uid from a service-account JWT's claims.
pub fn parse_token(token: &str) -> Result<ServiceAccount, String> {
    let payload = token.trim().split('.').nth(1).ok_or("not a JWT")?;
    let bytes = URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .map_err(|e| format!("token payload: {e}"))?;
    let claims: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| format!("token claims: {e}"))?;
    let k = &claims["kubernetes.io"];
    if let (Some(ns), Some(name)) = (
        k["namespace"].as_str(),
        k["serviceaccount"]["name"].as_str(),
    ) {
        return Ok(ServiceAccount {
            namespace: ns.into(),
            name: name.into(),
            pod_uid: k["pod"]["uid"].as_str().map(Into::into),
        });
    }
    // Legacy secret-based tokens: sub = system:serviceaccount:<ns>:<name>.
    let sub = claims["sub"]
        .as_str()
        .ok_or("token has no service-account claims")?;
    let rest = sub
        .strip_prefix("system:serviceaccount:")
        .ok_or("token subject is not a service account")?;
    let (ns, name) = rest
        .split_once(':')
        .ok_or("malformed service-account subject")?;
    Ok(ServiceAccount {
        namespace: ns.into(),
        name: name.into(),
        pod_uid: None,
    })
}

/// The service account, if the token at `path` is believable for this pod (see module docs).
pub fn service_account(
    path: &Path,
    token: &str,
    kubelet_root: &Path,
    pod_namespace: &str,
    pod_uid: &str,
) -> Result<String, String> {
    if !is_kubelet_projected(path, kubelet_root, pod_uid) {
        return Err(format!(
            "token {} is not in kubelet's projected volumes of pod {pod_uid}",
            path.display()
        ));
    }
    let sa = parse_token(token)?;
    if sa.namespace != pod_namespace {
        return Err(format!(
            "token is for namespace {:?}, the pod is in {pod_namespace:?}",
            sa.namespace
        ));
    }
    // Only pod-bound tokens: a legacy (Secret-based) token can be projected into the same
    // volume by the pod author and names no pod at all.
    match &sa.pod_uid {
        Some(uid) if uid == pod_uid => Ok(sa.name),
        Some(uid) => Err(format!("token is bound to pod {uid}, not {pod_uid}")),
        None => Err("token is not bound to a pod (a legacy Secret-based token?); only kubelet's pod-bound tokens count".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: serde_json::Value) -> String {
        format!(
            "eyJhbGciOiJSUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }

    #[test]
    fn bound_and_legacy_tokens() {
        let t = jwt(
            serde_json::json!({"kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "web"}, "pod": {"uid": "u1"}}}),
        );
        assert_eq!(
            parse_token(&t).unwrap(),
            ServiceAccount {
                namespace: "prod".into(),
                name: "web".into(),
                pod_uid: Some("u1".into())
            }
        );
        let t = jwt(serde_json::json!({"sub": "system:serviceaccount:dev:builder"}));
        assert_eq!(parse_token(&t).unwrap().name, "builder");
        assert!(parse_token("nope").is_err());
        assert!(parse_token(&jwt(serde_json::json!({"sub": "alice"}))).is_err());
    }

    #[test]
    fn only_kubelet_projected_tokens_of_this_pod_count() {
        let root = Path::new("/var/lib/kubelet");
        let good = Path::new(
            "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/kube-api-access-x/token",
        );
        let t = jwt(
            serde_json::json!({"kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "web"}, "pod": {"uid": "u1"}}}),
        );
        assert_eq!(
            service_account(good, &t, root, "prod", "u1").unwrap(),
            "web"
        );
        let secret = Path::new("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~secret/mine/token");
        assert!(
            service_account(secret, &t, root, "prod", "u1").is_err(),
            "a user Secret is not the SA token"
        );
        let other_pod =
            Path::new("/var/lib/kubelet/pods/u2/volumes/kubernetes.io~projected/x/token");
        assert!(
            service_account(other_pod, &t, root, "prod", "u2").is_err(),
            "bound to u1"
        );
        let dotdot =
            Path::new("/var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/../../../u2/token");
        assert!(service_account(dotdot, &t, root, "prod", "u1").is_err());
        assert!(service_account(good, &t, root, "other-ns", "u1").is_err());
        assert!(service_account(good, &t, root, "prod", "").is_err());
        let legacy = jwt(serde_json::json!({"sub": "system:serviceaccount:prod:admin"}));
        let e = service_account(good, &legacy, root, "prod", "u1").unwrap_err();
        assert!(e.contains("not bound to a pod"), "{e}");
    }

    #[test]
    fn finds_the_token_mount() {
        let spec: oci_spec::runtime::Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","mounts":[{"destination":"/etc/hosts","source":"/h"},
            {"destination":"/var/run/secrets/kubernetes.io/serviceaccount","source":"/var/lib/kubelet/pods/u/volumes/kubernetes.io~projected/k","type":"bind"}]}"#,
        )
        .unwrap();
        assert_eq!(
            token_source(&spec).unwrap(),
            PathBuf::from("/var/lib/kubelet/pods/u/volumes/kubernetes.io~projected/k/token")
        );
    }
}
