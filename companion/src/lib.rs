//! nhi-companion: one per workload network namespace. Serves its workload's identity on
//! loopback, from a cache refreshed at half-life through the socketpair to `nhid`.

pub mod audit;
pub mod aws;
pub mod cache;
pub mod channel;
pub mod h2fix;
pub mod harden;
pub mod http;
pub mod log;
pub mod proxy;
pub mod workload;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use nhi_core::wire::CompanionResponse;

pub struct Options {
    pub listen: SocketAddr,
    pub channel_fd: RawFd,
    pub max_cached_audiences: usize,
    /// SPIFFE Workload API (gRPC) TCP address inside the workload's network namespace.
    pub workload_api_listen: SocketAddr,
    /// A listening unix socket nhid bound for the Workload API (`/run/nhi/workload.sock` in
    /// the container), inherited at spawn.
    pub listener_fd: Option<RawFd>,
    /// The re-adoption socket nhid bound (unlistened) in its root-only state directory,
    /// inherited at spawn: a restarted nhid connects to it (see [`channel`]).
    pub adopt_fd: Option<RawFd>,
    /// How long to keep serving without nhid, waiting to be re-adopted, before exiting.
    pub orphan_timeout: Duration,
}

/// Hardens the process, binds, says hello to nhid and serves until nhid stops it, or until
/// nhid went away and none re-adopted it within `orphan_timeout`.
pub fn run(opts: Options) -> Result<(), String> {
    if opts.channel_fd < 3 {
        return Err(format!(
            "--channel-fd {} is not an inherited channel",
            opts.channel_fd
        ));
    }
    // SAFETY: nhid passes the fd number of the socketpair end it left open for us across
    // exec; nothing else in this process owns or closes it.
    let channel_fd = unsafe { OwnedFd::from_raw_fd(opts.channel_fd) };
    let unix_listener = opts.listener_fd.map(workload_listener).transpose()?;
    let adopt_listener = opts.adopt_fd.map(adoption_listener).transpose()?;
    harden::harden()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|e| format!("listening on {}: {e}", opts.listen))?;
        let wapi_listener = tokio::net::TcpListener::bind(opts.workload_api_listen)
            .await
            .map_err(|e| format!("listening on {}: {e}", opts.workload_api_listen))?;
        let unix_listener = unix_listener
            .map(|l| tokio::net::UnixListener::from_std(l))
            .transpose()
            .map_err(|e| format!("workload API socket: {e}"))?;
        let adoption = adopt_listener
            .map(|l| {
                tokio::net::UnixListener::from_std(l).map(|listener| channel::Adoption {
                    listener,
                    orphan_timeout: opts.orphan_timeout,
                })
            })
            .transpose()
            .map_err(|e| format!("re-adoption socket: {e}"))?;
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let (channel, init, events) = channel::Channel::open(channel_fd, adoption, move || {
            let _ = closed_tx.send(());
        })
        .await?;
        crate::log!("serving {} on http://{}", init.spiffe_id, opts.listen);
        let trust = cache::Trust::new(&init.bundle_pem, &init.jwks);
        let recorder = audit::Recorder::start(channel.clone());
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
            proxy::Edge::new(init.policy.clone(), recorder, edge_channel, creds.clone()),
            edge_events,
        )
        .await;
        let wapi = workload::WorkloadApi::new(creds.clone(), &init.spiffe_id, &init.trust_domain);
        tokio::spawn(workload::serve(wapi_listener, unix_listener, wapi));
        let api = Arc::new(http::Api::new(&init, creds));
        tokio::select! {
            _ = http::serve(listener, api) => Ok(()),
            // The channel logged why.
            _ = closed_rx => Ok(()),
        }
    })
}

type EdgeEvents = tokio::sync::mpsc::UnboundedReceiver<CompanionResponse>;

/// Copies nhid's events to the credential cache and to the edge proxy (policy reloads,
/// secret changes and revocations concern both).
fn split_events(mut events: channel::Events) -> (channel::Events, EdgeEvents) {
    let (creds_tx, creds_rx) = tokio::sync::mpsc::unbounded_channel();
    let (edge_tx, edge_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if matches!(
                e,
                CompanionResponse::Policy { .. }
                    | CompanionResponse::SecretChanged { .. }
                    | CompanionResponse::Revoked { .. }
                    | CompanionResponse::Init(_)
            ) {
                let _ = edge_tx.send(e.clone());
            }
            if !matches!(e, CompanionResponse::Policy { .. }) {
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
async fn start_edge(init: &nhi_core::wire::Init, edge: Arc<proxy::Edge>, mut events: EdgeEvents) {
    let ports = init.egress;
    let mut listening = false;
    if edge.policy().is_some() {
        listen(&edge, ports).await;
        listening = true;
    }
    tokio::spawn(async move {
        while let Some(ev) = events.recv().await {
            edge.apply(&ev);
            if !listening && edge.policy().is_some() {
                listen(&edge, ports).await;
                listening = true;
            }
        }
    });
}

async fn listen(edge: &Arc<proxy::Edge>, ports: nhi_core::policy::EgressConfig) {
    let out: SocketAddr = (std::net::Ipv4Addr::LOCALHOST, ports.proxy_port).into();
    match tokio::net::TcpListener::bind(out).await {
        Ok(l) => {
            tokio::spawn(proxy::serve_outbound(l, edge.clone()));
        }
        Err(e) => crate::log!("edge proxy disabled: listening on {out}: {e}"),
    }
    let inb: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, ports.inbound_port).into();
    match tokio::net::TcpListener::bind(inb).await {
        Ok(l) => {
            tokio::spawn(proxy::inbound::serve(l, edge.clone()));
        }
        Err(e) => crate::log!("inbound policy disabled: listening on {inb}: {e}"),
    }
}

/// Takes the inherited re-adoption socket `fd` (bound by nhid, not yet listening) and listens
/// on it. Listening here, not in nhid, makes this process the socket's peer credentials: a
/// restarted nhid that connects sees this companion's pid and uid (`SO_PEERCRED`).
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

/// Takes the inherited Workload API socket `fd`: it must be a listening unix stream socket.
fn workload_listener(fd: RawFd) -> Result<std::os::unix::net::UnixListener, String> {
    if fd < 3 {
        return Err(format!("--listener-fd {fd} is not an inherited socket"));
    }
    // SAFETY: nhid passes the fd number of the listening socket it left open for us across
    // exec; nothing else in this process owns or closes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let l = std::os::unix::net::UnixListener::from(owned);
    l.local_addr()
        .map_err(|e| format!("--listener-fd {fd}: not a unix socket: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("--listener-fd {fd}: {e}"))?;
    Ok(l)
}
