//! The agent API: a unix socket only root can use (mode 0600 and a peer-credential check),
//! one JSON request line and one JSON response line per connection.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nhi_core::wire::{AgentRequest, AgentResponse, MAX_LINE};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::agent::Agent;

const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket, refusing to steal it from a live daemon and cleaning up a stale one.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!("{} is served by a running nhid", path.display()),
            ));
        }
        std::fs::remove_file(path)?;
    }
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub async fn serve(agent: Arc<Agent>, listener: UnixListener) {
    let me = nix::unistd::geteuid().as_raw();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("agent socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(agent, stream, me).await {
                tracing::warn!("agent API connection: {e}");
            }
        });
    }
}

async fn connection(agent: Arc<Agent>, mut stream: UnixStream, me: u32) -> io::Result<()> {
    let cred = stream.peer_cred()?;
    if cred.uid() != 0 && cred.uid() != me {
        let resp = AgentResponse::Error {
            message: format!("uid {} may not use the nhid socket", cred.uid()),
        };
        return write(&mut stream, &resp).await;
    }
    let (rd, _) = stream.split();
    let mut line = String::new();
    let n = tokio::time::timeout(
        REQUEST_TIMEOUT,
        BufReader::new(rd)
            .take(MAX_LINE as u64)
            .read_line(&mut line),
    )
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no request in time"))??;
    if n == 0 {
        return Ok(());
    }
    if n >= MAX_LINE && !line.ends_with('\n') {
        let resp = AgentResponse::Error {
            message: format!("request refused: longer than the {MAX_LINE} bytes nhid accepts"),
        };
        return write(&mut stream, &resp).await;
    }
    let resp = match serde_json::from_str::<AgentRequest>(&line) {
        Ok(req) => agent.handle(req).await,
        Err(e) => AgentResponse::Error {
            message: format!("bad request: {e}"),
        },
    };
    write(&mut stream, &resp).await
}

async fn write(stream: &mut UnixStream, resp: &AgentResponse) -> io::Result<()> {
    let mut out = serde_json::to_vec(resp)?;
    out.push(b'\n');
    stream.write_all(&out).await
}
