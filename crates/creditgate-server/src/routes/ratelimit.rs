//! `ratelimit.limit` and `ratelimit.multiLimit`: parse → one service call → map.

use axum::extract::State;
use axum::Json;

use super::ok;
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::{ApiJson, ApiJsonList};
use crate::parse::{parse_limit, parse_multi_limit};
use crate::state::AppState;
use crate::wire::*;

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
            })
            .collect(),
    }))
}
