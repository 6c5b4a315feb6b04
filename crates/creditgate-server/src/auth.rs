//! Root-key authentication: `Authorization: Bearer <root key>` → the workspace and the
//! permissions of the caller (the service checks them).

use axum::extract::FromRequestParts;
use axum::http::header;
use axum::http::request::Parts;
use creditgate_service::Caller;

use crate::context::RequestContext;
use crate::error::ApiError;
use crate::state::AppState;

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct RootKey(pub Caller);

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
        let caller = state.service.authenticate(token).await?;
        RequestContext::set_workspace(caller.workspace().shared());
        Ok(RootKey(caller))
    }
}
