//! `webhooks.createEndpoint`, `listEndpoints`, `deleteEndpoint` (creditgate's
//! extension): parse → one service call → map. The signing secret is answered by
//! `createEndpoint` only.

use axum::extract::State;
use axum::Json;
use creditgate_domain::{WebhookDelivery, WebhookEndpoint};
use creditgate_service::CreateWebhookEndpoint;

use super::ok;
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::parse::{parse_list_deliveries, parse_list_webhooks, parse_webhook_endpoint_id};
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

fn delivery_data(d: WebhookDelivery) -> WebhookDeliveryData {
    WebhookDeliveryData {
        event_id: d.event_id,
        event_type: d.event_type,
        state: d.state,
        next_attempt_at: d.next_attempt_at,
        last_status: d.last_status,
        last_error: d.last_error,
        delivered_at: d.delivered_at,
        created_at: d.created_at,
        attempts: d
            .attempts
            .into_iter()
            .map(|a| WebhookAttemptData {
                attempt: a.attempt,
                at: a.at,
                status: a.status,
                latency_ms: a.latency_ms,
                error: a.error,
                next_retry_at: a.next_retry_at,
            })
            .collect(),
    }
}

#[utoipa::path(post, path = "/v2/webhooks.listDeliveries", tag = "webhooks", request_body = ListWebhookDeliveriesRequest,
    responses((status = 200, body = PagedEnvelope<WebhookDeliveryData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn list_deliveries(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<ListWebhookDeliveriesRequest>,
) -> Result<Json<PagedEnvelope<WebhookDeliveryData>>, ApiError> {
    let (id, limit, cursor) = parse_list_deliveries(req)?;
    let (deliveries, cursor) = state
        .service
        .list_webhook_deliveries(&caller, &id, limit, cursor.as_deref())
        .await?;
    Ok(super::paged(
        deliveries.into_iter().map(delivery_data).collect(),
        cursor,
    ))
}
