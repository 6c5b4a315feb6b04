//! `ApiJson<T>`: the JSON body extractor. Checks the content type and the size limit,
//! and turns serde errors into 400s that name the field (`body.credits.cost`).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::header;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, FieldError};
use crate::state::AppState;

pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = content_type.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::field(
                "header.Content-Type",
                format!("expected application/json, got '{content_type}'"),
                "send the body as JSON with Content-Type: application/json",
            ));
        }
        let limit = state.config.max_body_bytes;
        let body = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::PayloadTooLarge { limit })?;
        parse(&body).map(ApiJson)
    }
}

/// Parses a body, naming the offending field on error.
pub fn parse<T: DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let syntax = inner.is_syntax() || inner.is_eof();
        let mut location = if syntax || path == "." || path.is_empty() {
            "body".to_owned()
        } else {
            format!("body.{path}")
        };
        // A missing or unknown field: serde names it only in the message.
        if !syntax {
            let text = inner.to_string();
            for marker in ["missing field `", "unknown field `"] {
                if let Some(rest) = text.strip_prefix(marker) {
                    if let Some(name) = rest.split('`').next() {
                        if !location.ends_with(&format!(".{name}")) {
                            location = format!("{location}.{name}");
                        }
                    }
                }
            }
        }
        let (message, fix) = if syntax {
            (
                format!("invalid JSON: {inner}"),
                "send a well-formed JSON object",
            )
        } else {
            (
                inner.to_string(),
                "check the field's name and type against /openapi.json",
            )
        };
        let err = FieldError::new(location, message).fix(fix);
        ApiError::BadRequest {
            detail: format!("{}: {}", err.location, err.message),
            errors: vec![err],
        }
    })
}
