//! `identities.createIdentity`, `getIdentity`, `listIdentities`, `updateIdentity`,
//! `deleteIdentity`: parse → one service call → map.

use axum::extract::State;
use axum::Json;
use creditgate_domain::IdentityRecord;
use creditgate_service::{CreateIdentity, ListIdentities, UpdateIdentity};

use super::ok;
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::parse::parse_identity;
use crate::state::AppState;
use crate::wire::*;

/// The response shape of an identity.
pub fn identity_data(i: &IdentityRecord) -> IdentityData {
    IdentityData {
        id: i.id.0.to_string(),
        external_id: i.external_id.clone(),
        meta: i.meta.clone(),
        ratelimits: i.ratelimits.iter().map(super::ratelimit_data).collect(),
    }
}

#[utoipa::path(post, path = "/v2/identities.createIdentity", tag = "identities", request_body = CreateIdentityRequest,
    responses((status = 200, body = Envelope<CreateIdentityData>), (status = 409, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn create_identity(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<CreateIdentityRequest>,
) -> Result<Json<Envelope<CreateIdentityData>>, ApiError> {
    let id = state
        .service
        .create_identity(&caller, CreateIdentity::try_from(req)?)
        .await?;
    Ok(ok(CreateIdentityData {
        identity_id: id.0.to_string(),
    }))
}

#[utoipa::path(post, path = "/v2/identities.getIdentity", tag = "identities", request_body = IdentityRequest,
    responses((status = 200, body = Envelope<IdentityData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_identity(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<IdentityRequest>,
) -> Result<Json<Envelope<IdentityData>>, ApiError> {
    let identity = parse_identity(&req.identity)?;
    let found = state.service.get_identity(&caller, identity).await?;
    Ok(ok(identity_data(&found)))
}

#[utoipa::path(post, path = "/v2/identities.listIdentities", tag = "identities", request_body = ListIdentitiesRequest,
    responses((status = 200, body = PagedEnvelope<IdentityData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn list_identities(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<ListIdentitiesRequest>,
) -> Result<Json<PagedEnvelope<IdentityData>>, ApiError> {
    let page = state
        .service
        .list_identities(&caller, ListIdentities::try_from(req)?)
        .await?;
    Ok(super::paged(
        page.identities.iter().map(identity_data).collect(),
        page.cursor,
    ))
}

#[utoipa::path(post, path = "/v2/identities.updateIdentity", tag = "identities", request_body = UpdateIdentityRequest,
    responses((status = 200, body = Envelope<IdentityData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn update_identity(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<UpdateIdentityRequest>,
) -> Result<Json<Envelope<IdentityData>>, ApiError> {
    let updated = state
        .service
        .update_identity(&caller, UpdateIdentity::try_from(req)?)
        .await?;
    Ok(ok(identity_data(&updated)))
}

#[utoipa::path(post, path = "/v2/identities.deleteIdentity", tag = "identities", request_body = IdentityRequest,
    responses((status = 200, body = Envelope<Empty>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn delete_identity(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<IdentityRequest>,
) -> Result<Json<Envelope<Empty>>, ApiError> {
    let identity = parse_identity(&req.identity)?;
    state.service.delete_identity(&caller, identity).await?;
    Ok(ok(Empty {}))
}
