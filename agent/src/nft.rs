//! The kernel's part of an edge policy: an nftables table of our own (`inet nhi`) inside the
//! workload's network namespace, never the host's. Installed with `nft -f -` run in the
//! namespace (one atomic transaction), replaced whole on policy reload, deleted at detach.
//!
//! - `egress` (nat, output): outbound TCP is redirected to the companion's proxy port, and UDP
//!   DNS to the policy's resolvers to its DNS relay;
//! - `egress_filter` (filter, output): every other protocol, IPv4 and IPv6. The policy's UDP and
//!   ICMP rules in order, then its default; TCP that reaches this chain was not redirected
//!   (crafted, or older than the rules) and is dropped. Denials are counted per protocol
//!   (named counters `denied_tcp|udp|icmp|other`) and logged, at most [`LOG_RATE`] per
//!   namespace and with the deciding rule in the prefix, to NFLOG group [`NFLOG_GROUP`], which
//!   `nhid` reads (`crate::denials`);
//! - `inbound` (nat, prerouting): ports with an inbound rule go to the inbound port.
//!
//! What passes unchecked: the companion's own sockets, recognised by their cgroup (nftables
//! `socket cgroupv2`, never a uid: any root process of a container can switch to any uid, and
//! a uid per companion would be a whole range to step into); loopback; packets of flows that are
//! already established (replies to what a peer opened, and flows older than the rules); IPv6
//! neighbour discovery (hop limit 255) and multicast listener reports (hop limit 1, to ff02::):
//! the kernel's own link-local signalling, which never leaves the link. What the operator must
//! withhold from a workload so it cannot step around these rules is in ARCHITECTURE.md.

use std::ffi::CString;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Command, Stdio};

use nhi_core::policy::{Action, EgressConfig, EgressRule, Policy, Protocol};

use crate::cgroup::Exempt;

/// Our table: `nft list table inet nhi` inside a workload's namespace shows it.
pub const TABLE: &str = "inet nhi";
/// NFLOG group denied packets are logged to (groups are per network namespace).
pub const NFLOG_GROUP: u16 = 20040;
/// At most this many denied packets per namespace are logged; all are counted.
pub const LOG_RATE: &str = "5/second burst 20 packets";
/// Log prefix of our denials, followed by the deciding rule's id (nothing: the default).
pub const LOG_PREFIX: &str = "nhi:";
/// Bytes of each logged packet handed to `nhid` (IP and transport headers).
pub const LOG_SNAPLEN: u32 = 128;
/// The named counters of denials, by protocol class.
pub const COUNTERS: [&str; 4] = ["denied_tcp", "denied_udp", "denied_icmp", "denied_other"];

fn split_cidrs(rule: &EgressRule) -> (Vec<String>, Vec<String>) {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    for c in &rule.cidr {
        let s = String::from(*c);
        match c.addr {
            IpAddr::V4(_) => v4.push(s),
            IpAddr::V6(v6a) => match v6a.to_ipv4_mapped() {
                Some(a) => v4.push(format!("{a}/{}", c.prefix.saturating_sub(96))),
                None => v6.push(s),
            },
        }
    }
    (v4, v6)
}

fn set(items: &[String]) -> String {
    format!("{{ {} }}", items.join(", "))
}

/// The log prefix of denials by egress rule `rule` (`None`: the policy's default). Rule ids
/// are letters, digits and `.-_`; the kernel keeps 127 bytes.
pub fn log_prefix(rule: Option<&str>) -> String {
    let mut p = format!("{LOG_PREFIX}{}", rule.unwrap_or(""));
    p.truncate(120);
    p
}

/// The denying rules for packets matching `m`: counted in `denied_<class>`, logged within the
/// namespace's shared log rate (with the deciding rule in the prefix), dropped.
fn deny(m: &str, class: &str, rule: Option<&str>) -> String {
    let m = if m.is_empty() {
        String::new()
    } else {
        format!("{m} ")
    };
    format!(
        "\t\t{m}counter name \"denied_{class}\" limit name \"deny_log\" log prefix \"{}\" group {NFLOG_GROUP} snaplen {LOG_SNAPLEN} drop\n\t\t{m}drop\n",
        log_prefix(rule)
    )
}

/// The nft rules of one UDP/ICMP egress rule (one per address family it applies to).
fn packet_rule(rule: &EgressRule) -> Vec<String> {
    let (v4, v6) = split_cidrs(rule);
    let families: Vec<(&str, &str, Option<&Vec<String>>)> = if rule.cidr.is_empty() {
        vec![("ip", "icmp", None), ("ip6", "ipv6-icmp", None)]
    } else {
        let mut f = Vec::new();
        if !v4.is_empty() {
            f.push(("ip", "icmp", Some(&v4)));
        }
        if !v6.is_empty() {
            f.push(("ip6", "ipv6-icmp", Some(&v6)));
        }
        f
    };
    let ports: Vec<String> = rule.ports.iter().map(u16::to_string).collect();
    let mut out = Vec::new();
    for (fam, icmp, addrs) in families {
        let mut m = match addrs {
            Some(a) => format!("{fam} daddr {}", set(a)),
            None => format!("meta nfproto {}", if fam == "ip" { "ipv4" } else { "ipv6" }),
        };
        let class = match rule.protocol {
            Protocol::Udp if ports.is_empty() => {
                m.push_str(" meta l4proto udp");
                "udp"
            }
            Protocol::Udp => {
                m.push_str(&format!(" udp dport {}", set(&ports)));
                "udp"
            }
            _ => {
                m.push_str(&format!(" meta l4proto {icmp}"));
                "icmp"
            }
        };
        out.push(match rule.action {
            Action::Allow => format!("\t\t{m} accept\n"),
            Action::Deny => deny(&m, class, Some(&rule.id)),
        });
    }
    out
}

/// The ruleset for a workload whose companion's cgroup is `exempt`. Starts by declaring and
/// deleting the table so applying it replaces any previous version in the same transaction.
pub fn ruleset(policy: &Policy, egress: &EgressConfig, exempt: &Exempt) -> String {
    let companion = format!("socket cgroupv2 level {} \"{}\"", exempt.level, exempt.path);
    let mut s = format!("table {TABLE}\ndelete table {TABLE}\ntable {TABLE} {{\n");
    for c in COUNTERS {
        s.push_str(&format!("\tcounter {c} {{ }}\n"));
    }
    s.push_str(&format!("\tlimit deny_log {{ rate {LOG_RATE} }}\n"));
    // NAT: TCP to the proxy, DNS to the policy's resolvers to the relay.
    s.push_str(&format!(
        "\tchain egress {{\n\
         \t\ttype nat hook output priority -100; policy accept;\n\
         \t\t{companion} return\n\
         \t\tip daddr 127.0.0.0/8 return\n\
         \t\tip6 daddr ::1 return\n\
         \t\tmeta l4proto tcp redirect to :{}\n",
        egress.proxy_port
    ));
    let (dns4, dns6): (Vec<String>, Vec<String>) = {
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for d in &policy.dns {
            match nhi_core::policy::canonical_ip(*d) {
                IpAddr::V4(a) => v4.push(a.to_string()),
                IpAddr::V6(a) => v6.push(a.to_string()),
            }
        }
        (v4, v6)
    };
    if !dns4.is_empty() {
        s.push_str(&format!(
            "\t\tip daddr {} udp dport 53 redirect to :{}\n",
            set(&dns4),
            egress.dns_port
        ));
    }
    if !dns6.is_empty() {
        s.push_str(&format!(
            "\t\tip6 daddr {} udp dport 53 redirect to :{}\n",
            set(&dns6),
            egress.dns_port
        ));
    }
    s.push_str("\t}\n");
    // Filter: everything that was not redirected.
    s.push_str(&format!(
        "\tchain egress_filter {{\n\
         \t\ttype filter hook output priority 0; policy accept;\n\
         \t\t{companion} accept\n\
         \t\toifname \"lo\" accept\n\
         \t\tip daddr 127.0.0.0/8 accept\n\
         \t\tip6 daddr ::1 accept\n\
         \t\tct state established,related accept\n\
         \t\ticmpv6 type {{ nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert }} ip6 hoplimit 255 accept\n\
         \t\tip6 daddr ff02::/16 ip6 hoplimit 1 icmpv6 type {{ mld-listener-report, mld2-listener-report, mld-listener-done }} accept\n"
    ));
    for r in policy.packet_rules() {
        for line in packet_rule(r) {
            s.push_str(&line);
        }
    }
    // TCP goes through the proxy or nowhere.
    s.push_str(&deny("meta l4proto tcp", "tcp", None));
    if policy.default == Action::Deny {
        s.push_str(&deny("meta l4proto udp", "udp", None));
        s.push_str(&deny("meta l4proto { icmp, ipv6-icmp }", "icmp", None));
        s.push_str(&deny("", "other", None));
    }
    s.push_str("\t}\n");
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

/// The denial counters of our table in the namespace: (name, packets), from `nft -j`.
pub fn counters(netns: &impl AsRawFd) -> io::Result<Vec<(String, u64)>> {
    let out = run(
        netns,
        &["-j", "list", "counters", "table", "inet", "nhi"],
        None,
        None,
    )?;
    Ok(parse_counters(&out))
}

/// `nft -j list counters` output → (name, packets).
pub fn parse_counters(json: &str) -> Vec<(String, u64)> {
    let v: serde_json::Value = serde_json::from_str(json).unwrap_or_default();
    v["nftables"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|o| {
                    let c = o.get("counter")?;
                    Some((c["name"].as_str()?.to_string(), c["packets"].as_u64()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `nft -f -` with `script` on stdin inside the network namespace behind `netns`, seeing
/// the cgroup v2 hierarchy mounted at `cgroup2` as `/sys/fs/cgroup` (where nft resolves the
/// paths of `socket cgroupv2` rules: on a hybrid host that is a tmpfs of v1 mounts).
pub fn apply(netns: &impl AsRawFd, script: &str, cgroup2: &Path) -> io::Result<()> {
    run(netns, &["-f", "-"], Some(script), Some(cgroup2)).map(|_| ())
}

fn run(
    netns: &impl AsRawFd,
    args: &[&str],
    stdin: Option<&str>,
    cgroup2: Option<&Path>,
) -> io::Result<String> {
    let ns = netns.as_raw_fd();
    let mut cmd = Command::new(nft_binary());
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    const SYS_FS_CGROUP: &str = "/sys/fs/cgroup";
    let bind = match cgroup2 {
        Some(p) if p != Path::new(SYS_FS_CGROUP) => Some((
            CString::new(p.as_os_str().as_encoded_bytes())
                .map_err(|_| io::Error::other("cgroup2 mount path holds a NUL"))?,
            CString::new(SYS_FS_CGROUP).expect("no NUL"),
            CString::new("/").expect("no NUL"),
        )),
        _ => None,
    };
    // SAFETY: runs in the forked child before exec and only calls setns(2), unshare(2) and
    // mount(2) on C strings built before the fork; all async-signal-safe, nothing allocated or
    // locked.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            if libc::setns(ns, libc::CLONE_NEWNET) != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some((src, dst, root)) = &bind {
                // A private mount namespace for nft alone: nothing it sees leaks to the host.
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(
                        src.as_ptr(),
                        dst.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    ) != 0
                {
                    return Err(io::Error::last_os_error());
                }
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
    if let Some(script) = stdin {
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(script.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(io::Error::other(format!(
            "nft {} failed ({}): {}",
            args.join(" "),
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

    fn policy(v: serde_json::Value) -> Policy {
        serde_json::from_value(v).unwrap()
    }

    fn exempt() -> Exempt {
        Exempt::of("/nhi/c-4026532181")
    }

    fn base(extra: serde_json::Value) -> Policy {
        let mut v = serde_json::json!({"id": "p", "spiffe_ids": ["spiffe://td/a"]});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        policy(v)
    }

    #[test]
    fn companion_exempt_by_cgroup_never_by_uid() {
        let r = ruleset(
            &base(serde_json::json!({})),
            &EgressConfig::default(),
            &exempt(),
        );
        assert!(
            r.starts_with("table inet nhi\ndelete table inet nhi\n"),
            "{r}"
        );
        assert!(!r.contains("skuid"), "no uid exemption: {r}");
        let nat = &r[r.find("chain egress {").unwrap()..r.find("chain egress_filter").unwrap()];
        let cg = nat
            .find("socket cgroupv2 level 2 \"nhi/c-4026532181\" return")
            .unwrap();
        let redirect = nat.find("meta l4proto tcp redirect to :15001").unwrap();
        assert!(cg < redirect, "exemption first: {nat}");
        assert!(
            !r.contains("prerouting"),
            "no inbound chain without inbound rules"
        );
        let filter = &r[r.find("chain egress_filter").unwrap()..];
        assert!(filter.contains("socket cgroupv2 level 2 \"nhi/c-4026532181\" accept"));
        // Default allow: only unredirected TCP is refused.
        assert!(filter.contains("meta l4proto tcp counter name \"denied_tcp\" limit name \"deny_log\" log prefix \"nhi:\" group 20040 snaplen 128 drop\n\t\tmeta l4proto tcp drop\n"), "{filter}");
        assert!(!filter.contains("denied_udp"), "{filter}");
    }

    #[test]
    fn default_deny_drops_every_protocol_after_the_rules_in_order() {
        let p = base(serde_json::json!({
            "default": "deny",
            "dns": ["10.96.0.10", "fd00::53"],
            "egress": [
                {"id": "ntp", "protocol": "udp", "cidr": ["10.0.0.0/8", "2001:db8::/32"], "ports": [123]},
                {"id": "no-echo", "protocol": "udp", "action": "deny", "ports": [7]},
                {"id": "ping", "protocol": "icmp", "cidr": ["10.0.0.1"]},
                {"id": "web", "ports": [80]},
            ],
            "inbound": [{"id": "i", "ports": [8443, 8080, 8080], "allow": ["spiffe://td/b"], "audience": "a"}],
        }));
        let r = ruleset(&p, &EgressConfig::default(), &exempt());
        let pos = |needle: &str| {
            r.find(needle)
                .unwrap_or_else(|| panic!("{needle:?} not in:\n{r}"))
        };
        // DNS to the resolvers goes to the relay; other DNS is just UDP.
        pos("ip daddr { 10.96.0.10 } udp dport 53 redirect to :15053");
        pos("ip6 daddr { fd00::53 } udp dport 53 redirect to :15053");
        let ntp4 = pos("ip daddr { 10.0.0.0/8 } udp dport { 123 } accept");
        let ntp6 = pos("ip6 daddr { 2001:db8::/32 } udp dport { 123 } accept");
        let echo = pos("meta nfproto ipv4 udp dport { 7 } counter name \"denied_udp\" limit name \"deny_log\" log prefix \"nhi:no-echo\"");
        let ping = pos("ip daddr { 10.0.0.1/32 } meta l4proto icmp accept");
        let udp = pos("meta l4proto udp counter name \"denied_udp\" limit name \"deny_log\" log prefix \"nhi:\" ");
        let icmp = pos("meta l4proto { icmp, ipv6-icmp } counter name \"denied_icmp\"");
        let other = pos("\t\tcounter name \"denied_other\" limit name \"deny_log\"");
        pos("\t\tdrop\n");
        assert!(
            ntp4 < ntp6 && ntp6 < echo && echo < ping && ping < udp && udp < icmp && icmp < other
        );
        assert!(!r.contains("dport { 80 }"), "TCP rules are the companion's");
        pos("limit deny_log { rate 5/second burst 20 packets }");
        pos("tcp dport { 8080, 8443 } redirect to :15006");
        for c in COUNTERS {
            pos(&format!("counter {c} {{ }}"));
        }
    }

    #[test]
    fn counters_from_nft_json() {
        let j = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"counter": {"family": "inet", "name": "denied_udp", "table": "nhi", "handle": 5, "packets": 7, "bytes": 400}}, {"counter": {"family": "inet", "name": "denied_tcp", "table": "nhi", "handle": 4, "packets": 0, "bytes": 0}}]}"#;
        assert_eq!(
            parse_counters(j),
            vec![("denied_udp".to_string(), 7), ("denied_tcp".to_string(), 0)]
        );
        assert!(parse_counters("not json").is_empty());
    }
}
