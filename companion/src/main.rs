use std::net::SocketAddr;

use clap::Parser;

/// nhi-companion: serves one workload's identity on loopback. Started by nhid, never by hand.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// HTTP API address inside the workload's network namespace.
    #[arg(long, default_value = nhi_core::config::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// Serve no HTTP API (only the SPIFFE Workload API and the edge proxy).
    #[arg(long)]
    no_http_api: bool,
    /// File descriptor of the socketpair to nhid, inherited at spawn.
    #[arg(long)]
    channel_fd: i32,
    /// File descriptor of the fd channel (Workload API sockets), inherited at spawn.
    #[arg(long)]
    fd_channel_fd: i32,
    /// The seccomp filter: "required" (refuse to start without it) or "if_available".
    #[arg(long, default_value = "required")]
    seccomp: nhi_core::config::Enforcement,
    /// Landlock: "required" or "if_available".
    #[arg(long, default_value = "required")]
    landlock: nhi_core::config::Enforcement,
    /// Most JWT-SVID audience sets kept cached.
    #[arg(long, default_value_t = 64)]
    max_cached_audiences: usize,
    /// SPIFFE Workload API (gRPC) address inside the workload's network namespace.
    #[arg(long, default_value = nhi_core::config::DEFAULT_WORKLOAD_API_LISTEN)]
    workload_api_listen: SocketAddr,
    /// File descriptor of the re-adoption socket nhid bound, inherited at spawn.
    #[arg(long)]
    adopt_fd: Option<i32>,
    /// Seconds to keep serving without nhid, waiting to be re-adopted, before exiting.
    #[arg(long, default_value_t = 600)]
    orphan_timeout_secs: u64,
}

fn main() {
    let a = Args::parse();
    let opts = nhi_companion::Options {
        listen: (!a.no_http_api).then_some(a.listen),
        channel_fd: a.channel_fd,
        fd_channel_fd: a.fd_channel_fd,
        max_cached_audiences: a.max_cached_audiences,
        workload_api_listen: a.workload_api_listen,
        seccomp: a.seccomp,
        landlock: a.landlock,
        adopt_fd: a.adopt_fd,
        orphan_timeout: std::time::Duration::from_secs(a.orphan_timeout_secs),
    };
    if let Err(e) = nhi_companion::run(opts) {
        nhi_companion::log!("nhi-companion: {e}");
        std::process::exit(1);
    }
}
