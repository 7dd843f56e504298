//! DNS at the edge: what binds a name to addresses.
//!
//! An allow rule that names its destination (`sni = "*.github.com"`, `host = "api.example.com"`)
//! holds only for the addresses that name resolves to, never for wherever the workload chose to
//! send it. Like Cilium's FQDN policy, the companion learns those addresses from the DNS answers
//! the workload itself received: `nhid`'s rules redirect the workload's DNS queries to the
//! policy's resolvers (UDP) to [`serve_udp`] here, and its TCP connections to them arrive at
//! [`relay_tcp`]; both relay each query to a resolver, remember every A/AAAA answer (following
//! CNAME chains) for its TTL (at least `dns_min_ttl`), and only then hand the answer back, so a
//! client never connects before its answer is known. A name the companion has no live answer
//! for (the workload used a cached answer, or resolved before the companion restarted) is
//! resolved by the companion itself at the same resolvers before the connection is refused.
//!
//! The companion runs in the workload's network namespace but the host's mount namespace: it
//! never reads `/etc/resolv.conf` (the host's) and asks only the policy's `dns` resolvers.
//! Every relayed query is audited (`dns` records). Memory is bounded: at most [`MAX_NAMES`]
//! names with [`MAX_ADDRS`] addresses each, [`MAX_IN_FLIGHT`] queries relayed at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use nhi_core::audit::{AuditKind, Decision, Destination};
use nhi_core::policy::canonical_ip;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use super::{event, finish, Edge};

/// Names remembered at once (the workload chooses them: bounded).
pub const MAX_NAMES: usize = 4096;
/// Addresses remembered per name.
pub const MAX_ADDRS: usize = 32;
/// Queries relayed at once; more are dropped (the client retries).
pub const MAX_IN_FLIGHT: usize = 256;
/// The longest an answer binds, whatever its TTL says.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long the companion waits for one resolver.
pub const QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// Idle time after which a DNS-over-TCP relay closes.
const TCP_IDLE: Duration = Duration::from_secs(30);
/// Largest DNS message over UDP we accept (EDNS allows up to 4096 in practice).
const MAX_UDP: usize = 4096;

/// A name as compared: lower case, without the trailing dot.
pub fn canonical_name(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// Every (question name, address, TTL) an answer gives, following CNAME chains from each
/// question name (so `www.example.com CNAME example.com; example.com A 192.0.2.1` binds both
/// names to 192.0.2.1; the TTL is the smallest along the chain).
pub fn bindings(msg: &Message) -> Vec<(String, IpAddr, u32)> {
    let mut out = Vec::new();
    for q in &msg.queries {
        let qname = canonical_name(&q.name().to_ascii());
        // (name, smallest TTL on the way to it)
        let mut chain: Vec<(String, u32)> = vec![(qname.clone(), u32::MAX)];
        let mut i = 0;
        while i < chain.len() && chain.len() <= msg.answers.len() + 1 {
            let (name, ttl) = chain[i].clone();
            for r in &msg.answers {
                if canonical_name(&r.name.to_ascii()) != name {
                    continue;
                }
                match &r.data {
                    RData::CNAME(c) => {
                        let target = canonical_name(&c.0.to_ascii());
                        if !chain.iter().any(|(n, _)| *n == target) {
                            chain.push((target, ttl.min(r.ttl)));
                        }
                    }
                    RData::A(a) => {
                        let t = ttl.min(r.ttl);
                        out.push((qname.clone(), IpAddr::V4(a.0), t));
                        if name != qname {
                            out.push((name.clone(), IpAddr::V4(a.0), t));
                        }
                    }
                    RData::AAAA(a) => {
                        let t = ttl.min(r.ttl);
                        out.push((qname.clone(), IpAddr::V6(a.0), t));
                        if name != qname {
                            out.push((name.clone(), IpAddr::V6(a.0), t));
                        }
                    }
                    _ => {}
                }
            }
            i += 1;
        }
    }
    out
}

/// What an answer said, for the audit record.
pub fn describe(msg: &Message) -> String {
    let b = bindings(msg);
    let qtype = msg
        .queries
        .first()
        .map(|q| q.query_type().to_string())
        .unwrap_or_default();
    if b.is_empty() {
        return format!("{qtype}: {} (no addresses)", msg.metadata.response_code);
    }
    let mut addrs: Vec<String> = Vec::new();
    for (_, ip, ttl) in &b {
        let s = format!("{ip} ttl {ttl}");
        if !addrs.contains(&s) {
            addrs.push(s);
        }
    }
    addrs.truncate(8);
    format!("{qtype}: {}", addrs.join(", "))
}

#[derive(Default)]
struct Table {
    names: HashMap<String, Vec<(IpAddr, Instant)>>,
    /// Names the companion resolved itself lately: not asked again before this.
    resolved: HashMap<String, Instant>,
}

/// The names the workload (and the companion) resolved, with their addresses until they expire.
pub struct Names {
    table: Mutex<Table>,
    min_ttl: Duration,
}

impl Names {
    pub fn new(min_ttl: Duration) -> Names {
        Names {
            table: Mutex::new(Table::default()),
            min_ttl,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers what `msg` (a resolver's answer) binds.
    pub fn learn(&self, msg: &Message, now: Instant) {
        let b = bindings(msg);
        if b.is_empty() {
            return;
        }
        let mut t = self.lock();
        for (name, ip, ttl) in b {
            let until = now
                + Duration::from_secs(ttl as u64)
                    .max(self.min_ttl)
                    .min(MAX_TTL);
            if !t.names.contains_key(&name) && t.names.len() >= MAX_NAMES {
                t.names.retain(|_, v| {
                    v.retain(|(_, u)| *u > now);
                    !v.is_empty()
                });
                if t.names.len() >= MAX_NAMES {
                    // Still full of live names: make room with one arbitrary eviction.
                    if let Some(k) = t.names.keys().next().cloned() {
                        t.names.remove(&k);
                    }
                }
            }
            let ip = canonical_ip(ip);
            let v = t.names.entry(name).or_default();
            match v.iter_mut().find(|(a, _)| *a == ip) {
                Some(e) => e.1 = e.1.max(until),
                None => {
                    v.retain(|(_, u)| *u > now);
                    if v.len() >= MAX_ADDRS {
                        v.remove(0);
                    }
                    v.push((ip, until));
                }
            }
        }
    }

    /// Whether `name` resolved to `ip` in an answer that has not expired.
    pub fn binds(&self, name: &str, ip: IpAddr, now: Instant) -> bool {
        let ip = canonical_ip(ip);
        self.lock()
            .names
            .get(&canonical_name(name))
            .is_some_and(|v| v.iter().any(|(a, u)| *a == ip && *u > now))
    }

    /// The live addresses of `name`, for messages.
    pub fn addresses(&self, name: &str, now: Instant) -> Vec<IpAddr> {
        self.lock()
            .names
            .get(&canonical_name(name))
            .map(|v| {
                v.iter()
                    .filter(|(_, u)| *u > now)
                    .map(|(a, _)| *a)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Marks `name` as resolved by the companion now; false if it already was within
    /// `min_ttl` (then it is not asked again: a workload naming random hosts cannot make the
    /// companion flood the resolver).
    pub fn mark_resolved(&self, name: &str, now: Instant) -> bool {
        let mut t = self.lock();
        let name = canonical_name(name);
        if t.resolved.get(&name).is_some_and(|u| *u > now) {
            return false;
        }
        if t.resolved.len() >= MAX_NAMES {
            t.resolved.retain(|_, u| *u > now);
            if t.resolved.len() >= MAX_NAMES {
                return false;
            }
        }
        t.resolved.insert(name, now + self.min_ttl);
        true
    }
}

fn random_id() -> u16 {
    let mut b = [0u8; 2];
    // SAFETY: getrandom writes at most 2 bytes into the buffer we own.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), 2, 0) };
    if n != 2 {
        // Only the id's unpredictability suffers; the socket's random port still protects us.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        return t as u16;
    }
    u16::from_ne_bytes(b)
}

/// A recursive query for `name` of type `t`.
pub fn query(name: &str, t: RecordType) -> Option<Message> {
    let name = Name::from_ascii(format!("{}.", canonical_name(name))).ok()?;
    let mut m = Message::new(random_id(), MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name, t));
    Some(m)
}

/// Whether `resp` answers `req`: same id, a response, same questions.
pub fn answers(req: &Message, resp: &Message) -> bool {
    resp.metadata.id == req.metadata.id
        && resp.metadata.message_type == MessageType::Response
        && resp.queries == req.queries
}

/// One query over UDP to `server` (a fresh socket on a random port each time); the raw answer.
pub async fn exchange_udp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    let bind: SocketAddr = match server {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let s = UdpSocket::bind(bind).await?;
    s.connect(server).await?;
    s.send(query).await?;
    let mut buf = vec![0u8; MAX_UDP];
    let want = query.get(..2).map(|b| [b[0], b[1]]);
    tokio::time::timeout(QUERY_TIMEOUT, async {
        loop {
            let n = s.recv(&mut buf).await?;
            // A datagram with another id is not ours (late answer to an earlier query).
            if n >= 2 && want == Some([buf[0], buf[1]]) {
                buf.truncate(n);
                return Ok(buf);
            }
        }
    })
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("DNS resolver {server} did not answer"),
        )
    })?
}

/// One query over TCP to `server`.
pub async fn exchange_tcp(server: SocketAddr, query: &[u8]) -> std::io::Result<Vec<u8>> {
    tokio::time::timeout(QUERY_TIMEOUT, async {
        let mut s = TcpStream::connect(server).await?;
        write_framed(&mut s, query).await?;
        read_framed(&mut s)
            .await?
            .ok_or_else(|| std::io::ErrorKind::UnexpectedEof.into())
    })
    .await
    .map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("DNS resolver {server} did not answer over TCP"),
        )
    })?
}

async fn write_framed(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len =
        u16::try_from(msg.len()).map_err(|_| std::io::Error::other("DNS message over 64 KiB"))?;
    let mut out = Vec::with_capacity(msg.len() + 2);
    out.extend(len.to_be_bytes());
    out.extend(msg);
    s.write_all(&out).await
}

/// One length-prefixed DNS message; `None` at a clean end of stream.
async fn read_framed(s: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; u16::from_be_bytes(len) as usize];
    s.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

/// Asks the policy's resolvers, in order, until one answers `req` (over TCP if the UDP answer
/// was truncated).
pub async fn ask(resolvers: &[IpAddr], req: &Message) -> Result<Message, String> {
    let raw = req
        .to_vec()
        .map_err(|e| format!("encoding the query: {e}"))?;
    let mut last = "the policy has no dns resolvers".to_string();
    for r in resolvers {
        let server = SocketAddr::new(*r, 53);
        let mut resp = exchange_udp(server, &raw)
            .await
            .map_err(|e| e.to_string())
            .and_then(|b| Message::from_vec(&b).map_err(|e| format!("{server}: {e}")));
        if matches!(&resp, Ok(m) if m.metadata.truncation) {
            resp = exchange_tcp(server, &raw)
                .await
                .map_err(|e| e.to_string())
                .and_then(|b| Message::from_vec(&b).map_err(|e| format!("{server}: {e}")));
        }
        match resp {
            Ok(m) if answers(req, &m) => return Ok(m),
            Ok(_) => last = format!("{server} answered another question"),
            Err(e) => last = e,
        }
    }
    Err(last)
}

impl Edge {
    /// Whether `name` (an SNI or HTTP host) is bound to `ip`: an IP literal equal to it, or a
    /// live DNS answer; else the companion asks the resolvers itself once.
    pub(crate) async fn name_binds(
        &self,
        resolvers: &[IpAddr],
        name: &str,
        ip: IpAddr,
    ) -> Result<(), String> {
        if let Some(same) = nhi_core::policy::literal_binding(name, ip) {
            return if same {
                Ok(())
            } else {
                Err(format!("{name} is another address than {ip}"))
            };
        }
        if self.names.binds(name, ip, Instant::now()) {
            return Ok(());
        }
        if self.names.mark_resolved(name, Instant::now()) {
            for t in [RecordType::A, RecordType::AAAA] {
                let Some(q) = query(name, t) else {
                    return Err(format!("{name:?} is not a DNS name"));
                };
                if let Ok(m) = ask(resolvers, &q).await {
                    self.names.learn(&m, Instant::now());
                }
            }
            if self.names.binds(name, ip, Instant::now()) {
                return Ok(());
            }
        }
        let known = self.names.addresses(name, Instant::now());
        Err(if known.is_empty() {
            format!("{name} does not resolve to {ip} (no address known for it)")
        } else {
            let list: Vec<String> = known.iter().map(IpAddr::to_string).collect();
            format!(
                "{name} does not resolve to {ip} (it resolves to {})",
                list.join(", ")
            )
        })
    }

    /// Relays one query from the workload; the answer to send back (`None`: nothing to send).
    async fn relay_one(
        &self,
        raw: &[u8],
        peer: SocketAddr,
        tcp_dest: Option<SocketAddr>,
    ) -> Option<Vec<u8>> {
        let started = Instant::now();
        let policy = self.policy()?;
        let req = Message::from_vec(raw).ok()?;
        if req.metadata.message_type != MessageType::Query {
            return None;
        }
        let qname = req
            .queries
            .first()
            .map(|q| canonical_name(&q.name().to_ascii()));
        let resolver = tcp_dest.map(|d| d.ip());
        let mut ev = event(
            AuditKind::Dns,
            peer,
            Destination {
                addr: Some(match tcp_dest {
                    Some(d) => d.to_string(),
                    None => "dns".into(),
                }),
                host: qname.clone(),
                ..Default::default()
            },
        );
        // Over TCP the workload chose one of the resolvers; over UDP the redirect hides which,
        // and any of them will do.
        let order: Vec<IpAddr> = match resolver {
            Some(r) => std::iter::once(r)
                .chain(policy.dns.iter().copied().filter(|d| *d != r))
                .collect(),
            None => policy.dns.clone(),
        };
        let result = ask(&order, &req).await;
        match &result {
            Ok(m) => {
                // Learned before the workload has the answer: it cannot connect first.
                self.names.learn(m, Instant::now());
                ev.detail = Some(describe(m));
            }
            Err(e) => {
                ev.decision = Decision::Error;
                ev.detail = Some(e.clone());
            }
        }
        ev.bytes_out = raw.len() as u64;
        let out = match result {
            Ok(m) => m.to_vec().ok(),
            Err(_) => {
                // SERVFAIL, so the client moves on at once instead of timing out.
                let mut m =
                    Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
                m.metadata.recursion_desired = req.metadata.recursion_desired;
                m.metadata.response_code = hickory_proto::op::ResponseCode::ServFail;
                m.queries = req.queries.clone();
                m.to_vec().ok()
            }
        };
        ev.bytes_in = out.as_ref().map(|o| o.len() as u64).unwrap_or(0);
        finish(self, ev, started);
        out
    }
}

/// Serves the DNS relay on `sock` (where the workload's UDP queries to the resolvers are
/// redirected). Answers go back from the same socket, so conntrack gives them the resolver's
/// address.
pub async fn serve_udp(sock: UdpSocket, edge: Arc<Edge>) {
    let sock = Arc::new(sock);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let mut buf = vec![0u8; MAX_UDP];
    loop {
        let (n, peer) = match sock.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                crate::log!("dns relay: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue; // too many at once: dropped, the client retries
        };
        let (raw, sock, edge) = (buf[..n].to_vec(), sock.clone(), edge.clone());
        tokio::spawn(async move {
            if let Some(out) = edge.relay_one(&raw, peer, None).await {
                let _ = sock.send_to(&out, peer).await;
            }
            drop(permit);
        });
    }
}

/// A workload's TCP connection to one of the policy's resolvers (port 53): relayed message by
/// message, each answer learned before it is passed on.
pub async fn relay_tcp(edge: Arc<Edge>, mut client: TcpStream, peer: SocketAddr, dest: SocketAddr) {
    loop {
        let msg = match tokio::time::timeout(TCP_IDLE, read_framed(&mut client)).await {
            Ok(Ok(Some(m))) => m,
            _ => return,
        };
        let Some(out) = edge.relay_one(&msg, peer, Some(dest)).await else {
            return;
        };
        if write_framed(&mut client, &out).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, AAAA, CNAME};
    use hickory_proto::rr::Record;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn answer(q: &str, records: Vec<Record>) -> Message {
        let mut m = query(q, RecordType::A).unwrap();
        m.metadata.message_type = MessageType::Response;
        m.answers = records;
        m
    }

    #[test]
    fn answers_bind_names_through_cname_chains() {
        let m = answer(
            "WWW.Example.com.",
            vec![
                Record::from_rdata(
                    name("www.example.com."),
                    300,
                    RData::CNAME(CNAME(name("edge.example.net."))),
                ),
                Record::from_rdata(
                    name("edge.example.net."),
                    60,
                    RData::A(A("192.0.2.1".parse().unwrap())),
                ),
                Record::from_rdata(
                    name("edge.example.net."),
                    60,
                    RData::AAAA(AAAA("2001:db8::1".parse().unwrap())),
                ),
                // Unrelated owner: never bound to the question.
                Record::from_rdata(
                    name("evil.example."),
                    60,
                    RData::A(A("203.0.113.9".parse().unwrap())),
                ),
            ],
        );
        let b = bindings(&m);
        assert!(
            b.contains(&("www.example.com".into(), "192.0.2.1".parse().unwrap(), 60)),
            "{b:?}"
        );
        assert!(b.contains(&("edge.example.net".into(), "192.0.2.1".parse().unwrap(), 60)));
        assert!(b.contains(&("www.example.com".into(), "2001:db8::1".parse().unwrap(), 60)));
        assert!(!b
            .iter()
            .any(|(_, ip, _)| *ip == "203.0.113.9".parse::<IpAddr>().unwrap()));
        assert!(
            describe(&m).starts_with("A: 192.0.2.1 ttl 60"),
            "{}",
            describe(&m)
        );
        // A CNAME loop ends.
        let looped = answer(
            "a.example.",
            vec![
                Record::from_rdata(
                    name("a.example."),
                    5,
                    RData::CNAME(CNAME(name("b.example."))),
                ),
                Record::from_rdata(
                    name("b.example."),
                    5,
                    RData::CNAME(CNAME(name("a.example."))),
                ),
            ],
        );
        assert!(bindings(&looped).is_empty());
    }

    #[test]
    fn names_expire_with_their_ttl_but_not_before_the_floor() {
        let names = Names::new(Duration::from_secs(5));
        let t0 = Instant::now();
        let m = answer(
            "api.example.com.",
            vec![
                Record::from_rdata(
                    name("api.example.com."),
                    0,
                    RData::A(A("192.0.2.1".parse().unwrap())),
                ),
                Record::from_rdata(
                    name("api.example.com."),
                    60,
                    RData::A(A("192.0.2.2".parse().unwrap())),
                ),
            ],
        );
        names.learn(&m, t0);
        let ip1: IpAddr = "192.0.2.1".parse().unwrap();
        let ip2: IpAddr = "192.0.2.2".parse().unwrap();
        assert!(names.binds("API.example.com.", ip1, t0));
        assert!(names.binds("api.example.com", "::ffff:192.0.2.1".parse().unwrap(), t0));
        assert!(!names.binds("api.example.com", "192.0.2.3".parse().unwrap(), t0));
        assert!(!names.binds("other.example.com", ip1, t0));
        // TTL 0 still binds for the 5 s floor; TTL 60 for 60 s.
        assert!(names.binds("api.example.com", ip1, t0 + Duration::from_secs(4)));
        assert!(!names.binds("api.example.com", ip1, t0 + Duration::from_secs(6)));
        assert!(names.binds("api.example.com", ip2, t0 + Duration::from_secs(59)));
        assert!(!names.binds("api.example.com", ip2, t0 + Duration::from_secs(61)));
        assert_eq!(
            names.addresses("api.example.com", t0 + Duration::from_secs(10)),
            vec![ip2]
        );
    }

    #[test]
    fn the_table_stays_bounded() {
        let names = Names::new(Duration::from_secs(5));
        let t0 = Instant::now();
        for i in 0..(MAX_NAMES + 100) {
            let m = answer(
                &format!("n{i}.example."),
                vec![Record::from_rdata(
                    name(&format!("n{i}.example.")),
                    600,
                    RData::A(A("192.0.2.1".parse().unwrap())),
                )],
            );
            names.learn(&m, t0);
        }
        assert!(names.lock().names.len() <= MAX_NAMES);
        let many: Vec<Record> = (0..100u8)
            .map(|i| {
                Record::from_rdata(
                    name("big.example."),
                    600,
                    RData::A(A(std::net::Ipv4Addr::new(10, 0, 0, i))),
                )
            })
            .collect();
        names.learn(&answer("big.example.", many), t0);
        assert!(names.addresses("big.example", t0).len() <= MAX_ADDRS);
        // The companion's own look-ups of one name are spaced by the floor.
        assert!(names.mark_resolved("x.example", t0));
        assert!(!names.mark_resolved("X.example.", t0 + Duration::from_secs(1)));
        assert!(names.mark_resolved("x.example", t0 + Duration::from_secs(6)));
    }

    #[test]
    fn responses_must_match_their_query() {
        let q = query("a.example", RecordType::A).unwrap();
        let mut r = q.clone();
        r.metadata.message_type = MessageType::Response;
        assert!(answers(&q, &r));
        let mut other = r.clone();
        other.metadata.id = other.metadata.id.wrapping_add(1);
        assert!(!answers(&q, &other));
        let mut other_q = r.clone();
        other_q.queries = query("b.example", RecordType::A).unwrap().queries;
        assert!(!answers(&q, &other_q));
        assert!(!answers(&q, &q), "a query is no answer");
        assert_eq!(canonical_name("API.Example.COM."), "api.example.com");
    }
}
