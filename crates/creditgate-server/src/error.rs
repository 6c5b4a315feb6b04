//! The API error: one enum, one table mapping each variant to its HTTP status, title and
//! `type`, and the one `IntoResponse` that renders Unkey's error envelope. 5xx bodies say
//! nothing internal; their cause is logged once here.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::context::RequestId;

pub use creditgate_service::FieldError;

/// One invalid field of a request, as the error body shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct FieldErrorBody {
    /// Where: `body.credits.cost`, `header.Authorization`, …
    pub location: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
}

impl From<FieldError> for FieldErrorBody {
    fn from(e: FieldError) -> Self {
        Self {
            location: e.location,
            message: e.message,
            fix: e.fix,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// Every field is well-formed but what they ask for is not served (a usage range
    /// that ends before it starts or is too wide, a webhook URL this node does not send
    /// to): 422 naming the fields.
    #[error("{detail}")]
    Unprocessable {
        detail: String,
        errors: Vec<FieldError>,
    },
    #[error("{detail}")]
    NotFound { kind: NotFoundKind, detail: String },
    #[error("{0}")]
    MethodNotAllowed(String),
    /// The hold was closed otherwise, or expired: nothing was changed.
    #[error("the hold is already {state}: nothing was changed")]
    HoldClosed { state: &'static str },
    /// Well-formed, but the key's state does not allow it; nothing was changed.
    #[error("{0}")]
    Conflict(String),
    #[error("the request body exceeds {limit} bytes")]
    PayloadTooLarge { limit: usize },
    /// A backend is unavailable and nothing was done.
    #[error("{0}")]
    Unavailable(String),
    /// The node has as many requests in flight as it takes; this one was not processed.
    #[error("{limit} requests in flight")]
    Overloaded { limit: usize },
    /// A backend did not answer in time after the request was sent: the operation may
    /// or may not have been applied.
    #[error("{0}")]
    OutcomeUnknown(String),
    /// As `OutcomeUnknown`, for a request with an idempotency key: a retry with the same
    /// key is safe.
    #[error("{0}")]
    OutcomeUnknownRetrySafe(String),
    /// The idempotency key was used with a different request: nothing was done.
    #[error(
        "this idempotency key was used with a different request (route or body) in the \
             last 24 h; nothing was done: send a new key for a new request"
    )]
    IdempotencyMismatch,
    /// `Idempotency-Key` and `idempotencyKey` name different keys: nothing was done.
    #[error(
        "the Idempotency-Key header and body.idempotencyKey differ; nothing was done: \
             send the idempotency key once, in the header or in the body"
    )]
    IdempotencyKeysDiffer,
    /// A request with the same idempotency key is still being processed.
    #[error(
        "a request with this idempotency key is still being processed; nothing was done: \
             retry shortly to get its answer"
    )]
    IdempotencyInFlight,
    #[error("{0}")]
    Internal(String),
}

/// `location: message; …` of every field error, the `detail` of a 400 or 422.
fn field_details(errors: &[FieldError]) -> String {
    errors
        .iter()
        .map(|e| format!("{}: {}", e.location, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotFoundKind {
    Key,
    Api,
    Hold,
    Identity,
    Override,
    Webhook,
    Route,
}

impl ApiError {
    pub fn field(location: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        Self::invalid(vec![FieldError::new(location, message).fix(fix)])
    }

    /// One 400 naming every invalid field.
    pub fn invalid(errors: Vec<FieldError>) -> Self {
        let detail = field_details(&errors);
        ApiError::BadRequest { detail, errors }
    }

    /// One 422 naming every field of a combination that is not served.
    pub fn unprocessable(errors: Vec<FieldError>) -> Self {
        let detail = field_details(&errors);
        ApiError::Unprocessable { detail, errors }
    }

    pub fn key_not_found() -> Self {
        ApiError::NotFound {
            kind: NotFoundKind::Key,
            detail: "The requested key does not exist or has been deleted.".into(),
        }
    }

    pub fn api_not_found() -> Self {
        ApiError::NotFound {
            kind: NotFoundKind::Api,
            detail: "The requested API does not exist or has been deleted.".into(),
        }
    }

    /// (status, title, type) — the one table.
    fn table(&self) -> (StatusCode, &'static str, &'static str) {
        match self {
            ApiError::BadRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "Bad Request",
                "https://unkey.com/docs/errors/unkey/application/invalid_input",
            ),
            ApiError::Unprocessable { .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "Unprocessable Content",
                "https://creditgate.dev/docs/errors/application/unprocessable",
            ),
            ApiError::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "Unauthorized",
                "https://unkey.com/docs/errors/unkey/authentication/key_not_found",
            ),
            ApiError::Forbidden(_) => (
                StatusCode::FORBIDDEN,
                "Forbidden",
                "https://unkey.com/docs/errors/unkey/authorization/insufficient_permissions",
            ),
            ApiError::NotFound { kind, .. } => (
                StatusCode::NOT_FOUND,
                "Not Found",
                match kind {
                    NotFoundKind::Key => "https://unkey.com/docs/errors/unkey/data/key_not_found",
                    NotFoundKind::Api => "https://unkey.com/docs/errors/unkey/data/api_not_found",
                    NotFoundKind::Hold => "https://creditgate.dev/docs/errors/data/hold_not_found",
                    NotFoundKind::Identity => {
                        "https://unkey.com/docs/errors/unkey/data/identity_not_found"
                    }
                    NotFoundKind::Override => {
                        "https://unkey.com/docs/errors/unkey/data/ratelimit_override_not_found"
                    }
                    NotFoundKind::Webhook => {
                        "https://creditgate.dev/docs/errors/data/webhook_endpoint_not_found"
                    }
                    NotFoundKind::Route => {
                        "https://unkey.com/docs/errors/unkey/application/route_not_found"
                    }
                },
            ),
            ApiError::MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "Method Not Allowed",
                "https://unkey.com/docs/errors/unkey/application/method_not_allowed",
            ),
            ApiError::Conflict(_) => (
                StatusCode::CONFLICT,
                "Conflict",
                "https://unkey.com/docs/errors/unkey/data/conflict",
            ),
            ApiError::HoldClosed { state } => (
                StatusCode::CONFLICT,
                "Conflict",
                match *state {
                    "settled" => "https://creditgate.dev/docs/errors/data/hold_settled",
                    "released" => "https://creditgate.dev/docs/errors/data/hold_released",
                    _ => "https://creditgate.dev/docs/errors/data/hold_expired",
                },
            ),
            ApiError::PayloadTooLarge { .. } => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "Payload Too Large",
                "https://unkey.com/docs/errors/unkey/application/request_too_large",
            ),
            ApiError::IdempotencyMismatch => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "Unprocessable Content",
                "https://creditgate.dev/docs/errors/idempotency/key_reused",
            ),
            ApiError::IdempotencyKeysDiffer => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "Unprocessable Content",
                "https://creditgate.dev/docs/errors/idempotency/keys_differ",
            ),
            ApiError::IdempotencyInFlight => (
                StatusCode::CONFLICT,
                "Conflict",
                "https://creditgate.dev/docs/errors/idempotency/in_flight",
            ),
            // Its own type: a client must not take it for "nothing was done".
            ApiError::OutcomeUnknown(_) | ApiError::OutcomeUnknownRetrySafe(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "https://unkey.com/docs/errors/unkey/application/service_unavailable#outcome-unknown",
            ),
            ApiError::Unavailable(_) | ApiError::Overloaded { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "Service Unavailable",
                "https://unkey.com/docs/errors/unkey/application/service_unavailable",
            ),
            ApiError::Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "Internal Server Error",
                "https://unkey.com/docs/errors/unkey/application/unexpected_error",
            ),
        }
    }

    /// Renders the envelope for a request id.
    pub fn into_response_with(self, request_id: &str) -> Response {
        let (status, title, kind) = self.table();
        let detail = match &self {
            ApiError::Internal(cause) => {
                tracing::error!(request_id, cause = %cause, "internal error");
                "Something went wrong on our side; the request changed nothing it reported."
                    .to_owned()
            }
            ApiError::Unavailable(cause) => {
                tracing::warn!(request_id, cause = %cause, "backend unavailable");
                "A storage backend is unavailable; nothing was spent. Retry shortly.".to_owned()
            }
            ApiError::Overloaded { limit } => format!(
                "This node is at its limit of {limit} requests in flight; this request was not \
                 processed and changed nothing. Retry shortly."
            ),
            ApiError::OutcomeUnknown(cause) => {
                tracing::warn!(request_id, cause = %cause, "backend outcome unknown");
                "A storage backend did not answer in time; the outcome is unknown: this request \
                 may or may not have spent credits. Check the balance (keys.getKey) before \
                 retrying."
                    .to_owned()
            }
            ApiError::OutcomeUnknownRetrySafe(cause) => {
                tracing::warn!(request_id, cause = %cause, "backend outcome unknown");
                "A storage backend did not answer in time and the outcome could not be looked \
                 up: this request may or may not have been applied. Retrying with the same \
                 idempotency key is safe: it is applied at most once, and answers the first \
                 decision."
                    .to_owned()
            }
            other => other.to_string(),
        };
        let errors = match self {
            ApiError::BadRequest { errors, .. } | ApiError::Unprocessable { errors, .. } => {
                Some(errors.into_iter().map(FieldErrorBody::from).collect())
            }
            _ => None,
        };
        let body = ErrorEnvelope {
            meta: crate::wire::Meta {
                request_id: request_id.into(),
            },
            error: ErrorBody {
                title,
                detail,
                status: status.as_u16(),
                kind,
                errors,
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<creditgate_domain::StoreError> for ApiError {
    fn from(e: creditgate_domain::StoreError) -> Self {
        use creditgate_domain::StoreError;
        match e {
            StoreError::Unavailable(s) => ApiError::Unavailable(s),
            StoreError::Conflict(cause) => {
                // The database's own text stays in the log.
                tracing::warn!(cause = %cause, "store conflict");
                ApiError::Conflict(
                    "the write conflicts with data already stored; nothing was changed".into(),
                )
            }
            StoreError::Backend(s) => ApiError::Internal(s),
        }
    }
}

impl From<creditgate_limiter::EngineError> for ApiError {
    fn from(e: creditgate_limiter::EngineError) -> Self {
        use creditgate_limiter::EngineError;
        match e {
            EngineError::Unavailable(s) | EngineError::Busy(s) => ApiError::Unavailable(s),
            EngineError::Ambiguous(s) => ApiError::OutcomeUnknown(s),
            EngineError::NotFound => ApiError::key_not_found(),
            EngineError::Overflow { max } => ApiError::Conflict(format!(
                "the balance would exceed the maximum of {max} credits: use a smaller increment"
            )),
            EngineError::Unlimited => ApiError::Conflict(
                "the key has unlimited credits: use operation 'set' with a value to give it a \
                 balance first"
                    .into(),
            ),
            EngineError::Internal(s) => ApiError::Internal(s),
            EngineError::Superseded => ApiError::IdempotencyInFlight,
        }
    }
}

impl From<creditgate_service::ServiceError> for ApiError {
    fn from(e: creditgate_service::ServiceError) -> Self {
        use creditgate_service::ServiceError;
        match e {
            ServiceError::Invalid(errors) => ApiError::invalid(errors),
            ServiceError::Unprocessable(errors) => ApiError::unprocessable(errors),
            ServiceError::Unauthorized(s) => ApiError::Unauthorized(s),
            ServiceError::Forbidden(s) => ApiError::Forbidden(s),
            ServiceError::Conflict(s) => ApiError::Conflict(s),
            ServiceError::KeyNotFound => ApiError::key_not_found(),
            ServiceError::ApiNotFound => ApiError::api_not_found(),
            ServiceError::HoldNotFound => ApiError::NotFound {
                kind: NotFoundKind::Hold,
                detail: "The requested hold does not exist, or belongs to a key this root key \
                         may not verify."
                    .into(),
            },
            ServiceError::IdentityNotFound => ApiError::NotFound {
                kind: NotFoundKind::Identity,
                detail: "The requested identity does not exist in this workspace.".into(),
            },
            ServiceError::OverrideNotFound => ApiError::NotFound {
                kind: NotFoundKind::Override,
                detail: "The namespace has no override of exactly this identifier.".into(),
            },
            ServiceError::WebhookEndpointNotFound => ApiError::NotFound {
                kind: NotFoundKind::Webhook,
                detail: "The workspace has no webhook endpoint with this id.".into(),
            },
            ServiceError::HoldClosed(state) => ApiError::HoldClosed {
                state: state.as_str(),
            },
            ServiceError::IdempotencyMismatch => ApiError::IdempotencyMismatch,
            ServiceError::IdempotencyInFlight => ApiError::IdempotencyInFlight,
            ServiceError::OutcomeUnknown(s) => ApiError::OutcomeUnknownRetrySafe(s),
            ServiceError::Engine(e) => e.into(),
            ServiceError::Store(e) => e.into(),
            ServiceError::RateLimiter(e) => {
                use creditgate_limiter::LimitError;
                match e {
                    LimitError::Unavailable(s) => ApiError::Unavailable(format!(
                        "the rate limiter is unavailable, nothing was counted: {s}"
                    )),
                    LimitError::Ambiguous(s) => ApiError::OutcomeUnknown(format!(
                        "the rate limiter did not answer in time and may have counted: {s}"
                    )),
                    LimitError::Other(s) => ApiError::Internal(s),
                }
            }
            ServiceError::Unavailable(s) => ApiError::Unavailable(s),
            ServiceError::Internal(s) => ApiError::Internal(s),
        }
    }
}

/// The error envelope.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorEnvelope {
    pub meta: crate::wire::Meta,
    pub error: ErrorBody,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub title: &'static str,
    pub detail: String,
    pub status: u16,
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Present on 400 responses: one entry per invalid field.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldErrorBody>>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.into_response_with(&RequestId::current())
    }
}
