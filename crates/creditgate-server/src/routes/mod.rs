//! The HTTP routes: thin handlers that extract, call one service function, and wrap the
//! result in the envelope.

pub mod apis;
pub mod keys;
pub mod system;
pub mod verify;

use axum::Json;

use crate::context::RequestId;
use crate::wire::{Envelope, Meta};

/// Wraps `data` in the success envelope of the current request.
pub fn ok<T>(data: T) -> Json<Envelope<T>> {
    Json(Envelope {
        meta: Meta {
            request_id: RequestId::current(),
        },
        data,
    })
}
