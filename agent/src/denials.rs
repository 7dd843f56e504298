//! Packets the edge policy's kernel rules denied (`crate::nft`), turned into audit records.
//!
//! Every denial is counted in the table's named counters (exact); at most `nft::LOG_RATE` per
//! namespace are also logged to NFLOG group `nft::NFLOG_GROUP` with the deciding rule in the
//! prefix. `nhid` binds that group in each intercepted namespace (a netlink socket made inside
//! it: NFLOG groups are per namespace) and writes one `packet` record per logged packet,
//! attributed to the workload it attached there. When the table is replaced (reload, restart) or
//! removed (detach), the counters are read first and written as one summary record, so the
//! audit log holds the exact number of denials even when the logging was rate-limited.
//!
//! The kernel bounds the rate and the socket buffer bounds what waits: a workload flooding
//! denied packets costs nhid at most `LOG_RATE` records per second.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::Arc;

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_netfilter::nflog::{
    config_request, ConfigCmd, ConfigMode, PacketNla, ULogMessage,
};
use netlink_packet_netfilter::{NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily};
use netlink_sys::{constants::NETLINK_NETFILTER, Socket};
use nhi_core::audit::{now_ms, AuditEvent, AuditKind, Decision, Destination};
use tokio::io::unix::AsyncFd;

use crate::identity::Identity;
use crate::supervisor::Ctx;

/// What a logged packet says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    /// `udp`, `tcp`, `icmp`, `ipv6-icmp` or the IP protocol number.
    pub protocol: String,
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: Option<u16>,
    pub dst_port: Option<u16>,
}

fn protocol_name(p: u8) -> String {
    match p {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        58 => "ipv6-icmp".into(),
        n => format!("ip protocol {n}"),
    }
}

/// Reads the IP header (and the ports of TCP/UDP) of a logged packet.
pub fn parse_packet(b: &[u8]) -> Option<Denied> {
    let (proto, src, dst, l4) = match b.first()? >> 4 {
        4 => {
            let ihl = ((b[0] & 0x0f) as usize) * 4;
            if b.len() < 20 || ihl < 20 {
                return None;
            }
            let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
            let dst = Ipv4Addr::new(b[16], b[17], b[18], b[19]);
            (b[9], IpAddr::V4(src), IpAddr::V4(dst), b.get(ihl..))
        }
        6 => {
            if b.len() < 40 {
                return None;
            }
            let a = |o: usize| {
                let mut x = [0u8; 16];
                x.copy_from_slice(&b[o..o + 16]);
                Ipv6Addr::from(x)
            };
            // Skip extension headers (hop-by-hop, routing, fragment, destination options) to
            // the transport protocol.
            let (mut next, mut at) = (b[6], 40usize);
            while matches!(next, 0 | 43 | 44 | 60) {
                let Some(h) = b.get(at..at + 2) else { break };
                let len = if next == 44 {
                    8
                } else {
                    (h[1] as usize + 1) * 8
                };
                next = h[0];
                at += len;
            }
            (next, IpAddr::V6(a(8)), IpAddr::V6(a(24)), b.get(at..))
        }
        _ => return None,
    };
    let ports = match (proto, l4) {
        (6 | 17, Some(l4)) if l4.len() >= 4 => Some((
            u16::from_be_bytes([l4[0], l4[1]]),
            u16::from_be_bytes([l4[2], l4[3]]),
        )),
        _ => None,
    };
    Some(Denied {
        protocol: protocol_name(proto),
        src,
        dst,
        src_port: ports.map(|p| p.0),
        dst_port: ports.map(|p| p.1),
    })
}

/// The audit event of one logged denial; `prefix` is the NFLOG prefix (`nhi:<rule id>`).
pub fn event(d: &Denied, prefix: &str, policy: Option<&str>) -> AuditEvent {
    let rule = prefix
        .strip_prefix(crate::nft::LOG_PREFIX)
        .filter(|r| !r.is_empty())
        .map(str::to_string);
    let addr = |ip: IpAddr, port: Option<u16>| match port {
        Some(p) => SocketAddr::new(ip, p).to_string(),
        None => ip.to_string(),
    };
    let by = match (&rule, policy) {
        (Some(r), _) => format!("rule {r:?}"),
        (None, Some(p)) if d.protocol == "tcp" => {
            format!("edge policy {p:?} (TCP only leaves through the proxy)")
        }
        (None, Some(p)) => format!("the default of edge policy {p:?}"),
        (None, None) => "the edge policy".into(),
    };
    AuditEvent {
        ts_ms: now_ms(),
        kind: AuditKind::Packet,
        source: Some(addr(d.src, d.src_port)),
        destination: Some(Destination {
            addr: Some(addr(d.dst, d.dst_port)),
            ..Default::default()
        }),
        decision: Decision::Deny,
        rule,
        detail: Some(format!("{} packet denied by {by}", d.protocol)),
        ..Default::default()
    }
}

/// The summary record of a table's counters (`None` when nothing was denied).
pub fn summary(counters: &[(String, u64)], policy: Option<&str>) -> Option<AuditEvent> {
    let total: u64 = counters.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    let parts: Vec<String> = counters
        .iter()
        .filter(|(_, n)| *n > 0)
        .map(|(c, n)| format!("{} {n}", c.trim_start_matches("denied_")))
        .collect();
    Some(AuditEvent {
        ts_ms: now_ms(),
        kind: AuditKind::Packet,
        decision: Decision::Deny,
        detail: Some(format!(
            "{total} packets denied by edge policy {} while its rules were installed ({}); at most {} were recorded one by one",
            policy.unwrap_or("?"),
            parts.join(", "),
            crate::nft::LOG_RATE
        )),
        ..Default::default()
    })
}

/// Opens an NFLOG socket inside the namespace behind `netns` (a short-lived thread enters it:
/// the socket stays there) and binds our group.
fn open(netns: &impl AsRawFd) -> io::Result<Socket> {
    let ns = netns.as_raw_fd();
    // SAFETY: the fd is a namespace handle borrowed for the duration of the thread below,
    // which the caller keeps open (it joins the thread before returning).
    let ns = unsafe { BorrowedFd::borrow_raw(ns) }.try_clone_to_owned()?;
    std::thread::spawn(move || -> io::Result<Socket> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let mut s = Socket::new(NETLINK_NETFILTER)?;
        s.bind_auto()?;
        // Room for bursts while nhid is busy; beyond it the kernel drops logs (never packets).
        let _ = s.set_rx_buf_sz(256 * 1024);
        let req = config_request(
            NetfilterProtoFamily::Unspec,
            crate::nft::NFLOG_GROUP,
            vec![
                ConfigCmd::Bind.into(),
                ConfigMode::new_packet(crate::nft::LOG_SNAPLEN).into(),
            ],
        );
        let mut buf = vec![0; req.header.length as usize];
        req.serialize(&mut buf);
        s.send(&buf, 0)?;
        let mut ack = vec![0u8; 4096];
        let n = s.recv(&mut &mut ack[..], 0)?;
        match NetlinkMessage::<NetfilterMessage>::deserialize(&ack[..n]) {
            Ok(m) => {
                if let NetlinkPayload::Error(e) = m.payload {
                    if let Some(code) = e.code {
                        return Err(io::Error::from_raw_os_error(-code.get()));
                    }
                }
            }
            Err(e) => return Err(io::Error::other(format!("NFLOG bind answer: {e}"))),
        }
        s.set_non_blocking(true)?;
        Ok(s)
    })
    .join()
    .map_err(|_| io::Error::other("NFLOG thread panicked"))?
}

/// Reads one namespace's logged denials until dropped.
pub struct Watch {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts reading the denials logged in the namespace behind `netns` for `identity`.
pub fn watch(ctx: Arc<Ctx>, identity: Arc<Identity>, netns: &impl AsRawFd) -> io::Result<Watch> {
    let sock = open(netns)?;
    // SAFETY: `Socket` owns its fd, keeps it open until dropped and always reports the same
    // one; the AsyncFd owns the socket for its whole life.
    let fd = unsafe { AsyncFd::register_with_interest(sock, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)?;
    let task = tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match fd.readable().await {
                Ok(mut guard) => match guard.try_io(|s| s.get_ref().recv(&mut &mut buf[..], 0)) {
                    Ok(Ok(n)) => n,
                    Ok(Err(e)) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        tracing::warn!(spiffe_id = %identity.spiffe_id, "denied-packet log overran its buffer; the counters still hold every denial");
                        continue;
                    }
                    Ok(Err(e)) => {
                        tracing::error!(spiffe_id = %identity.spiffe_id, "reading denied-packet log: {e}");
                        return;
                    }
                    Err(_would_block) => continue,
                },
                Err(e) => {
                    tracing::error!("denied-packet log: {e}");
                    return;
                }
            };
            let policy = ctx.policy_for(&identity).map(|p| p.id);
            let mut events = Vec::new();
            let mut at = 0;
            while at < n {
                let Ok(m) = NetlinkMessage::<NetfilterMessage>::deserialize(&buf[at..n]) else {
                    break;
                };
                let len = m.header.length as usize;
                if let NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::ULog(ULogMessage::Packet(nlas)),
                    ..
                }) = &m.payload
                {
                    let prefix = nlas.iter().find_map(|a| match a {
                        PacketNla::Prefix(p) => Some(p.to_string_lossy().into_owned()),
                        _ => None,
                    });
                    let packet = nlas.iter().find_map(|a| match a {
                        PacketNla::Payload(p) => parse_packet(p),
                        _ => None,
                    });
                    if let (Some(prefix), Some(d)) = (prefix, packet) {
                        events.push(event(&d, &prefix, policy.as_deref()));
                    }
                }
                if len == 0 {
                    break;
                }
                at += (len + 3) & !3;
            }
            if !events.is_empty() {
                crate::audit::ingest(&ctx.audit, &ctx.metrics, &identity, events, 0);
            }
        }
    });
    Ok(Watch { task })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4() -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 33, 0, 0, 0x40, 0, 64, 17, 0, 0];
        p.extend([10, 77, 0, 2, 10, 77, 0, 1]);
        p.extend(40000u16.to_be_bytes());
        p.extend(9999u16.to_be_bytes());
        p.extend([0, 13, 0, 0, b'x', b'y', b'z', b'!', b'\n']);
        p
    }

    #[test]
    fn reads_addresses_and_ports_of_logged_packets() {
        assert_eq!(
            parse_packet(&udp4()),
            Some(Denied {
                protocol: "udp".into(),
                src: "10.77.0.2".parse().unwrap(),
                dst: "10.77.0.1".parse().unwrap(),
                src_port: Some(40000),
                dst_port: Some(9999),
            })
        );
        let mut icmp6 = vec![0x60, 0, 0, 0, 0, 8, 58, 64];
        icmp6.extend("fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        icmp6.extend("fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        icmp6.extend([128, 0, 0, 0, 0, 1, 0, 1]);
        let d = parse_packet(&icmp6).unwrap();
        assert_eq!((d.protocol.as_str(), d.dst_port), ("ipv6-icmp", None));
        assert_eq!(d.dst, "fd00::1".parse::<IpAddr>().unwrap());
        // Behind a hop-by-hop header (MLD reports carry one): the transport protocol counts.
        let mut mld = vec![0x60, 0, 0, 0, 0, 16, 0, 1];
        mld.extend("fe80::1".parse::<Ipv6Addr>().unwrap().octets());
        mld.extend("ff02::16".parse::<Ipv6Addr>().unwrap().octets());
        mld.extend([58, 0, 5, 2, 0, 0, 1, 0, 143, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(parse_packet(&mld).unwrap().protocol, "ipv6-icmp");
        assert_eq!(parse_packet(&[0x45, 0, 0]), None, "truncated");
        assert_eq!(parse_packet(&[]), None);
        assert_eq!(parse_packet(&[0x20; 40]), None, "not IP");
    }

    #[test]
    fn records_name_the_rule_or_the_default() {
        let d = parse_packet(&udp4()).unwrap();
        let e = event(&d, "nhi:no-echo", Some("web"));
        assert_eq!((e.kind, e.decision), (AuditKind::Packet, Decision::Deny));
        assert_eq!(e.rule.as_deref(), Some("no-echo"));
        assert_eq!(
            e.destination.unwrap().addr.as_deref(),
            Some("10.77.0.1:9999")
        );
        assert_eq!(e.source.as_deref(), Some("10.77.0.2:40000"));
        let e = event(&d, "nhi:", Some("web"));
        assert_eq!(e.rule, None);
        assert!(e.detail.unwrap().contains("default of edge policy \"web\""));
    }

    #[test]
    fn summaries_only_when_something_was_denied() {
        let none = vec![("denied_udp".to_string(), 0), ("denied_tcp".to_string(), 0)];
        assert!(summary(&none, Some("p")).is_none());
        let some = vec![
            ("denied_udp".to_string(), 7),
            ("denied_icmp".to_string(), 2),
        ];
        let e = summary(&some, Some("p")).unwrap();
        let d = e.detail.unwrap();
        assert!(d.starts_with("9 packets denied by edge policy p"), "{d}");
        assert!(d.contains("udp 7, icmp 2"), "{d}");
    }
}
