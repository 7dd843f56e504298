//! nhi-companion: one per workload network namespace. Serves its workload's identity on
//! loopback, from a cache refreshed at half-life through the socketpair to `nhid`.

pub mod audit;
pub mod aws;
pub mod cache;
pub mod channel;
pub mod edge;
pub mod h2fix;
pub mod harden;
pub mod http;
pub mod limits;
pub mod listeners;
pub mod log;
pub mod workload_api;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nhi_core::config::CompanionLimits;

pub struct Options {
    /// The HTTP API's address; `None`: no HTTP API (`companion.http_api = false`).
    pub listen: Option<SocketAddr>,
    pub channel_fd: RawFd,
    /// The fd channel: Workload API unix sockets handed over while it runs.
    pub fd_channel_fd: RawFd,
    pub max_cached_audiences: usize,
    /// SPIFFE Workload API (gRPC) TCP address inside the workload's network namespace.
    pub workload_api_listen: SocketAddr,
    pub seccomp: nhi_core::config::Enforcement,
    pub landlock: nhi_core::config::Enforcement,
    /// The re-adoption socket nhid bound (unlistened) in its root-only state directory,
    /// inherited at spawn: a restarted nhid connects to it (see [`channel`]).
    pub adopt_fd: Option<RawFd>,
    /// How long to keep serving without nhid, waiting to be re-adopted, before exiting.
    pub orphan_timeout: std::time::Duration,
}

/// Takes an fd nhid left open across exec.
fn inherited(fd: RawFd, what: &str) -> Result<OwnedFd, String> {
    if fd < 3 {
        return Err(format!("--{what} {fd} is not an inherited fd"));
    }
    // SAFETY: nhid passes the number of an fd it left open for us across exec; nothing else in
    // this process owns or closes it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Hardens and sandboxes the process, binds, says hello to nhid and serves until nhid stops it,
/// or until nhid went away and none re-adopted it within `orphan_timeout`.
pub fn run(opts: Options) -> Result<(), String> {
    let channel_fd = inherited(opts.channel_fd, "channel-fd")?;
    let fd_channel = inherited(opts.fd_channel_fd, "fd-channel-fd")?;
    let adopt_listener = opts.adopt_fd.map(adoption_listener).transpose()?;
    harden::harden()?;
    // Before the sandbox, which allows no prlimit64; the listeners' caps (`fd_budget`) then
    // fit under what this returns.
    let nofile = nhi_core::fd_limit::raise_to_hard();
    // Before any thread and before anything the workload or nhid sends is read.
    let applied = harden::sandbox(opts.landlock, opts.seccomp)?;
    for w in &applied.warnings {
        crate::log!("nhi-companion: warning: {w}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let listener = match opts.listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|e| format!("listening on {addr}: {e}"))?,
            ),
            None => None,
        };
        let wapi_listener = tokio::net::TcpListener::bind(opts.workload_api_listen)
            .await
            .map_err(|e| format!("listening on {}: {e}", opts.workload_api_listen))?;
        let (listeners, unix_incoming) = listeners::Listeners::new();
        listeners
            .attach(fd_channel)
            .map_err(|e| format!("fd channel: {e}"))?;
        let adoption = adopt_listener
            .map(|l| {
                tokio::net::UnixListener::from_std(l).map(|listener| channel::Adoption {
                    listener,
                    orphan_timeout: opts.orphan_timeout,
                    listeners: listeners.clone(),
                })
            })
            .transpose()
            .map_err(|e| format!("re-adoption socket: {e}"))?;
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let (channel, init, events) = channel::Channel::open(channel_fd, adoption, move || {
            let _ = closed_tx.send(());
        })
        .await?;
        match &opts.listen {
            Some(addr) => crate::log!("serving {} on http://{addr}", init.spiffe_id),
            None => crate::log!("serving {} (HTTP API off)", init.spiffe_id),
        }
        crate::log!(
            "sandbox: seccomp {}, {}",
            if applied.seccomp { "on" } else { "OFF" },
            applied.landlock.as_deref().unwrap_or("Landlock OFF")
        );
        let limits = fit_limits(init.limits, nofile);
        let trust = cache::Trust::new(&init.bundle_pem, &init.jwks, &init.bundle_spiffe);
        let recorder = audit::Recorder::start(channel.clone());
        let api_recorder = recorder.clone();
        let edge_channel = channel.clone();
        let (events, edge_events) = split_events(events);
        let creds = cache::Creds::new(
            channel,
            events,
            opts.max_cached_audiences,
            init.revoked,
            trust,
        );
        start_edge(
            &init,
            edge::Edge::new(
                init.policy.clone(),
                init.egress,
                recorder,
                edge_channel,
                creds.clone(),
                &init.trust_domain,
                init.denied_peers.clone(),
            ),
            edge_events,
            limits,
        )
        .await;
        let wapi =
            workload_api::WorkloadApi::new(creds.clone(), &init.spiffe_id, &init.trust_domain);
        tokio::spawn(workload_api::serve(
            wapi_listener,
            unix_incoming,
            wapi,
            limits,
        ));
        let http = async move {
            match listener {
                Some(l) => {
                    http::serve(
                        l,
                        Arc::new(http::Api::new(&init, creds, api_recorder)),
                        limits,
                    )
                    .await
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = http => Ok(()),
            // The channel logged why.
            _ = closed_rx => Ok(()),
        }
    })
}

type EdgeEvents = tokio::sync::mpsc::UnboundedReceiver<channel::Pushed>;

/// Copies nhid's events to the credential cache and to the edge proxy (policy reloads,
/// secret changes and revocations concern both).
fn split_events(mut events: channel::Events) -> (channel::Events, EdgeEvents) {
    let (creds_tx, creds_rx) = tokio::sync::mpsc::unbounded_channel();
    let (edge_tx, edge_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            use channel::Pushed;
            use nhi_core::wire::Event;
            let (edge, creds) = match &e {
                Pushed::Event(Event::Policy { .. } | Event::DeniedPeers { .. }) => (true, false),
                Pushed::Event(Event::SecretChanged { .. } | Event::Revoked { .. })
                | Pushed::Readopted(_) => (true, true),
                Pushed::Event(Event::Restored | Event::Trust { .. }) => (false, true),
            };
            if edge {
                let _ = edge_tx.send(e.clone());
            }
            if creds {
                let _ = creds_tx.send(e);
            }
        }
    });
    (creds_rx, edge_rx)
}

/// Serves the edge proxy once the identity has a policy (at hello, or when a reload gives it
/// one): outbound on loopback, where nftables' output REDIRECT sends it; inbound on all
/// addresses, where prerouting REDIRECT does. Without a policy nothing is redirected, so
/// nothing is bound. A port already taken only disables that side, with a log line.
async fn start_edge(
    init: &nhi_core::wire::Init,
    edge: Arc<edge::Edge>,
    mut events: EdgeEvents,
    limits: CompanionLimits,
) {
    let ports = init.egress;
    let mut listening = false;
    if edge.policy().is_some() {
        listen(&edge, ports, limits).await;
        listening = true;
    }
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            edge.apply(&ev);
            if !listening && edge.policy().is_some() {
                listen(&edge, ports, limits).await;
                listening = true;
            }
        }
    });
}

async fn listen(
    edge: &Arc<edge::Edge>,
    ports: nhi_core::policy::EgressConfig,
    limits: CompanionLimits,
) {
    let out: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, ports.proxy_port).into();
    match tokio::net::TcpListener::bind(out).await {
        Ok(l) => {
            tokio::spawn(edge::serve_outbound(l, edge.clone(), limits));
        }
        Err(e) => crate::log!("edge proxy disabled: listening on {out}: {e}"),
    }
    // The DNS relay, where the workload's UDP queries to the policy's resolvers are
    // redirected (IPv4 and, where the namespace has it, IPv6 loopback).
    for ip in [
        std::net::IpAddr::from(std::net::Ipv4Addr::LOCALHOST),
        std::net::Ipv6Addr::LOCALHOST.into(),
    ] {
        let at = SocketAddr::new(ip, ports.dns_port);
        match tokio::net::UdpSocket::bind(at).await {
            Ok(s) => {
                tokio::spawn(edge::dns::serve_udp(s, edge.clone()));
            }
            Err(e) if ip.is_ipv6() => crate::log!("dns relay: no IPv6 ({at}: {e})"),
            Err(e) => crate::log!("dns relay disabled: listening on {at}: {e}"),
        }
    }
    let inb: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, ports.inbound_port).into();
    match tokio::net::TcpListener::bind(inb).await {
        Ok(l) => {
            tokio::spawn(edge::inbound::serve(l, edge.clone(), limits));
        }
        Err(e) => crate::log!("inbound policy disabled: listening on {inb}: {e}"),
    }
}

/// `[companion.limits]`, with the connection caps scaled down when the hard file descriptor
/// limit cannot hold what they need (so the listeners refuse a connection before `accept`
/// would fail with EMFILE for everyone).
fn fit_limits(limits: CompanionLimits, have: u64) -> CompanionLimits {
    let need = limits.fd_budget();
    if have >= need {
        return limits;
    }
    let scale = |n: usize| ((n as u64 * have.saturating_sub(64) / need.max(1)) as usize).max(8);
    let fitted = CompanionLimits {
        api_connections: scale(limits.api_connections),
        workload_api_connections: scale(limits.workload_api_connections),
        proxy_connections: scale(limits.proxy_connections),
        ..limits
    };
    crate::log!(
        "nhi-companion: RLIMIT_NOFILE is {have}, the connection limits need {need}: serving at most {} API, {} Workload API and {} proxy connections",
        fitted.api_connections, fitted.workload_api_connections, fitted.proxy_connections
    );
    fitted
}

fn adoption_listener(fd: RawFd) -> Result<std::os::unix::net::UnixListener, String> {
    if fd < 3 {
        return Err(format!("--adopt-fd {fd} is not an inherited socket"));
    }
    // SAFETY: nhid passes the fd number of the socket it left open for us across exec; nothing
    // else in this process owns or closes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: listen(2) on an fd we own; it only changes the socket's state.
    if unsafe { libc::listen(owned.as_raw_fd(), 16) } != 0 {
        return Err(format!(
            "--adopt-fd {fd}: listen: {}",
            std::io::Error::last_os_error()
        ));
    }
    let l = std::os::unix::net::UnixListener::from(owned);
    l.local_addr()
        .map_err(|e| format!("--adopt-fd {fd}: not a unix socket: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("--adopt-fd {fd}: {e}"))?;
    Ok(l)
}
