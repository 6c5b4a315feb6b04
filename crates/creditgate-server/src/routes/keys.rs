//! `keys.createKey`, `keys.getKey`, `keys.updateKey`, `keys.updateCredits`,
//! `keys.deleteKey`, `keys.whoami`.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use creditgate_domain::{
    hash_secret, new_secret, secret_start, Action, ApiId, KeyId, KeyPatch, KeyRecord, NewKey,
};
use creditgate_limiter::CreditOp;

use super::ok;
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;
use crate::validate::{is_external_id_char, is_id_char, refill_wire, Checks};
use crate::wire::*;

/// The response shape of a key, with its exact balance.
pub async fn key_data(state: &AppState, k: &KeyRecord) -> Result<KeyData, ApiError> {
    let k = &*state
        .refill_if_due(Arc::new(k.clone()), state.clock.now_ms())
        .await?;
    let credits = if k.limited {
        let remaining = state.engine.balance(&k.id).await?;
        Some(KeyCreditsData {
            remaining: remaining.and_then(|r| i64::try_from(r).ok()),
            refill: k.refill.as_ref().map(refill_wire),
        })
    } else {
        None
    };
    Ok(KeyData {
        key_id: k.id.0.clone(),
        start: k.start.clone(),
        enabled: k.enabled,
        name: k.name.clone(),
        meta: k.meta.clone(),
        created_at: k.created_at,
        updated_at: k.updated_at,
        expires: k.expires,
        credits,
        identity: k.external_id.as_ref().map(|e| IdentityData {
            id: format!("id_{e}"),
            external_id: e.clone(),
        }),
    })
}

/// The caller's live key by id (404 for unknown, deleted or another workspace's), after
/// checking `action` on its API (403).
async fn find_key(
    state: &AppState,
    root: &RootKey,
    key_id: &str,
    action: Action,
) -> Result<KeyRecord, ApiError> {
    if key_id.len() < 3 {
        return Err(ApiError::field(
            "body.keyId",
            "must be at least 3 characters",
            "send the keyId returned by keys.createKey",
        ));
    }
    let key = state
        .store
        .key_by_id(&KeyId::from(key_id))
        .await?
        .filter(|k| &k.workspace_id == root.workspace())
        .ok_or_else(ApiError::key_not_found)?;
    root.require(action, Some(&key.api_id))?;
    Ok(key)
}

#[utoipa::path(post, path = "/v2/keys.createKey", tag = "keys", request_body = CreateKeyRequest,
    responses((status = 200, body = Envelope<CreateKeyData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<CreateKeyRequest>,
) -> Result<Json<Envelope<CreateKeyData>>, ApiError> {
    let api_id = ApiId::from(req.api_id.as_str());
    root.require(Action::CreateKey, Some(&api_id))?;
    let mut c = Checks::default();
    c.len("body.apiId", &req.api_id, 3, 255);
    if let Some(p) = &req.prefix {
        c.len("body.prefix", p, 1, 16);
        c.charset("body.prefix", p, "letters, digits and '_'", is_id_char);
    }
    if let Some(n) = &req.name {
        c.len("body.name", n, 1, 200);
    }
    let byte_length = req.byte_length.unwrap_or(16);
    if !(16..=255).contains(&byte_length) {
        c.push(
            "body.byteLength",
            format!("must be 16 to 255, got {byte_length}"),
            "send a byteLength from 16 to 255",
        );
    }
    if let Some(e) = &req.external_id {
        c.len("body.externalId", e, 1, 255);
        c.charset(
            "body.externalId",
            e,
            "letters, digits, '_', '.' and '-'",
            is_external_id_char,
        );
    }
    if req.meta.as_ref().is_some_and(|m| m.len() > 100) {
        c.push(
            "body.meta",
            "has more than 100 properties",
            "send at most 100 properties",
        );
    }
    if let Some(x) = req.expires {
        if !(0..=4_102_444_800_000).contains(&x) {
            c.push(
                "body.expires",
                "must be a Unix time in milliseconds up to 4102444800000",
                "send milliseconds since 1970",
            );
        }
    }
    if req.recoverable == Some(true) {
        c.push(
            "body.recoverable",
            "keys are stored only as hashes and cannot be recoverable",
            "omit recoverable or send false",
        );
    }
    c.unsupported_list("body.roles", &req.roles);
    c.unsupported_list("body.permissions", &req.permissions);
    c.unsupported_list("body.ratelimits", &req.ratelimits);
    let (remaining, refill) = match &req.credits {
        None => (None, None),
        Some(cw) => {
            let remaining = match cw.remaining {
                Some(Some(v)) => c.credits("body.credits.remaining", v),
                _ => None,
            };
            let limited = matches!(cw.remaining, Some(Some(_)));
            let refill = cw
                .refill
                .as_ref()
                .and_then(|r| c.refill("body.credits.refill", r, limited));
            (remaining, refill)
        }
    };
    c.finish()?;
    let api = state
        .store
        .get_api(root.workspace(), &api_id)
        .await?
        .ok_or_else(ApiError::api_not_found)?;
    let byte_length = usize::try_from(byte_length).unwrap_or(16);
    let secret = new_secret(req.prefix.as_deref(), byte_length);
    let now = state.clock.now_ms();
    let record = KeyRecord {
        id: KeyId::generate(),
        workspace_id: api.workspace_id,
        api_id: api.id,
        hash: hash_secret(&secret),
        start: secret_start(&secret, req.prefix.as_deref()),
        name: req.name,
        external_id: req.external_id,
        meta: req.meta,
        created_at: now,
        updated_at: None,
        expires: req.expires,
        enabled: req.enabled.unwrap_or(true),
        limited: remaining.is_some(),
        refill,
        last_refill_at: Some(now),
    };
    let key_id = record.id.0.clone();
    state
        .store
        .create_key(&NewKey { record, remaining })
        .await?;
    Ok(ok(CreateKeyData {
        key_id,
        key: secret,
    }))
}

#[utoipa::path(post, path = "/v2/keys.getKey", tag = "keys", request_body = GetKeyRequest,
    responses((status = 200, body = Envelope<KeyData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_key(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<GetKeyRequest>,
) -> Result<Json<Envelope<KeyData>>, ApiError> {
    if req.decrypt == Some(true) {
        return Err(ApiError::field(
            "body.decrypt",
            "keys are stored only as hashes and cannot be decrypted",
            "omit decrypt or send false",
        ));
    }
    let key = find_key(&state, &root, &req.key_id, Action::ReadKey).await?;
    Ok(ok(key_data(&state, &key).await?))
}

#[utoipa::path(post, path = "/v2/keys.whoami", tag = "keys", request_body = WhoamiRequest,
    responses((status = 200, body = Envelope<KeyData>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn whoami(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<WhoamiRequest>,
) -> Result<Json<Envelope<KeyData>>, ApiError> {
    let mut c = Checks::default();
    c.len("body.key", &req.key, 1, 512);
    c.finish()?;
    // Unknown, foreign and unreadable keys all answer 404: existence does not leak.
    let key = state
        .key_by_hash(&hash_secret(&req.key))
        .await?
        .filter(|k| {
            &k.workspace_id == root.workspace() && root.allows(Action::ReadKey, Some(&k.api_id))
        })
        .ok_or_else(ApiError::key_not_found)?;
    Ok(ok(key_data(&state, &key).await?))
}

#[utoipa::path(post, path = "/v2/keys.deleteKey", tag = "keys", request_body = DeleteKeyRequest,
    responses((status = 200, body = Envelope<Empty>), (status = 404, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn delete_key(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<DeleteKeyRequest>,
) -> Result<Json<Envelope<Empty>>, ApiError> {
    let key = find_key(&state, &root, &req.key_id, Action::DeleteKey).await?;
    let deleted = state
        .store
        .delete_key(&key.id, state.clock.now_ms())
        .await?;
    state.invalidate_key(&key.hash).await;
    if !deleted {
        return Err(ApiError::key_not_found());
    }
    Ok(ok(Empty {}))
}

#[utoipa::path(post, path = "/v2/keys.updateCredits", tag = "keys", request_body = UpdateCreditsRequest,
    responses((status = 200, body = Envelope<KeyCreditsData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn update_credits(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<UpdateCreditsRequest>,
) -> Result<Json<Envelope<KeyCreditsData>>, ApiError> {
    let mut c = Checks::default();
    let value = match req.value {
        Some(Some(v)) => c.credits("body.value", v),
        _ => None,
    };
    let op = match req.operation.as_str() {
        "set" => Some(CreditOp::Set(value)),
        "increment" | "decrement" => {
            if req.value.flatten().is_none() {
                c.push(
                    "body.value",
                    format!("is required for {}", req.operation),
                    "send a non-negative integer value",
                );
            }
            value.map(|v| {
                if req.operation == "increment" {
                    CreditOp::Increment(v)
                } else {
                    CreditOp::Decrement(v)
                }
            })
        }
        other => {
            c.push(
                "body.operation",
                format!("must be set, increment or decrement, got '{other}'"),
                "send 'set', 'increment' or 'decrement'",
            );
            None
        }
    };
    c.finish()?;
    let key = find_key(&state, &root, &req.key_id, Action::UpdateKey).await?;
    // A refill due in this period applies before the change, not after it.
    let key = (*state
        .refill_if_due(Arc::new(key), state.clock.now_ms())
        .await?)
        .clone();
    let op = op.ok_or_else(|| ApiError::Internal("validated operation missing".into()))?;
    if !key.limited && matches!(op, CreditOp::Increment(_) | CreditOp::Decrement(_)) {
        return Err(ApiError::field(
            "body.operation",
            "the key has unlimited credits",
            "use operation 'set' with a value to give it a balance first",
        ));
    }
    let record = apply_credit_op(&state, &key, op).await?;
    let remaining = match record.limited {
        true => state.engine.balance(&key.id).await?,
        false => None,
    };
    Ok(ok(KeyCreditsData {
        remaining: remaining.and_then(|r| i64::try_from(r).ok()),
        refill: record.refill.as_ref().map(refill_wire),
    }))
}

/// Runs a balance change through the engine; a switch to unlimited also drops the refill.
/// Returns the key as it is afterwards.
async fn apply_credit_op(
    state: &AppState,
    key: &KeyRecord,
    op: CreditOp,
) -> Result<KeyRecord, ApiError> {
    state.engine.update(&key.id, op).await?;
    let mut record = key.clone();
    if op == CreditOp::Set(None) && key.refill.is_some() {
        let patch = KeyPatch {
            refill: Some(None),
            ..KeyPatch::default()
        };
        record = state
            .store
            .update_key(&key.id, &patch, state.clock.now_ms())
            .await?
            .ok_or_else(ApiError::key_not_found)?;
    }
    record.limited = !matches!(op, CreditOp::Set(None));
    state.invalidate_key(&key.hash).await;
    Ok(record)
}

#[utoipa::path(post, path = "/v2/keys.updateKey", tag = "keys", request_body = UpdateKeyRequest,
    responses((status = 200, body = Envelope<Empty>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn update_key(
    State(state): State<AppState>,
    root: RootKey,
    ApiJson(req): ApiJson<UpdateKeyRequest>,
) -> Result<Json<Envelope<Empty>>, ApiError> {
    let key = find_key(&state, &root, &req.key_id, Action::UpdateKey).await?;
    let mut c = Checks::default();
    if let Some(Some(n)) = &req.name {
        c.len("body.name", n, 1, 200);
    }
    if let Some(Some(e)) = &req.external_id {
        c.len("body.externalId", e, 1, 255);
        c.charset(
            "body.externalId",
            e,
            "letters, digits, '_', '.' and '-'",
            is_external_id_char,
        );
    }
    if let Some(Some(m)) = &req.meta {
        if m.len() > 100 {
            c.push(
                "body.meta",
                "has more than 100 properties",
                "send at most 100 properties",
            );
        }
    }
    if let Some(Some(x)) = req.expires {
        if !(0..=4_102_444_800_000).contains(&x) {
            c.push(
                "body.expires",
                "must be a Unix time in milliseconds up to 4102444800000",
                "send milliseconds since 1970",
            );
        }
    }
    c.unsupported_list("body.roles", &req.roles);
    c.unsupported_list("body.permissions", &req.permissions);
    c.unsupported_list("body.ratelimits", &req.ratelimits);
    // Credits: the balance change (through the engine) and the refill (in the store).
    let mut op = None;
    let mut refill = None;
    match &req.credits {
        None => {}
        Some(None) => {
            op = Some(CreditOp::Set(None));
            refill = Some(None);
        }
        Some(Some(cw)) => {
            match cw.remaining {
                None => {}
                Some(None) => {
                    op = Some(CreditOp::Set(None));
                    refill = Some(None);
                }
                Some(Some(v)) => {
                    op = c
                        .credits("body.credits.remaining", v)
                        .map(|v| CreditOp::Set(Some(v)))
                }
            }
            let limited_after = match op {
                Some(CreditOp::Set(v)) => v.is_some(),
                _ => key.limited,
            };
            match &cw.refill {
                None => {}
                Some(None) => refill = Some(None),
                Some(Some(r)) => {
                    if let Some(r) = c.refill("body.credits.refill", r, limited_after) {
                        refill = Some(Some(r));
                    }
                }
            }
        }
    }
    c.finish()?;
    if let Some(op) = op {
        apply_credit_op(&state, &key, op).await?;
    }
    let patch = KeyPatch {
        name: req.name,
        external_id: req.external_id,
        meta: req.meta,
        expires: req.expires,
        enabled: req.enabled,
        refill,
    };
    if !patch.is_empty() {
        state
            .store
            .update_key(&key.id, &patch, state.clock.now_ms())
            .await?
            .ok_or_else(ApiError::key_not_found)?;
    }
    state.invalidate_key(&key.hash).await;
    Ok(ok(Empty {}))
}
