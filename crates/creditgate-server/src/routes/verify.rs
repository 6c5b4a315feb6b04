//! `keys.verifyKey`: the hot path. The service decides (DESIGN.md §2); this maps.

use axum::extract::{FromRequest, FromRequestParts, Request, State};
use axum::response::{IntoResponse, Response};
use creditgate_domain::Outcome;
use creditgate_service::Verify;

use super::{identity, once};
use crate::auth::RootKey;
use crate::context::RequestId;
use crate::error::ApiError;
use crate::extract::IdemJson;
use crate::state::AppState;
use crate::wire::{Envelope, VerifyKeyData, VerifyKeyRequest, VerifyRatelimitData};

#[utoipa::path(post, path = "/v2/keys.verifyKey", tag = "keys", request_body = VerifyKeyRequest,
    responses((status = 200, description = "Every verification outcome, valid or not", body = Envelope<VerifyKeyData>),
        (status = 400, body = crate::error::ErrorEnvelope), (status = 503, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn verify_key(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    IdemJson { body, idem }: IdemJson<VerifyKeyRequest>,
) -> Result<Response, ApiError> {
    let cmd = Verify::try_from(body)?;
    let (state, caller, cmd) = (&state, &caller, &cmd);
    once(state, caller, idem, |ticket| async move {
        let verdict = state
            .service
            .verify(caller, cmd.clone(), RequestId::current(), ticket.as_ref())
            .await?;
        Ok(verify_data(&verdict))
    })
    .await
}

/// `keys.verifyKey` as the router would serve it (the same extractors in the same
/// order, then [`verify_key`]), for `crate::app::Routes`, which serves the hot path
/// ahead of the router: no route lookup, no boxed services or futures per layer.
pub async fn serve(state: AppState, req: Request) -> Response {
    let (mut parts, body) = req.into_parts();
    let caller = match RootKey::from_request_parts(&mut parts, &state).await {
        Ok(caller) => caller,
        Err(e) => return e.into_response(),
    };
    let req = Request::from_parts(parts, body);
    let body = match IdemJson::from_request(req, &state).await {
        Ok(body) => body,
        Err(e) => return e.into_response(),
    };
    verify_key(State(state), caller, body).await.into_response()
}

fn verify_data(verdict: &creditgate_service::Verdict) -> VerifyKeyData {
    let key = verdict.key.as_deref();
    VerifyKeyData {
        valid: verdict.outcome == Outcome::Valid,
        code: verdict.outcome.as_str(),
        key_id: key.map(|k| k.id.shared()),
        name: key.and_then(|k| k.name.clone()),
        meta: key.and_then(|k| k.meta.clone()),
        expires: key.and_then(|k| k.expires),
        credits: verdict.remaining.and_then(|r| i64::try_from(r).ok()),
        enabled: key.map(|k| k.enabled),
        identity: key.and_then(|k| identity(k, verdict.pool_remaining)),
        credits_exact: verdict.on_ledger.then_some(false),
        ratelimits: (!verdict.ratelimits.is_empty()).then(|| {
            verdict
                .ratelimits
                .iter()
                .map(|l| VerifyRatelimitData {
                    id: l.rule.id.clone(),
                    name: l.rule.name.clone(),
                    limit: l.rule.limit,
                    duration: l.rule.duration_ms,
                    remaining: l.remaining,
                    reset: l.reset_ms,
                    exceeded: l.exceeded,
                    auto_apply: l.rule.auto_apply,
                })
                .collect()
        }),
    }
}
