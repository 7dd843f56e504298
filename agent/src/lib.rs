//! nhid, the node daemon: issues identities, places and supervises companions, answers the
//! hook over a root-only socket. `main.rs` only parses arguments and calls [`run`].

pub mod agent;
pub mod api;
pub mod issuer;
pub mod keystore;
pub mod netns;
pub mod openbao;
pub mod persist;
pub mod spawn;
pub mod supervisor;

use std::sync::Arc;
use std::time::Duration;

use nhi_core::Config;

/// How often containers that vanished without a poststop are looked for.
const GC_INTERVAL: Duration = Duration::from_secs(5);

/// Checks and loads everything, then serves until SIGTERM/SIGINT.
pub async fn run(config: Config) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("nhid must run as root: it enters network namespaces and switches companions to their own uid".into());
    }
    let user = spawn::CompanionUser::resolve(&config.companion.user)?;
    let bin = &config.companion.binary;
    if !bin.is_file() {
        return Err(format!(
            "companion binary {} does not exist (companion.binary)",
            bin.display()
        ));
    }
    let issuer = issuer::EmbeddedIssuer::load_or_create(&config).map_err(|e| e.to_string())?;
    let ctx = Arc::new(supervisor::Ctx {
        issuer: Arc::new(issuer),
        user,
        config,
    });
    let agent = Arc::new(
        agent::Agent::new(ctx.clone())
            .map_err(|e| format!("reading own network namespace: {e}"))?,
    );
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

    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down: stopping companions");
    server.abort();
    gc.abort();
    let _ = std::fs::remove_file(&socket);
    agent.shutdown().await;
    Ok(())
}
