use std::io::Read;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// nhictl: operate nhi on this node.
#[derive(Parser)]
#[command(name = "nhictl", version, about)]
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
    /// Wire nhi into a container runtime's configuration (idempotent; never restarts it).
    Configure {
        #[command(subcommand)]
        runtime: ConfigureCmd,
        /// Print the resulting file(s) instead of writing them.
        #[arg(long, global = true)]
        dry_run: bool,
        /// nhi-runc to register (default: next to nhictl).
        #[arg(long, global = true)]
        nhi_runc: Option<PathBuf>,
        /// nhi-hook to register (default: next to nhictl).
        #[arg(long, global = true)]
        nhi_hook: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum ConfigureCmd {
    /// CRI runtime handler `nhi` in containerd's config (version 2 or 3).
    Containerd {
        /// containerd's config file.
        #[arg(long, default_value = "/etc/containerd/config.toml")]
        file: PathBuf,
        /// Write the handler to a drop-in (default /etc/containerd/conf.d/99-nhi.toml) imported
        /// by the main config, instead of editing it in place.
        #[arg(long, num_args = 0..=1, default_missing_value = "/etc/containerd/conf.d/99-nhi.toml")]
        drop_in: Option<PathBuf>,
        /// Also make `nhi` the default runtime handler.
        #[arg(long)]
        set_as_default: bool,
    },
    /// Runtime `nhi` in Docker's daemon.json.
    Docker {
        #[arg(long, default_value = "/etc/docker/daemon.json")]
        file: PathBuf,
        /// Also make `nhi` Docker's default runtime.
        #[arg(long)]
        set_as_default: bool,
    },
    /// oci-hooks(5) files for Podman.
    Podman {
        #[arg(long, default_value = "/etc/containers/oci/hooks.d")]
        hooks_dir: PathBuf,
        /// Run the hook for every container, not only those annotated nhi.dev/inject=true.
        #[arg(long)]
        always: bool,
    },
    /// oci-hooks(5) files for CRI-O.
    Crio {
        #[arg(long, default_value = "/etc/containers/oci/hooks.d")]
        hooks_dir: PathBuf,
        #[arg(long)]
        always: bool,
    },
    /// Print the Nomad client plugin stanzas.
    Nomad,
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
        Cmd::Configure {
            runtime,
            dry_run,
            nhi_runc,
            nhi_hook,
        } => configure(&cli.config, runtime, dry_run, nhi_runc, nhi_hook)?,
    }
    Ok(())
}

/// `name` next to this executable, else /usr/bin/name.
fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join(name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("/usr/bin").join(name))
}

fn configure(
    nhi_config: &std::path::Path,
    runtime: ConfigureCmd,
    dry_run: bool,
    nhi_runc: Option<PathBuf>,
    nhi_hook: Option<PathBuf>,
) -> Result<(), String> {
    use nhi_ctl::configure::{containerd, docker, hooks, Paths};
    let paths = Paths {
        nhi_runc: nhi_runc.unwrap_or_else(|| sibling("nhi-runc")),
        hook: nhi_hook.unwrap_or_else(|| sibling("nhi-hook")),
        config: std::path::absolute(nhi_config).unwrap_or_else(|_| nhi_config.to_path_buf()),
    };
    let plan = match runtime {
        ConfigureCmd::Containerd {
            file,
            drop_in,
            set_as_default,
        } => containerd::plan(
            &containerd::Options {
                config: file,
                drop_in,
                set_as_default,
            },
            &paths,
        )?,
        ConfigureCmd::Docker {
            file,
            set_as_default,
        } => docker::plan(
            &docker::Options {
                config: file,
                set_as_default,
            },
            &paths,
        )?,
        ConfigureCmd::Podman { hooks_dir, always } => hooks::plan(
            &hooks::Options {
                hooks_dir,
                always,
                runtime: "podman",
            },
            &paths,
        )?,
        ConfigureCmd::Crio { hooks_dir, always } => hooks::plan(
            &hooks::Options {
                hooks_dir,
                always,
                runtime: "crio",
            },
            &paths,
        )?,
        ConfigureCmd::Nomad => {
            print!("{}", nhi_ctl::configure::nomad::stanzas());
            return Ok(());
        }
    };
    if dry_run {
        print!("{}", plan.render());
        return Ok(());
    }
    plan.apply()?;
    for c in &plan.changes {
        println!(
            "{} {}",
            if c.changed { "wrote" } else { "unchanged" },
            c.path.display()
        );
    }
    println!("next: {}", plan.next_step);
    Ok(())
}
