//! Workload metadata, as the container runtime observed it: the OCI state (container id, pid)
//! and the bundle's `config.json` annotations written by CRI / the orchestrator. Nomad metadata
//! comes from the task's signed workload identity (`crate::nomad`). Nothing here comes from the
//! workload itself.

use std::collections::BTreeMap;

use oci_spec::runtime::{LinuxNamespaceType, Spec, State};
use serde::{Deserialize, Serialize};

/// Annotation prefix operators use to steer nhi (opt in/out, pick a rule).
pub const NHI_ANNOTATION_PREFIX: &str = "nhi.dev/";
/// `nhi.dev/inject`: `"true"` opts a container in where a rule asks for it, `"false"` opts out.
pub const INJECT_ANNOTATION: &str = "nhi.dev/inject";
/// `nhi.dev/rule`: restrict selection to the rule of this name.
pub const RULE_ANNOTATION: &str = "nhi.dev/rule";

pub mod cri {
    pub const CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
    pub const SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    pub const SANDBOX_UID: &str = "io.kubernetes.cri.sandbox-uid";
    pub const CONTAINER_NAME: &str = "io.kubernetes.cri.container-name";
    pub const IMAGE_NAME: &str = "io.kubernetes.cri.image-name";
}

/// Annotations other runtimes use for a container's human name and image, in order of trust.
const NAME_ANNOTATIONS: &[&str] = &[
    cri::CONTAINER_NAME,
    "nerdctl/name",
    "io.podman.annotations.name",
];
const IMAGE_ANNOTATIONS: &[&str] = &[
    cri::IMAGE_NAME,
    "io.containerd.image.name",
    "org.opencontainers.image.ref.name",
    "nerdctl/image",
];

/// Kubernetes metadata from CRI annotations (and, from issue 3 on, the projected SA token).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct K8s {
    pub namespace: Option<String>,
    pub pod: Option<String>,
    pub pod_uid: Option<String>,
    pub container: Option<String>,
    pub container_type: Option<String>,
    pub sandbox_id: Option<String>,
    pub service_account: Option<String>,
    /// Host path of the kubelet-projected service-account token the hook read (only for a rule
    /// whose identity names the service account). In cluster mode nhid re-reads it, beneath
    /// kubelet's root, whenever OpenBao must see the pod's proof (issue 17).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_path: Option<std::path::PathBuf>,
}

/// Nomad metadata, from the task's signed workload identity (`crate::nomad`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nomad {
    pub namespace: Option<String>,
    pub job: Option<String>,
    pub group: Option<String>,
    pub task: Option<String>,
    pub alloc_id: Option<String>,
}

/// The uid and gid a container's process runs as, as the host sees them: the OCI spec's
/// `process.user`, mapped through the container's user namespace when it has one. Files and
/// sockets `nhid` puts in the container's `/run/nhi` belong to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostUser {
    pub uid: u32,
    pub gid: u32,
}

/// Where a workload comes from, for rules limited to some sources (`sources = [...]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A Kubernetes pod's container (CRI annotations).
    Kubernetes,
    /// A Nomad task (the Nomad client's environment and allocation directory).
    Nomad,
    /// Any other container (runc, containerd, Docker, Podman, ...).
    Container,
}

impl Source {
    pub const ALL: [Source; 3] = [Source::Kubernetes, Source::Nomad, Source::Container];

    pub fn name(self) -> &'static str {
        match self {
            Source::Kubernetes => "kubernetes",
            Source::Nomad => "nomad",
            Source::Container => "container",
        }
    }
}

/// Everything nhi knows about a container when it decides on an identity.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    pub container_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub k8s: Option<K8s>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nomad: Option<Nomad>,
    /// Only `nhi.dev/*` annotations: everything else stays out of nhi's records.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Who the container's process runs as on the host (`None`: the spec has no `process`,
    /// or its uid/gid has no mapping in the container's user namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<HostUser>,
    /// The node nhid runs on (`node_name`), set by nhid itself: never taken from the hook or
    /// the container. For node-scoped identities (`node/{node.name}/...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// Variables an identity template may use.
pub const TEMPLATE_VARS: &[&str] = &[
    "container.id",
    "container.name",
    "k8s.namespace",
    "k8s.pod",
    "k8s.pod_uid",
    "k8s.container",
    "k8s.service_account",
    "nomad.namespace",
    "nomad.job",
    "nomad.group",
    "nomad.task",
    "nomad.alloc_id",
    "node.name",
];

/// How the container relates to the network namespaces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NetnsMode {
    /// `config.json` asks for no network namespace: the container shares the host's.
    Host,
    /// A fresh network namespace created for this container.
    New,
    /// Joins an existing namespace at this path (e.g. a pod's sandbox).
    Join(String),
}

impl Workload {
    /// Extracts the metadata from the runtime's state and the bundle's spec.
    pub fn from_oci(state: &State, spec: &Spec) -> Self {
        let mut ann: BTreeMap<&str, &str> = BTreeMap::new();
        // State annotations come from the same config.json; the spec wins on conflict.
        if let Some(a) = state.annotations() {
            ann.extend(a.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        if let Some(a) = spec.annotations() {
            ann.extend(a.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        }
        let get = |k: &str| ann.get(k).map(|v| v.to_string()).filter(|v| !v.is_empty());
        let first = |keys: &[&str]| keys.iter().find_map(|k| get(k));

        let k8s =
            if ann.contains_key(cri::SANDBOX_NAMESPACE) || ann.contains_key(cri::CONTAINER_TYPE) {
                Some(K8s {
                    namespace: get(cri::SANDBOX_NAMESPACE),
                    pod: get(cri::SANDBOX_NAME),
                    pod_uid: get(cri::SANDBOX_UID),
                    container: get(cri::CONTAINER_NAME),
                    container_type: get(cri::CONTAINER_TYPE),
                    sandbox_id: get(cri::SANDBOX_ID),
                    service_account: None,
                    token_path: None,
                })
            } else {
                None
            };

        Workload {
            container_id: state.id().to_string(),
            container_name: first(NAME_ANNOTATIONS),
            image: first(IMAGE_ANNOTATIONS),
            k8s,
            // Filled by `crate::nomad::attach` from what proves it (the signed workload
            // identity), never from the spec alone.
            nomad: None,
            annotations: ann
                .iter()
                .filter(|(k, _)| k.starts_with(NHI_ANNOTATION_PREFIX))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            user: host_user_of(spec),
            node: None,
        }
    }

    /// Which kind of orchestrator (if any) created the workload.
    pub fn source(&self) -> Source {
        if self.k8s.is_some() {
            Source::Kubernetes
        } else if self.nomad.is_some() {
            Source::Nomad
        } else {
            Source::Container
        }
    }

    /// The value of a template variable, if the workload has it.
    pub fn var(&self, name: &str) -> Option<&str> {
        let k = self.k8s.as_ref();
        let n = self.nomad.as_ref();
        let v = match name {
            "container.id" => Some(&self.container_id),
            "container.name" => return Some(self.name()),
            "k8s.namespace" => k.and_then(|k| k.namespace.as_ref()),
            "k8s.pod" => k.and_then(|k| k.pod.as_ref()),
            "k8s.pod_uid" => k.and_then(|k| k.pod_uid.as_ref()),
            "k8s.container" => k.and_then(|k| k.container.as_ref()),
            "k8s.service_account" => k.and_then(|k| k.service_account.as_ref()),
            "nomad.namespace" => n.and_then(|n| n.namespace.as_ref()),
            "nomad.job" => n.and_then(|n| n.job.as_ref()),
            "nomad.group" => n.and_then(|n| n.group.as_ref()),
            "nomad.task" => n.and_then(|n| n.task.as_ref()),
            "nomad.alloc_id" => n.and_then(|n| n.alloc_id.as_ref()),
            "node.name" => self.node.as_ref(),
            _ => None,
        };
        v.map(String::as_str)
    }

    /// A CRI pod sandbox (pause) container: it holds the pod's network namespace.
    pub fn is_k8s_sandbox(&self) -> bool {
        self.k8s
            .as_ref()
            .is_some_and(|k| k.container_type.as_deref() == Some("sandbox"))
    }

    /// Human name: the orchestrator's container name, else the container id.
    pub fn name(&self) -> &str {
        self.container_name.as_deref().unwrap_or(&self.container_id)
    }

    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// The host uid/gid of the spec's `process.user`: unchanged without a user namespace, mapped
/// through `linux.uidMappings` / `gidMappings` with one. `None` when there is no `process` or an
/// id has no mapping (then nothing in `/run/nhi` can be given to it).
fn host_user_of(spec: &Spec) -> Option<HostUser> {
    let user = spec.process().as_ref()?.user();
    let linux = spec.linux().as_ref();
    let userns = linux
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|nss| nss.iter().any(|n| n.typ() == LinuxNamespaceType::User));
    if !userns {
        return Some(HostUser {
            uid: user.uid(),
            gid: user.gid(),
        });
    }
    let map = |id: u32, maps: Option<&Vec<oci_spec::runtime::LinuxIdMapping>>| {
        maps?.iter().find_map(|m| {
            let offset = id.checked_sub(m.container_id())?;
            (offset < m.size()).then(|| m.host_id().checked_add(offset))?
        })
    };
    Some(HostUser {
        uid: map(user.uid(), linux.and_then(|l| l.uid_mappings().as_ref()))?,
        gid: map(user.gid(), linux.and_then(|l| l.gid_mappings().as_ref()))?,
    })
}

/// Reads the network namespace the spec asks for.
pub fn netns_of(spec: &Spec) -> NetnsMode {
    let ns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .and_then(|nss| nss.iter().find(|n| n.typ() == LinuxNamespaceType::Network));
    match ns {
        None => NetnsMode::Host,
        Some(n) => match n.path() {
            Some(p) if !p.as_os_str().is_empty() => NetnsMode::Join(p.display().to_string()),
            _ => NetnsMode::New,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(state: &str, spec: &str) -> (State, Spec) {
        (
            serde_json::from_str(state).unwrap(),
            serde_json::from_str(spec).unwrap(),
        )
    }

    #[test]
    fn extracts_cri_and_nomad_metadata() {
        let (state, spec) = parse(
            r#"{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":42,"bundle":"/b"}"#,
            r#"{"ociVersion":"1.0.2",
                "process":{"cwd":"/","args":["sh"],"user":{"uid":0,"gid":0},"env":["PATH=/bin","SECRET=hunter2"]},
                "annotations":{"io.kubernetes.cri.sandbox-namespace":"prod","io.kubernetes.cri.sandbox-name":"web-0",
                  "io.kubernetes.cri.container-name":"app","io.kubernetes.cri.container-type":"container",
                  "io.kubernetes.cri.image-name":"busybox:1","nhi.dev/inject":"true","other":"x"},
                "linux":{"namespaces":[{"type":"pid"},{"type":"network"}]}}"#,
        );
        let w = Workload::from_oci(&state, &spec);
        assert_eq!(w.container_id, "c1");
        assert_eq!(w.name(), "app");
        assert_eq!(w.image.as_deref(), Some("busybox:1"));
        assert_eq!(w.var("k8s.namespace"), Some("prod"));
        assert_eq!(w.var("k8s.pod"), Some("web-0"));
        assert_eq!(
            w.annotations.len(),
            1,
            "only nhi.dev/* annotations are kept"
        );
        // The rest of the environment never enters the workload record.
        assert!(!serde_json::to_string(&w).unwrap().contains("hunter2"));
        assert_eq!(netns_of(&spec), NetnsMode::New);
        assert_eq!(w.user, Some(HostUser { uid: 0, gid: 0 }));
        assert_eq!(w.source(), Source::Kubernetes);
    }

    #[test]
    fn process_user_is_mapped_through_the_user_namespace() {
        let spec = |ns: &str, maps: &str| -> Spec {
            serde_json::from_str(&format!(
                r#"{{"ociVersion":"1.0.2","process":{{"cwd":"/","args":["sh"],"user":{{"uid":1000,"gid":1001}}}},
                    "linux":{{"namespaces":[{ns}]{maps}}}}}"#
            ))
            .unwrap()
        };
        let (state, _) = parse(
            r#"{"ociVersion":"1.0.2","id":"u","status":"creating","pid":1,"bundle":"/b"}"#,
            r#"{"ociVersion":"1.0.2"}"#,
        );
        let w = Workload::from_oci(&state, &spec(r#"{"type":"network"}"#, ""));
        assert_eq!(
            w.user,
            Some(HostUser {
                uid: 1000,
                gid: 1001
            })
        );
        assert_eq!(w.source(), Source::Container);
        let maps = r#","uidMappings":[{"containerID":0,"hostID":200000,"size":65536}],"gidMappings":[{"containerID":1000,"hostID":300000,"size":10}]"#;
        let w = Workload::from_oci(&state, &spec(r#"{"type":"network"},{"type":"user"}"#, maps));
        assert_eq!(
            w.user,
            Some(HostUser {
                uid: 201000,
                gid: 300001
            })
        );
        // An id outside every mapping has no host id: nothing is handed to it.
        let short = r#","uidMappings":[{"containerID":0,"hostID":200000,"size":1000}],"gidMappings":[{"containerID":1000,"hostID":300000,"size":10}]"#;
        let w = Workload::from_oci(&state, &spec(r#"{"type":"user"}"#, short));
        assert_eq!(w.user, None);
    }

    #[test]
    fn plain_container_and_host_netns() {
        let (state, spec) = parse(
            r#"{"ociVersion":"1.0.2","id":"plain","status":"creating","pid":1,"bundle":"/b"}"#,
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#,
        );
        let w = Workload::from_oci(&state, &spec);
        assert_eq!(w.name(), "plain");
        assert!(w.k8s.is_none() && w.nomad.is_none());
        assert_eq!(netns_of(&spec), NetnsMode::Host);
        let spec: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"network","path":"/proc/7/ns/net"}]}}"#,
        )
        .unwrap();
        assert_eq!(netns_of(&spec), NetnsMode::Join("/proc/7/ns/net".into()));
    }
}
