//! `webhooks.createEndpoint`, `listEndpoints`, `deleteEndpoint` (creditgate's
//! extension): parse → one service call → map. The signing secret is answered by
//! `createEndpoint` only.

use axum::extract::State;
use axum::Json;
use creditgate_domain::WebhookEndpoint;
use creditgate_service::CreateWebhookEndpoint;

use super::ok;
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::parse::{parse_list_webhooks, parse_webhook_endpoint_id};
use crate::state::AppState;
use crate::wire::*;

fn endpoint_data(e: &WebhookEndpoint) -> WebhookEndpointData {
    WebhookEndpointData {
        endpoint_id: e.id.clone(),
        url: e.url.clone(),
        events: e.events.iter().map(|v| v.as_str().to_owned()).collect(),
        description: e.description.clone(),
        created_at: e.created_at,
    }
}

#[utoipa::path(post, path = "/v2/webhooks.createEndpoint", tag = "webhooks", request_body = CreateWebhookEndpointRequest,
    responses((status = 200, body = Envelope<CreatedWebhookEndpointData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn create_endpoint(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<CreateWebhookEndpointRequest>,
) -> Result<Json<Envelope<CreatedWebhookEndpointData>>, ApiError> {
    let endpoint = state
        .service
        .create_webhook_endpoint(&caller, CreateWebhookEndpoint::try_from(req)?)
        .await?;
    Ok(ok(CreatedWebhookEndpointData {
        endpoint: endpoint_data(&endpoint),
        secret: endpoint.secret,
    }))
}

#[utoipa::path(post, path = "/v2/webhooks.listEndpoints", tag = "webhooks", request_body = ListWebhookEndpointsRequest,
    responses((status = 200, body = PagedEnvelope<WebhookEndpointData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn list_endpoints(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<ListWebhookEndpointsRequest>,
) -> Result<Json<PagedEnvelope<WebhookEndpointData>>, ApiError> {
    let (limit, cursor) = parse_list_webhooks(req)?;
    let page = state
        .service
        .list_webhook_endpoints(&caller, limit, cursor.as_deref())
        .await?;
    Ok(super::paged(
        page.endpoints.iter().map(endpoint_data).collect(),
        page.cursor,
    ))
}

#[utoipa::path(post, path = "/v2/webhooks.deleteEndpoint", tag = "webhooks", request_body = WebhookEndpointIdRequest,
    responses((status = 200, body = Envelope<Empty>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn delete_endpoint(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<WebhookEndpointIdRequest>,
) -> Result<Json<Envelope<Empty>>, ApiError> {
    let id = parse_webhook_endpoint_id(req)?;
    state.service.delete_webhook_endpoint(&caller, &id).await?;
    Ok(ok(Empty {}))
}
