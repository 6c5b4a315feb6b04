//! The HTTP routes: thin handlers that extract, call one service function, and wrap the
//! result in the envelope.

pub mod analytics;
pub mod apis;
pub mod holds;
pub mod identities;
pub mod keys;
pub mod ratelimit;
pub mod system;
pub mod verify;
pub mod webhooks;

use std::future::Future;

use axum::http::HeaderValue;
use axum::response::{IntoResponse, Response};
use axum::Json;
use creditgate_domain::{KeyRecord, RatelimitRule};
use creditgate_limiter::ports::CreditEntry;
use creditgate_service::{AfterFailure, Caller, Claim, HistoryPage, IdemRequest, Ticket};
use serde::Serialize;

use crate::context::RequestId;
use crate::error::ApiError;
use crate::state::AppState;
use crate::wire::{
    CreditHistoryEntryData, Envelope, IdentityData, Meta, PagedEnvelope, Pagination, RatelimitData,
};

/// Set on every answer of a request with an idempotency key: `true` when it is the
/// first request's answer, replayed.
const REPLAYED: &str = "idempotent-replayed";

/// Runs a request that may carry an idempotency key. Without one: `run(None)`. With
/// one: claims it; a stored answer is replayed as it was; else `run` with the ticket,
/// whose ledger transaction records the decision. When `run` fails, the node looks up
/// whether its change was made (for at most a second): if so it answers it as a replay;
/// if the lookup cannot tell, 503 saying a retry with the same key is safe.
pub async fn once<T, F, Fut>(
    state: &AppState,
    caller: &Caller,
    idem: Option<IdemRequest>,
    run: F,
) -> Result<Response, ApiError>
where
    T: Serialize,
    F: Fn(Option<Ticket>) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let Some(idem) = idem else {
        return Ok(ok(run(None).await?).into_response());
    };
    let ticket = match state.service.claim(caller, &idem).await? {
        Claim::Answered(answer) => return replayed(&answer),
        Claim::Run(ticket) => ticket,
    };
    let data = match run(Some(ticket.clone())).await {
        Ok(data) => data,
        Err(e) => match state.service.after_failure(&ticket).await {
            AfterFailure::Decided if !ticket.is_replay() => run(Some(ticket.replaying())).await?,
            AfterFailure::Decided => return Err(e),
            // The record shows nothing was decided: whatever the backend said, nothing
            // was spent.
            AfterFailure::Undecided => {
                return Err(match e {
                    ApiError::OutcomeUnknown(cause) => ApiError::Unavailable(cause),
                    e => e,
                })
            }
            AfterFailure::Unknown => return Err(ApiError::OutcomeUnknownRetrySafe(e.to_string())),
        },
    };
    let value = serde_json::to_value(&data)
        .map_err(|e| ApiError::Internal(format!("answer not serializable: {e}")))?;
    state.service.answered(&ticket, &value.to_string()).await;
    let mut response = ok(value).into_response();
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("false"));
    Ok(response)
}

/// The stored answer of the first request, in a new envelope.
fn replayed(answer: &str) -> Result<Response, ApiError> {
    let data: serde_json::Value = serde_json::from_str(answer)
        .map_err(|e| ApiError::Internal(format!("stored answer unreadable: {e}")))?;
    let mut response = ok(data).into_response();
    response
        .headers_mut()
        .insert(REPLAYED, HeaderValue::from_static("true"));
    Ok(response)
}

/// Wraps `data` in the success envelope of the current request.
pub fn ok<T>(data: T) -> Json<Envelope<T>> {
    Json(Envelope {
        meta: Meta {
            request_id: RequestId::current(),
        },
        data,
    })
}

/// A page of a list, and the cursor of the next one when there is one.
pub fn paged<T>(data: Vec<T>, cursor: Option<String>) -> Json<PagedEnvelope<T>> {
    Json(PagedEnvelope {
        meta: Meta {
            request_id: RequestId::current(),
        },
        data,
        pagination: Pagination {
            has_more: cursor.is_some(),
            cursor,
        },
    })
}

/// A rate limit as keys and identities show it.
pub fn ratelimit_data(r: &RatelimitRule) -> RatelimitData {
    RatelimitData {
        id: r.id.clone(),
        name: r.name.clone(),
        limit: r.limit,
        duration: r.duration_ms,
        auto_apply: r.auto_apply,
    }
}

/// The identity of a key, when it has one.
pub fn identity(k: &KeyRecord, pool_remaining: Option<u64>) -> Option<IdentityData> {
    k.identity
        .as_deref()
        .map(|i| identities::identity_data(i, pool_remaining))
}

/// A page of a credit history (keys' and identities' routes answer the same shape).
pub fn history_page(page: HistoryPage) -> Json<PagedEnvelope<CreditHistoryEntryData>> {
    let wide = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let data = page
        .entries
        .into_iter()
        .map(|e: CreditEntry| CreditHistoryEntryData {
            seq: wide(e.seq),
            time: e.at_ms,
            kind: e.kind.as_str().to_owned(),
            value: e.value.map(wide),
            actor: e.actor,
            hold_id: e.hold_id,
            balance_before: e.balance_before.map(wide),
            balance_after: e.balance_after.map(wide),
            held_before: wide(e.held_before),
            held_after: wide(e.held_after),
            spent_total: wide(e.spent_total),
            exact: e.exact,
        })
        .collect();
    paged(data, page.cursor)
}
