//! `GET /v2/liveness`, `GET /openapi.json`, `GET /metrics`, and the 404 fallback.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;

use super::ok;
use crate::error::{ApiError, NotFoundKind};
use crate::state::AppState;
use crate::wire::{Envelope, LivenessData};

#[utoipa::path(get, path = "/v2/liveness", tag = "system",
    responses((status = 200, body = Envelope<LivenessData>)))]
pub async fn liveness() -> Json<Envelope<LivenessData>> {
    ok(LivenessData {
        message: "OK".into(),
    })
}

pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document_json(),
    )
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}

pub async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "{method} is not allowed on {}: API routes take POST with a JSON body; \
         /v2/liveness, /openapi.json and /metrics take GET",
        uri.path()
    ))
}

pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::NotFound {
        kind: NotFoundKind::Route,
        detail: format!(
            "no route {}: routes are POST /v2/<group>.<action>; see /openapi.json",
            uri.path()
        ),
    }
}
