//! Issuance for one workload on OpenBao's side of the trust boundary: the workload's own proof
//! (its service-account token) logs it in through a JWT auth method, and the short-lived token
//! that login returns can have a CSR signed only for the identity that proof names (the PKI
//! role's templated URI SAN, see docs/OPENBAO.md); the node's own token is not used for either
//! step. A workload without such a proof is signed with the node's token under a role that
//! admits only the node's own path (`.../node/<node>/...`). The private key never leaves the
//! caller.

use super::*;

/// A workload's short-lived OpenBao token, from [`Bao::login_jwt`]. Wiped on drop; `Debug`
/// never shows it.
pub struct WorkloadToken {
    pub(crate) token: Zeroizing<String>,
    /// Unix seconds; `None` if OpenBao gave it no expiry.
    pub expires_at: Option<u64>,
}

impl fmt::Debug for WorkloadToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadToken")
            .field("token", &"<redacted>")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A leaf certificate signed by the PKI mount for one workload.
#[derive(Debug, Clone)]
pub struct SignedLeaf {
    pub certificate_pem: String,
    /// The certificate that signed it.
    pub issuing_ca_pem: String,
    /// The issuers up to the root, as OpenBao returns them.
    pub ca_chain_pem: Vec<String>,
    pub serial_number: String,
    /// `notAfter`, Unix seconds.
    pub expiration: u64,
}

impl Bao {
    /// Logs a workload in with `jwt` (its service-account token) at the JWT auth method mounted
    /// at `mount`, role `role`. OpenBao checks the signature, issuer, audience and expiry; a
    /// token it does not accept is [`BaoError::Status`] with OpenBao's reason.
    pub async fn login_jwt(
        &self,
        mount: &str,
        role: &str,
        jwt: &str,
    ) -> Result<WorkloadToken, BaoError> {
        let api = format!("auth/{mount}/login");
        let body = Zeroizing::new(
            serde_json::to_vec(&serde_json::json!({ "role": role, "jwt": jwt }))
                .expect("JSON value serializes"),
        );
        let ans = check(
            self.inner
                .request(Method::POST, &api, Some(&body), None)
                .await?,
            &api,
        )?;
        let (token, _, expires_at) = parse_auth(&ans, &api, Instant::now())?;
        Ok(WorkloadToken { token, expires_at })
    }

    /// Has OpenBao sign `csr_pem` for the one URI SAN `uri` under PKI role `role`, with the
    /// workload's `token`. OpenBao refuses (HTTP 400, naming the URI SAN) an identity the
    /// token's proof does not admit.
    pub async fn pki_sign(
        &self,
        token: &WorkloadToken,
        role: &str,
        csr_pem: &str,
        uri: &str,
        ttl: Duration,
    ) -> Result<SignedLeaf, BaoError> {
        self.sign_leaf(Some(&token.token), role, csr_pem, uri, ttl)
            .await
    }

    /// [`Bao::pki_sign`] with the node's own session token: for workloads that proved nothing
    /// to OpenBao, under a role whose template admits only this node's path.
    pub async fn pki_sign_as_node(
        &self,
        role: &str,
        csr_pem: &str,
        uri: &str,
        ttl: Duration,
    ) -> Result<SignedLeaf, BaoError> {
        self.sign_leaf(None, role, csr_pem, uri, ttl).await
    }

    /// `<pki>/sign/<role>`: only the key comes from the CSR; the one URI SAN `uri`, no SAN
    /// from a common name. With `token` or (`None`) the node's session.
    async fn sign_leaf(
        &self,
        token: Option<&str>,
        role: &str,
        csr_pem: &str,
        uri: &str,
        ttl: Duration,
    ) -> Result<SignedLeaf, BaoError> {
        let api = format!("{}/sign/{role}", self.inner.pki_mount);
        let body = serde_json::to_vec(&serde_json::json!({
            "csr": csr_pem,
            "uri_sans": uri,
            "ttl": format!("{}s", ttl.as_secs().max(1)),
            "format": "pem",
            "exclude_cn_from_sans": true,
        }))
        .expect("JSON value serializes");
        let ans = match token {
            Some(t) => {
                self.inner
                    .request(Method::POST, &api, Some(&body), Some(t))
                    .await?
            }
            None => self.inner.authed(Method::POST, &api, Some(&body)).await?,
        };
        let ans = check(ans, &api)?;
        let d: Signed = decode_data(&ans, &api)?;
        Ok(SignedLeaf {
            certificate_pem: d.certificate,
            issuing_ca_pem: d.issuing_ca,
            ca_chain_pem: d.ca_chain,
            serial_number: d.serial_number,
            expiration: d.expiration,
        })
    }
}
