//! The Kubernetes service account of a container, from the token kubelet projects into it.
//!
//! The token file is read on the host at the mount's *source* (a kubelet-written path), never
//! through the container. Because a pod author can mount their own Secret, or an emptyDir they
//! fill with links and FIFOs, at the token's usual destination, a token is only believed when
//! - its host path lies under kubelet's projected volumes of *this* pod
//!   (`<kubelet_root>/pods/<pod uid>/volumes/kubernetes.io~projected/`): checked on the path
//!   before anything is opened, then again on the path the kernel reports for the opened fd;
//! - it is reached beneath the kubelet root without following any symbolic link, except the two
//!   of kubelet's atomic-writer layout (`token -> ..data/token`, `..data -> ..<timestamp>`),
//!   which are read (never followed) and must have exactly that shape;
//! - it is a regular file of at most [`MAX_TOKEN_BYTES`] (a FIFO or device is refused without
//!   blocking: `nhi_core::untrusted_fs`), and
//! - its claims name the pod's namespace (CRI annotation) and the pod's uid (bound tokens only).
//!
//! The signature is not checked here (the cluster's signing keys are not on the node);
//! see docs/ARCHITECTURE.md for the residual risk.

use std::path::{Component, Path, PathBuf};

use crate::untrusted_fs::{read_beneath, read_link_beneath};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Where kubelet mounts the service-account token directory in every container.
pub const SA_MOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
pub const DEFAULT_KUBELET_ROOT: &str = "/var/lib/kubelet";
/// Largest token file read (kubelet's are about 1 KiB).
pub const MAX_TOKEN_BYTES: u64 = 64 * 1024;
/// kubelet's atomic writer: the visible files link into `..data/`, itself a link to the
/// current `..<timestamp>` directory.
const ATOMIC_DATA: &str = "..data";

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

/// Reads the token kubelet projected for pod `pod_uid`, at host path `token_path` (the mount
/// source from `config.json`, which the container's author chose), as the module docs say:
/// checked lexically before any open, resolved beneath `kubelet_root` without following links
/// (kubelet's atomic-writer links are read and checked instead), bounded, regular files only,
/// and checked again by the path of the opened fd. Errors name the path and the reason.
pub fn read_projected_token(
    kubelet_root: &Path,
    token_path: &Path,
    pod_uid: &str,
) -> Result<String, String> {
    let not_projected = |p: &Path| {
        format!(
            "token {} is not in kubelet's projected volumes of pod {pod_uid}",
            p.display()
        )
    };
    if !is_kubelet_projected(token_path, kubelet_root, pod_uid) {
        return Err(not_projected(token_path));
    }
    let rel = token_path
        .strip_prefix(kubelet_root)
        .map_err(|_| not_projected(token_path))?;
    // kubelet swaps `..data` to a new directory and removes the old one when it refreshes the
    // token: a read that loses that race finds nothing and tries once more.
    let mut attempt = 0;
    let (bytes, opened) = loop {
        let file = atomic_writer_file(kubelet_root, rel)?;
        match read_beneath(kubelet_root, &file, MAX_TOKEN_BYTES) {
            Ok(r) => break r,
            Err(crate::untrusted_fs::UntrustedReadError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::NotFound && attempt == 0 =>
            {
                attempt += 1;
            }
            Err(e) => return Err(format!("service-account token: {e}")),
        }
    };
    let root = std::fs::canonicalize(kubelet_root).unwrap_or_else(|_| kubelet_root.into());
    if !is_kubelet_projected(&opened, &root, pod_uid) {
        return Err(format!(
            "{} (opened as {})",
            not_projected(token_path),
            opened.display()
        ));
    }
    String::from_utf8(bytes).map_err(|_| format!("token {} is not UTF-8", token_path.display()))
}

/// The path (relative to the kubelet root) of the regular file behind `rel`: `rel` itself, or,
/// in kubelet's atomic-writer layout, `<dir>/..<timestamp>/<name>`. Any other link is refused.
fn atomic_writer_file(root: &Path, rel: &Path) -> Result<PathBuf, String> {
    let link = |rel: &Path| {
        read_link_beneath(root, rel, 256).map_err(|e| format!("service-account token: {e}"))
    };
    let Some(target) = link(rel)? else {
        return Ok(rel.to_path_buf());
    };
    let refuse = |what: &Path, target: &Path| {
        format!(
            "service-account token: {} is a symbolic link to {}, not kubelet's atomic-writer layout; links are never followed",
            root.join(what).display(),
            target.display()
        )
    };
    let (Some(name), Some(dir)) = (rel.file_name(), rel.parent()) else {
        return Err(refuse(rel, &target));
    };
    if target != Path::new(ATOMIC_DATA).join(name) {
        return Err(refuse(rel, &target));
    }
    let data = dir.join(ATOMIC_DATA);
    let Some(current) = link(&data)? else {
        return Err(refuse(rel, &target));
    };
    let mut parts = current.components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(c)), None)
            if c.to_str().is_some_and(|c| {
                c.starts_with("..") && c.len() > 2 && c != ATOMIC_DATA && !c.contains('/')
            }) =>
        {
            Ok(dir.join(c).join(name))
        }
        _ => Err(refuse(&data, &current)),
    }
}

/// The service account, if the token's claims are believable for this pod (see module docs;
/// the token must come from [`read_projected_token`]).
pub fn service_account(token: &str, pod_namespace: &str, pod_uid: &str) -> Result<String, String> {
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
    fn only_tokens_for_this_pod_count() {
        let t = jwt(
            serde_json::json!({"kubernetes.io": {"namespace": "prod", "serviceaccount": {"name": "web"}, "pod": {"uid": "u1"}}}),
        );
        assert_eq!(service_account(&t, "prod", "u1").unwrap(), "web");
        assert!(service_account(&t, "prod", "u2").is_err(), "bound to u1");
        assert!(service_account(&t, "other-ns", "u1").is_err());
        let legacy = jwt(serde_json::json!({"sub": "system:serviceaccount:prod:admin"}));
        let e = service_account(&legacy, "prod", "u1").unwrap_err();
        assert!(e.contains("not bound to a pod"), "{e}");
    }

    #[test]
    fn only_paths_in_kubelet_projected_volumes_of_this_pod_count() {
        let root = Path::new("/var/lib/kubelet");
        let good = Path::new(
            "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/kube-api-access-x/token",
        );
        assert!(is_kubelet_projected(good, root, "u1"));
        for (bad, uid) in [
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~secret/mine/token",
                "u1",
            ),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~empty-dir/sa/token",
                "u1",
            ),
            (
                "/var/lib/kubelet/pods/u2/volumes/kubernetes.io~projected/x/token",
                "u1",
            ),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/../../../u2/token",
                "u1",
            ),
            (
                "/var/lib/kubelet/pods/u1/volumes/kubernetes.io~projected/token",
                "u1",
            ),
            (
                "/elsewhere/pods/u1/volumes/kubernetes.io~projected/x/token",
                "u1",
            ),
        ] {
            assert!(!is_kubelet_projected(Path::new(bad), root, uid), "{bad}");
        }
        assert!(!is_kubelet_projected(good, root, ""));
    }

    /// A kubelet root with pod `u1`'s projected volume `v` in kubelet's atomic-writer layout.
    fn kubelet(token: &str) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let vol = d.path().join("pods/u1/volumes/kubernetes.io~projected/v");
        std::fs::create_dir_all(vol.join("..2026_01_02_03_04_05.1")).unwrap();
        std::fs::write(vol.join("..2026_01_02_03_04_05.1/token"), token).unwrap();
        symlink("..2026_01_02_03_04_05.1", vol.join("..data")).unwrap();
        symlink("..data/token", vol.join("token")).unwrap();
        (d, vol)
    }

    use std::os::unix::fs::symlink;

    #[test]
    fn reads_kubelets_atomic_writer_layout_and_plain_files() {
        let (d, vol) = kubelet("tok-1");
        assert_eq!(
            read_projected_token(d.path(), &vol.join("token"), "u1").unwrap(),
            "tok-1"
        );
        // A file mounted directly (no atomic writer) is fine too.
        std::fs::write(vol.join("plain"), "tok-2").unwrap();
        assert_eq!(
            read_projected_token(d.path(), &vol.join("plain"), "u1").unwrap(),
            "tok-2"
        );
        // Another pod's uid never reads it.
        let e = read_projected_token(d.path(), &vol.join("token"), "u2").unwrap_err();
        assert!(
            e.contains("not in kubelet's projected volumes of pod u2"),
            "{e}"
        );
    }

    #[test]
    fn planted_links_fifos_and_big_files_are_refused_without_following_or_blocking() {
        let outside = tempfile::tempdir().unwrap();
        let host_file = outside.path().join("shadow");
        std::fs::write(&host_file, "root:secret").unwrap();
        let (d, vol) = kubelet("tok");
        let started = std::time::Instant::now();
        // `token` straight to a host file.
        std::fs::remove_file(vol.join("token")).unwrap();
        symlink(&host_file, vol.join("token")).unwrap();
        let e = read_projected_token(d.path(), &vol.join("token"), "u1").unwrap_err();
        assert!(
            e.contains("symbolic link") && e.contains("never followed"),
            "{e}"
        );
        // The atomic-writer shape, but `..data` pointing out of the volume.
        std::fs::remove_file(vol.join("token")).unwrap();
        symlink("..data/token", vol.join("token")).unwrap();
        std::fs::remove_file(vol.join("..data")).unwrap();
        symlink(outside.path(), vol.join("..data")).unwrap();
        let e = read_projected_token(d.path(), &vol.join("token"), "u1").unwrap_err();
        assert!(e.contains("..data") && e.contains("never followed"), "{e}");
        std::fs::remove_file(vol.join("..data")).unwrap();
        symlink("../../../../../../..", vol.join("..data")).unwrap();
        assert!(read_projected_token(d.path(), &vol.join("token"), "u1").is_err());
        // A directory component that is a link.
        let vol2 = d.path().join("pods/u1/volumes/kubernetes.io~projected/w");
        symlink(outside.path(), &vol2).unwrap();
        let e = read_projected_token(d.path(), &vol2.join("shadow"), "u1").unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        // A FIFO: refused at once, not waited on.
        let fifo_vol = d.path().join("pods/u1/volumes/kubernetes.io~projected/f");
        std::fs::create_dir_all(&fifo_vol).unwrap();
        let c =
            std::ffi::CString::new(fifo_vol.join("token").as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = read_projected_token(d.path(), &fifo_vol.join("token"), "u1").unwrap_err();
        assert!(e.contains("FIFO"), "{e}");
        // Too big: refused by size, never read whole.
        let big = fifo_vol.join("big");
        std::fs::File::create(&big)
            .unwrap()
            .set_len(100 << 20)
            .unwrap();
        let e = read_projected_token(d.path(), &big, "u1").unwrap_err();
        assert!(e.contains("more than the 65536 bytes allowed"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        // An emptyDir the pod fills: refused before anything is opened.
        let e = read_projected_token(
            d.path(),
            &d.path()
                .join("pods/u1/volumes/kubernetes.io~empty-dir/sa/token"),
            "u1",
        )
        .unwrap_err();
        assert!(e.contains("not in kubelet's projected volumes"), "{e}");
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
