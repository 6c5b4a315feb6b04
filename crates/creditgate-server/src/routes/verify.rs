//! `keys.verifyKey`: the hot path. The service decides (DESIGN.md §2); this maps.

use axum::extract::State;
use axum::Json;
use creditgate_domain::Outcome;
use creditgate_service::Verify;

use super::{identity, ok};
use crate::auth::RootKey;
use crate::context::RequestId;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;
use crate::wire::{Envelope, VerifyKeyData, VerifyKeyRequest};

#[utoipa::path(post, path = "/v2/keys.verifyKey", tag = "keys", request_body = VerifyKeyRequest,
    responses((status = 200, description = "Every verification outcome, valid or not", body = Envelope<VerifyKeyData>),
        (status = 400, body = crate::error::ErrorEnvelope), (status = 503, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn verify_key(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<VerifyKeyRequest>,
) -> Result<Json<Envelope<VerifyKeyData>>, ApiError> {
    let cmd = Verify::try_from(req)?;
    let verdict = state
        .service
        .verify(&caller, cmd, RequestId::current())
        .await?;
    let key = verdict.key.as_deref();
    Ok(ok(VerifyKeyData {
        valid: verdict.outcome == Outcome::Valid,
        code: verdict.outcome.as_str(),
        key_id: key.map(|k| k.id.shared()),
        name: key.and_then(|k| k.name.clone()),
        meta: key.and_then(|k| k.meta.clone()),
        expires: key.and_then(|k| k.expires),
        credits: verdict.remaining.and_then(|r| i64::try_from(r).ok()),
        enabled: key.map(|k| k.enabled),
        identity: key.and_then(identity),
    }))
}
