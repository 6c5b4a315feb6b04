//! `keys.reserveCredits`, `keys.settleCredits`, `keys.releaseCredits`, `keys.getHold`
//! (creditgate's extension): parse → one service call → map.

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use creditgate_domain::Outcome;
use creditgate_limiter::ports::Hold;
use creditgate_service::{CloseHold, Closing, Reserve};

use super::{ok, once};
use crate::auth::RootKey;
use crate::context::RequestId;
use crate::error::ApiError;
use crate::extract::{ApiJson, IdemJson};
use crate::parse::{parse_hold_id, parse_settle};
use crate::state::AppState;
use crate::wire::*;

fn credits(remaining: Option<u64>) -> Option<i64> {
    remaining.and_then(|r| i64::try_from(r).ok())
}

#[utoipa::path(post, path = "/v2/keys.reserveCredits", tag = "keys", request_body = ReserveCreditsRequest,
    responses((status = 200, description = "Every outcome of the checks, held or not", body = Envelope<ReserveCreditsData>),
        (status = 400, body = crate::error::ErrorEnvelope), (status = 503, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn reserve_credits(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    IdemJson { body, idem }: IdemJson<ReserveCreditsRequest>,
) -> Result<Response, ApiError> {
    let cmd = Reserve::try_from(body)?;
    let (state, caller, cmd) = (&state, &caller, &cmd);
    once(state, caller, idem, |ticket| async move {
        let r = state
            .service
            .reserve(caller, cmd.clone(), RequestId::current(), ticket.as_ref())
            .await?;
        Ok(ReserveCreditsData {
            valid: r.outcome == Outcome::Valid,
            code: r.outcome.as_str(),
            key_id: r.key.as_deref().map(|k| k.id.shared()),
            hold_id: r.hold.as_ref().map(|h| h.id.clone()),
            credits: credits(r.remaining),
            expires_at: r.hold.as_ref().map(|h| h.expires_at_ms),
        })
    })
    .await
}

fn close_data(c: Closing) -> CloseHoldData {
    CloseHoldData {
        valid: c.done,
        code: if c.done { "VALID" } else { "USAGE_EXCEEDED" },
        credits: credits(c.remaining),
        spent: if c.done { c.hold.cost.unwrap_or(0) } else { 0 },
    }
}

#[utoipa::path(post, path = "/v2/keys.settleCredits", tag = "keys", request_body = SettleCreditsRequest,
    responses((status = 200, description = "Settled (or settled before), or USAGE_EXCEEDED with the hold still open", body = Envelope<CloseHoldData>),
        (status = 400, body = crate::error::ErrorEnvelope), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 409, body = crate::error::ErrorEnvelope), (status = 503, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn settle_credits(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    IdemJson { body, idem }: IdemJson<SettleCreditsRequest>,
) -> Result<Response, ApiError> {
    let (hold_id, cost) = parse_settle(&body)?;
    close(&state, &caller, idem, &hold_id, CloseHold::Settle(cost)).await
}

async fn close(
    state: &AppState,
    caller: &creditgate_service::Caller,
    idem: Option<creditgate_service::IdemRequest>,
    hold_id: &str,
    op: CloseHold,
) -> Result<Response, ApiError> {
    once(state, caller, idem, |ticket| async move {
        let c = state
            .service
            .close_hold(caller, hold_id, op, RequestId::current(), ticket.as_ref())
            .await?;
        Ok(close_data(c))
    })
    .await
}

#[utoipa::path(post, path = "/v2/keys.releaseCredits", tag = "keys", request_body = ReleaseCreditsRequest,
    responses((status = 200, description = "Released (or released before)", body = Envelope<CloseHoldData>),
        (status = 400, body = crate::error::ErrorEnvelope), (status = 404, body = crate::error::ErrorEnvelope),
        (status = 409, body = crate::error::ErrorEnvelope), (status = 503, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn release_credits(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    IdemJson { body, idem }: IdemJson<ReleaseCreditsRequest>,
) -> Result<Response, ApiError> {
    let hold_id = parse_hold_id(&body.hold_id)?;
    close(&state, &caller, idem, &hold_id, CloseHold::Release).await
}

pub fn hold_data(h: Hold) -> HoldData {
    HoldData {
        hold_id: h.id,
        key_id: h.key.0.to_string(),
        amount: h.amount,
        state: h.state.as_str(),
        cost: h.cost,
        created_at: h.created_at_ms,
        expires_at: h.expires_at_ms,
    }
}

#[utoipa::path(post, path = "/v2/keys.getHold", tag = "keys", request_body = HoldIdRequest,
    responses((status = 200, body = Envelope<HoldData>), (status = 400, body = crate::error::ErrorEnvelope),
        (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_hold(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<HoldIdRequest>,
) -> Result<Json<Envelope<HoldData>>, ApiError> {
    let hold_id = parse_hold_id(&req.hold_id)?;
    Ok(ok(hold_data(
        state.service.get_hold(&caller, &hold_id).await?,
    )))
}
