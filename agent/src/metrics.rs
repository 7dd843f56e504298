//! `nhid`'s Prometheus endpoint (host side only, `[metrics] listen`): per-identity decisions from
//! the audit events, issuance counts and latencies by credential kind, audit records written and
//! dropped, attached workloads. Served as OpenMetrics text on `GET /metrics`.

use std::sync::Arc;
use std::time::Duration;

use nhi_core::audit::{AuditKind, Decision};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Gauges that are read off the daemon's state rather than counted as events happen (the
/// number of attached workloads): refreshed right before each scrape by whoever holds that
/// state. Keeps this module free of the registry's types.
pub trait Refresh: Send + Sync + 'static {
    fn refresh(&self, metrics: &Metrics) -> impl std::future::Future<Output = ()> + Send;
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EventLabels {
    spiffe_id: String,
    kind: String,
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssueLabels {
    credential: String,
    decision: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    credential: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MtlsLabels {
    role: String,
    decision: String,
    warm: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

fn latency_histogram() -> Histogram {
    // 20 µs .. ~1.3 s.
    Histogram::new(exponential_buckets(0.000_02, 2.0, 17))
}

pub struct Metrics {
    registry: Registry,
    events: Family<EventLabels, Counter>,
    issuance: Family<IssueLabels, Counter>,
    issuance_seconds: Family<KindLabel, Histogram, fn() -> Histogram>,
    dropped: Family<SourceLabel, Counter>,
    mtls: Family<MtlsLabels, Counter>,
    pub records_written: Counter,
    pub write_errors: Counter,
    pub attached: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn label<T: serde::Serialize>(v: T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("nhi");
        let events = Family::<EventLabels, Counter>::default();
        let issuance = Family::<IssueLabels, Counter>::default();
        let issuance_seconds =
            Family::<KindLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        let dropped = Family::<SourceLabel, Counter>::default();
        let mtls = Family::<MtlsLabels, Counter>::default();
        let records_written = Counter::default();
        let write_errors = Counter::default();
        let attached = Gauge::default();
        registry.register(
            "audit_events",
            "Audited events by workload identity, kind (connection, http_request, inbound, credential) and decision",
            events.clone(),
        );
        registry.register(
            "credential_issuance",
            "Credential requests nhid answered, by credential kind and decision",
            issuance.clone(),
        );
        registry.register(
            "credential_issuance_seconds",
            "Time nhid took to answer a credential request, by credential kind",
            issuance_seconds.clone(),
        );
        registry.register(
            "mtls_connections",
            "Connections over mutual TLS between workloads, by this workload's role (caller, callee), decision and whether a handshake was on the way (warm=false)",
            mtls.clone(),
        );
        registry.register(
            "audit_records_written",
            "Records appended to the audit log",
            records_written.clone(),
        );
        registry.register(
            "audit_dropped",
            "Audit events lost (source: companion or nhid: a full queue; disk: a failed write); each loss is itself a record",
            dropped.clone(),
        );
        registry.register(
            "audit_write_errors",
            "Failed writes of the audit log",
            write_errors.clone(),
        );
        registry.register(
            "attached_workloads",
            "Network namespaces with a running companion",
            attached.clone(),
        );
        Metrics {
            registry,
            events,
            issuance,
            mtls,
            issuance_seconds,
            dropped,
            records_written,
            write_errors,
            attached,
        }
    }

    pub fn event(&self, spiffe_id: &str, kind: AuditKind, decision: Decision) {
        self.events
            .get_or_create(&EventLabels {
                spiffe_id: spiffe_id.to_string(),
                kind: label(kind),
                decision: label(decision),
            })
            .inc();
    }

    /// One connection over mutual TLS between workloads, from its audit event.
    pub fn mtls(&self, m: &nhi_core::audit::MtlsAudit, decision: Decision) {
        self.mtls
            .get_or_create(&MtlsLabels {
                role: label(m.role),
                decision: label(decision),
                warm: m.warm.to_string(),
            })
            .inc();
    }

    pub fn issuance(&self, credential: &str, decision: Decision, took: Duration) {
        self.issuance
            .get_or_create(&IssueLabels {
                credential: credential.to_string(),
                decision: label(decision),
            })
            .inc();
        self.issuance_seconds
            .get_or_create(&KindLabel {
                credential: credential.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    pub fn dropped(&self, source: &str, n: u64) {
        self.dropped
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .inc_by(n);
    }

    pub fn dropped_total(&self, source: &str) -> u64 {
        self.dropped
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .get()
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String never fails");
        out
    }
}

/// Binds `[metrics] listen` (None when disabled).
pub async fn bind(listen: &str) -> Result<Option<TcpListener>, String> {
    if listen.is_empty() {
        return Ok(None);
    }
    TcpListener::bind(listen)
        .await
        .map(Some)
        .map_err(|e| format!("metrics endpoint {listen}: {e}"))
}

/// Serves `GET /metrics` until aborted; `state` refreshes its gauges before each scrape.
pub async fn serve<R: Refresh>(listener: TcpListener, metrics: Arc<Metrics>, state: Arc<R>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (metrics, state) = (metrics.clone(), state.clone());
        tokio::spawn(async move {
            let scrape = answer(conn, &metrics, &*state);
            let _ = tokio::time::timeout(Duration::from_secs(10), scrape).await;
        });
    }
}

/// Longest request head read.
const MAX_HEAD: usize = 8192;

async fn answer(
    mut conn: TcpStream,
    metrics: &Metrics,
    state: &impl Refresh,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && buf.len() < MAX_HEAD {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or(&[]);
    let mut parts = line.split(|&b| b == b' ');
    let (method, path) = (parts.next().unwrap_or(&[]), parts.next().unwrap_or(&[]));
    let (status, ctype, body) = match (method, path) {
        (b"GET", b"/metrics") => {
            state.refresh(metrics).await;
            (
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                metrics.render(),
            )
        }
        (b"GET", _) => ("404 Not Found", "text/plain", "not found\n".to_string()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n".to_string(),
        ),
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_per_identity_counts_issuance_histograms_and_drops() {
        let m = Metrics::new();
        m.event("spiffe://td/a", AuditKind::Connection, Decision::Allow);
        m.event("spiffe://td/a", AuditKind::Connection, Decision::Deny);
        m.event("spiffe://td/a", AuditKind::Connection, Decision::Deny);
        m.issuance("jwt-svid", Decision::Allow, Duration::from_micros(150));
        m.dropped("companion", 7);
        m.records_written.inc_by(3);
        m.attached.set(2);
        let warm = nhi_core::audit::MtlsAudit {
            role: nhi_core::audit::MtlsRole::Callee,
            peer: "spiffe://td/b".into(),
            warm: true,
        };
        m.mtls(&warm, Decision::Allow);
        m.mtls(&warm, Decision::Allow);
        let text = m.render();
        for want in [
            r#"nhi_mtls_connections_total{role="callee",decision="allow",warm="true"} 2"#,
            r#"nhi_audit_events_total{spiffe_id="spiffe://td/a",kind="connection",decision="deny"} 2"#,
            r#"nhi_credential_issuance_total{credential="jwt-svid",decision="allow"} 1"#,
            r#"nhi_credential_issuance_seconds_count{credential="jwt-svid"} 1"#,
            r#"nhi_audit_dropped_total{source="companion"} 7"#,
            "nhi_audit_records_written_total 3",
            "nhi_attached_workloads 2",
        ] {
            assert!(text.contains(want), "{want} not in:\n{text}");
        }
    }
}
