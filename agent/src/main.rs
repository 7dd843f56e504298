use std::path::PathBuf;

use clap::Parser;

/// nhid: the nhi node daemon.
#[derive(Parser)]
#[command(name = "nhid", version, about)]
struct Args {
    /// Configuration file.
    #[arg(long, default_value = nhi_core::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NHI_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let result = nhi_core::Config::load(&args.config)
        .map_err(|e| e.to_string())
        .and_then(|config| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(nhi_agent::run(config))
        });
    if let Err(e) = result {
        eprintln!("nhid: {e}");
        std::process::exit(1);
    }
}
