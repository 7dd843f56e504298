use std::io::Read;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// nhictl: operate nhi on this node.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Configuration file (for the socket path).
    #[arg(long, global = true, default_value = nhi_core::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Show the trust domain and the attached workloads.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the trust bundle (PEM).
    Bundle,
    /// Token operations.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Verify a JWT-SVID read from stdin (never from argv, where other users could read it).
    Verify {
        /// JWKS file (e.g. saved from a companion's /v1/jwks).
        #[arg(long)]
        jwks: PathBuf,
        /// Audience the token must carry.
        #[arg(long)]
        audience: String,
        /// Require `sub` in this trust domain.
        #[arg(long)]
        trust_domain: Option<String>,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("nhictl: {e}");
        std::process::exit(1);
    }
}

fn socket(config: &std::path::Path) -> Result<PathBuf, String> {
    Ok(nhi_core::Config::load(config)
        .map_err(|e| e.to_string())?
        .socket)
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Status { json } => {
            let s = nhi_ctl::status(&socket(&cli.config)?)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&s).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", nhi_ctl::render_status(&s));
            }
        }
        Cmd::Bundle => print!("{}", nhi_ctl::status(&socket(&cli.config)?)?.bundle_pem),
        Cmd::Token {
            cmd:
                TokenCmd::Verify {
                    jwks,
                    audience,
                    trust_domain,
                },
        } => {
            let jwks =
                std::fs::read_to_string(&jwks).map_err(|e| format!("{}: {e}", jwks.display()))?;
            let mut token = String::new();
            std::io::stdin()
                .take(64 * 1024)
                .read_to_string(&mut token)
                .map_err(|e| format!("reading the token from stdin: {e}"))?;
            let token = token.trim();
            // Accept the companion's /v1/token JSON as well as a bare token.
            let token = serde_json::from_str::<serde_json::Value>(token)
                .ok()
                .and_then(|v| v.get("token").and_then(|t| t.as_str()).map(str::to_string))
                .unwrap_or_else(|| token.to_string());
            let claims = nhi_ctl::verify_token(&token, &jwks, &audience, trust_domain.as_deref())?;
            println!(
                "{}",
                serde_json::to_string_pretty(&claims).map_err(|e| e.to_string())?
            );
        }
    }
    Ok(())
}
