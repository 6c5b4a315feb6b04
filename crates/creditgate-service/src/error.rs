//! What a service call can fail with. The HTTP layer maps each variant to one row of its
//! error table; nothing here knows about statuses.

use creditgate_domain::StoreError;
use creditgate_limiter::EngineError;

/// One invalid field of a command: where, what is wrong, and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where: `body.credits.cost`, `header.Authorization`, …
    pub location: String,
    pub message: String,
    pub fix: Option<String>,
}

impl FieldError {
    pub fn new(location: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            location: location.into(),
            message: message.into(),
            fix: None,
        }
    }

    pub fn fix(mut self, fix: impl Into<String>) -> Self {
        self.fix = Some(fix.into());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The command is invalid; nothing was changed.
    #[error("invalid request: {0:?}")]
    Invalid(Vec<FieldError>),
    /// Each field is valid but together they ask for more than is served (a usage
    /// answer past its bound); nothing was changed.
    #[error("not served: {0:?}")]
    Unprocessable(Vec<FieldError>),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// The request is well-formed but the key's state does not allow it (a balance
    /// change on an unlimited key, an increment past the maximum); nothing was changed.
    #[error("{0}")]
    Conflict(String),
    /// Unknown, deleted or another workspace's key.
    #[error("key not found")]
    KeyNotFound,
    /// Unknown, deleted or another workspace's API.
    #[error("api not found")]
    ApiNotFound,
    /// Unknown identity, or another workspace's.
    #[error("identity not found")]
    IdentityNotFound,
    /// No override of that identifier in the namespace.
    #[error("override not found")]
    OverrideNotFound,
    /// No webhook endpoint of that id in the workspace.
    #[error("webhook endpoint not found")]
    WebhookEndpointNotFound,
    /// Unknown hold, or one of a key the caller may not verify.
    #[error("hold not found")]
    HoldNotFound,
    /// The hold was closed otherwise (or expired) before: nothing was changed.
    #[error("the hold is {}", .0.as_str())]
    HoldClosed(creditgate_limiter::ports::HoldState),
    /// The idempotency key was used with another request.
    #[error("the idempotency key was used with a different request")]
    IdempotencyMismatch,
    /// A request with the same idempotency key is still in flight.
    #[error("a request with this idempotency key is in flight")]
    IdempotencyInFlight,
    /// A backend failed after the request was sent and its outcome could not be looked
    /// up: it may or may not have been applied.
    #[error("outcome unknown: {0}")]
    OutcomeUnknown(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    RateLimiter(#[from] creditgate_limiter::LimitError),
    /// A backend needed for a read is unavailable (or not configured); nothing was
    /// changed.
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ServiceError {
    /// One invalid field.
    pub fn field(location: &str, message: impl Into<String>, fix: impl Into<String>) -> Self {
        ServiceError::Invalid(vec![FieldError::new(location, message).fix(fix)])
    }
}
