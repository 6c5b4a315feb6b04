//! The HTTP routes: thin handlers that extract, call one service function, and wrap the
//! result in the envelope.

pub mod apis;
pub mod holds;
pub mod keys;
pub mod system;
pub mod verify;

use axum::Json;
use creditgate_domain::KeyRecord;

use crate::context::RequestId;
use crate::wire::{Envelope, IdentityData, Meta};

/// Wraps `data` in the success envelope of the current request.
pub fn ok<T>(data: T) -> Json<Envelope<T>> {
    Json(Envelope {
        meta: Meta {
            request_id: RequestId::current(),
        },
        data,
    })
}

/// The identity of a key with an external id.
pub fn identity(k: &KeyRecord) -> Option<IdentityData> {
    k.external_id.as_ref().map(|e| IdentityData {
        id: format!("id_{e}"),
        external_id: e.clone(),
    })
}
