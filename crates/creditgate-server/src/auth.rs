//! Root-key authentication: `Authorization: Bearer <root key>` → the workspace and the
//! permissions of the caller. Routes state the permission they need with
//! [`RootKey::require`].

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use creditgate_domain::{hash_secret, Action, ApiId, RootKeyRecord};

use crate::context::RequestContext;
use crate::error::ApiError;
use crate::state::AppState;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct RootKey(pub Arc<RootKeyRecord>);

impl RootKey {
    /// 403 unless the root key may do `action` on `api` (or on every API).
    pub fn require(&self, action: Action, api: Option<&ApiId>) -> Result<(), ApiError> {
        if self.allows(action, api) {
            return Ok(());
        }
        let scope = api.map_or("*", |a| a.as_str());
        Err(ApiError::Forbidden(format!(
            "this root key lacks the permission api.{scope}.{} (or api.*.{})",
            action.as_str(),
            action.as_str()
        )))
    }

    pub fn allows(&self, action: Action, api: Option<&ApiId>) -> bool {
        self.0.permissions.allows(action, api)
    }

    pub fn workspace(&self) -> &creditgate_domain::WorkspaceId {
        &self.0.workspace_id
    }
}

impl FromRequestParts<AppState> for RootKey {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
            return Err(ApiError::Unauthorized(
                "missing Authorization header: send 'Authorization: Bearer <root key>'".into(),
            ));
        };
        let value = value.to_str().unwrap_or("");
        // The scheme is case-insensitive (RFC 9110 §11.1).
        let token = match value.split_once(' ') {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
            _ => "",
        };
        if token.is_empty() {
            return Err(ApiError::Unauthorized(
                "malformed Authorization header: expected 'Bearer <root key>'".into(),
            ));
        }
        let hash = hash_secret(token);
        let root = match state.roots.get(&hash).await {
            Some(r) => r,
            None => {
                let found = state.store.root_key_by_hash(&hash).await?;
                let Some(found) = found else {
                    return Err(ApiError::Unauthorized(
                        "the root key is invalid or was revoked".into(),
                    ));
                };
                let found = Arc::new(found);
                state.roots.insert(hash, found.clone()).await;
                found
            }
        };
        RequestContext::set_workspace(root.workspace_id.as_str());
        Ok(RootKey(root))
    }
}
