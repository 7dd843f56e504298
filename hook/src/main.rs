//! `nhi-hook <createRuntime|prestart|poststop> [--config FILE]`. Never writes to stdout; at most
//! one line on stderr. Exit 1 only when a selected container must not start (fail-closed).

use std::path::PathBuf;

use nhi_hook::{run, Outcome, Stage};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut stage = None;
    let mut config = std::env::var_os("NHI_CONFIG")
        .map(PathBuf::from)
        .unwrap_or_else(|| nhi_core::config::DEFAULT_CONFIG_PATH.into());
    while let Some(a) = args.next() {
        match a.as_str() {
            "--config" => match args.next() {
                Some(p) => config = p.into(),
                None => die("--config needs a file"),
            },
            "--version" => {
                eprintln!("nhi-hook {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            s if stage.is_none() => match Stage::parse(s) {
                Some(st) => stage = Some(st),
                None => die(&format!(
                    "unknown stage {s:?} (createRuntime, prestart, poststop)"
                )),
            },
            s => die(&format!("unexpected argument {s:?}")),
        }
    }
    let Some(stage) = stage else {
        die("usage: nhi-hook <createRuntime|prestart|poststop> [--config FILE]");
    };
    match run(stage, &config, std::io::stdin().lock()) {
        Ok(Outcome::FailedOpen { message }) => {
            eprintln!("nhi-hook: warning: starting without an nhi companion (rule is fail_open): {message}");
        }
        Ok(_) => {}
        Err(e) if stage == Stage::Poststop => eprintln!("nhi-hook: poststop: {e}"),
        Err(e) => die(&e.to_string()),
    }
}

fn die(msg: &str) -> ! {
    eprintln!("nhi-hook: {msg}");
    std::process::exit(1);
}
