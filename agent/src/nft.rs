//! Interception rules for edge policy: an nftables table of our own (`inet nhi`) inside the
//! workload's network namespace, never the host's. Outbound TCP of every uid but the
//! companion's, except to loopback, is redirected to the companion's proxy port; inbound TCP to
//! ports with an inbound rule is redirected to its inbound port. Installed with `nft -f -` run in
//! the namespace (one atomic transaction), replaced whole on policy reload, deleted at detach.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use nhi_core::policy::{EgressConfig, Policy};

/// Our table: `nft list table inet nhi` inside a workload's namespace shows it.
pub const TABLE: &str = "inet nhi";

/// The ruleset for a workload whose companion runs as `companion_uid`. Starts by declaring and
/// deleting the table so applying it replaces any previous version in the same transaction.
pub fn ruleset(policy: &Policy, egress: &EgressConfig, companion_uid: u32) -> String {
    let mut s = format!(
        "table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n\
         \tchain egress {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\tmeta skuid {companion_uid} return\n\
         \t\tip daddr 127.0.0.0/8 return\n\
         \t\tip6 daddr ::1 return\n\
         \t\tmeta l4proto tcp redirect to :{}\n\
         \t}}\n",
        egress.proxy_port
    );
    let ports = policy.inbound_ports();
    if !ports.is_empty() {
        let list: Vec<String> = ports.iter().map(u16::to_string).collect();
        s.push_str(&format!(
            "\tchain inbound {{\n\
             \t\ttype nat hook prerouting priority -100; policy accept;\n\
             \t\ttcp dport {{ {} }} redirect to :{}\n\
             \t}}\n",
            list.join(", "),
            egress.inbound_port
        ));
    }
    s.push_str("}\n");
    s
}

/// Deletes our table (if present) in one transaction.
pub fn removal() -> String {
    format!("table {TABLE}\ndelete table {TABLE}\n")
}

/// Runs `nft -f -` with `script` on stdin inside the network namespace behind `netns`.
pub fn apply(netns: &impl AsRawFd, script: &str) -> io::Result<()> {
    let ns = netns.as_raw_fd();
    let mut cmd = Command::new(nft_binary());
    cmd.args(["-f", "-"])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: runs in the forked child before exec and only calls setns(2), which is
    // async-signal-safe; nothing is allocated or locked.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("running nft (install the nftables package): {e}"),
        )
    })?;
    child
        .stdin
        .take()
        .expect("piped stdin")
        .write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "nft -f - failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

fn nft_binary() -> &'static str {
    ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
        .unwrap_or("nft")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(inbound: bool) -> Policy {
        let mut p: Policy = serde_json::from_value(serde_json::json!({
            "id": "p", "spiffe_ids": ["spiffe://td/a"],
            "inbound": [{"id": "i", "ports": [8443, 8080, 8080], "allow": ["spiffe://td/b"], "audience": "a"}],
        }))
        .unwrap();
        if !inbound {
            p.inbound.clear();
        }
        p
    }

    #[test]
    fn ruleset_redirects_all_but_companion_and_loopback() {
        let r = ruleset(&policy(false), &EgressConfig::default(), 65533);
        assert!(
            r.starts_with("table inet nhi\ndelete table inet nhi\n"),
            "{r}"
        );
        let skuid = r.find("meta skuid 65533 return").unwrap();
        let lo = r.find("ip daddr 127.0.0.0/8 return").unwrap();
        let redirect = r.find("meta l4proto tcp redirect to :15001").unwrap();
        assert!(
            skuid < redirect && lo < redirect,
            "exemptions come first: {r}"
        );
        assert!(
            !r.contains("prerouting"),
            "no inbound chain without inbound rules"
        );
        let r = ruleset(&policy(true), &EgressConfig::default(), 65533);
        assert!(
            r.contains("tcp dport { 8080, 8443 } redirect to :15006"),
            "{r}"
        );
    }
}
