//! `identities.createIdentity`, `getIdentity`, `listIdentities`, `updateIdentity`,
//! `deleteIdentity`, `updateCredits`, `getCreditHistory`: parse → one service call → map.

use axum::extract::State;
use axum::Json;
use creditgate_domain::IdentityRecord;
use creditgate_service::{CreateIdentity, ListIdentities, UpdateIdentity};

use super::ok;
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::parse::{
    parse_identity, parse_identity_credit_history, parse_identity_credits, refill_wire,
};
use crate::state::AppState;
use crate::wire::*;

/// The response shape of an identity.
pub fn identity_data(i: &IdentityRecord, pool_remaining: Option<u64>) -> IdentityData {
    IdentityData {
        id: i.id.0.to_string(),
        external_id: i.external_id.clone(),
        meta: i.meta.clone(),
        ratelimits: i.ratelimits.iter().map(super::ratelimit_data).collect(),
        credits: i
            .pool
            .as_ref()
            .zip(pool_remaining)
            .map(|(p, remaining)| PoolCreditsData {
                remaining: i64::try_from(remaining).unwrap_or(i64::MAX),
                refill: p.refill.as_ref().map(refill_wire),
                alerts: super::keys::alerts_wire(&p.credit_alerts),
            }),
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
    let pool = state.service.pool_balance(&found).await?;
    Ok(ok(identity_data(&found, pool)))
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
    let mut data = Vec::with_capacity(page.identities.len());
    for i in &page.identities {
        let pool = state.service.pool_balance(i).await?;
        data.push(identity_data(i, pool));
    }
    Ok(super::paged(data, page.cursor))
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
    let pool = state.service.pool_balance(&updated).await?;
    Ok(ok(identity_data(&updated, pool)))
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

#[utoipa::path(post, path = "/v2/identities.updateCredits", tag = "identities", request_body = UpdateIdentityCreditsRequest,
    responses((status = 200, description = "The pool's exact balance after the change", body = Envelope<IdentityCreditsData>), (status = 404, body = crate::error::ErrorEnvelope), (status = 409, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn update_credits(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<UpdateIdentityCreditsRequest>,
) -> Result<Json<Envelope<IdentityCreditsData>>, ApiError> {
    let (identity, op) = parse_identity_credits(&req)?;
    let (found, remaining) = state
        .service
        .update_identity_credits(&caller, identity, op)
        .await?;
    Ok(ok(IdentityCreditsData {
        identity_id: found.id.0.to_string(),
        remaining: remaining.map_or(0, |r| i64::try_from(r).unwrap_or(i64::MAX)),
    }))
}

#[utoipa::path(post, path = "/v2/identities.getCreditHistory", tag = "identities", operation_id = "get_identity_credit_history", request_body = GetIdentityCreditHistoryRequest,
    responses((status = 200, description = "The credit history of the identity's shared pool, newest first (empty when it has none)", body = PagedEnvelope<CreditHistoryEntryData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_credit_history(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<GetIdentityCreditHistoryRequest>,
) -> Result<Json<PagedEnvelope<CreditHistoryEntryData>>, ApiError> {
    let (identity, query) = parse_identity_credit_history(&req)?;
    let page = state
        .service
        .identity_credit_history(&caller, identity, query)
        .await?;
    Ok(super::history_page(page))
}
