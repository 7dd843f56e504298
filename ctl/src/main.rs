//! nhictl's command line: parsing and printing only; what each command does is in the
//! `nhi_ctl` library (`token`, `secret`, `audit`, `configure`).

use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};
use nhi_core::wire::RevokeTarget;
use nhi_ctl::{audit, secret, token};

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
    /// Print the trust bundle: PEM CA certificates, or the SPIFFE bundle format (a JWK Set with
    /// the X.509 and JWT authorities, `spiffe_sequence`, `spiffe_refresh_hint`) that SPIRE and
    /// other SPIFFE control planes import to federate (`spire-server bundle set -format spiffe`).
    Bundle {
        #[arg(long, value_enum, default_value_t = BundleFormat::Pem)]
        format: BundleFormat,
    },
    /// Token operations.
    Token {
        #[command(subcommand)]
        cmd: TokenCmd,
    },
    /// Manage secrets in the store (values are read from a file or stdin, never argv).
    Secret {
        #[command(subcommand)]
        cmd: SecretCmd,
    },
    /// Revoke an identity: no new credentials, cached ones dropped, issued ones denied.
    #[command(group(clap::ArgGroup::new("target").required(true).args(["spiffe_id", "workload"])))]
    Revoke {
        /// The SPIFFE ID to revoke.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// A container (or pod sandbox) id: its identity is revoked.
        #[arg(long)]
        workload: Option<String>,
        /// Lift the revocation instead.
        #[arg(long)]
        undo: bool,
    },
    /// The trust domain's CA.
    Ca {
        #[command(subcommand)]
        cmd: CaCmd,
    },
    /// Cluster nodes (OpenBao mode).
    Node {
        #[command(subcommand)]
        cmd: NodeCmd,
    },
    /// Read and check the audit log (as root: the log is 0600).
    Audit {
        /// Log directory (default: `[audit] dir` of the config, else `<state_dir>/audit`).
        #[arg(long, global = true)]
        dir: Option<PathBuf>,
        #[command(subcommand)]
        cmd: AuditCmd,
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
enum CaCmd {
    /// Rotate the CA without downtime (embedded issuer): a new CA enters every bundle now and
    /// signs from --activate-after later; the old one leaves the bundle once the last
    /// X.509-SVID it signed has expired.
    Rotate {
        /// How long workloads get to fetch the new bundle before the new CA signs (default:
        /// half of issuer.x509_ttl), e.g. "30m".
        #[arg(long, value_parser = humantime::parse_duration)]
        activate_after: Option<std::time::Duration>,
    },
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Cut a node off the cluster: OpenBao disables its identity at once (its token signs and
    /// reads nothing), and every node drops its JWT keys from the JWKS it serves and validates
    /// with within one poll_interval. Audited on every node that learns it.
    Revoke {
        /// The node's name (its `node_name`, its AppRole role's name).
        node: String,
        /// Take the node back instead.
        #[arg(long)]
        undo: bool,
        /// File holding an OpenBao token with the operator's rights for this (see
        /// docs/OPENBAO.md, "Cutting a node off"); read once, never stored.
        #[arg(long)]
        openbao_token_file: PathBuf,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Subcommand)]
enum ConfigureCmd {
    /// CRI runtime handler `nhi` in containerd's config: version 2 (containerd 1.x), 3 or 4
    /// (containerd 2.x; 2.3's `containerd config default` writes 4).
    ///
    /// A missing or empty file gets the version the installed containerd writes (asked with
    /// `containerd --version`) unless --config-version says otherwise. On 2.x the drop-in holds
    /// only the handler (imports are merged key by key); on 1.x it carries a copy of the main
    /// file's CRI section (imports replace whole sections).
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
        /// Config version for a new file (2, 3 or 4) instead of asking `containerd --version`;
        /// must match the version of an existing file.
        #[arg(long, value_parser = clap::value_parser!(i64).range(2..=4))]
        config_version: Option<i64>,
        /// The containerd binary asked for its version.
        #[arg(long, default_value = "containerd")]
        containerd: PathBuf,
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

#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct ValueSource {
    /// Read the value from this file.
    #[arg(long)]
    from_file: Option<PathBuf>,
    /// Read the value from stdin.
    #[arg(long)]
    from_stdin: bool,
}

#[derive(Subcommand)]
enum SecretCmd {
    /// Store a secret (a new version if it exists).
    Put {
        name: String,
        #[command(flatten)]
        source: ValueSource,
    },
    /// Print a secret's value to stdout.
    Get { name: String },
    /// Names and versions, never values.
    List {
        #[arg(long)]
        json: bool,
    },
    /// New version of an existing secret: from a file or stdin, else 256 random bits.
    Rotate {
        name: String,
        #[arg(long, conflicts_with = "from_stdin")]
        from_file: Option<PathBuf>,
        #[arg(long)]
        from_stdin: bool,
    },
    /// Delete a secret and all its versions.
    Rm { name: String },
}

#[derive(Subcommand)]
enum AuditCmd {
    /// Print the last records (JSON lines), optionally of one identity, and keep following.
    Tail {
        /// Number of records to print first.
        #[arg(short = 'n', long, default_value_t = 20)]
        lines: usize,
        /// Only records of this SPIFFE ID.
        #[arg(long)]
        identity: Option<String>,
        /// Keep printing records as they are written (across rotations).
        #[arg(short, long)]
        follow: bool,
    },
    /// Check the hash chain and the head: exits non-zero naming the file, line and sequence
    /// number of every changed, deleted or reordered record. Loss the log itself counts
    /// (`dropped` records: a full queue or disk) is listed as `loss:` and is not a failure.
    Verify,
}

#[derive(Subcommand)]
enum TokenCmd {
    /// Verify a JWT-SVID read from stdin (never from argv, where other users could read it).
    /// With --jwks the signature is checked offline; nhid is asked too (its keys and deny list)
    /// unless --offline.
    Verify {
        /// JWKS file (e.g. saved from a companion's /v1/jwks).
        #[arg(long, required_if_eq("offline", "true"))]
        jwks: Option<PathBuf>,
        /// Do not ask nhid (no deny list check).
        #[arg(long)]
        offline: bool,
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

fn run(cli: Cli) -> Result<(), String> {
    match cli.cmd {
        Cmd::Status { json: as_json } => {
            let s = nhi_ctl::status(&nhi_ctl::client(&cli.config)?)?;
            if as_json {
                println!("{}", json(&s)?);
            } else {
                print!("{}", nhi_ctl::render_status(&s));
            }
        }
        Cmd::Bundle { format } => {
            let s = nhi_ctl::status(&nhi_ctl::client(&cli.config)?)?;
            match format {
                BundleFormat::Pem => print!("{}", s.bundle_pem),
                BundleFormat::Spiffe if !s.bundle_spiffe.is_object() => {
                    return Err("nhid sent no SPIFFE bundle (is it older than nhictl?)".into())
                }
                BundleFormat::Spiffe => println!("{}", json(&s.bundle_spiffe)?),
            }
        }
        Cmd::Token {
            cmd:
                TokenCmd::Verify {
                    jwks,
                    offline,
                    audience,
                    trust_domain,
                },
        } => {
            let input = secret::read_limited(std::io::stdin(), token::MAX_INPUT, "stdin")?;
            let token = token::from_input(&input)?;
            let jwks = match jwks {
                Some(p) => {
                    Some(std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?)
                }
                None => None,
            };
            let nhid = if offline {
                None
            } else {
                Some(nhi_ctl::client(&cli.config)?)
            };
            let claims = token::verify(
                &token,
                &audience,
                jwks.as_deref(),
                trust_domain.as_deref(),
                nhid.as_ref(),
            )?;
            println!("{}", json(&claims)?);
        }
        Cmd::Secret { cmd } => {
            let nhid = nhi_ctl::client(&cli.config)?;
            let stdin = &mut std::io::stdin();
            let line = match cmd {
                SecretCmd::Put { name, source } => {
                    let value = secret::read_value(
                        source.from_file.as_deref(),
                        source.from_stdin.then_some(stdin as &mut dyn std::io::Read),
                    )?
                    .ok_or("no value given")?;
                    secret::put(&nhid, &name, Some(value), false)?
                }
                SecretCmd::Rotate {
                    name,
                    from_file,
                    from_stdin,
                } => {
                    let value = secret::read_value(
                        from_file.as_deref(),
                        from_stdin.then_some(stdin as &mut dyn std::io::Read),
                    )?;
                    secret::put(&nhid, &name, value, true)?
                }
                SecretCmd::Get { name } => {
                    let value = secret::get(&nhid, &name)?;
                    return std::io::stdout()
                        .write_all(&value)
                        .map_err(|e| e.to_string());
                }
                SecretCmd::List { json } => {
                    print!("{}", secret::list(&nhid, json)?);
                    return Ok(());
                }
                SecretCmd::Rm { name } => secret::remove(&nhid, &name)?,
            };
            println!("{line}");
        }
        Cmd::Revoke {
            spiffe_id,
            workload,
            undo,
        } => {
            let target = match (spiffe_id, workload) {
                (Some(id), _) => RevokeTarget::SpiffeId(id),
                (None, Some(w)) => RevokeTarget::Workload(w),
                (None, None) => unreachable!("clap requires one"),
            };
            let r = nhi_ctl::client(&cli.config)?
                .revoke(target, undo)
                .map_err(|e| e.to_string())?;
            if r.undone {
                println!("{}: revocation lifted", r.spiffe_id);
            } else {
                println!(
                    "{}: revoked ({} tokens and {} certificates on the deny list)",
                    r.spiffe_id, r.jtis, r.serials
                );
            }
        }
        Cmd::Ca {
            cmd: CaCmd::Rotate { activate_after },
        } => {
            let (from, old_leaves, not_after) = nhi_ctl::client(&cli.config)?
                .ca_rotate(activate_after.map(|d| d.as_secs()))
                .map_err(|e| e.to_string())?;
            println!(
                "new CA in every bundle now; it signs from {from}, the previous CA leaves the bundle at {old_leaves} and the new one expires at {not_after} (unix times)"
            );
        }
        Cmd::Node {
            cmd:
                NodeCmd::Revoke {
                    node,
                    undo,
                    openbao_token_file,
                },
        } => {
            let nhid = nhi_ctl::client(&cli.config)?;
            println!(
                "{}",
                nhi_ctl::node::revoke(&nhid, &node, undo, &openbao_token_file)?
            );
        }
        Cmd::Audit { dir, cmd } => {
            let dir = match dir {
                Some(d) => d,
                None => nhi_core::Config::load(&cli.config)
                    .map_err(|e| e.to_string())?
                    .audit_dir(),
            };
            match cmd {
                AuditCmd::Verify => {
                    let r = audit::verify(&dir)?;
                    r.problems.iter().for_each(|p| eprintln!("{p}"));
                    r.losses.iter().for_each(|l| println!("{l}"));
                    println!("{}", r.outcome?);
                }
                AuditCmd::Tail {
                    lines,
                    identity,
                    follow,
                } => audit::tail(
                    &dir,
                    lines,
                    identity.as_deref(),
                    follow,
                    &mut std::io::stdout().lock(),
                )?,
            }
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

/// JSON output, pretty-printed.
fn json(v: &impl serde::Serialize) -> Result<String, String> {
    serde_json::to_string_pretty(v).map_err(|e| e.to_string())
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
            config_version,
            containerd,
        } => containerd::plan(
            &containerd::Options {
                config: file,
                drop_in,
                set_as_default,
                config_version,
                containerd,
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
