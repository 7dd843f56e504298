//! The SPIFFE Workload API (`SpiffeWorkloadAPI`, gRPC), served from the same cache as the HTTP
//! API: on `tcp://127.0.0.1:15101` inside the workload's network namespace and, where the
//! injection path mounted `/run/nhi`, on the unix socket `nhid` bound there and handed over at
//! spawn (`--listener-fd`).
//!
//! Per the SPIFFE Workload API / Workload Endpoint specifications: every call must carry the
//! metadata `workload.spiffe.io: true` (else `InvalidArgument`); streams send the full current
//! state at once and again whenever it changes (rotation, trust bundle change); a revoked
//! identity gets `PermissionDenied`, which ends an open X.509-SVID stream.

use std::pin::Pin;
use std::sync::Arc;

use base64::Engine;
use futures_util::Stream;
use tonic::{Request, Response, Status};

use crate::cache::{CredError, Creds};

#[allow(clippy::all, clippy::pedantic)]
pub mod pb {
    tonic::include_proto!("_");

    /// The encoded descriptor of `workload.proto`, served by gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("workload_descriptor");
}

use pb::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};

/// The metadata key every Workload API request must carry with the value `true`.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
const MAX_AUDIENCES: usize = 8;
const MAX_AUDIENCE_LEN: usize = 256;

#[derive(Clone)]
pub struct WorkloadApi {
    creds: Arc<Creds>,
    spiffe_id: Arc<str>,
    /// `spiffe://<trust domain>`: the key of bundle maps.
    td_id: Arc<str>,
}

impl WorkloadApi {
    pub fn new(creds: Arc<Creds>, spiffe_id: &str, trust_domain: &str) -> Self {
        WorkloadApi {
            creds,
            spiffe_id: spiffe_id.into(),
            td_id: format!("spiffe://{trust_domain}").into(),
        }
    }

    fn x509_bundle_der(&self) -> Vec<u8> {
        pem_blocks(
            &String::from_utf8_lossy(&self.creds.trust().bundle),
            "CERTIFICATE",
        )
        .into_iter()
        .flatten()
        .collect()
    }

    fn x509_bundles(&self) -> pb::X509BundlesResponse {
        pb::X509BundlesResponse {
            crl: vec![],
            bundles: [(self.td_id.to_string(), self.x509_bundle_der())].into(),
        }
    }

    fn jwt_bundles(&self) -> pb::JwtBundlesResponse {
        let jwks = self.creds.trust().jwks.to_vec();
        pb::JwtBundlesResponse {
            bundles: [(self.td_id.to_string(), jwks)].into(),
        }
    }

    /// The current X.509-SVID answer, with the certificate serial that identifies it.
    async fn x509_svid(&self) -> Result<(String, pb::X509svidResponse), Status> {
        let x = self.creds.x509().await.map_err(status)?;
        let chain: Vec<u8> = pem_blocks(&x.cert_chain_pem, "CERTIFICATE")
            .into_iter()
            .flatten()
            .collect();
        let key = pem_blocks(&x.key_pem, "PRIVATE KEY")
            .into_iter()
            .next()
            .ok_or_else(|| Status::internal("the issued key is not PKCS#8 PEM"))?;
        if chain.is_empty() {
            return Err(Status::internal("the issued certificate is not PEM"));
        }
        let resp = pb::X509svidResponse {
            svids: vec![pb::X509svid {
                spiffe_id: x.spiffe_id.clone(),
                x509_svid: chain,
                x509_svid_key: key,
                bundle: self.x509_bundle_der(),
                hint: String::new(),
            }],
            crl: vec![],
            federated_bundles: Default::default(),
        };
        Ok((x.serial.clone(), resp))
    }
}

fn status(e: CredError) -> Status {
    match e {
        CredError::Denied(m) => Status::permission_denied(m),
        CredError::NotFound(m) => Status::not_found(m),
        CredError::Unavailable(m) | CredError::Busy(m) => Status::unavailable(m),
    }
}

/// Refuses requests without `workload.spiffe.io: true` (SPIFFE Workload Endpoint §
/// "Transport": protects against SSRF-style forwarding of requests to the endpoint).
#[allow(clippy::result_large_err)]
pub fn check_security_header(req: Request<()>) -> Result<Request<()>, Status> {
    match req.metadata().get(SECURITY_HEADER).map(|v| v.to_str()) {
        Some(Ok("true")) => Ok(req),
        _ => Err(Status::invalid_argument(
            "security header missing from request: workload.spiffe.io: true",
        )),
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A stream that sends `current()` at once and again whenever the cache signals a change and
/// the answer differs from the last one sent; it ends after sending an error.
fn changes<T, K, F, Fut>(creds: &Creds, current: F) -> BoxStream<T>
where
    T: Send + 'static,
    K: PartialEq + Send + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(K, T), Status>> + Send,
{
    struct State<K, F> {
        watch: tokio::sync::watch::Receiver<u64>,
        last: Option<K>,
        current: F,
        done: bool,
        first: bool,
    }
    let state = State {
        watch: creds.watch(),
        last: None,
        current,
        done: false,
        first: true,
    };
    Box::pin(futures_util::stream::unfold(state, |mut s| async move {
        if s.done {
            return None;
        }
        loop {
            if !s.first && s.watch.changed().await.is_err() {
                return None;
            }
            s.first = false;
            s.watch.borrow_and_update();
            match (s.current)().await {
                Ok((key, item)) => {
                    if s.last.as_ref() != Some(&key) {
                        s.last = Some(key);
                        return Some((Ok(item), s));
                    }
                }
                Err(e) => {
                    s.done = true;
                    return Some((Err(e), s));
                }
            }
        }
    }))
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<pb::X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        _req: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let api = self.clone();
        Ok(Response::new(changes(&self.creds, move || {
            let api = api.clone();
            async move {
                let (serial, resp) = api.x509_svid().await?;
                Ok(((serial, api.creds.trust().bundle.clone()), resp))
            }
        })))
    }

    async fn fetch_x509_bundles(
        &self,
        _req: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let api = self.clone();
        Ok(Response::new(changes(&self.creds, move || {
            let api = api.clone();
            async move {
                let b = api.x509_bundles();
                Ok((b.bundles.clone(), b))
            }
        })))
    }

    async fn fetch_jwtsvid(
        &self,
        req: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        let req = req.into_inner();
        let audience = check_audience(req.audience)?;
        if !req.spiffe_id.is_empty() && req.spiffe_id != *self.spiffe_id {
            return Err(Status::permission_denied(format!(
                "this workload is {}, not {}",
                self.spiffe_id, req.spiffe_id
            )));
        }
        let j = self.creds.jwt(audience).await.map_err(status)?;
        Ok(Response::new(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: j.spiffe_id.clone(),
                svid: j.token.clone(),
                hint: String::new(),
            }],
        }))
    }

    async fn fetch_jwt_bundles(
        &self,
        _req: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let api = self.clone();
        Ok(Response::new(changes(&self.creds, move || {
            let api = api.clone();
            async move {
                let b = api.jwt_bundles();
                Ok((b.bundles.clone(), b))
            }
        })))
    }

    async fn validate_jwtsvid(
        &self,
        req: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        let req = req.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        match self.creds.validate(&req.svid, &req.audience).await {
            Ok(v) => Ok(Response::new(pb::ValidateJwtsvidResponse {
                spiffe_id: v.spiffe_id,
                claims: match json_to_prost(v.claims) {
                    prost_types::Value {
                        kind: Some(prost_types::value::Kind::StructValue(s)),
                    } => Some(s),
                    _ => None,
                },
            })),
            // As SPIRE answers an invalid token.
            Err(CredError::Denied(m)) => Err(Status::invalid_argument(m)),
            Err(e) => Err(status(e)),
        }
    }
}

#[allow(clippy::result_large_err)]
fn check_audience(audience: Vec<String>) -> Result<Vec<String>, Status> {
    let mut out: Vec<String> = Vec::new();
    for a in audience {
        if a.is_empty() || a.len() > MAX_AUDIENCE_LEN || a.chars().any(char::is_control) {
            return Err(Status::invalid_argument(format!(
                "audience must be 1 to {MAX_AUDIENCE_LEN} bytes without control characters"
            )));
        }
        if !out.contains(&a) {
            out.push(a);
        }
    }
    if out.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if out.len() > MAX_AUDIENCES {
        return Err(Status::invalid_argument(format!(
            "at most {MAX_AUDIENCES} audiences"
        )));
    }
    Ok(out)
}

fn json_to_prost(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(b),
        serde_json::Value::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        serde_json::Value::String(s) => Kind::StringValue(s),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_prost).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(prost_types::Struct {
            fields: o.into_iter().map(|(k, v)| (k, json_to_prost(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// The DER contents of every PEM block labelled `label` in `pem`.
pub fn pem_blocks(pem: &str, label: &str) -> Vec<Vec<u8>> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(i) = rest.find(&begin) {
        rest = &rest[i + begin.len()..];
        let Some(j) = rest.find(&end) else { break };
        let b64: String = rest[..j].chars().filter(|c| !c.is_whitespace()).collect();
        if let Ok(der) = base64::engine::general_purpose::STANDARD.decode(b64) {
            out.push(der);
        }
        rest = &rest[j + end.len()..];
    }
    out
}

/// Largest request message accepted (a JWT-SVID to validate is about 1 KiB).
const MAX_REQUEST: usize = 64 * 1024;
/// Streams per connection (SPIFFE clients open one or two).
const MAX_STREAMS: u32 = 16;
/// HTTP/2 flow-control windows: what a peer can make the companion buffer per connection.
const WINDOW: u32 = 64 * 1024;
/// Grace after `max_connection_age`'s GOAWAY before open streams are cut.
const AGE_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// Serves the Workload API on `tcp` and, if given, on the unix socket `unix`, until the
/// listeners fail, each within `limits` (see `crate::limits`).
pub async fn serve(
    tcp: tokio::net::TcpListener,
    unix: crate::listeners::Incoming,
    api: WorkloadApi,
    limits: nhi_core::config::CompanionLimits,
) {
    use crate::limits::{Bounds, Governor, Guarded, RequestLayer};
    use futures_util::StreamExt;
    let svc = || {
        tonic::service::interceptor::InterceptedService::new(
            SpiffeWorkloadApiServer::new(api.clone()).max_decoding_message_size(MAX_REQUEST),
            check_security_header,
        )
    };
    let builder = || {
        tonic::transport::Server::builder()
            .max_concurrent_streams(Some(MAX_STREAMS))
            .concurrency_limit_per_connection(MAX_STREAMS as usize)
            .initial_connection_window_size(Some(WINDOW))
            .initial_stream_window_size(Some(WINDOW))
            .http2_max_header_list_size(Some(16 * 1024))
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .max_connection_age(limits.max_connection_age)
            .max_connection_age_grace(AGE_GRACE)
            .layer(RequestLayer {
                timeout: limits.request_timeout,
            })
            // gRPC server reflection (Workload Endpoint spec §7: SHOULD), v1 and the v1alpha
            // older clients (grpcurl before 1.9, grpcio's reflection client) ask for. It
            // describes the public schema only, so it needs no security header.
            .add_service(reflection_v1())
            .add_service(reflection_v1alpha())
    };
    let governor = |name: String| {
        let g = Governor::new(
            name,
            Bounds {
                max_connections: limits.workload_api_connections,
                first_request: limits.header_timeout,
                idle: limits.idle_timeout,
                // tonic says GOAWAY at max_connection_age; this closes what outlives the grace.
                max_age: Some(limits.max_connection_age + AGE_GRACE),
            },
        );
        tokio::spawn(g.clone().watch());
        g
    };
    let tcp_gov = governor(format!("Workload API {}", crate::http::local(&tcp)));
    let tcp_incoming = tokio_stream::wrappers::TcpListenerStream::new(tcp).filter_map(move |c| {
        let gov = tcp_gov.clone();
        async move {
            match c {
                Ok(s) => {
                    // Small request/response messages: never wait for Nagle + delayed ACK.
                    let _ = s.set_nodelay(true);
                    gov.admit_fairly(None)
                        .await
                        .map(|conn| Ok(Guarded::new(s, conn)))
                }
                Err(e) => Some(Err(e)),
            }
        }
    });
    let tcp_srv = builder()
        .add_service(svc())
        .serve_with_incoming(tcp_incoming);
    // Connections of every container's socket (handed over by nhid while it runs), under one
    // governor: per-process fairness by the peer's pid (threads share it).
    let unix_gov = governor("Workload API unix sockets".into());
    let unix_incoming = tokio_stream::wrappers::ReceiverStream::new(unix).filter_map(move |c| {
        let gov = unix_gov.clone();
        async move {
            match c {
                Ok(s) => {
                    let peer = s.peer_cred().ok().and_then(|c| c.pid()).map(|p| p as u32);
                    gov.admit_fairly(peer)
                        .await
                        .map(|conn| Ok(Guarded::new(crate::h2fix::AuthorityFix::new(s), conn)))
                }
                Err(e) => Some(Err(e)),
            }
        }
    });
    let unix_srv = builder()
        .add_service(svc())
        .serve_with_incoming(unix_incoming);
    let (a, b) = tokio::join!(tcp_srv, unix_srv);
    for r in [a, b] {
        if let Err(e) = r {
            crate::log!("nhi-companion: workload API: {e}");
        }
    }
}

fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
}

fn reflection_v1() -> tonic_reflection::server::v1::ServerReflectionServer<
    impl tonic_reflection::server::v1::ServerReflection,
> {
    reflection()
        .build_v1()
        .expect("the compiled-in workload.proto descriptor decodes")
}

fn reflection_v1alpha() -> tonic_reflection::server::v1alpha::ServerReflectionServer<
    impl tonic_reflection::server::v1alpha::ServerReflection,
> {
    reflection()
        .build_v1alpha()
        .expect("the compiled-in workload.proto descriptor decodes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reflection_describes_the_workload_api() {
        // What the reflection services are built from decodes and names the service.
        use prost::Message;
        let set = prost_types::FileDescriptorSet::decode(pb::FILE_DESCRIPTOR_SET).unwrap();
        let services: Vec<&str> = set
            .file
            .iter()
            .flat_map(|f| f.service.iter().map(|s| s.name()))
            .collect();
        assert_eq!(services, ["SpiffeWorkloadAPI"]);
        let _ = (reflection_v1(), reflection_v1alpha());
    }

    #[test]
    fn security_header_is_required() {
        let mut r = Request::new(());
        assert_eq!(
            check_security_header(Request::new(())).unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
        r.metadata_mut()
            .insert(SECURITY_HEADER, "false".parse().unwrap());
        assert!(check_security_header(r).is_err());
        let mut r = Request::new(());
        r.metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().unwrap());
        assert!(check_security_header(r).is_ok());
    }

    #[test]
    fn pem_blocks_decode_in_order() {
        let pem = "junk\n-----BEGIN CERTIFICATE-----\nAQI=\n-----END CERTIFICATE-----\n-----BEGIN PRIVATE KEY-----\nAw==\n-----END PRIVATE KEY-----\n-----BEGIN CERTIFICATE-----\nBAU=\n-----END CERTIFICATE-----\n";
        assert_eq!(pem_blocks(pem, "CERTIFICATE"), vec![vec![1, 2], vec![4, 5]]);
        assert_eq!(pem_blocks(pem, "PRIVATE KEY"), vec![vec![3]]);
    }

    #[test]
    fn audiences_are_checked() {
        assert!(check_audience(vec![]).is_err());
        assert!(check_audience(vec!["".into()]).is_err());
        assert_eq!(
            check_audience(vec!["a".into(), "a".into(), "b".into()]).unwrap(),
            vec!["a", "b"]
        );
        assert!(check_audience((0..9).map(|i| i.to_string()).collect()).is_err());
    }

    #[test]
    fn claims_become_a_struct() {
        let v = json_to_prost(serde_json::json!({"sub": "spiffe://x/y", "aud": ["a"], "exp": 5}));
        let Some(prost_types::value::Kind::StructValue(s)) = v.kind else {
            panic!()
        };
        assert_eq!(s.fields.len(), 3);
    }
}
