//! Just enough of runc's command line to find what nhi-runc needs, without reinterpreting it:
//! the global `--log` / `--log-format`, the subcommand, and `create`/`run`'s `--bundle`.
//! runc (urfave/cli) accepts `--flag value`, `--flag=value`, `-flag value` and `-flag=value`.

use std::path::PathBuf;

/// runc's global flags that take a value (the others are booleans).
const GLOBAL_VALUE_FLAGS: &[&str] = &["log", "log-format", "root", "criu", "rootless"];
/// `create`/`run` flags that take a value.
const CREATE_VALUE_FLAGS: &[&str] = &["bundle", "b", "console-socket", "pid-file", "preserve-fds"];

#[derive(Debug, Default, PartialEq, Eq)]
pub struct RuncArgs {
    pub log: Option<PathBuf>,
    pub log_json: bool,
    /// The subcommand (`create`, `run`, `state`, ...), if any.
    pub command: Option<String>,
    /// `--bundle` of `create`/`run`; `None` means the current directory.
    pub bundle: Option<PathBuf>,
    /// The container id of `create`/`run`.
    pub id: Option<String>,
}

impl RuncArgs {
    /// Whether this invocation creates a container (the only ones nhi-runc touches).
    pub fn creates(&self) -> bool {
        matches!(self.command.as_deref(), Some("create" | "run"))
    }
}

/// Splits `-x`, `--x`, `-x=v`, `--x=v` into (name, inline value).
fn flag(arg: &str) -> Option<(&str, Option<&str>)> {
    let name = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    if name.is_empty() {
        return None;
    }
    Some(match name.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (name, None),
    })
}

/// The flags of `args[i..]` up to the first non-flag argument or `--` (where urfave/cli stops
/// parsing flags too), and the index after them.
fn scan<'a>(
    args: &'a [String],
    mut i: usize,
    value_flags: &[&str],
) -> (Vec<(&'a str, Option<&'a str>)>, usize) {
    let mut out = Vec::new();
    while let Some(a) = args.get(i) {
        if a == "--" {
            return (out, i + 1);
        }
        let Some((name, inline)) = flag(a) else { break };
        let value = match (value_flags.contains(&name), inline) {
            (true, Some(v)) => Some(v),
            (true, None) => {
                i += 1;
                args.get(i).map(String::as_str)
            }
            (false, _) => None,
        };
        out.push((name, value));
        i += 1;
    }
    (out, i)
}

pub fn parse(args: &[String]) -> RuncArgs {
    let mut out = RuncArgs::default();
    let (globals, i) = scan(args, 0, GLOBAL_VALUE_FLAGS);
    for (name, value) in globals {
        match (name, value) {
            ("log", Some(v)) => out.log = Some(v.into()),
            ("log-format", Some(v)) => out.log_json = v == "json",
            _ => {}
        }
    }
    let Some(cmd) = args.get(i) else { return out };
    out.command = Some(cmd.clone());
    if out.creates() {
        let (flags, j) = scan(args, i + 1, CREATE_VALUE_FLAGS);
        for (name, value) in flags {
            if matches!(name, "bundle" | "b") {
                out.bundle = value.map(PathBuf::from);
            }
        }
        out.id = args.get(j).cloned();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RuncArgs {
        parse(&s.split_whitespace().map(String::from).collect::<Vec<_>>())
    }

    #[test]
    fn containerd_style_create() {
        let a = p("--root /run/containerd/runc/k8s.io --log /run/x/log.json --log-format json --systemd-cgroup create --bundle /run/b --pid-file /run/b/init.pid c1");
        assert_eq!(a.command.as_deref(), Some("create"));
        assert_eq!(a.bundle, Some("/run/b".into()));
        assert_eq!(a.id.as_deref(), Some("c1"));
        assert_eq!(a.log, Some("/run/x/log.json".into()));
        assert!(a.log_json && a.creates());
    }

    #[test]
    fn flag_spellings() {
        assert_eq!(p("run -b=/x id").bundle, Some("/x".into()));
        assert_eq!(p("run -d -bundle /y id").bundle, Some("/y".into()));
        assert_eq!(
            p("--log=/l create --console-socket /s --bundle=/z id").bundle,
            Some("/z".into())
        );
        assert_eq!(p("--log=/l create id").log, Some("/l".into()));
        assert_eq!(p("run id").bundle, None);
        // A value that looks like a flag name is still a value.
        assert_eq!(p("create --pid-file --bundle id").bundle, None);
    }

    #[test]
    fn pass_through_commands() {
        let a = p("--root /r delete -f c1");
        assert_eq!(a.command.as_deref(), Some("delete"));
        assert!(!a.creates() && a.bundle.is_none());
        assert_eq!(p("--version").command, None);
        assert_eq!(
            p("exec -b /x id sh").bundle,
            None,
            "only create/run are parsed"
        );
    }
}
