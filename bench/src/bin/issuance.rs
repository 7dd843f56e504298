//! What OpenBao-side X.509-SVID issuance (issue 17) costs a workload, against local signing in
//! the same run. Each sample is a workload's first `GET /v1/x509` (its companion asks nhid,
//! which issues), timed from inside the workload's network namespace on a container made for
//! that sample (its creation is not timed). Four series, interleaved round by round:
//!
//! 0. **local**: the embedded issuer signs in nhid (today's single-node path, the baseline);
//! 1. **openbao node**: a plain container in cluster mode: OpenBao signs the CSR with the
//!    node's own token under the node-scoped role (one round trip);
//! 2. **openbao pod, attach**: a pod of a service account nhid has not seen: a JWT login with
//!    the pod's projected token, then the signing with the pod's OpenBao token (two round
//!    trips): the cost at attach;
//! 3. **openbao pod, renewal**: a pod of a service account whose OpenBao token nhid holds:
//!    signing only, what every renewal (at half an SVID's life) costs.
//!
//! Run as root: `cargo run --release -p nhi-bench --bin issuance -- --runs 100`

use std::time::{Duration, Instant};

use clap::Parser;
use nhi_bench::{compare, interleave_n, ms, row, summarize, HEADER};
use nhi_integration::bao::{setup_workload_issuance, BaoDev, NhiRoleOptions};
use nhi_integration::edge::{container_ns, in_netns};
use nhi_integration::kube::{ClusterKey, Pod, SA_RULE};
use nhi_integration::*;

const SA_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "nhi";

#[derive(Parser)]
struct Args {
    /// Samples per series.
    #[arg(long, default_value_t = 100)]
    runs: usize,
    /// Warm-up rounds, not counted.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
}

/// The first `GET /v1/x509` of container `c`: how long it took.
fn first_x509(c: &Container) -> Duration {
    let ns = container_ns(c.pid());
    in_netns(&ns, || {
        let t = Instant::now();
        match companion_request("GET", "/v1/x509", "") {
            Ok((200, _)) => t.elapsed(),
            other => panic!("X.509-SVID not issued: {other:?}"),
        }
    })
}

fn main() {
    let args = Args::parse();
    let mut local = Node::new(ANNOTATED_RULE);
    local.start();

    let dev = BaoDev::start();
    let setup = dev.setup_nhi(TRUST_DOMAIN, &NhiRoleOptions::default());
    let cluster = ClusterKey::new("bench-key");
    setup_workload_issuance(
        &dev.root(),
        TRUST_DOMAIN,
        SA_ISSUER,
        &cluster.key.public_key_pem(),
        AUDIENCE,
    );
    let node_rule = r#"
[[rule]]
name = "plain"
spiffe_id = "node/{node.name}/container/{container.name}"
[rule.match]
annotations = { "nhi.dev/inject" = "true" }
"#;
    let mut bao = Node::with_config(
        &format!("{SA_RULE}{node_rule}"),
        &format!(
            "node_name = \"bench\"\n[issuer]\nkind = \"openbao\"\n[openbao]\naddresses = [\"{}\"]\nrequest_timeout = \"2s\"\n{}",
            dev.addr,
            setup.node("bench").auth_toml()
        ),
    );
    bao.with_kubelet_root();
    bao.start();

    // A pod of service account `sa`, its first X.509-SVID timed.
    let pod_sample = |sa: &str| -> Duration {
        let pod = Pod::new("team-bench", &unique_id("p"));
        let token = cluster.token(&pod.ns, sa, &pod.uid, AUDIENCE, SA_ISSUER);
        let (sandbox, app) = pod.run_with_token(&bao, &token).unwrap();
        let d = first_x509(&app);
        app.delete();
        sandbox.delete();
        d
    };
    let mut fresh_sa = 0;
    let series = interleave_n(args.runs, args.warmup, 4, |s| match s {
        0 => {
            let c = local.named_container(&unique_id("l"));
            let d = first_x509(&c);
            c.delete();
            d
        }
        1 => {
            let c = bao.named_container(&unique_id("b"));
            let d = first_x509(&c);
            c.delete();
            d
        }
        2 => {
            fresh_sa += 1;
            pod_sample(&format!("sa-{fresh_sa}"))
        }
        _ => pod_sample("steady"),
    });
    let names = [
        "local signing (embedded)",
        "openbao, node-scoped",
        "openbao, pod at attach (login + sign)",
        "openbao, pod at renewal (sign)",
    ];
    println!(
        "## First X.509-SVID of a workload ({} runs each, interleaved)\n",
        args.runs
    );
    println!("{HEADER}");
    for (name, s) in names.iter().zip(&series) {
        println!("{}", row(name, &summarize(s)));
    }
    println!();
    for i in 1..4 {
        compare(names[i], (names[0], &series[0]), (names[i], &series[i]));
    }
    let base = summarize(&series[0]);
    for (i, name) in names.iter().enumerate().skip(1) {
        let s = summarize(&series[i]);
        println!(
            "{name}: +{:.2} ms p50 over local signing",
            ms(s.p50) - ms(base.p50)
        );
    }
}
