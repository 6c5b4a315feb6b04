//! The OpenAPI 3.1 document: generated from the handlers' own types, then completed
//! from two tables here — the error statuses each route can answer, and the constraints
//! the parse functions (`parse.rs`) enforce — so that a request valid by the document
//! is accepted and one invalid by it is rejected. The fuzz test
//! (`tests/http/fuzz.rs`) holds the two to each other. Error messages for bodies that
//! do not deserialize are worded from this document too ([`describe`]).

use std::sync::OnceLock;

use creditgate_domain::{Cost, Credits, MAX_ALERTS};
use creditgate_service::{
    MAX_HOLD_TTL_MS, MAX_IDEMPOTENCY_KEY_LEN, MAX_LIMIT, MAX_WEBHOOK_URL_LEN,
};
use serde_json::{json, Map, Value};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::parse::{
    MAX_EXPIRES_MS, MAX_LIMITS_PER_CALL, MAX_LIMIT_DURATION_MS, MAX_MIGRATE_KEYS, MAX_RATELIMITS,
    MAX_REROLL_GRACE_MS, MAX_WEBHOOK_DESCRIPTION_CHARS, MIN_LIMIT_DURATION_MS,
};
use crate::routes::{
    analytics, apis, holds, identities, keys, ratelimit, system, verify, webhooks,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "creditgate", description = "API keys with exact credit balances; Unkey v2 compatible key routes."),
    paths(
        apis::create_api, apis::get_api, apis::list_keys, apis::delete_api,
        keys::create_key, keys::get_key, keys::update_key, keys::update_credits,
        keys::delete_key, keys::whoami, keys::get_credit_history, keys::reroll_key, keys::migrate_keys, verify::verify_key, holds::reserve_credits,
        holds::settle_credits, holds::release_credits, holds::get_hold,
        identities::create_identity, identities::get_identity, identities::list_identities,
        identities::update_identity, identities::delete_identity, identities::update_credits,
        identities::get_credit_history,
        ratelimit::limit,
        ratelimit::multi_limit, ratelimit::set_override, ratelimit::get_override,
        ratelimit::list_overrides, ratelimit::delete_override, analytics::get_usage,
        webhooks::create_endpoint, webhooks::list_endpoints, webhooks::delete_endpoint,
        webhooks::list_deliveries,
        system::liveness,
    ),
    modifiers(&RootKeyAuth)
)]
pub struct ApiDoc;

struct RootKeyAuth;

impl Modify for RootKeyAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "rootKey",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The error statuses of each root-key route, besides its 200.
const ROUTE_ERRORS: &[(&str, &[u16])] = &[
    ("/v2/apis.createApi", &[400, 401, 403, 413, 500, 503]),
    ("/v2/apis.getApi", &[400, 401, 403, 404, 413, 500, 503]),
    ("/v2/apis.listKeys", &[400, 401, 403, 404, 413, 500, 503]),
    ("/v2/apis.deleteApi", &[400, 401, 403, 404, 413, 500, 503]),
    (
        "/v2/keys.createKey",
        &[400, 401, 403, 404, 409, 413, 500, 503],
    ),
    ("/v2/keys.getKey", &[400, 401, 403, 404, 413, 500, 503]),
    (
        "/v2/keys.updateKey",
        &[400, 401, 403, 404, 409, 413, 500, 503],
    ),
    (
        "/v2/keys.updateCredits",
        &[400, 401, 403, 404, 409, 413, 422, 500, 503],
    ),
    ("/v2/keys.deleteKey", &[400, 401, 403, 404, 413, 500, 503]),
    (
        "/v2/keys.getCreditHistory",
        &[400, 401, 403, 404, 413, 500, 503],
    ),
    ("/v2/keys.rerollKey", &[400, 401, 403, 404, 413, 500, 503]),
    (
        "/v2/keys.migrateKeys",
        &[400, 401, 403, 404, 409, 413, 500, 503],
    ),
    // A key the root key may not see is a NOT_FOUND verdict (200), never 403/404.
    ("/v2/keys.verifyKey", &[400, 401, 409, 413, 422, 500, 503]),
    ("/v2/keys.whoami", &[400, 401, 404, 413, 500, 503]),
    // As verifyKey: a key the root key may not see is a NOT_FOUND verdict.
    (
        "/v2/keys.reserveCredits",
        &[400, 401, 409, 413, 422, 500, 503],
    ),
    (
        "/v2/keys.settleCredits",
        &[400, 401, 404, 409, 413, 422, 500, 503],
    ),
    (
        "/v2/keys.releaseCredits",
        &[400, 401, 404, 409, 413, 422, 500, 503],
    ),
    ("/v2/keys.getHold", &[400, 401, 404, 413, 500, 503]),
    (
        "/v2/identities.createIdentity",
        &[400, 401, 403, 409, 413, 500, 503],
    ),
    (
        "/v2/identities.getIdentity",
        &[400, 401, 403, 404, 413, 500, 503],
    ),
    (
        "/v2/identities.listIdentities",
        &[400, 401, 403, 413, 500, 503],
    ),
    (
        "/v2/identities.updateIdentity",
        &[400, 401, 403, 404, 409, 413, 500, 503],
    ),
    (
        "/v2/identities.updateCredits",
        &[400, 401, 403, 404, 409, 413, 500, 503],
    ),
    (
        "/v2/identities.deleteIdentity",
        &[400, 401, 403, 404, 413, 500, 503],
    ),
    (
        "/v2/identities.getCreditHistory",
        &[400, 401, 403, 404, 413, 500, 503],
    ),
    ("/v2/ratelimit.limit", &[400, 401, 403, 413, 500, 503]),
    (
        "/v2/webhooks.createEndpoint",
        &[400, 401, 403, 413, 422, 500, 503],
    ),
    (
        "/v2/webhooks.listEndpoints",
        &[400, 401, 403, 413, 500, 503],
    ),
    (
        "/v2/webhooks.deleteEndpoint",
        &[400, 401, 403, 404, 413, 500, 503],
    ),
    (
        "/v2/webhooks.listDeliveries",
        &[400, 401, 403, 404, 413, 500, 503],
    ),
    (
        "/v2/analytics.getUsage",
        &[400, 401, 403, 404, 413, 422, 500, 503],
    ),
    ("/v2/ratelimit.multiLimit", &[400, 401, 403, 413, 500, 503]),
    ("/v2/ratelimit.setOverride", &[400, 401, 403, 413, 500, 503]),
    (
        "/v2/ratelimit.getOverride",
        &[400, 401, 403, 404, 413, 500, 503],
    ),
    (
        "/v2/ratelimit.listOverrides",
        &[400, 401, 403, 413, 500, 503],
    ),
    (
        "/v2/ratelimit.deleteOverride",
        &[400, 401, 403, 404, 413, 500, 503],
    ),
];

/// OpenAPI links: which response values feed which requests, so that a client (and the
/// fuzz test's stateful phase) can follow createApi → createKey → the key routes.
/// (from operation, link name, to operation, body field, response field).
const LINKS: &[(&str, &str, &str, &str, &str)] = &[
    (
        "/v2/apis.createApi",
        "CreateKey",
        "create_key",
        "apiId",
        "/data/apiId",
    ),
    (
        "/v2/apis.createApi",
        "GetApi",
        "get_api",
        "apiId",
        "/data/apiId",
    ),
    (
        "/v2/apis.createApi",
        "ListKeys",
        "list_keys",
        "apiId",
        "/data/apiId",
    ),
    (
        "/v2/apis.createApi",
        "DeleteApi",
        "delete_api",
        "apiId",
        "/data/apiId",
    ),
    (
        "/v2/keys.createKey",
        "GetKey",
        "get_key",
        "keyId",
        "/data/keyId",
    ),
    (
        "/v2/keys.createKey",
        "UpdateKey",
        "update_key",
        "keyId",
        "/data/keyId",
    ),
    (
        "/v2/keys.createKey",
        "UpdateCredits",
        "update_credits",
        "keyId",
        "/data/keyId",
    ),
    (
        "/v2/keys.createKey",
        "GetCreditHistory",
        "get_credit_history",
        "keyId",
        "/data/keyId",
    ),
    (
        "/v2/identities.createIdentity",
        "GetCreditHistory",
        "get_identity_credit_history",
        "identity",
        "/data/identityId",
    ),
    (
        "/v2/keys.createKey",
        "DeleteKey",
        "delete_key",
        "keyId",
        "/data/keyId",
    ),
    (
        "/v2/keys.createKey",
        "VerifyKey",
        "verify_key",
        "key",
        "/data/key",
    ),
    ("/v2/keys.createKey", "Whoami", "whoami", "key", "/data/key"),
    (
        "/v2/keys.createKey",
        "RerollKey",
        "reroll_key",
        "keyId",
        "/data/keyId",
    ),
    (
        "/v2/keys.createKey",
        "ReserveCredits",
        "reserve_credits",
        "key",
        "/data/key",
    ),
    (
        "/v2/keys.reserveCredits",
        "SettleCredits",
        "settle_credits",
        "holdId",
        "/data/holdId",
    ),
    (
        "/v2/keys.reserveCredits",
        "ReleaseCredits",
        "release_credits",
        "holdId",
        "/data/holdId",
    ),
    (
        "/v2/keys.reserveCredits",
        "GetHold",
        "get_hold",
        "holdId",
        "/data/holdId",
    ),
    (
        "/v2/identities.createIdentity",
        "GetIdentity",
        "get_identity",
        "identity",
        "/data/identityId",
    ),
    (
        "/v2/identities.createIdentity",
        "UpdateIdentity",
        "update_identity",
        "identity",
        "/data/identityId",
    ),
    (
        "/v2/identities.createIdentity",
        "DeleteIdentity",
        "delete_identity",
        "identity",
        "/data/identityId",
    ),
];

fn status_description(status: u16) -> &'static str {
    match status {
        400 => "The request is invalid and changed nothing: `error.errors` names each field and how to fix it.",
        401 => "The Authorization header is missing or malformed, or the root key is unknown or revoked.",
        403 => "The root key lacks the permission this operation needs (on this API, or on identities).",
        404 => "The key, API, hold or identity does not exist, was deleted, or belongs to another workspace.",
        409 => "Well-formed, but the key's state does not allow it (a balance change on an \
                unlimited key, an increment past 2^53 - 1, a refill without a balance, a hold \
                closed otherwise), or a request with the same idempotency key is still being \
                processed (`error.type` ends `idempotency/in_flight`: retry shortly for its \
                answer); nothing was changed.",
        422 => "The idempotency key was used in the last 24 h with a different request (route \
                or body: `error.type` ends `idempotency/key_reused`), or the Idempotency-Key \
                header and `idempotencyKey` differ (`idempotency/keys_differ`); nothing was \
                done. On `analytics.getUsage`: the query is not served (the range ends before \
                it starts, spans more than 400 days or 1,440 buckets, the answer would hold \
                more than 1,440 buckets, or `keyId` is not a key of `apiId`: \
                `application/unprocessable`, `error.errors` names the field to change). \
                On `webhooks.createEndpoint`: the URL is not one this server sends to (not an \
                absolute http(s) URL, credentials or a fragment in it, or a loopback, private, \
                link-local or cloud-metadata host on a node without \
                `--webhook-allow-private`: `application/unprocessable`).",
        413 => "The body is larger than the node accepts (`--max-body-bytes`).",
        500 => "An unexpected error; the request changed nothing it reported.",
        503 => "A backend is unavailable and nothing was spent; or a backend did not answer in time \
                and the outcome is unknown (the detail says which; check the balance before \
                retrying); or the node is at its in-flight limit and the request was not \
                processed. `Retry-After` gives the seconds to wait.",
        _ => "",
    }
}

const MAX_CREDITS: u64 = Credits::MAX;

/// Constraints of a request property: (schema, property, what to merge into it).
fn constraints() -> Vec<(&'static str, &'static str, Value)> {
    let credits = json!({ "minimum": 0, "maximum": MAX_CREDITS });
    let unsupported = json!({ "maxItems": 0, "description": "Not supported: only an absent, null or empty list is accepted." });
    let hashes_only = json!({ "enum": [false, null], "description": "Must be false: creditgate stores only hashes." });
    let key_id = json!({ "minLength": 3 });
    let name = json!({ "minLength": 1, "maxLength": 200 });
    let external_id = json!({ "minLength": 1, "maxLength": 255, "pattern": "^[A-Za-z0-9_.-]+$" });
    let meta = json!({ "maxProperties": 100 });
    let expires = json!({ "minimum": 0, "maximum": MAX_EXPIRES_MS });
    let secret = json!({ "minLength": 1, "maxLength": 512 });
    let api_id = json!({ "minLength": 1 });
    let cost = json!({ "minimum": 0, "maximum": Cost::MAX });
    let hold_id = json!({ "maxLength": 64, "pattern": "^hold_[A-Za-z0-9]+$" });
    let ratelimits = json!({ "maxItems": MAX_RATELIMITS });
    let limit_name = json!({ "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9_.:/-]+$" });
    let window = json!({ "minimum": MIN_LIMIT_DURATION_MS, "maximum": MAX_LIMIT_DURATION_MS });
    let window_ms = window.clone();
    let namespace = json!({ "minLength": 1, "maxLength": 255, "pattern": "^[A-Za-z0-9_.:/-]+$" });
    // No control character (C0, DEL, C1), as `char::is_control` says.
    // A credit history cursor: a seq as the previous page answered it.
    let history_cursor = json!({ "pattern": "^[1-9][0-9]{0,17}$" });
    let page_limit = json!({ "minimum": 1, "maximum": 100 });
    let identifier = json!({ "minLength": 1, "maxLength": 255, "pattern": "^[^\\u0000-\\u001f\\u007f-\\u009f]+$" });
    let alerts = json!({ "maxItems": MAX_ALERTS, "uniqueItems": true });
    vec![
        ("PoolCreditsWire", "remaining", credits.clone()),
        (
            "AlertWire",
            "threshold",
            json!({ "minimum": 1, "maximum": MAX_CREDITS }),
        ),
        ("CreditsWire", "alerts", alerts.clone()),
        ("UpdateCreditsWire", "alerts", alerts.clone()),
        ("PoolCreditsWire", "alerts", alerts.clone()),
        ("PoolAlertsWire", "alerts", alerts),
        (
            "UpdateIdentityCreditsRequest",
            "identity",
            json!({ "minLength": 1, "maxLength": 255 }),
        ),
        (
            "UpdateIdentityCreditsRequest",
            "operation",
            json!({ "enum": ["set", "increment", "decrement"] }),
        ),
        ("UpdateIdentityCreditsRequest", "value", credits.clone()),
        ("RerollKeyRequest", "keyId", key_id.clone()),
        (
            "RerollKeyRequest",
            "expiration",
            json!({ "minimum": 0, "maximum": MAX_REROLL_GRACE_MS }),
        ),
        (
            "MigrateKeysRequest",
            "migrationId",
            json!({ "minLength": 1, "maxLength": 255 }),
        ),
        (
            "MigrateKeysRequest",
            "apiId",
            json!({ "minLength": 3, "maxLength": 255 }),
        ),
        (
            "MigrateKeysRequest",
            "keys",
            json!({ "minItems": 1, "maxItems": MAX_MIGRATE_KEYS }),
        ),
        (
            "MigrateKeyWire",
            "hash",
            json!({ "pattern": "^([0-9A-Fa-f]{64}|[A-Za-z0-9+/_-]{43}=?)$" }),
        ),
        ("MigrateKeyWire", "name", name.clone()),
        ("MigrateKeyWire", "externalId", external_id.clone()),
        ("MigrateKeyWire", "meta", meta.clone()),
        ("MigrateKeyWire", "expires", expires.clone()),
        ("MigrateKeyWire", "roles", unsupported.clone()),
        ("MigrateKeyWire", "permissions", unsupported.clone()),
        ("MigrateKeyWire", "ratelimits", ratelimits.clone()),
        ("RatelimitWire", "name", limit_name.clone()),
        (
            "RatelimitWire",
            "limit",
            json!({ "minimum": 1, "maximum": MAX_LIMIT }),
        ),
        ("RatelimitWire", "duration", window.clone()),
        ("VerifyRatelimitWire", "name", limit_name),
        (
            "VerifyRatelimitWire",
            "cost",
            json!({ "minimum": 0, "maximum": MAX_LIMIT }),
        ),
        (
            "VerifyRatelimitWire",
            "limit",
            json!({ "minimum": 0, "maximum": MAX_LIMIT }),
        ),
        ("VerifyRatelimitWire", "duration", window),
        (
            "CreateApiRequest",
            "name",
            json!({ "minLength": 3, "maxLength": 255, "pattern": "^[A-Za-z][A-Za-z0-9._-]*$" }),
        ),
        ("ApiIdRequest", "apiId", api_id.clone()),
        ("ListKeysRequest", "apiId", api_id.clone()),
        ("GetUsageRequest", "apiId", api_id),
        (
            "CreateWebhookEndpointRequest",
            "url",
            json!({ "minLength": 1, "maxLength": MAX_WEBHOOK_URL_LEN }),
        ),
        (
            "CreateWebhookEndpointRequest",
            "events",
            json!({ "minItems": 1, "maxItems": 4, "items": { "type": "string",
                "enum": ["credits.low", "credits.exhausted", "credits.refilled", "hold.expired"] } }),
        ),
        (
            "CreateWebhookEndpointRequest",
            "description",
            json!({ "maxLength": MAX_WEBHOOK_DESCRIPTION_CHARS }),
        ),
        (
            "ListWebhookEndpointsRequest",
            "limit",
            json!({ "minimum": 1, "maximum": 100 }),
        ),
        (
            "WebhookEndpointIdRequest",
            "endpointId",
            json!({ "minLength": 1, "maxLength": 64 }),
        ),
        (
            "ListWebhookDeliveriesRequest",
            "endpointId",
            json!({ "minLength": 1, "maxLength": 64 }),
        ),
        (
            "ListWebhookDeliveriesRequest",
            "limit",
            json!({ "minimum": 1, "maximum": 100 }),
        ),
        ("GetUsageRequest", "keyId", key_id.clone()),
        (
            "GetUsageRequest",
            "externalId",
            json!({ "minLength": 1, "maxLength": 255 }),
        ),
        (
            "GetUsageRequest",
            "from",
            json!({ "minimum": 0, "maximum": MAX_EXPIRES_MS }),
        ),
        (
            "GetUsageRequest",
            "to",
            json!({ "minimum": 1, "maximum": MAX_EXPIRES_MS }),
        ),
        (
            "GetUsageRequest",
            "granularity",
            json!({ "enum": ["minute", "hour", "day"] }),
        ),
        (
            "GetUsageRequest",
            "groupBy",
            json!({ "enum": ["outcome", "keyId", "tag", null] }),
        ),
        (
            "ListKeysRequest",
            "limit",
            json!({ "minimum": 1, "maximum": 100 }),
        ),
        (
            "ListKeysRequest",
            "externalId",
            json!({ "minLength": 1, "maxLength": 255 }),
        ),
        ("ListKeysRequest", "decrypt", hashes_only.clone()),
        (
            "CreateKeyRequest",
            "apiId",
            json!({ "minLength": 3, "maxLength": 255 }),
        ),
        (
            "CreateKeyRequest",
            "prefix",
            json!({ "minLength": 1, "maxLength": 16, "pattern": "^[A-Za-z0-9_]+$" }),
        ),
        ("CreateKeyRequest", "name", name.clone()),
        (
            "CreateKeyRequest",
            "byteLength",
            json!({ "minimum": 16, "maximum": 255 }),
        ),
        ("CreateKeyRequest", "externalId", external_id.clone()),
        ("CreateKeyRequest", "meta", meta.clone()),
        ("CreateKeyRequest", "expires", expires.clone()),
        ("CreateKeyRequest", "recoverable", hashes_only.clone()),
        ("CreateKeyRequest", "roles", unsupported.clone()),
        ("CreateKeyRequest", "permissions", unsupported.clone()),
        ("CreateKeyRequest", "ratelimits", ratelimits.clone()),
        ("CreditsWire", "remaining", credits.clone()),
        (
            "RefillWire",
            "interval",
            json!({ "enum": ["daily", "monthly"] }),
        ),
        (
            "RefillWire",
            "amount",
            json!({ "minimum": 1, "maximum": MAX_CREDITS }),
        ),
        (
            "RefillWire",
            "refillDay",
            json!({ "minimum": 1, "maximum": 31 }),
        ),
        ("GetKeyRequest", "keyId", key_id.clone()),
        ("GetCreditHistoryRequest", "keyId", key_id.clone()),
        ("GetCreditHistoryRequest", "cursor", history_cursor.clone()),
        ("GetCreditHistoryRequest", "limit", page_limit.clone()),
        (
            "GetIdentityCreditHistoryRequest",
            "identity",
            json!({ "minLength": 1, "maxLength": 255 }),
        ),
        ("GetIdentityCreditHistoryRequest", "cursor", history_cursor),
        ("GetIdentityCreditHistoryRequest", "limit", page_limit),
        ("GetKeyRequest", "decrypt", hashes_only),
        ("DeleteKeyRequest", "keyId", key_id.clone()),
        ("UpdateKeyRequest", "keyId", key_id.clone()),
        ("UpdateKeyRequest", "name", name),
        ("UpdateKeyRequest", "externalId", external_id.clone()),
        ("UpdateKeyRequest", "meta", meta.clone()),
        ("UpdateKeyRequest", "expires", expires),
        ("UpdateKeyRequest", "roles", unsupported.clone()),
        ("UpdateKeyRequest", "permissions", unsupported.clone()),
        ("UpdateKeyRequest", "ratelimits", ratelimits.clone()),
        ("UpdateCreditsWire", "remaining", credits.clone()),
        ("UpdateCreditsRequest", "keyId", key_id),
        (
            "UpdateCreditsRequest",
            "operation",
            json!({ "enum": ["set", "increment", "decrement"] }),
        ),
        ("UpdateCreditsRequest", "value", credits),
        ("VerifyKeyRequest", "key", secret.clone()),
        ("VerifyCreditsWire", "cost", cost.clone()),
        (
            "VerifyKeyRequest",
            "tags",
            json!({ "maxItems": 20, "items": {
            "type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[A-Za-z0-9_=/.:-]+$" } }),
        ),
        (
            "VerifyKeyRequest",
            "permissions",
            json!({ "maxLength": 0, "description": "Not supported: only an absent, null or empty string is accepted." }),
        ),
        ("VerifyKeyRequest", "ratelimits", ratelimits.clone()),
        (
            "VerifyKeyRequest",
            "migrationId",
            json!({ "type": "null", "description": "Not supported: only absent or null is accepted." }),
        ),
        ("WhoamiRequest", "key", secret.clone()),
        ("ReserveCreditsRequest", "key", secret),
        ("ReserveCreditsRequest", "amount", cost.clone()),
        (
            "ReserveCreditsRequest",
            "ttlMs",
            json!({ "minimum": 1, "maximum": MAX_HOLD_TTL_MS }),
        ),
        ("SettleCreditsRequest", "holdId", hold_id.clone()),
        ("SettleCreditsRequest", "cost", cost.clone()),
        ("HoldIdRequest", "holdId", hold_id.clone()),
        ("ReleaseCreditsRequest", "holdId", hold_id),
        ("VerifyKeyRequest", "idempotencyKey", idempotency_key()),
        ("RatelimitLimitRequest", "namespace", namespace.clone()),
        ("RatelimitLimitRequest", "identifier", identifier.clone()),
        ("SetOverrideRequest", "namespace", namespace.clone()),
        ("SetOverrideRequest", "identifier", identifier.clone()),
        (
            "SetOverrideRequest",
            "limit",
            json!({ "minimum": 0, "maximum": MAX_LIMIT }),
        ),
        ("SetOverrideRequest", "duration", window_ms.clone()),
        ("OverrideRequest", "namespace", namespace.clone()),
        ("OverrideRequest", "identifier", identifier),
        (
            "ListOverridesRequest",
            "namespace",
            json!({ "minLength": 1, "maxLength": 255 }),
        ),
        (
            "ListOverridesRequest",
            "limit",
            json!({ "minimum": 1, "maximum": 100 }),
        ),
        (
            "RatelimitLimitRequest",
            "limit",
            json!({ "minimum": 1, "maximum": MAX_LIMIT }),
        ),
        (
            "RatelimitLimitRequest",
            "duration",
            json!({ "minimum": MIN_LIMIT_DURATION_MS, "maximum": MAX_LIMIT_DURATION_MS }),
        ),
        (
            "RatelimitLimitRequest",
            "cost",
            json!({ "minimum": 0, "maximum": MAX_LIMIT }),
        ),
        ("CreateIdentityRequest", "externalId", external_id.clone()),
        ("CreateIdentityRequest", "meta", meta.clone()),
        ("CreateIdentityRequest", "ratelimits", ratelimits.clone()),
        (
            "IdentityRequest",
            "identity",
            json!({ "minLength": 1, "maxLength": 255 }),
        ),
        (
            "UpdateIdentityRequest",
            "identity",
            json!({ "minLength": 1, "maxLength": 255 }),
        ),
        ("UpdateIdentityRequest", "meta", meta.clone()),
        ("UpdateIdentityRequest", "ratelimits", ratelimits.clone()),
        (
            "ListIdentitiesRequest",
            "limit",
            json!({ "minimum": 1, "maximum": 100 }),
        ),
        ("ReserveCreditsRequest", "idempotencyKey", idempotency_key()),
        ("SettleCreditsRequest", "idempotencyKey", idempotency_key()),
        ("ReleaseCreditsRequest", "idempotencyKey", idempotency_key()),
        ("UpdateCreditsRequest", "idempotencyKey", idempotency_key()),
    ]
}

/// Routes that take an idempotency key.
const IDEMPOTENT_ROUTES: &[&str] = &[
    "/v2/keys.verifyKey",
    "/v2/keys.reserveCredits",
    "/v2/keys.settleCredits",
    "/v2/keys.releaseCredits",
    "/v2/keys.updateCredits",
];

/// An idempotency key's constraints (in the body its type, a nullable string, is the
/// generated one).
fn idempotency_key() -> Value {
    json!({ "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY_LEN,
        "pattern": "^[!-~]([ -~]*[!-~])?$" })
}

/// Rules between fields of one schema (JSON Schema `if`/`then`).
fn schema_rules() -> Vec<(&'static str, Value)> {
    vec![
        // createKey: a refill needs a balance to refill.
        (
            "CreditsWire",
            json!({
                "required": ["remaining"],
                "if": { "properties": { "refill": { "type": "object" } }, "required": ["refill"] },
                "then": { "properties": { "remaining": { "type": "integer" } } }
            }),
        ),
        // updateKey: a refill with `remaining: null` in the same request.
        (
            "UpdateCreditsWire",
            json!({
                "if": { "properties": { "refill": { "type": "object" } }, "required": ["refill"] },
                "then": { "properties": { "remaining": { "type": "integer" } } }
            }),
        ),
        // refillDay only with monthly, and required there.
        (
            "RefillWire",
            json!({
                "if": { "properties": { "interval": { "const": "monthly" } } },
                "then": { "required": ["refillDay"], "properties": { "refillDay": { "type": "integer" } } },
                "else": { "properties": { "refillDay": { "type": "null" } } }
            }),
        ),
        // increment and decrement need a value.
        (
            "UpdateCreditsRequest",
            json!({
                "if": { "properties": { "operation": { "enum": ["increment", "decrement"] } } },
                "then": { "required": ["value"], "properties": { "value": { "type": "integer" } } }
            }),
        ),
    ]
}

fn merge(target: &mut Value, add: &Value) {
    if let (Some(t), Some(a)) = (target.as_object_mut(), add.as_object()) {
        for (k, v) in a {
            t.insert(k.clone(), v.clone());
        }
    }
}

fn complete(mut doc: Value) -> Value {
    for (path, statuses) in ROUTE_ERRORS {
        let Some(responses) = doc
            .pointer_mut(&format!(
                "/paths/{}/post/responses",
                path.replace('/', "~1")
            ))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        for status in *statuses {
            let mut response = json!({
                "description": status_description(*status),
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ErrorEnvelope" } } }
            });
            if *status == 503 {
                response["headers"] = json!({ "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": { "type": "integer", "minimum": 0 } } });
            }
            responses.insert(status.to_string(), response);
        }
    }
    for path in IDEMPOTENT_ROUTES {
        let Some(op) = doc
            .pointer_mut(&format!("/paths/{}/post", path.replace('/', "~1")))
            .and_then(Value::as_object_mut)
        else {
            continue;
        };
        let params = op.entry("parameters").or_insert_with(|| json!([]));
        if let Some(list) = params.as_array_mut() {
            list.push(json!({
                "name": "Idempotency-Key",
                "in": "header",
                "required": false,
                "description": "Makes the request idempotent: the same key with the same body \
                    within 24 h, from any node, answers the first decision (same credits, same \
                    holdId) and changes nothing again; another body is 422, a retry while the \
                    first is in flight 409. Per workspace. A structured-field string (\"…\") \
                    or the bare key. Or send `idempotencyKey` in the body.",
                "schema": { "type": "string", "minLength": 1,
                    "maxLength": MAX_IDEMPOTENCY_KEY_LEN, "pattern": "^[!-~]([ -~]*[!-~])?$" }
            }));
        }
        if let Some(ok) = op.get_mut("responses").and_then(|r| r.get_mut("200")) {
            ok["headers"] = json!({ "Idempotent-Replayed": {
                "description": "With an idempotency key: `true` when this is the first \
                    request's answer, replayed.",
                "schema": { "type": "string", "enum": ["true", "false"] } } });
        }
    }
    for (from, name, to, field, source) in LINKS {
        let pointer = format!("/paths/{}/post/responses/200", from.replace('/', "~1"));
        if let Some(ok) = doc.pointer_mut(&pointer).and_then(Value::as_object_mut) {
            let links = ok.entry("links").or_insert_with(|| json!({}));
            links[*name] = json!({
                "operationId": to,
                "requestBody": { *field: format!("$response.body#{source}") }
            });
        }
    }
    for (schema, property, add) in constraints() {
        if let Some(p) = doc.pointer_mut(&format!(
            "/components/schemas/{schema}/properties/{property}"
        )) {
            merge(p, &add);
        }
    }
    let multi =
        "/paths/~1v2~1ratelimit.multiLimit/post/requestBody/content/application~1json/schema";
    if let Some(s) = doc.pointer_mut(multi) {
        merge(
            s,
            &json!({ "minItems": 1, "maxItems": MAX_LIMITS_PER_CALL }),
        );
    }
    for (schema, add) in schema_rules() {
        if let Some(s) = doc.pointer_mut(&format!("/components/schemas/{schema}")) {
            merge(s, &add);
        }
    }
    doc
}

/// The document, completed, built once.
pub fn document() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let generated = serde_json::to_value(ApiDoc::openapi()).unwrap_or(Value::Null);
        complete(generated)
    })
}

/// The document as JSON, rendered once.
pub fn document_json() -> String {
    static JSON: OnceLock<String> = OnceLock::new();
    JSON.get_or_init(|| document().to_string()).clone()
}

/// The schema of a request property: `path` is like `credits.cost` or `tags[0]`,
/// starting at the request schema `root`. `None` when the document has no such field.
fn schema_at(root: &str, path: &str) -> Option<Value> {
    let doc = document();
    let mut schema = doc.pointer(&format!("/components/schemas/{root}"))?.clone();
    for segment in path.split('.').filter(|s| !s.is_empty()) {
        let (name, indexed) = match segment.find('[') {
            Some(i) => (&segment[..i], true),
            None => (segment, false),
        };
        schema = resolve(doc, schema);
        schema = schema.get("properties")?.get(name)?.clone();
        if indexed {
            schema = resolve(doc, schema).get("items")?.clone();
        }
    }
    Some(resolve(doc, schema))
}

/// Follows a `$ref`, or the one non-null branch of a nullable `oneOf`.
fn resolve(doc: &Value, schema: Value) -> Value {
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let pointer = r.trim_start_matches('#');
        return doc.pointer(pointer).cloned().unwrap_or(Value::Null);
    }
    if let Some(branches) = schema.get("oneOf").and_then(Value::as_array) {
        let non_null: Vec<&Value> = branches
            .iter()
            .filter(|b| b.get("type") != Some(&json!("null")))
            .collect();
        if let [only] = non_null.as_slice() {
            let mut resolved = resolve(doc, (*only).clone());
            if let Some(obj) = resolved.as_object_mut() {
                obj.insert("nullable".into(), Value::Bool(true));
            }
            return resolved;
        }
    }
    schema
}

/// What the document allows for a request field, in words: "must be a whole number
/// from 0 to 1000000000000". `None` when the document does not know the field.
pub fn describe(root: &str, path: &str) -> Option<String> {
    let schema = schema_at(root, path)?;
    let types: Vec<&str> = match schema.get("type") {
        Some(Value::String(t)) => vec![t.as_str()],
        Some(Value::Array(ts)) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec!["object"],
    };
    let nullable = types.contains(&"null") || schema.get("nullable").is_some();
    let kind = types
        .iter()
        .copied()
        .find(|t| *t != "null")
        .unwrap_or("null");
    let mut what = match kind {
        "integer" => {
            let lo = schema.get("minimum").and_then(Value::as_i64);
            let hi = schema.get("maximum").and_then(Value::as_i64);
            match (lo, hi) {
                (Some(lo), Some(hi)) => format!("a whole number from {lo} to {hi}"),
                (Some(lo), None) => format!("a whole number of at least {lo}"),
                _ => "a whole number".to_owned(),
            }
        }
        "string" => match schema.get("enum").and_then(Value::as_array) {
            Some(values) => format!(
                "one of {}",
                values
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|v| format!("'{v}'"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "a string".to_owned(),
        },
        "boolean" => match schema.get("enum") {
            Some(_) => "false".to_owned(),
            None => "true or false".to_owned(),
        },
        "array" => "a list".to_owned(),
        "null" => "null (or absent)".to_owned(),
        _ => "a JSON object".to_owned(),
    };
    if nullable && kind != "null" {
        what.push_str(", or null");
    }
    Some(format!("must be {what}"))
}

/// The fields a request object at `path` has (for "unknown field" messages).
pub fn fields(root: &str, path: &str) -> Vec<String> {
    let schema = if path.is_empty() {
        document()
            .pointer(&format!("/components/schemas/{root}"))
            .cloned()
    } else {
        schema_at(root, path)
    };
    schema
        .as_ref()
        .and_then(|s| s.get("properties"))
        .and_then(Value::as_object)
        .map(|p: &Map<String, Value>| p.keys().cloned().collect())
        .unwrap_or_default()
}

/// Brings a request body in line with what the typed parse expects, where the document
/// allows more than serde does: a whole float where an integer is documented (`38.0`
/// is an integer in JSON Schema) becomes that integer. `Err(path)` names the first place
/// where an object is documented but a list was sent (serde would take the list as the
/// fields in order).
pub fn conform(root: &str, value: &mut Value) -> Result<(), String> {
    let doc = document();
    let schema = doc
        .pointer(&format!("/components/schemas/{root}"))
        .cloned()
        .unwrap_or(Value::Null);
    walk(doc, schema, value, "")
}

fn walk(doc: &Value, schema: Value, value: &mut Value, path: &str) -> Result<(), String> {
    let schema = resolve(doc, schema);
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        match value {
            Value::Array(_) => return Err(path.to_owned()),
            Value::Object(map) => {
                for (name, v) in map.iter_mut() {
                    if let Some(p) = props.get(name) {
                        let at = match path {
                            "" => name.clone(),
                            _ => format!("{path}.{name}"),
                        };
                        walk(doc, p.clone(), v, &at)?;
                    }
                }
            }
            _ => {}
        }
        return Ok(());
    }
    let integer = match schema.get("type") {
        Some(Value::String(t)) => t == "integer",
        Some(Value::Array(ts)) => ts.iter().any(|t| t == "integer"),
        _ => false,
    };
    if integer {
        if let Some(whole) = value
            .as_f64()
            .filter(|_| value.is_f64())
            .and_then(whole_number)
        {
            *value = whole;
        }
    }
    if let (Some(items), Value::Array(list)) = (schema.get("items"), value) {
        for (i, v) in list.iter_mut().enumerate() {
            walk(doc, items.clone(), v, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

/// `38.0` → `38`, for whole floats within ±2^53 (beyond it a float is not exact).
fn whole_number(f: f64) -> Option<Value> {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    if f.fract() != 0.0 || f.abs() > EXACT {
        return None;
    }
    // Exact: whole and within ±2^53, so the conversion neither truncates nor wraps.
    #[allow(clippy::cast_possible_truncation)]
    let i = f as i64;
    Some(Value::from(i))
}
