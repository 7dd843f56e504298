//! nhid, the node daemon: issues identities, places and supervises companions, answers the
//! hook over a root-only socket. `main.rs` only parses arguments and calls [`run`].

pub mod adopt;
pub mod agent;
pub mod api;
pub mod audit;
pub mod cgroup;
pub mod control;
pub mod denials;
pub mod edge;
pub mod handler;
pub mod identity;
pub mod issuer;
pub mod keystore;
pub mod lanes;
pub mod metrics;
pub mod netns;
pub mod nft;
pub mod nodes;
pub mod persist;
pub mod registry;
pub mod revoke;
pub mod sa_keys;
pub mod secrets;
pub mod services;
pub mod spawn;
pub mod spiffe_bundle;
pub mod store;
pub mod supervisor;
pub mod sync;
pub mod uids;
pub mod workload_socket;

use std::sync::Arc;
use std::time::Duration;

use nhi_core::config::Backend;
use nhi_core::Config;

/// The account the packages reserve the companion uid range for in /etc/subuid and /etc/subgid.
pub const COMPANION_RANGE_OWNER: &str = "nhi-companion";

/// How often containers that vanished without a poststop are looked for.
const GC_INTERVAL: Duration = Duration::from_secs(5);

/// Checks and loads everything, then serves until SIGTERM/SIGINT.
/// Config validation refuses an `openbao` kind without an `[openbao]` section; should one get
/// here anyway, nhid refuses to start rather than quietly falling back to the embedded backend.
const NEEDS_OPENBAO: &str = "kind = \"openbao\" needs an [openbao] section (addresses, auth)";

pub async fn run(config: Config) -> Result<(), String> {
    // A few descriptors per companion and per container: the default soft limit would cap the
    // node at a few hundred workloads.
    let nofile = nhi_core::fd_limit::raise_to_hard();
    if nofile < 65536 {
        tracing::warn!(
            nofile,
            "open-file limit is low for many workloads; raise LimitNOFILE= in nhid's unit"
        );
    } else {
        tracing::debug!(nofile, "open-file limit");
    }
    if !nix::unistd::geteuid().is_root() {
        return Err("nhid must run as root: it enters network namespaces and switches companions to their own uid".into());
    }
    // Companions are separated by uid and start non-dumpable: both are checked before any
    // companion runs, so a setup that would break them is refused, not silently weakened.
    spawn::check_binary(&config.companion.binary)?;
    spawn::check_suid_dumpable()?;
    let range = config.companion.uid_range;
    uids::check_reserved(range, COMPANION_RANGE_OWNER)?;
    let uids = Arc::new(uids::UidAllocator::new(range, &uids::live_uids(range)));
    keystore::create_private_dir(&config.state_dir).map_err(|e| e.to_string())?;
    // One nhid per state dir: a second one would restore (and fight over) the same companions.
    let _single = lock_state_dir(&config.state_dir)?;
    let uses_bao = config.issuer.kind == Backend::OpenBao || config.store.kind == Backend::OpenBao;
    // What is degraded from the start (OpenBao unreachable: serving from the sealed cache).
    let mut degraded = Vec::new();
    let bao = match (&config.openbao, uses_bao) {
        (Some(ob), true) => {
            let (bao, outage) = nhi_openbao::Bao::connect_deferred(ob)
                .await
                .map_err(|e| format!("OpenBao: {e}"))?;
            if let Some(e) = &outage {
                tracing::warn!("OpenBao unreachable at start ({e}); logging in in the background");
                degraded.push(format!("OpenBao: not logged in ({e})"));
            }
            let cache = store::sealed_cache::BaoCache::open(
                &config.state_dir,
                &config.key_file(),
                config.store.secret_ttl,
            )?;
            Some((bao, Arc::new(cache)))
        }
        _ => None,
    };
    let issuer: Arc<dyn issuer::Issuer> = match (&bao, config.issuer.kind) {
        (Some((bao, cache)), Backend::OpenBao) => {
            let (issuer, why) =
                issuer::BaoIssuer::start(&config, bao.clone(), cache.clone()).await?;
            degraded.extend(why);
            Arc::new(issuer)
        }
        (None, Backend::OpenBao) => return Err(NEEDS_OPENBAO.into()),
        (_, Backend::Embedded) => {
            Arc::new(issuer::EmbeddedIssuer::load_or_create(&config).map_err(|e| e.to_string())?)
        }
    };
    let store = match (&bao, config.store.kind) {
        (Some((bao, cache)), Backend::OpenBao) => {
            store::Store::OpenBao(store::BaoStore::new(bao.clone(), cache.clone()))
        }
        (None, Backend::OpenBao) => return Err(NEEDS_OPENBAO.into()),
        (_, Backend::Embedded) => store::Store::Embedded(
            store::EmbeddedStore::open(&config.state_dir, &config.key_file())
                .map_err(|e| e.to_string())?,
        ),
    };
    let revocations = match (store.load_revocations().await, &store) {
        (Ok(list), _) => list,
        // Never start forgetting a revocation: the list as last loaded, or no start.
        (Err(store::StoreError::Unavailable(e)), store::Store::OpenBao(s)) => {
            let list = s.cached_revocations().ok_or_else(|| {
                format!("loading revocations: OpenBao is unreachable ({e}) and there is no sealed cache of the revocation list from an earlier run")
            })?;
            tracing::warn!(
                revocations = list.len(),
                "OpenBao unreachable: revocation list from the sealed cache"
            );
            degraded.push(format!(
                "revocations: from the sealed cache (OpenBao unreachable: {e})"
            ));
            list
        }
        (Err(e), _) => return Err(format!("loading revocations: {e}")),
    };
    // Companions' cgroups: checked (and leftovers removed) before any companion starts.
    let cgroups = Arc::new(
        cgroup::Cgroups::setup(&config.companion.cgroup).map_err(|e| {
            format!(
                "companion cgroups ([companion.cgroup] parent {:?}): {e}",
                config.companion.cgroup.parent
            )
        })?,
    );
    let metrics = Arc::new(metrics::Metrics::new());
    let audit = Arc::new(audit::AuditSink::start(
        &config.audit_dir(),
        (&config.audit).into(),
        config.audit.queue,
        metrics.clone(),
    )?);
    let companions = adopt::Records::open(&config.state_dir)?;
    let ctx = Arc::new(supervisor::Ctx {
        services: services::Services::new(
            config,
            audit,
            metrics,
            issuer,
            Arc::new(store),
            Arc::new(revoke::Revocations::new(revocations)),
        ),
        uids,
        cgroups,
        companions,
    });
    let agent = Arc::new(
        agent::Agent::new(ctx.clone())
            .map_err(|e| format!("reading own network namespace: {e}"))?,
    );
    *agent.degraded.lock().unwrap_or_else(|p| p.into_inner()) = degraded;
    // Nodes cut off while this one was down are refused from the first request on, not
    // from the first poll.
    // (Bounded: during an OpenBao outage the sealed cache's list applies.)
    match tokio::time::timeout(
        std::time::Duration::from_secs(2),
        sync::node_revocations(&agent),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("{e}; the sealed cache's list applies until the next poll"),
        Err(_) => tracing::warn!(
            "node revocations: OpenBao slow to answer; the sealed cache's list applies until the next poll"
        ),
    }
    agent.recover().await;
    let socket = ctx.config.socket.clone();
    let listener =
        api::bind(&socket).map_err(|e| format!("agent socket {}: {e}", socket.display()))?;
    tracing::info!(
        trust_domain = %ctx.issuer.trust_domain(),
        socket = %socket.display(),
        state_dir = %ctx.config.state_dir.display(),
        rules = ctx.config.rules.len(),
        "nhid ready"
    );

    let gc = {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(GC_INTERVAL);
            loop {
                t.tick().await;
                agent.collect_garbage().await;
            }
        })
    };
    let server = tokio::spawn(api::serve(agent.clone(), listener));
    // Metrics are not worth failing identity issuance for: a taken port is logged, not fatal.
    let metrics_server = match metrics::bind(&ctx.config.metrics.listen).await {
        Ok(Some(l)) => {
            tracing::info!(listen = %ctx.config.metrics.listen, "metrics endpoint ready");
            Some(tokio::spawn(metrics::serve(
                l,
                ctx.metrics.clone(),
                agent.clone(),
            )))
        }
        Ok(None) => None,
        Err(e) => {
            tracing::error!("{e}; serving without metrics");
            None
        }
    };
    if let Some(keys) = &ctx.sa_keys {
        tokio::spawn(keys.clone().refresh_loop());
    }
    // Cluster mode follows OpenBao every poll_interval; the embedded issuer only needs its
    // upkeep (CA rotation and retirement) now and then.
    let follower = match &ctx.config.openbao {
        Some(ob) if bao.is_some() => Some(tokio::spawn(sync::run(agent.clone(), ob.poll_interval))),
        _ => Some(tokio::spawn(sync::run(
            agent.clone(),
            std::time::Duration::from_secs(5),
        ))),
    };

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    let mut usr2 = signal(SignalKind::user_defined2()).map_err(|e| e.to_string())?;
    // SIGTERM/SIGINT (restart, upgrade): companions keep serving for the next nhid.
    // SIGUSR2 (node decommission, package removal): companions stop too.
    let stop_companions = loop {
        tokio::select! {
            _ = term.recv() => break false,
            _ = int.recv() => break false,
            _ = usr2.recv() => break true,
            _ = hup.recv() => agent.reload_policies().await,
        }
    };
    if stop_companions {
        tracing::info!("shutting down (SIGUSR2): stopping companions");
    } else {
        tracing::info!("shutting down: companions keep serving until the next nhid re-adopts them");
    }
    server.abort();
    gc.abort();
    if let Some(f) = follower {
        f.abort();
    }
    let _ = std::fs::remove_file(&socket);
    if let Some(m) = metrics_server {
        m.abort();
    }
    if stop_companions {
        agent.stop_companions().await;
    } else {
        agent.shutdown().await;
    }
    // What the companions reported last is on disk before nhid exits.
    let audit = ctx.audit.clone();
    let _ = tokio::task::spawn_blocking(move || audit.sync(Duration::from_secs(5))).await;
    Ok(())
}

/// Takes `<state_dir>/nhid.lock` for the life of the process (released by the kernel on exit).
fn lock_state_dir(dir: &std::path::Path) -> Result<nix::fcntl::Flock<std::fs::File>, String> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("nhid.lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_CLOEXEC | libc::O_NOFOLLOW)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(|(_, e)| {
        format!(
            "another nhid already runs with state_dir {} ({}: {e})",
            dir.display(),
            path.display()
        )
    })
}
