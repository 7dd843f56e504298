//! The cluster's service-account signing keys, kept current from the API server's OIDC
//! discovery (`kubernetes.service_account_discovery`): `<issuer>/.well-known/openid-configuration`
//! names `jwks_uri`, both fetched over HTTPS (only the CA file's authorities when one is set, no
//! redirects, bounded size and time). Fetched at the first need, again every
//! `service_account_jwks_refresh`, and at once when a token names a `kid` the keys do not
//! have (at most every [`UNKNOWN_KID_PAUSE`]), so a key rotation in the cluster is followed
//! without a restart. With discovery on, `nhid` checks a pod's token at attach (the hook only
//! checks where it lies and what it claims); the JWKS file (`service_account_jwks`) stays the
//! offline option, checked by the hook.

use std::time::{Duration, Instant};

use nhi_core::config::KubernetesConfig;

/// Longest discovery document or JWKS accepted.
const MAX_BODY: usize = 1 << 20;
/// A token with an unknown `kid` triggers a fetch at most this often.
pub const UNKNOWN_KID_PAUSE: Duration = Duration::from_secs(5);

struct Fetched {
    jwks: String,
    at: Instant,
}

pub struct SaKeys {
    issuer: String,
    ca_file: Option<std::path::PathBuf>,
    refresh: Duration,
    state: std::sync::Mutex<State>,
}

#[derive(Default)]
struct State {
    keys: Option<Fetched>,
    last_attempt: Option<Instant>,
}

impl SaKeys {
    /// `None` unless discovery is on.
    pub fn from_config(k: &KubernetesConfig) -> Option<SaKeys> {
        if !k.service_account_discovery {
            return None;
        }
        Some(SaKeys {
            issuer: k
                .service_account_issuer
                .clone()
                .unwrap_or_default()
                .trim_end_matches('/')
                .to_string(),
            ca_file: k.service_account_ca_file.clone(),
            refresh: k.service_account_jwks_refresh,
            state: Default::default(),
        })
    }

    fn client(&self) -> Result<reqwest::Client, String> {
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .https_only(true);
        if let Some(ca) = &self.ca_file {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("{}: {e}", ca.display()))?;
            if certs.is_empty() {
                return Err(format!("{}: no certificate", ca.display()));
            }
            b = b.tls_built_in_root_certs(false);
            for c in certs {
                b = b.add_root_certificate(c);
            }
        }
        b.build().map_err(|e| e.to_string())
    }

    async fn get(client: &reqwest::Client, url: &str) -> Result<String, String> {
        let mut resp = client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("{url}: HTTP {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| format!("{url}: {e}"))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_BODY {
                return Err(format!("{url}: larger than {MAX_BODY} bytes"));
            }
        }
        String::from_utf8(body).map_err(|_| format!("{url}: not UTF-8"))
    }

    /// Discovery, then the JWKS it names.
    async fn fetch(&self) -> Result<String, String> {
        let client = self.client()?;
        let disco_url = format!("{}/.well-known/openid-configuration", self.issuer);
        let disco: serde_json::Value = serde_json::from_str(&Self::get(&client, &disco_url).await?)
            .map_err(|e| format!("{disco_url}: {e}"))?;
        if disco["issuer"].as_str().map(|i| i.trim_end_matches('/')) != Some(&self.issuer) {
            return Err(format!(
                "{disco_url}: names issuer {}, not {}",
                disco["issuer"], self.issuer
            ));
        }
        let jwks_uri = disco["jwks_uri"]
            .as_str()
            .ok_or_else(|| format!("{disco_url}: no jwks_uri"))?;
        let jwks = Self::get(&client, jwks_uri).await?;
        let set: jsonwebtoken::jwk::JwkSet =
            serde_json::from_str(&jwks).map_err(|e| format!("{jwks_uri}: {e}"))?;
        if set.keys.is_empty() {
            return Err(format!("{jwks_uri}: no keys"));
        }
        tracing::info!(keys = set.keys.len(), %jwks_uri, "service-account keys fetched");
        Ok(jwks)
    }

    /// The keys, fetched if there are none, they are older than the refresh period, or
    /// `want_kid` is not among them (then at most every [`UNKNOWN_KID_PAUSE`]). The fetch
    /// runs without holding the state, so other attaches go on with the keys already known.
    async fn keys(&self, want_kid: Option<&str>) -> Result<String, String> {
        let (known, fetch) = {
            let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
            let stale = st
                .keys
                .as_ref()
                .is_none_or(|k| k.at.elapsed() >= self.refresh);
            let unknown = match (want_kid, &st.keys) {
                (Some(kid), Some(k)) => !has_kid(&k.jwks, kid),
                _ => false,
            };
            let may_try = st
                .last_attempt
                .is_none_or(|t| t.elapsed() >= UNKNOWN_KID_PAUSE);
            let fetch = (stale || unknown) && may_try;
            if fetch {
                st.last_attempt = Some(Instant::now());
            }
            (st.keys.as_ref().map(|k| k.jwks.clone()), fetch)
        };
        if fetch {
            match self.fetch().await {
                Ok(jwks) => {
                    self.state.lock().unwrap_or_else(|p| p.into_inner()).keys = Some(Fetched {
                        jwks: jwks.clone(),
                        at: Instant::now(),
                    });
                    return Ok(jwks);
                }
                Err(e) if known.is_some() => {
                    tracing::warn!(
                        "service-account keys not refreshed ({e}); using the ones fetched before"
                    )
                }
                Err(e) => return Err(format!("the cluster's service-account keys: {e}")),
            }
        }
        known.ok_or_else(|| "the cluster's service-account keys are not fetched yet".into())
    }

    /// Checks a pod's service-account token: a signature by one of the cluster's current keys,
    /// the issuer, not expired.
    pub async fn verify(&self, token: &str) -> Result<(), String> {
        let token = token.trim();
        let kid = jsonwebtoken::decode_header(token)
            .map_err(|e| format!("service-account token header: {e}"))?
            .kid;
        let jwks = self.keys(kid.as_deref()).await?;
        let check = nhi_core::jwt::ForeignCheck {
            issuer: Some(&self.issuer),
            audience: None,
            require_exp: true,
            leeway: 60,
        };
        nhi_core::jwt::verify_foreign(token, &jwks, "the cluster's keys", &check)
            .map(|_| ())
            .map_err(|e| format!("service-account {e}"))
    }

    /// Keeps the keys fresh in the background (and warm for the next attach).
    pub async fn refresh_loop(self: std::sync::Arc<Self>) {
        loop {
            if let Err(e) = self.keys(None).await {
                tracing::warn!("{e}");
            }
            tokio::time::sleep(self.refresh.min(Duration::from_secs(60))).await;
        }
    }
}

fn has_kid(jwks: &str, kid: &str) -> bool {
    serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(jwks).is_ok_and(|s| s.find(kid).is_some())
}
