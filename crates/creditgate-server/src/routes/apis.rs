//! `apis.createApi`, `apis.getApi`, `apis.listKeys`, `apis.deleteApi`.

use axum::extract::State;
use axum::Json;
use creditgate_domain::{Action, ApiId, ApiRecord};

use super::ok;
use crate::auth::RootKey;
use crate::context::RequestId;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::routes::keys::key_data;
use crate::state::AppState;
use crate::validate::Checks;
use crate::wire::*;

#[utoipa::path(post, path = "/v2/apis.createApi", tag = "apis", request_body = CreateApiRequest,
    responses((status = 200, body = Envelope<CreateApiData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn create_api(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<CreateApiRequest>,
) -> Result<Json<Envelope<CreateApiData>>, ApiError> {
    root.require(Action::CreateApi, None)?;
    let mut checks = Checks::default();
    checks.len("body.name", &req.name, 3, 255);
    if !req.name.starts_with(|c: char| c.is_ascii_alphabetic())
        || !req
            .name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        checks.push(
            "body.name",
            "must start with a letter and contain only letters, digits, '.', '_' or '-'",
            "for example: my-api",
        );
    }
    checks.finish()?;
    let api = ApiRecord {
        id: ApiId::generate(),
        workspace_id: root.workspace().clone(),
        name: req.name,
        created_at: state.clock.now_ms(),
    };
    state.store.create_api(&api).await?;
    Ok(ok(CreateApiData { api_id: api.id.0 }))
}

/// The caller's live API, or 404.
async fn find_api(state: &AppState, root: &RootKey, api_id: &str) -> Result<ApiRecord, ApiError> {
    if api_id.is_empty() {
        return Err(ApiError::field(
            "body.apiId",
            "must not be empty",
            "send the id returned by apis.createApi",
        ));
    }
    state
        .store
        .get_api(root.workspace(), &ApiId::from(api_id))
        .await?
        .ok_or_else(ApiError::api_not_found)
}

#[utoipa::path(post, path = "/v2/apis.getApi", tag = "apis", request_body = ApiIdRequest,
    responses((status = 200, body = Envelope<GetApiData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_api(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<ApiIdRequest>,
) -> Result<Json<Envelope<GetApiData>>, ApiError> {
    root.require(Action::ReadApi, Some(&ApiId::from(req.api_id.as_str())))?;
    let api = find_api(&state, &root, &req.api_id).await?;
    Ok(ok(GetApiData {
        id: api.id.0,
        name: api.name,
    }))
}

#[utoipa::path(post, path = "/v2/apis.deleteApi", tag = "apis", request_body = ApiIdRequest,
    responses((status = 200, body = Envelope<Empty>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn delete_api(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<ApiIdRequest>,
) -> Result<Json<Envelope<Empty>>, ApiError> {
    let id = ApiId::from(req.api_id.as_str());
    root.require(Action::DeleteApi, Some(&id))?;
    find_api(&state, &root, &req.api_id).await?;
    if !state.store.delete_api(root.workspace(), &id).await? {
        return Err(ApiError::api_not_found());
    }
    // Its keys are gone too; this node forgets every cached key at once.
    state.invalidate_all_keys().await;
    Ok(ok(Empty {}))
}

#[utoipa::path(post, path = "/v2/apis.listKeys", tag = "apis", request_body = ListKeysRequest,
    responses((status = 200, body = PagedEnvelope<KeyData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<ListKeysRequest>,
) -> Result<Json<PagedEnvelope<KeyData>>, ApiError> {
    let id = ApiId::from(req.api_id.as_str());
    root.require(Action::ReadKey, Some(&id))?;
    root.require(Action::ReadApi, Some(&id))?;
    let mut checks = Checks::default();
    let limit = req.limit.unwrap_or(100);
    if !(1..=100).contains(&limit) {
        checks.push(
            "body.limit",
            format!("must be 1 to 100, got {limit}"),
            "send a limit from 1 to 100",
        );
    }
    if req.decrypt == Some(true) {
        checks.push(
            "body.decrypt",
            "keys are stored only as hashes and cannot be decrypted",
            "omit decrypt or send false",
        );
    }
    if let Some(e) = &req.external_id {
        checks.len("body.externalId", e, 1, 255);
    }
    checks.finish()?;
    find_api(&state, &root, &req.api_id).await?;
    let page = state
        .store
        .list_keys(
            &id,
            limit,
            req.cursor.as_deref(),
            req.external_id.as_deref(),
        )
        .await?;
    let mut data = Vec::with_capacity(page.keys.len());
    for k in &page.keys {
        data.push(key_data(&state, k).await?);
    }
    Ok(Json(PagedEnvelope {
        meta: Meta {
            request_id: RequestId::current(),
        },
        data,
        pagination: Pagination {
            has_more: page.cursor.is_some(),
            cursor: page.cursor,
        },
    }))
}
