//! `ratelimit.limit`, `ratelimit.multiLimit` and the overrides: parse → one service
//! call → map.

use axum::extract::State;
use axum::Json;

use creditgate_domain::RatelimitOverride;

use super::{ok, paged};
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiJsonList};
use crate::parse::{parse_limit, parse_list_overrides, parse_multi_limit, parse_override};
use crate::state::AppState;
use crate::wire::*;
use creditgate_service::SetOverride;

#[utoipa::path(post, path = "/v2/ratelimit.limit", tag = "ratelimit", request_body = RatelimitLimitRequest,
    responses((status = 200, description = "Passed or not: `success`", body = Envelope<RatelimitLimitData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn limit(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<RatelimitLimitRequest>,
) -> Result<Json<Envelope<RatelimitLimitData>>, ApiError> {
    let request = parse_limit(req)?;
    let (passed, answers) = state.service.rate_limit(&caller, vec![request]).await?;
    let a = answers
        .into_iter()
        .next()
        .ok_or_else(|| ApiError::Internal("no answer to a rate limit check".into()))?;
    Ok(ok(RatelimitLimitData {
        limit: a.limit,
        remaining: a.remaining,
        reset: a.reset_ms,
        success: passed,
        override_id: a.override_id,
    }))
}

#[utoipa::path(post, path = "/v2/ratelimit.multiLimit", tag = "ratelimit", request_body = Vec<RatelimitLimitRequest>,
    responses((status = 200, description = "All passed and counted, or none counted", body = Envelope<RatelimitMultiLimitData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn multi_limit(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJsonList(reqs): ApiJsonList<RatelimitLimitRequest>,
) -> Result<Json<Envelope<RatelimitMultiLimitData>>, ApiError> {
    let requests = parse_multi_limit(reqs)?;
    let (passed, answers) = state.service.rate_limit(&caller, requests).await?;
    Ok(ok(RatelimitMultiLimitData {
        passed,
        limits: answers
            .into_iter()
            .map(|a| RatelimitMultiLimitCheck {
                namespace: a.request.namespace,
                identifier: a.request.identifier,
                limit: a.limit,
                remaining: a.remaining,
                reset: a.reset_ms,
                passed: a.passed,
                override_id: a.override_id,
            })
            .collect(),
    }))
}

fn override_data(o: RatelimitOverride) -> OverrideData {
    OverrideData {
        override_id: o.id,
        duration: o.duration_ms,
        identifier: o.identifier,
        limit: o.limit,
    }
}

#[utoipa::path(post, path = "/v2/ratelimit.setOverride", tag = "ratelimit", request_body = SetOverrideRequest,
    responses((status = 200, description = "Created, or changed (same id)", body = Envelope<SetOverrideData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn set_override(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<SetOverrideRequest>,
) -> Result<Json<Envelope<SetOverrideData>>, ApiError> {
    let cmd = SetOverride::try_from(req)?;
    let stored = state.service.set_override(&caller, cmd).await?;
    Ok(ok(SetOverrideData {
        override_id: stored.id,
    }))
}

#[utoipa::path(post, path = "/v2/ratelimit.getOverride", tag = "ratelimit", request_body = OverrideRequest,
    responses((status = 200, body = Envelope<OverrideData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_override(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<OverrideRequest>,
) -> Result<Json<Envelope<OverrideData>>, ApiError> {
    let (namespace, identifier) = parse_override(&req)?;
    let found = state
        .service
        .get_override(&caller, namespace, identifier)
        .await?;
    Ok(ok(override_data(found)))
}

#[utoipa::path(post, path = "/v2/ratelimit.listOverrides", tag = "ratelimit", request_body = ListOverridesRequest,
    responses((status = 200, body = PagedEnvelope<OverrideData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn list_overrides(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<ListOverridesRequest>,
) -> Result<Json<PagedEnvelope<OverrideData>>, ApiError> {
    let limit = parse_list_overrides(&req)?;
    let (found, cursor) = state
        .service
        .list_overrides(&caller, &req.namespace, limit, req.cursor.as_deref())
        .await?;
    Ok(paged(
        found.into_iter().map(override_data).collect(),
        cursor,
    ))
}

#[utoipa::path(post, path = "/v2/ratelimit.deleteOverride", tag = "ratelimit", request_body = OverrideRequest,
    responses((status = 200, body = Envelope<Empty>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn delete_override(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<OverrideRequest>,
) -> Result<Json<Envelope<Empty>>, ApiError> {
    let (namespace, identifier) = parse_override(&req)?;
    state
        .service
        .delete_override(&caller, namespace, identifier)
        .await?;
    Ok(ok(Empty {}))
}
