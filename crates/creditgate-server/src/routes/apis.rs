//! `apis.createApi`, `apis.getApi`, `apis.listKeys`, `apis.deleteApi`: parse → one
//! service call → map.

use axum::extract::State;
use axum::Json;
use creditgate_service::ListKeys;

use super::ok;
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::parse::{parse_api_id, parse_api_name};
use crate::routes::keys::key_data;
use crate::state::AppState;
use crate::wire::*;

#[utoipa::path(post, path = "/v2/apis.createApi", tag = "apis", request_body = CreateApiRequest,
    responses((status = 200, body = Envelope<CreateApiData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn create_api(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<CreateApiRequest>,
) -> Result<Json<Envelope<CreateApiData>>, ApiError> {
    let name = parse_api_name(req)?;
    let id = state.service.create_api(&caller, name).await?;
    Ok(ok(CreateApiData {
        api_id: id.0.to_string(),
    }))
}

#[utoipa::path(post, path = "/v2/apis.getApi", tag = "apis", request_body = ApiIdRequest,
    responses((status = 200, body = Envelope<GetApiData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_api(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<ApiIdRequest>,
) -> Result<Json<Envelope<GetApiData>>, ApiError> {
    let api = state.service.get_api(&caller, &parse_api_id(req)?).await?;
    Ok(ok(GetApiData {
        id: api.id.0.to_string(),
        name: api.name,
    }))
}

#[utoipa::path(post, path = "/v2/apis.deleteApi", tag = "apis", request_body = ApiIdRequest,
    responses((status = 200, body = Envelope<Empty>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn delete_api(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<ApiIdRequest>,
) -> Result<Json<Envelope<Empty>>, ApiError> {
    state
        .service
        .delete_api(&caller, &parse_api_id(req)?)
        .await?;
    Ok(ok(Empty {}))
}

#[utoipa::path(post, path = "/v2/apis.listKeys", tag = "apis", request_body = ListKeysRequest,
    responses((status = 200, body = PagedEnvelope<KeyData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<ListKeysRequest>,
) -> Result<Json<PagedEnvelope<KeyData>>, ApiError> {
    let listing = state
        .service
        .list_keys(&caller, ListKeys::try_from(req)?)
        .await?;
    Ok(super::paged(
        listing.keys.into_iter().map(key_data).collect(),
        listing.cursor,
    ))
}
