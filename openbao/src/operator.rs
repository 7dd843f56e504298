//! What only an operator may do, with the operator's token handed in for one command (never the
//! node's own, never stored): write the cluster-wide list of cut-off nodes and disable a node's
//! OpenBao identity, so OpenBao refuses every token the node holds at once.

use super::*;

/// An operator's OpenBao token for one command. Wiped on drop; `Debug` never shows it.
pub struct OperatorToken(Zeroizing<String>);

impl OperatorToken {
    pub fn new(token: Zeroizing<String>) -> Result<Self, BaoError> {
        let t = token.trim();
        if t.is_empty() || t.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(BaoError::Invalid(
                "the operator token is empty or not one word".into(),
            ));
        }
        Ok(OperatorToken(Zeroizing::new(t.to_string())))
    }
}

impl fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OperatorToken(<redacted>)")
    }
}

/// A node's OpenBao identity after [`Bao::set_node_disabled`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntity {
    pub entity_id: String,
    /// Created here (disabled) because the node had never logged in.
    pub created: bool,
}

impl Bao {
    async fn as_operator(
        &self,
        op: &OperatorToken,
        method: Method,
        api: &str,
        body: Option<&Value>,
    ) -> Result<Answer, BaoError> {
        let bytes = body.map(|b| serde_json::to_vec(b).expect("JSON value serializes"));
        self.inner
            .request(method, api, bytes.as_deref(), Some(&op.0))
            .await
    }

    /// Writes `<kv_mount>/<kv_prefix>/<path>` with the operator's token.
    pub async fn kv_write_as(
        &self,
        op: &OperatorToken,
        path: &str,
        data: Map<String, Value>,
    ) -> Result<(), BaoError> {
        let api = self.inner.kv_path("data", path, false)?;
        let body = serde_json::json!({ "data": data });
        check(
            self.as_operator(op, Method::POST, &api, Some(&body))
                .await?,
            &api,
        )
        .map(|_| ())
    }

    /// Deletes `<kv_mount>/<kv_prefix>/<path>` (every version) with the operator's token; a
    /// missing secret is fine.
    pub async fn kv_delete_as(&self, op: &OperatorToken, path: &str) -> Result<(), BaoError> {
        let api = self.inner.kv_path("metadata", path, false)?;
        let ans = self.as_operator(op, Method::DELETE, &api, None).await?;
        if ans.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        check(ans, &api).map(|_| ())
    }

    /// Disables (or enables again) the OpenBao entity of node `role` of the AppRole mount
    /// `approle_mount`: while it is disabled OpenBao refuses every token the node holds or gets
    /// (its KV reads, its signing). A node that never logged in gets a disabled entity with its
    /// alias made now, so its first login is refused too.
    pub async fn set_node_disabled(
        &self,
        op: &OperatorToken,
        approle_mount: &str,
        role: &str,
        disabled: bool,
    ) -> Result<NodeEntity, BaoError> {
        let mount = approle_mount.trim_matches('/');
        let api = format!("auth/{mount}/role/{role}/role-id");
        let ans = self.as_operator(op, Method::GET, &api, None).await?;
        if ans.status == StatusCode::NOT_FOUND {
            return Err(BaoError::Invalid(format!(
                "there is no AppRole role {role:?} at auth/{mount}/ (a node logs in with the role named after it)"
            )));
        }
        #[derive(Deserialize)]
        struct RoleId {
            role_id: String,
        }
        let role_id = decode_data::<RoleId>(&check(ans, &api)?, &api)?.role_id;

        let api = "sys/auth".to_string();
        let ans = check(self.as_operator(op, Method::GET, &api, None).await?, &api)?;
        let v: Value = serde_json::from_slice(&ans.body).map_err(|e| BaoError::Decode {
            address: ans.address.clone(),
            path: api.clone(),
            reason: decode_reason(&e),
        })?;
        let key = format!("{mount}/");
        let accessor = v["data"][&key]["accessor"]
            .as_str()
            .or_else(|| v[&key]["accessor"].as_str())
            .ok_or_else(|| BaoError::Invalid(format!("no auth method mounted at {mount}/")))?
            .to_string();

        #[derive(Deserialize)]
        struct Id {
            id: String,
        }
        let api = "identity/lookup/entity".to_string();
        let lookup = serde_json::json!({ "alias_name": role_id, "alias_mount_accessor": accessor });
        let ans = check(
            self.as_operator(op, Method::POST, &api, Some(&lookup))
                .await?,
            &api,
        )?;
        let found = if ans.status == StatusCode::NO_CONTENT || ans.body.is_empty() {
            None
        } else {
            Some(decode_data::<Id>(&ans, &api)?.id)
        };
        let (entity_id, created) = match found {
            Some(id) => {
                let api = format!("identity/entity/id/{id}");
                check(
                    self.as_operator(
                        op,
                        Method::POST,
                        &api,
                        Some(&serde_json::json!({ "disabled": disabled })),
                    )
                    .await?,
                    &api,
                )?;
                (id, false)
            }
            None => {
                let api = format!("identity/entity/name/nhi-node-{role}");
                let body = serde_json::json!({
                    "disabled": disabled,
                    "metadata": { "nhi_node": role },
                });
                let ans = check(
                    self.as_operator(op, Method::POST, &api, Some(&body))
                        .await?,
                    &api,
                )?;
                let id = if ans.body.is_empty() {
                    // Updated an existing entity of that name: read its id.
                    let ans = check(self.as_operator(op, Method::GET, &api, None).await?, &api)?;
                    decode_data::<Id>(&ans, &api)?.id
                } else {
                    decode_data::<Id>(&ans, &api)?.id
                };
                let api = "identity/entity-alias".to_string();
                let alias = serde_json::json!({
                    "name": role_id,
                    "canonical_id": id,
                    "mount_accessor": accessor,
                });
                check(
                    self.as_operator(op, Method::POST, &api, Some(&alias))
                        .await?,
                    &api,
                )?;
                (id, true)
            }
        };
        Ok(NodeEntity { entity_id, created })
    }
}
