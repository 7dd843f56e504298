//! Container start through containerd with nhi vs without, in one run, interleaved:
//! - `ctr run --rm` of a busybox `/bin/true` (full lifecycle): `io.containerd.nhi.v2` vs the
//!   stock `io.containerd.runc.v2`;
//! - a Kubernetes pod start through CRI, as kubelet does it (RunPodSandbox, CreateContainer,
//!   StartContainer; teardown not timed): runtime handler `nhi` (companion started, identity
//!   from the service-account token) vs the default runc handler.
//!
//! Run as root: `cargo run --release -p nhi-bench --bin runtime-start -- --runs 40`

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use nhi_bench::{interleave, report};
use nhi_integration::kube::{kubelet_token, CriContainerd, PodSpec, PROJECTED};
use nhi_integration::*;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 40)]
    runs: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
}

fn main() {
    let args = Args::parse();
    let mut node = Node::new(
        r#"
[[rule]]
name = "k8s"
spiffe_id = "ns/{k8s.namespace}/sa/{k8s.service_account}"
[rule.match]
k8s_namespaces = ["bench"]
[[rule]]
name = "plain"
spiffe_id = "ctr/{container.id}"
"#,
    );
    node.with_kubelet_root();
    node.append_config(&format!(
        "[runtime]\nshim_bin_dir = \"{}\"",
        node.path("runtime-bin").display()
    ));
    node.start();
    let mut ctd = CriContainerd::new(&node);
    ctd.configure_nhi_handler();
    ctd.start(&node.rootfs);
    let rootfs = node.rootfs.display().to_string();

    let (plain, nhi) = interleave(args.runs, args.warmup, |with_nhi| {
        let id = unique_id(if with_nhi { "cn" } else { "cp" });
        let runtime = if with_nhi {
            "io.containerd.nhi.v2"
        } else {
            "io.containerd.runc.v2"
        };
        let t = Instant::now();
        let out = ctd.ctr(&[
            "run",
            "--rm",
            "--runtime",
            runtime,
            "--rootfs",
            &rootfs,
            &id,
            "/bin/true",
        ]);
        let d = t.elapsed();
        assert!(out.status.success(), "{runtime}: {out:?}");
        d
    });
    assert!(eventually(Duration::from_secs(5), || node
        .status()
        .workloads
        .is_empty()));

    let cri = ctd.client();
    let (pod_plain, pod_nhi) = interleave(args.runs, args.warmup, |with_nhi| {
        let uid = unique_id("uid");
        let tok = kubelet_token(&node, &uid, PROJECTED, "bench", "svc");
        let name = unique_id("p");
        let spec = PodSpec {
            name: &name,
            namespace: "bench",
            uid: &uid,
            annotations: HashMap::new(),
            runtime_handler: if with_nhi { "nhi" } else { "" },
        };
        let t = Instant::now();
        let pod = cri.run_pod(&spec).expect("RunPodSandbox");
        cri.start_container(&pod, &spec, "app", Some(&tok))
            .expect("start container");
        let d = t.elapsed();
        cri.stop_pod(&pod).unwrap();
        cri.remove_pod(&pod).unwrap();
        d
    });
    assert!(eventually(Duration::from_secs(10), || node
        .status()
        .workloads
        .is_empty()));

    report(
        "`ctr run --rm` busybox `/bin/true`: io.containerd.runc.v2 vs io.containerd.nhi.v2",
        "io.containerd.runc.v2",
        &plain,
        &nhi,
    );
    report(
        "CRI pod start (RunPodSandbox + CreateContainer + StartContainer): default handler vs `nhi`",
        "default runc handler",
        &pod_plain,
        &pod_nhi,
    );
}
