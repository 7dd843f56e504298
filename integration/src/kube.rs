//! Kubernetes without a kubelet: a private containerd with its CRI plugin (bridge CNI on a
//! private bridge, `restrict_oom_score_adj` for this VM kind), busybox images imported as OCI
//! archives, and a CRI client (the `k8s-cri` crate over the unix socket) that makes the calls a
//! kubelet makes: RunPodSandbox, CreateContainer, StartContainer, ExecSync, StopPodSandbox,
//! RemovePodSandbox.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use sha2::{Digest, Sha256};

use crate::{bin_dir, eventually, which, Node};

pub const APP_IMAGE: &str = "docker.io/library/busybox:nhi-test";
pub const PAUSE_IMAGE: &str = "registry.k8s.io/pause:3.6";

/// Writes the token kubelet projects for a pod (under the node's kubelet root, see
/// [`Node::with_kubelet_root`]) in kubelet's atomic-writer layout (`token -> ..data/token`,
/// `..data -> ..<timestamp>`), and returns its directory, the host side of the
/// service-account mount. `volume_kind` is `kubernetes.io~projected` for a genuine one. The
/// token carries the claims of pod `pod_uid` in `ns` as `sa` and no valid signature (for
/// nodes that check only claims; see [`kubelet_token_of`] for a signed one).
pub fn kubelet_token(node: &Node, pod_uid: &str, volume_kind: &str, ns: &str, sa: &str) -> PathBuf {
    let claims = serde_json::json!({
        "iss": "https://kubernetes.default.svc", "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "sa-uid"}, "pod": {"name": "p", "uid": pod_uid}},
    });
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims.to_string());
    kubelet_token_of(
        node,
        pod_uid,
        volume_kind,
        &format!("eyJhbGciOiJSUzI1NiIsImtpZCI6IngifQ.{payload}.sig"),
    )
}

/// [`kubelet_token`] with the token itself given (e.g. signed by a test cluster's key).
pub fn kubelet_token_of(node: &Node, pod_uid: &str, volume_kind: &str, token: &str) -> PathBuf {
    let dir = node.path(&format!(
        "kubelet/pods/{pod_uid}/volumes/{volume_kind}/kube-api-access-1"
    ));
    let data = dir.join("..2026_01_01_00_00_00.000000001");
    fs::create_dir_all(&data).unwrap();
    fs::write(data.join("token"), token).unwrap();
    std::os::unix::fs::symlink(data.file_name().unwrap(), dir.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/token", dir.join("token")).unwrap();
    dir
}

/// A cluster's service-account signing key (ES256, as kube-apiserver can be configured) and
/// the projected tokens the API server would give kubelet.
pub struct ClusterKey {
    pub key: rcgen::KeyPair,
    pub kid: String,
}

impl ClusterKey {
    pub fn new(kid: &str) -> Self {
        ClusterKey {
            key: rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap(),
            kid: kid.into(),
        }
    }

    /// A token for `ns`/`sa`, bound to pod `pod_uid`, for `audience`, from `issuer`, valid 10 min.
    pub fn token(&self, ns: &str, sa: &str, pod_uid: &str, audience: &str, issuer: &str) -> String {
        let now = nhi_core::clock::now_unix();
        let claims = serde_json::json!({
            "iss": issuer,
            "sub": format!("system:serviceaccount:{ns}:{sa}"),
            "aud": [audience],
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "kubernetes.io": {
                "namespace": ns,
                "serviceaccount": {"name": sa, "uid": "7c1f0c1e-0000-4000-8000-000000000001"},
                "pod": {"name": format!("{sa}-0"), "uid": pod_uid},
            },
        });
        let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        h.kid = Some(self.kid.clone());
        let key = jsonwebtoken::EncodingKey::from_ec_der(&self.key.serialize_der());
        jsonwebtoken::encode(&h, &claims, &key).unwrap()
    }

    /// This key as a JWK (what the API server's `/openid/v1/jwks` lists).
    pub fn jwk(&self) -> serde_json::Value {
        let raw = self.key.public_key_raw();
        let b = |x: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(x);
        serde_json::json!({
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig",
            "kid": self.kid, "x": b(&raw[1..33]), "y": b(&raw[33..65]),
        })
    }
}

/// A pod as CRI shapes it on real runc: a sandbox (pause) container owning the network
/// namespace, app containers joining it with the service-account token mounted.
pub struct Pod {
    pub ns: String,
    pub name: String,
    pub uid: String,
}

impl Pod {
    pub fn new(ns: &str, name: &str) -> Self {
        Pod {
            ns: ns.into(),
            name: name.into(),
            uid: crate::unique_id("uid"),
        }
    }

    /// `b` with the CRI annotations of a `kind` (`sandbox`, `container`) container `container` of this pod.
    pub fn annotate<'n>(
        &self,
        b: crate::BundleBuilder<'n>,
        kind: &str,
        container: &str,
    ) -> crate::BundleBuilder<'n> {
        b.annotation("io.kubernetes.cri.container-type", kind)
            .annotation("io.kubernetes.cri.sandbox-namespace", &self.ns)
            .annotation("io.kubernetes.cri.sandbox-name", &self.name)
            .annotation("io.kubernetes.cri.sandbox-uid", &self.uid)
            .annotation("io.kubernetes.cri.container-name", container)
    }

    /// The pod's sandbox container (written, not started).
    pub fn sandbox(&self, node: &Node) -> crate::Container {
        self.annotate(node.bundle(&crate::unique_id("sandbox")), "sandbox", "POD")
            .write()
    }

    /// Starts the pod's sandbox and an app container `app` whose projected service-account
    /// token (in kubelet's layout under the node's kubelet root) is `token`. When the app does
    /// not start (e.g. nhid refused its attach), the sandbox is removed and the runtime's error
    /// returned.
    pub fn run_with_token(
        &self,
        node: &Node,
        token: &str,
    ) -> Result<(crate::Container, crate::Container), String> {
        let sandbox = self.sandbox(node);
        sandbox.start().unwrap();
        let app = self.app(
            node,
            &sandbox,
            "app",
            &kubelet_token_of(node, &self.uid, PROJECTED, token),
        );
        match app.start() {
            Ok(()) => Ok((sandbox, app)),
            Err(e) => {
                sandbox.delete();
                Err(e)
            }
        }
    }

    /// App container `name` in `sandbox`'s network namespace with `token` (a directory, the
    /// host side of the service-account mount) mounted (written, not started).
    pub fn app(
        &self,
        node: &Node,
        sandbox: &crate::Container,
        name: &str,
        token: &Path,
    ) -> crate::Container {
        self.annotate(node.bundle(&crate::unique_id(name)), "container", name)
            .join_netns(sandbox.pid())
            .mount("/var/run/secrets/kubernetes.io/serviceaccount", token)
            .write()
    }
}

pub const PROJECTED: &str = "kubernetes.io~projected";

/// A rule selecting pods of `team-*` namespaces by their service account.
pub const SA_RULE: &str = r#"
[[rule]]
name = "k8s"
spiffe_id = "ns/{k8s.namespace}/sa/{k8s.service_account}"
[rule.match]
k8s_namespaces = ["team-*"]
"#;

/// Builds an OCI image archive from `rootfs` with `cmd` as its command, named `name`.
pub fn oci_archive(rootfs: &Path, name: &str, cmd: &[&str], work: &Path) -> PathBuf {
    let layout = work.join(format!("layout-{}", sha_hex(name.as_bytes())));
    let blobs = layout.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    let layer_path = layout.join("layer.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(rootfs)
        .arg("-cf")
        .arg(&layer_path)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar rootfs");
    let layer = fs::read(&layer_path).unwrap();
    fs::remove_file(&layer_path).unwrap();
    let put = |data: &[u8]| -> (String, usize) {
        let d = sha_hex(data);
        fs::write(blobs.join(&d), data).unwrap();
        (format!("sha256:{d}"), data.len())
    };
    let (layer_digest, layer_size) = put(&layer);
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": cmd, "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
    });
    let (config_digest, config_size) = put(config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer_digest, "size": layer_size}],
    });
    let (manifest_digest, manifest_size) = put(manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": manifest_digest, "size": manifest_size,
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": name, "org.opencontainers.image.ref.name": name},
        }],
    });
    fs::write(layout.join("index.json"), index.to_string()).unwrap();
    fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let archive = work.join(format!("image-{}.tar", sha_hex(name.as_bytes())));
    let st = Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar layout");
    archive
}

fn sha_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A private containerd with CRI. Configure it (e.g. with `nhictl configure containerd`)
/// through [`CriContainerd::config`] before [`CriContainerd::start`].
pub struct CriContainerd {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub sock: PathBuf,
    bridge: String,
    net_name: String,
    child: Option<Child>,
    nhi_config: PathBuf,
    /// Put first on containerd's `PATH`, where it finds `containerd-shim-nhi-v2`: the
    /// workspace's build ([`bin_dir`]) unless a test points it elsewhere (e.g. `/usr/bin`).
    pub path_prefix: PathBuf,
}

impl CriContainerd {
    pub fn new(node: &Node) -> CriContainerd {
        assert!(
            which("containerd").is_some(),
            "containerd is not installed: run scripts/install-deps"
        );
        assert!(
            Path::new("/usr/lib/cni/bridge").exists(),
            "CNI plugins missing: run scripts/install-deps"
        );
        let dir = node.path("cri");
        let cni = dir.join("cni");
        fs::create_dir_all(&cni).unwrap();
        let n = std::process::id() % 1000 * 10
            + crate::unique_id("n")
                .rsplit('-')
                .next()
                .unwrap()
                .parse::<u32>()
                .unwrap()
                % 10;
        let bridge = format!("nhibr{n}");
        let net_name = format!("nhi-it-{n}");
        let subnet = format!("10.213.{}.0/24", n % 250);
        fs::write(
            cni.join("10-nhi-it.conflist"),
            serde_json::json!({
                "cniVersion": "0.4.0", "name": net_name,
                "plugins": [
                    {"type": "bridge", "bridge": bridge, "isGateway": false, "ipMasq": false,
                     "ipam": {"type": "host-local", "ranges": [[{"subnet": subnet}]], "dataDir": dir.join("ipam")}},
                    {"type": "loopback"},
                ],
            })
            .to_string(),
        )
        .unwrap();
        let sock = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        fs::write(
            &config,
            format!(
                r#"version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{s}"

[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  sandbox_image = "{PAUSE_IMAGE}"
  # Parallel instances must not fight over the default streaming port (10010).
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{c}"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
"#,
                d = dir.display(),
                s = sock.display(),
                c = cni.display()
            ),
        )
        .unwrap();
        CriContainerd {
            dir,
            config,
            sock,
            bridge,
            net_name,
            child: None,
            nhi_config: node.config.clone(),
            path_prefix: bin_dir(),
        }
    }

    /// Adds the `nhi` runtime handler to this containerd's config with `nhictl configure
    /// containerd`, as an operator would. Before [`CriContainerd::start`].
    pub fn configure_nhi_handler(&self) {
        let out = Command::new(crate::bin("nhictl"))
            .args(["configure", "containerd", "--file"])
            .arg(&self.config)
            .output()
            .expect("nhictl");
        assert!(out.status.success(), "nhictl configure containerd: {out:?}");
    }

    /// Starts containerd and imports the busybox app and pause images into `k8s.io`.
    pub fn start(&mut self, rootfs: &Path) {
        let log = fs::File::create(self.dir.join("containerd.log")).unwrap();
        let path = format!(
            "{}:{}",
            self.path_prefix.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        self.child = Some(
            Command::new("containerd")
                .arg("--config")
                .arg(&self.config)
                .env("PATH", path)
                .env("NHI_CONFIG", &self.nhi_config)
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .expect("start containerd"),
        );
        assert!(
            eventually(Duration::from_secs(30), || self
                .ctr(&["version"])
                .status
                .success()),
            "containerd did not come up: {}",
            self.log()
        );
        for (name, cmd) in [
            (APP_IMAGE, &["/bin/sh"][..]),
            (PAUSE_IMAGE, &["/bin/sleep", "2147483647"][..]),
        ] {
            let archive = oci_archive(rootfs, name, cmd, &self.dir);
            let out = self.ctr(&[
                "-n",
                "k8s.io",
                "images",
                "import",
                archive.to_str().unwrap(),
            ]);
            assert!(out.status.success(), "import {name}: {out:?}");
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    pub fn ctr(&self, args: &[&str]) -> std::process::Output {
        Command::new("ctr")
            .arg("-a")
            .arg(&self.sock)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("ctr")
    }

    /// A CRI client (blocking facade over the async gRPC client).
    pub fn client(&self) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path = self.sock.clone();
        let channel = rt
            .block_on(
                tonic::transport::Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_: tonic::transport::Uri| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    })),
            )
            .expect("connect CRI");
        Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        }
    }
}

impl Drop for CriContainerd {
    fn drop(&mut self) {
        if self.child.is_some() {
            let cri = self.client();
            if let Ok(pods) = cri.rt.block_on(
                cri.client
                    .clone()
                    .list_pod_sandbox(ListPodSandboxRequest::default()),
            ) {
                for p in pods.into_inner().items {
                    let _ = cri.stop_pod(&p.id);
                    let _ = cri.remove_pod(&p.id);
                }
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("pkill")
            .arg("-f")
            .arg(format!(
                "containerd-shim.* -address {}",
                self.sock.display()
            ))
            .status();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("state"))
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("umount")
            .arg("-R")
            .arg(self.dir.join("root"))
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .stderr(Stdio::null())
            .status();
        let _ = fs::remove_dir_all(format!("/var/lib/cni/results/{}", self.net_name));
    }
}

/// `f`, or `DeadlineExceeded` after `deadline`.
async fn within<T>(
    deadline: Duration,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(deadline, f)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("test deadline")))
}

pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<tonic::transport::Channel>,
}

/// A pod as the kubelet describes it.
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub namespace: &'a str,
    pub uid: &'a str,
    pub annotations: HashMap<String, String>,
    /// `""` for the default handler.
    pub runtime_handler: &'a str,
}

impl PodSpec<'_> {
    pub fn config(&self) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.into(),
                uid: self.uid.into(),
                namespace: self.namespace.into(),
                attempt: 0,
            }),
            hostname: self.name.into(),
            annotations: self.annotations.clone(),
            linux: Some(LinuxPodSandboxConfig::default()),
            ..Default::default()
        }
    }
}

impl Cri {
    fn call<T>(
        &self,
        f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, String> {
        self.rt
            .block_on(f)
            .map(|r| r.into_inner())
            .map_err(|s| format!("{}: {}", s.code(), s.message()))
    }

    pub fn run_pod(&self, pod: &PodSpec) -> Result<String, String> {
        let req = RunPodSandboxRequest {
            config: Some(pod.config()),
            runtime_handler: pod.runtime_handler.into(),
        };
        self.call(self.client.clone().run_pod_sandbox(req))
            .map(|r| r.pod_sandbox_id)
    }

    /// Creates and starts `name` running `sleep` in the pod, with the kubelet-style
    /// service-account mount from `token_dir`.
    pub fn start_container(
        &self,
        pod_id: &str,
        pod: &PodSpec,
        name: &str,
        token_dir: Option<&Path>,
    ) -> Result<String, String> {
        self.start_container_as(pod_id, pod, name, token_dir, None)
    }

    /// [`Cri::start_container`] with the pod spec's `securityContext.runAsUser` /
    /// `runAsGroup` (`run_as`).
    pub fn start_container_as(
        &self,
        pod_id: &str,
        pod: &PodSpec,
        name: &str,
        token_dir: Option<&Path>,
        run_as: Option<(i64, i64)>,
    ) -> Result<String, String> {
        let mounts: Vec<(&str, &Path)> = token_dir
            .map(|d| vec![("/var/run/secrets/kubernetes.io/serviceaccount", d)])
            .unwrap_or_default();
        self.create_and_start(pod_id, pod, name, &mounts, run_as, Duration::from_secs(120))
    }

    /// Creates and starts `name` running `sleep` in the pod with read-only bind `mounts`
    /// (container path, host path), as kubelet asks for volumes; each CRI call gives up after
    /// `deadline` (a runtime hook that blocks must fail the test, not hang it).
    pub fn start_container_with(
        &self,
        pod_id: &str,
        pod: &PodSpec,
        name: &str,
        mounts: &[(&str, &Path)],
        deadline: Duration,
    ) -> Result<String, String> {
        self.create_and_start(pod_id, pod, name, mounts, None, deadline)
    }

    fn create_and_start(
        &self,
        pod_id: &str,
        pod: &PodSpec,
        name: &str,
        mounts: &[(&str, &Path)],
        run_as: Option<(i64, i64)>,
        deadline: Duration,
    ) -> Result<String, String> {
        let mounts = mounts
            .iter()
            .map(|(c, h)| Mount {
                container_path: c.to_string(),
                host_path: h.display().to_string(),
                readonly: true,
                ..Default::default()
            })
            .collect();
        let req = CreateContainerRequest {
            pod_sandbox_id: pod_id.into(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: name.into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image: APP_IMAGE.into(),
                    ..Default::default()
                }),
                command: vec!["/bin/sleep".into(), "600".into()],
                envs: vec![KeyValue {
                    key: "PATH".into(),
                    value: "/bin".into(),
                }],
                mounts,
                linux: Some(LinuxContainerConfig {
                    security_context: run_as.map(|(uid, gid)| LinuxContainerSecurityContext {
                        run_as_user: Some(Int64Value { value: uid }),
                        run_as_group: Some(Int64Value { value: gid }),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            sandbox_config: Some(pod.config()),
        };
        let id = self
            .call(within(deadline, self.client.clone().create_container(req)))?
            .container_id;
        self.call(within(
            deadline,
            self.client.clone().start_container(StartContainerRequest {
                container_id: id.clone(),
            }),
        ))?;
        Ok(id)
    }

    /// `ExecSync`: stdout, stderr, exit code.
    pub fn exec(&self, container_id: &str, cmd: &[&str]) -> Result<(String, String, i32), String> {
        let req = ExecSyncRequest {
            container_id: container_id.into(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 20,
        };
        let r = self.call(self.client.clone().exec_sync(req))?;
        Ok((
            String::from_utf8_lossy(&r.stdout).into_owned(),
            String::from_utf8_lossy(&r.stderr).into_owned(),
            r.exit_code,
        ))
    }

    pub fn stop_pod(&self, id: &str) -> Result<(), String> {
        self.call(self.client.clone().stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }))
        .map(|_| ())
    }

    pub fn remove_pod(&self, id: &str) -> Result<(), String> {
        self.call(
            self.client
                .clone()
                .remove_pod_sandbox(RemovePodSandboxRequest {
                    pod_sandbox_id: id.into(),
                }),
        )
        .map(|_| ())
    }

    /// The host pid of a container's init (from `ContainerStatus` verbose info).
    pub fn container_pid(&self, id: &str) -> Option<i32> {
        let r = self
            .call(
                self.client
                    .clone()
                    .container_status(ContainerStatusRequest {
                        container_id: id.into(),
                        verbose: true,
                    }),
            )
            .ok()?;
        let info: serde_json::Value = serde_json::from_str(r.info.get("info")?).ok()?;
        info["pid"].as_i64().map(|p| p as i32)
    }
}
