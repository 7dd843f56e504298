//! Sending one request: the address that answered last first, failover in rounds over the
//! others (probing `sys/health`) until the request's budget is spent; what each answer means.

use super::*;

impl Inner {
    /// An authenticated request without a body whose 404 means "there is none": `None` then,
    /// the answer when it is a success, the error otherwise. `query` (e.g. `?list=true`) is
    /// sent after `api`, which alone names the request in errors.
    pub(crate) async fn found(
        &self,
        method: Method,
        api: &str,
        query: &str,
    ) -> Result<Option<Answer>, BaoError> {
        let ans = self.authed(method, &format!("{api}{query}"), None).await?;
        if ans.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        check(ans, api).map(Some)
    }

    /// Sends one request, failing over between addresses (see the module docs). `api` is the
    /// path after `/v1/`, already encoded. Returns the first answer that is not a reason to
    /// try elsewhere, whatever its status.
    pub(crate) async fn request(
        &self,
        method: Method,
        api: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Result<Answer, BaoError> {
        let n = self.addresses.len();
        let deadline = Instant::now() + self.request_timeout * n as u32;
        let mut round = 0u32;
        loop {
            round += 1;
            let mut tried: Vec<String> = Vec::new();
            let cur = self.current_index();
            let failure = match self.attempt(cur, &method, api, body, token).await? {
                Ok(ans) => return Ok(ans),
                Err(f) => f,
            };
            tracing::debug!(address = %self.addresses[cur], path = %api, reason = %failure.reason, "OpenBao request failed here");
            tried.push(format!("{} ({})", self.addresses[cur], failure.reason));
            // Where is the active node now? A node that did not answer at all is not asked
            // again in this round (a stalled node would cost another request_timeout).
            let first = if failure.answer.is_some() { 0 } else { 1 };
            let mut active = None;
            let mut unknown = None;
            for idx in failover_order(cur, n).skip(first) {
                match self.probe(idx).await {
                    Probe::Active => {
                        active = Some(idx);
                        break;
                    }
                    Probe::Unknown => {
                        unknown = unknown.or(Some(idx));
                    }
                    Probe::Unavailable(reason) => {
                        if idx != cur {
                            tried.push(format!("{} ({reason})", self.addresses[idx]));
                        }
                    }
                }
            }
            match active.or(unknown) {
                Some(idx) if idx == cur => {
                    // The node that answered is the active one: an internal error is its
                    // answer to this request, not a reason to look elsewhere.
                    if let Some(ans) = failure
                        .answer
                        .filter(|a| a.status == StatusCode::INTERNAL_SERVER_ERROR)
                    {
                        return Ok(ans);
                    }
                }
                Some(idx) => match self.attempt(idx, &method, api, body, token).await? {
                    Ok(ans) => {
                        self.current.store(idx, Ordering::Relaxed);
                        tracing::info!(address = %self.addresses[idx], "OpenBao: switched to this address");
                        return Ok(ans);
                    }
                    Err(f) => tried.push(format!("{} ({})", self.addresses[idx], f.reason)),
                },
                None => {}
            }
            let pause = round_pause(round);
            if Instant::now() + pause >= deadline {
                if round > 1 {
                    tried.push(format!("for {round} rounds"));
                }
                return Err(BaoError::Unreachable {
                    path: api.to_string(),
                    tried,
                });
            }
            tokio::time::sleep(pause).await;
        }
    }

    /// One request to one address. The outer `Err` is a local problem (bad token bytes);
    /// the inner `Err` says why this address gave no usable answer.
    pub(crate) async fn attempt(
        &self,
        idx: usize,
        method: &Method,
        api: &str,
        body: Option<&[u8]>,
        token: Option<&str>,
    ) -> Result<Result<Answer, Failure>, BaoError> {
        let address = &self.addresses[idx];
        let mut req = self
            .http
            .request(method.clone(), format!("{address}/v1/{api}"));
        if let Some(t) = token {
            let mut v = reqwest::header::HeaderValue::from_str(t).map_err(|_| {
                BaoError::Invalid("the OpenBao token contains invalid characters".into())
            })?;
            v.set_sensitive(true);
            req = req.header("X-Vault-Token", v);
        }
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_vec());
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => {
                return Ok(Err(Failure {
                    reason: describe_transport(&e, self.request_timeout),
                    answer: None,
                }))
            }
        };
        let status = resp.status();
        let body = match read_body(resp).await {
            Ok(b) => b,
            Err(reason) => {
                return Ok(Err(Failure {
                    reason,
                    answer: None,
                }))
            }
        };
        Ok(match classify(status, &body) {
            Verdict::Final => Ok(Answer {
                address: address.clone(),
                status,
                body,
            }),
            Verdict::TryNext => Err(Failure {
                reason: describe_status(status, &body),
                answer: Some(Answer {
                    address: address.clone(),
                    status,
                    body,
                }),
            }),
        })
    }

    /// `sys/health` of one address: is it the active node?
    pub(crate) async fn probe(&self, idx: usize) -> Probe {
        let url = format!("{}/v1/sys/health", self.addresses[idx]);
        let mut req = self.http.get(url);
        if let Some(ns) = &self.namespace {
            req = req.header("X-Vault-Namespace", ns);
        }
        match req.send().await {
            Ok(r) => probe_verdict(r.status()),
            Err(e) => Probe::Unavailable(describe_transport(&e, self.request_timeout)),
        }
    }

    /// Points `current` at the active node, if one answers (at connect: a standby would
    /// forward, but reads it serves itself may lag the active node).
    pub(crate) async fn find_active(&self) {
        if self.addresses.len() < 2 {
            return;
        }
        for idx in 0..self.addresses.len() {
            if self.probe(idx).await == Probe::Active {
                self.current.store(idx, Ordering::Relaxed);
                return;
            }
        }
    }

    /// A request with the client token. On 403 it checks whether the token itself is still
    /// valid; if not (revoked, expired) it logs in again and retries once.
    pub(crate) async fn authed(
        &self,
        method: Method,
        api: &str,
        body: Option<&[u8]>,
    ) -> Result<Answer, BaoError> {
        let mut retried = false;
        loop {
            let (token, generation) = self.token()?;
            let ans = self
                .request(method.clone(), api, body, Some(&token))
                .await?;
            if ans.status != StatusCode::FORBIDDEN || retried {
                return Ok(ans);
            }
            retried = true;
            if !self.recover_token(generation).await {
                return Ok(ans);
            }
        }
    }
}

pub(crate) fn round_pause(round: u32) -> Duration {
    ROUND_PAUSE_BASE
        .saturating_mul(1u32 << round.saturating_sub(1).min(8))
        .min(ROUND_PAUSE_MAX)
}

/// Indices of `n` addresses starting at `start`, wrapping around.
pub(crate) fn failover_order(start: usize, n: usize) -> impl Iterator<Item = usize> {
    (0..n).map(move |k| (start + k) % n)
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// This address answered; the status is the answer.
    Final,
    /// Unavailable, sealed, standby or overloaded here: ask the next address.
    TryNext,
}

/// What a KV v2 mount answers (HTTP 400) while it is being set up on a node that just became
/// active, e.g. right after a leader failover: unavailable for a moment, not a bad request.
const KV_UPGRADING: &str = "Waiting for the primary to upgrade";

pub(crate) fn classify(status: StatusCode, body: &[u8]) -> Verdict {
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_redirection()
    {
        return Verdict::TryNext;
    }
    if status == StatusCode::BAD_REQUEST
        && openbao_errors(body)
            .iter()
            .any(|e| e.starts_with(KV_UPGRADING))
    {
        return Verdict::TryNext;
    }
    Verdict::Final
}

pub(crate) fn describe_status(status: StatusCode, body: &[u8]) -> String {
    let errs = openbao_errors(body);
    if errs.is_empty() {
        format!("HTTP {}", status.as_u16())
    } else {
        format!("HTTP {}: {}", status.as_u16(), errs.join("; "))
    }
}

/// A transport error without the URL or anything else from the request.
pub(crate) fn describe_transport(e: &reqwest::Error, timeout: Duration) -> String {
    if e.is_timeout() {
        return format!("timed out after {timeout:?}");
    }
    let mut msg = if e.is_connect() {
        "connection failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src = std::error::Error::source(e);
    let mut last = String::new();
    while let Some(s) = src {
        let t = s.to_string();
        if t != last {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        last = t;
        src = s.source();
    }
    msg
}

pub(crate) async fn read_body(mut resp: reqwest::Response) -> Result<Zeroizing<Vec<u8>>, String> {
    let mut body = Zeroizing::new(Vec::new());
    loop {
        match resp.chunk().await {
            Ok(Some(c)) => {
                if body.len() + c.len() > MAX_BODY {
                    return Err(format!("answer larger than {MAX_BODY} bytes"));
                }
                body.extend_from_slice(&c);
            }
            Ok(None) => return Ok(body),
            Err(e) if e.is_timeout() => return Err("timed out reading the answer".into()),
            Err(_) => return Err("connection lost while reading the answer".into()),
        }
    }
}

/// The `errors` array of an OpenBao error answer (empty if there is none).
pub(crate) fn openbao_errors(body: &[u8]) -> Vec<String> {
    #[derive(Deserialize)]
    struct E {
        #[serde(default)]
        errors: Vec<String>,
    }
    serde_json::from_slice::<E>(body)
        .map(|e| e.errors)
        .unwrap_or_default()
}

/// Maps a non-2xx status to an error naming address and path.
pub(crate) fn check(ans: Answer, api: &str) -> Result<Answer, BaoError> {
    if ans.status.is_success() {
        return Ok(ans);
    }
    let errors = openbao_errors(&ans.body);
    let path = api.to_string();
    Err(if ans.status == StatusCode::FORBIDDEN {
        BaoError::Denied {
            address: ans.address,
            path,
            errors,
        }
    } else {
        BaoError::Status {
            address: ans.address,
            path,
            code: ans.status.as_u16(),
            errors,
        }
    })
}

/// Where JSON parsing failed, never the offending text (it may be a secret).
pub(crate) fn decode_reason(e: &serde_json::Error) -> String {
    use serde_json::error::Category;
    let what = match e.classify() {
        Category::Io => "I/O error",
        Category::Syntax => "malformed JSON",
        Category::Data => "JSON of the wrong shape",
        Category::Eof => "truncated JSON",
    };
    format!("{what} at line {} column {}", e.line(), e.column())
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    ans: &Answer,
    api: &str,
) -> Result<T, BaoError> {
    serde_json::from_slice(&ans.body).map_err(|e| BaoError::Decode {
        address: ans.address.clone(),
        path: api.to_string(),
        reason: decode_reason(&e),
    })
}

/// The `data` object of a standard OpenBao answer.
pub(crate) fn decode_data<T: serde::de::DeserializeOwned>(
    ans: &Answer,
    api: &str,
) -> Result<T, BaoError> {
    #[derive(Deserialize)]
    struct Envelope<T> {
        data: Option<T>,
    }
    decode::<Envelope<T>>(ans, api)?
        .data
        .ok_or_else(|| BaoError::Decode {
            address: ans.address.clone(),
            path: api.to_string(),
            reason: "no data in the answer".into(),
        })
}
