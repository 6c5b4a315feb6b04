//! `keys.createKey`, `keys.getKey`, `keys.updateKey`, `keys.updateCredits`,
//! `keys.deleteKey`, `keys.whoami`, `keys.getCreditHistory`: parse → one service call →
//! map.

use axum::extract::State;
use axum::response::Response;
use axum::Json;
use creditgate_domain::KeyId;
use creditgate_service::{CreateKey, KeyView, UpdateCredits, UpdateKey};

use super::{identity, ok, once};
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::{ApiJson, IdemJson};
use crate::parse::{
    parse_credit_history, parse_key_id, parse_migrate, parse_reroll, parse_secret, refill_wire,
};
use crate::state::AppState;
use crate::wire::*;

fn credits_data(v: &KeyView) -> KeyCreditsData {
    KeyCreditsData {
        remaining: v.remaining.and_then(|r| i64::try_from(r).ok()),
        reserved: (v.reserved > 0).then(|| i64::try_from(v.reserved).unwrap_or(i64::MAX)),
        refill: v.record.refill.as_ref().map(refill_wire),
        alerts: alerts_wire(&v.record.credit_alerts),
    }
}

/// Balance thresholds as the API shows them (`None` when there are none).
pub fn alerts_wire(alerts: &[u64]) -> Option<Vec<AlertWire>> {
    (!alerts.is_empty()).then(|| {
        alerts
            .iter()
            .map(|&t| AlertWire {
                threshold: i64::try_from(t).unwrap_or(i64::MAX),
            })
            .collect()
    })
}

/// The response shape of a key, with its exact balance.
pub fn key_data(v: KeyView) -> KeyData {
    let credits = v.record.limited.then(|| credits_data(&v));
    let identity = identity(&v.record, v.pool_remaining);
    let k = v.record;
    KeyData {
        key_id: k.id.0.to_string(),
        start: k.start,
        enabled: k.enabled,
        name: k.name,
        meta: k.meta,
        created_at: k.created_at,
        updated_at: k.updated_at,
        expires: k.expires,
        credits,
        identity,
        ratelimits: (!k.ratelimits.is_empty())
            .then(|| k.ratelimits.iter().map(super::ratelimit_data).collect()),
    }
}

#[utoipa::path(post, path = "/v2/keys.createKey", tag = "keys", request_body = CreateKeyRequest,
    responses((status = 200, body = Envelope<CreateKeyData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> Result<Json<Envelope<CreateKeyData>>, ApiError> {
    let created = state
        .service
        .create_key(&caller, CreateKey::try_from(req)?)
        .await?;
    Ok(ok(CreateKeyData {
        key_id: created.key_id.0.to_string(),
        key: created.secret,
    }))
}

#[utoipa::path(post, path = "/v2/keys.getKey", tag = "keys", request_body = GetKeyRequest,
    responses((status = 200, body = Envelope<KeyData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_key(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<GetKeyRequest>,
) -> Result<Json<Envelope<KeyData>>, ApiError> {
    let id = parse_key_id(&req.key_id, req.decrypt)?;
    Ok(ok(key_data(state.service.get_key(&caller, &id).await?)))
}

#[utoipa::path(post, path = "/v2/keys.whoami", tag = "keys", request_body = WhoamiRequest,
    responses((status = 200, body = Envelope<KeyData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn whoami(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<WhoamiRequest>,
) -> Result<Json<Envelope<KeyData>>, ApiError> {
    let secret = parse_secret(req.key)?;
    Ok(ok(key_data(state.service.whoami(&caller, &secret).await?)))
}

#[utoipa::path(post, path = "/v2/keys.deleteKey", tag = "keys", request_body = DeleteKeyRequest,
    responses((status = 200, body = Envelope<Empty>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn delete_key(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<DeleteKeyRequest>,
) -> Result<Json<Envelope<Empty>>, ApiError> {
    let id = parse_key_id(&req.key_id, None)?;
    state.service.delete_key(&caller, &id).await?;
    Ok(ok(Empty {}))
}

#[utoipa::path(post, path = "/v2/keys.updateCredits", tag = "keys", request_body = UpdateCreditsRequest,
    responses((status = 200, body = Envelope<KeyCreditsData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn update_credits(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    IdemJson { body, idem }: IdemJson<UpdateCreditsRequest>,
) -> Result<Response, ApiError> {
    let (id, cmd) = <(KeyId, UpdateCredits)>::try_from(body)?;
    let (state, caller, id, cmd) = (&state, &caller, &id, &cmd);
    once(state, caller, idem, |ticket| async move {
        let view = state
            .service
            .update_credits(caller, id, *cmd, ticket.as_ref())
            .await?;
        Ok(credits_data(&view))
    })
    .await
}

#[utoipa::path(post, path = "/v2/keys.updateKey", tag = "keys", request_body = UpdateKeyRequest,
    responses((status = 200, body = Envelope<Empty>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn update_key(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<UpdateKeyRequest>,
) -> Result<Json<Envelope<Empty>>, ApiError> {
    state
        .service
        .update_key(&caller, UpdateKey::try_from(req)?)
        .await?;
    Ok(ok(Empty {}))
}

#[utoipa::path(post, path = "/v2/keys.rerollKey", tag = "keys", request_body = RerollKeyRequest,
    responses((status = 200, description = "A new secret for the same key", body = Envelope<RerollKeyData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn reroll_key(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<RerollKeyRequest>,
) -> Result<Json<Envelope<RerollKeyData>>, ApiError> {
    let (key_id, grace_ms) = parse_reroll(&req)?;
    let created = state.service.reroll_key(&caller, &key_id, grace_ms).await?;
    Ok(ok(RerollKeyData {
        key_id: created.key_id.0.to_string(),
        key: created.secret,
    }))
}

#[utoipa::path(post, path = "/v2/keys.migrateKeys", tag = "keys", request_body = MigrateKeysRequest,
    responses((status = 200, description = "Keys created, and hashes already known", body = Envelope<MigrateKeysData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn migrate_keys(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<MigrateKeysRequest>,
) -> Result<Json<Envelope<MigrateKeysData>>, ApiError> {
    let (api_id, keys) = parse_migrate(req)?;
    // The service answers in the order sent; each answer carries the hash as sent.
    let (sent, commands): (Vec<String>, Vec<_>) = keys
        .into_iter()
        .map(|(as_sent, hash, cmd)| (as_sent, (hash, cmd)))
        .unzip();
    let outcomes = state
        .service
        .migrate_keys(&caller, &api_id, commands)
        .await?;
    let mut data = MigrateKeysData {
        migrated: Vec::new(),
        failed: Vec::new(),
    };
    for (as_sent, outcome) in sent.into_iter().zip(outcomes) {
        match outcome {
            Some(id) => data.migrated.push(MigratedKey {
                hash: as_sent,
                key_id: id.0.to_string(),
            }),
            None => data.failed.push(as_sent),
        }
    }
    Ok(ok(data))
}

#[utoipa::path(post, path = "/v2/keys.getCreditHistory", tag = "keys", request_body = GetCreditHistoryRequest,
    responses((status = 200, description = "The key's credit history, newest first: every change of its credits other than single spends, with the balance before and after", body = PagedEnvelope<CreditHistoryEntryData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_credit_history(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<GetCreditHistoryRequest>,
) -> Result<Json<PagedEnvelope<CreditHistoryEntryData>>, ApiError> {
    let (id, query) = parse_credit_history(&req)?;
    let page = state
        .service
        .key_credit_history(&caller, &id, query)
        .await?;
    Ok(super::history_page(page))
}
