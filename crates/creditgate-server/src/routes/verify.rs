//! `keys.verifyKey`: the hot path. Checks run in the order of DESIGN.md §2 and the first
//! failure decides; nothing is spent before the credit step.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::State;
use axum::Json;
use creditgate_analytics::VerificationEvent;
use creditgate_domain::{hash_secret, Action, Cost, KeyRecord, Outcome};
use creditgate_limiter::Decision;

use super::ok;
use crate::auth::RootKey;
use crate::context::RequestId;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;
use crate::telemetry::names;
use crate::validate::{is_tag_char, Checks};
use crate::wire::{Envelope, IdentityData, VerifyKeyData, VerifyKeyRequest};

/// The decision on one verification, before it is put on the wire.
struct Verdict {
    outcome: Outcome,
    key: Option<Arc<KeyRecord>>,
    /// Exact balance after the decision (`None`: unlimited or unknown).
    remaining: Option<u64>,
    spent: u64,
}

impl Verdict {
    fn without_credits(outcome: Outcome, key: Option<Arc<KeyRecord>>) -> Self {
        Self {
            outcome,
            key,
            remaining: None,
            spent: 0,
        }
    }
}

#[utoipa::path(post, path = "/v2/keys.verifyKey", tag = "keys", request_body = VerifyKeyRequest,
    responses((status = 200, description = "Every verification outcome, valid or not", body = Envelope<VerifyKeyData>),
        (status = 400, body = crate::error::ErrorEnvelope), (status = 503, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn verify_key(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<VerifyKeyRequest>,
) -> Result<Json<Envelope<VerifyKeyData>>, ApiError> {
    let started = Instant::now();
    let cost = validate(&req)?;
    let tags = req.tags.unwrap_or_default();
    let verdict = decide(&state, &root, &req.key, cost).await?;
    let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    metrics::counter!(names::VERIFICATIONS, "outcome" => verdict.outcome.as_str()).increment(1);
    metrics::histogram!(names::VERIFY_SECONDS).record(started.elapsed().as_secs_f64());
    let key = verdict.key.as_deref();
    state.analytics.verification(VerificationEvent {
        request_id: RequestId::current(),
        time: state.clock.now_ms(),
        workspace_id: root.workspace().0.clone(),
        api_id: key.map(|k| k.api_id.0.clone()).unwrap_or_default(),
        key_id: key.map(|k| k.id.0.clone()).unwrap_or_default(),
        node_id: state.config.node_id.clone(),
        region: state.config.region.clone(),
        outcome: verdict.outcome.as_str().to_owned(),
        cost: cost.get(),
        spent_credits: verdict.spent,
        remaining: verdict.remaining,
        latency_us,
        tags,
    });
    Ok(ok(VerifyKeyData {
        valid: verdict.outcome == Outcome::Valid,
        code: verdict.outcome.as_str().to_owned(),
        key_id: key.map(|k| k.id.0.clone()),
        name: key.and_then(|k| k.name.clone()),
        meta: key.and_then(|k| k.meta.clone()),
        expires: key.and_then(|k| k.expires),
        credits: verdict.remaining.and_then(|r| i64::try_from(r).ok()),
        enabled: key.map(|k| k.enabled),
        identity: key.and_then(|k| {
            k.external_id.as_ref().map(|e| IdentityData {
                id: format!("id_{e}"),
                external_id: e.clone(),
            })
        }),
    }))
}

fn validate(req: &VerifyKeyRequest) -> Result<Cost, ApiError> {
    let mut c = Checks::default();
    c.len("body.key", &req.key, 1, 512);
    let cost = req.credits.as_ref().map_or(Cost::DEFAULT.get(), |c| c.cost);
    let cost = match Cost::new(cost) {
        Ok(cost) => Some(cost),
        Err(_) => {
            c.push(
                "body.credits.cost",
                format!("must be at most {}, got {cost}", Cost::MAX),
                "send a cost from 0 to 1000000000000",
            );
            None
        }
    };
    if let Some(tags) = &req.tags {
        if tags.len() > 20 {
            c.push(
                "body.tags",
                format!("has {} tags, at most 20 are allowed", tags.len()),
                "send at most 20 tags",
            );
        }
        for (i, t) in tags.iter().enumerate() {
            let loc = format!("body.tags[{i}]");
            c.len(&loc, t, 1, 128);
            c.charset(&loc, t, "letters, digits and _=/.:-", is_tag_char);
        }
    }
    if req.permissions.as_deref().is_some_and(|p| !p.is_empty()) {
        c.push(
            "body.permissions",
            "permission queries are not supported by creditgate",
            "omit permissions",
        );
    }
    c.unsupported_list("body.ratelimits", &req.ratelimits);
    if req.migration_id.is_some() {
        c.push(
            "body.migrationId",
            "key migrations are not supported by creditgate",
            "omit migrationId",
        );
    }
    c.finish()?;
    cost.ok_or_else(|| ApiError::Internal("validated cost missing".into()))
}

async fn decide(
    state: &AppState,
    root: &RootKey,
    secret: &str,
    cost: Cost,
) -> Result<Verdict, ApiError> {
    let hash = hash_secret(secret);
    // Unknown, deleted, foreign, or not verifiable with this root key: all NOT_FOUND,
    // so a root key cannot probe for keys it may not see.
    let key = match state.key_by_hash(&hash).await? {
        Some(k)
            if &k.workspace_id == root.workspace()
                && root.allows(Action::VerifyKey, Some(&k.api_id)) =>
        {
            k
        }
        _ => return Ok(Verdict::without_credits(Outcome::NotFound, None)),
    };
    let now = state.clock.now_ms();
    if !key.enabled {
        return Ok(Verdict::without_credits(Outcome::Disabled, Some(key)));
    }
    if key.is_expired(now) {
        return Ok(Verdict::without_credits(Outcome::Expired, Some(key)));
    }
    if !key.limited {
        return Ok(Verdict::without_credits(Outcome::Valid, Some(key)));
    }
    let key = state.refill_if_due(key, now).await?;
    // Spawned so a client that hangs up cannot cancel the engine half-way.
    let engine = state.engine.clone();
    let id = key.id.clone();
    let decision = tokio::spawn(async move { engine.spend(&id, cost).await })
        .await
        .map_err(|e| ApiError::Internal(format!("verification task failed: {e}")))?;
    Ok(match decision {
        Ok(Decision::Valid { remaining }) => Verdict {
            outcome: Outcome::Valid,
            key: Some(key),
            remaining,
            spent: if remaining.is_some() { cost.get() } else { 0 },
        },
        Ok(Decision::Exceeded { remaining }) => Verdict {
            outcome: Outcome::UsageExceeded,
            key: Some(key),
            remaining: Some(remaining),
            spent: 0,
        },
        Ok(Decision::NotFound) => Verdict::without_credits(Outcome::NotFound, None),
        Err(e) if state.config.allow_on_backend_failure => {
            tracing::warn!(key_id = %key.id, error = %e, "backends failed; allowing (on-backend-failure=allow)");
            metrics::counter!(names::FAIL_OPEN).increment(1);
            Verdict::without_credits(Outcome::Valid, Some(key))
        }
        Err(e) => return Err(e.into()),
    })
}
