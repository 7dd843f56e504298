//! Container start through containerd with nhi vs without, in one run, interleaved:
//! - `ctr run --rm` of a busybox `/bin/true` (full lifecycle): `io.containerd.nhi.v2` vs the
//!   stock `io.containerd.runc.v2`;
//! - a Kubernetes pod start through CRI, as kubelet does it (RunPodSandbox, CreateContainer,
//!   StartContainer; teardown not timed): runtime handler `nhi` (companion started, identity
//!   from the service-account token) vs the default runc handler.
//!
//! Run as root: `cargo run --release -p nhi-bench --bin runtime-start -- --runs 40`

use std::collections::HashMap;
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use clap::Parser;
use nhi_bench::{ms, row, summarize, HEADER};
use nhi_integration::kube::{CriContainerd, PodSpec};
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
    let kubelet = node.path("kubelet");
    let cfg = fs::read_to_string(&node.config).unwrap();
    fs::write(
        &node.config,
        format!(
            "{cfg}\n[kubernetes]\nkubelet_root = \"{}\"\n[runtime]\nshim_bin_dir = \"{}\"\n",
            kubelet.display(),
            node.path("runtime-bin").display()
        ),
    )
    .unwrap();
    node.start();
    let mut ctd = CriContainerd::new(&node);
    let out = Command::new(bin("nhictl"))
        .args([
            "configure",
            "containerd",
            "--file",
            ctd.config.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    ctd.start(&node.rootfs);
    let rootfs = node.rootfs.display().to_string();

    // ctr run --rm
    let (mut plain, mut nhi) = (Vec::new(), Vec::new());
    for i in 0..args.warmup + args.runs {
        let order = if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_nhi in order {
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
            if i >= args.warmup {
                if with_nhi {
                    nhi.push(d)
                } else {
                    plain.push(d)
                }
            }
        }
    }
    assert!(eventually(Duration::from_secs(5), || node
        .status()
        .workloads
        .is_empty()));

    // CRI pod start
    let cri = ctd.client();
    let (mut pod_plain, mut pod_nhi) = (Vec::new(), Vec::new());
    for i in 0..args.warmup + args.runs {
        let order = if i % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_nhi in order {
            let uid = unique_id("uid");
            let tok = node.path(&format!(
                "kubelet/pods/{uid}/volumes/kubernetes.io~projected/kube-api-access-b"
            ));
            fs::create_dir_all(&tok).unwrap();
            let claims = serde_json::json!({"kubernetes.io": {"namespace": "bench", "serviceaccount": {"name": "svc"}, "pod": {"uid": uid}}});
            fs::write(
                tok.join("token"),
                format!("e30.{}.s", URL_SAFE_NO_PAD.encode(claims.to_string())),
            )
            .unwrap();
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
            if i >= args.warmup {
                if with_nhi {
                    pod_nhi.push(d)
                } else {
                    pod_plain.push(d)
                }
            }
        }
    }
    assert!(eventually(Duration::from_secs(10), || node
        .status()
        .workloads
        .is_empty()));

    let report = |title: &str, base: &str, a: &[Duration], b: &[Duration]| {
        let (sa, sb) = (summarize(a), summarize(b));
        println!("## {title} ({} runs each, interleaved)\n", args.runs);
        println!("{HEADER}");
        println!("{}", row(base, &sa));
        println!("{}", row("with nhi", &sb));
        println!(
            "\nratio nhi/plain: p50 {:.2}x, p99 {:.2}x; added p50 {:+.2} ms\n",
            ms(sb.p50) / ms(sa.p50),
            ms(sb.p99) / ms(sa.p99),
            ms(sb.p50) - ms(sa.p50)
        );
    };
    report(
        "`ctr run --rm` busybox `/bin/true`: io.containerd.runc.v2 vs io.containerd.nhi.v2",
        "io.containerd.runc.v2",
        &plain,
        &nhi,
    );
    report("CRI pod start (RunPodSandbox + CreateContainer + StartContainer): default handler vs `nhi`", "default runc handler", &pod_plain, &pod_nhi);
}
