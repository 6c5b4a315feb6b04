//! Wire types of the Unkey-v2-compatible API. The handlers use these very types and the
//! OpenAPI document is generated from them. Requests reject unknown fields; responses
//! omit absent optional fields (the official SDK rejects `null` for them).

use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// `meta` of every response.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Meta {
    #[schema(value_type = String)]
    pub request_id: Arc<str>,
}

/// The success envelope.
#[derive(Debug, Serialize, ToSchema)]
pub struct Envelope<T> {
    pub meta: Meta,
    pub data: T,
}

/// The success envelope of `apis.listKeys`.
#[derive(Debug, Serialize, ToSchema)]
pub struct PagedEnvelope<T> {
    pub meta: Meta,
    pub data: Vec<T>,
    pub pagination: Pagination,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Pagination {
    pub has_more: bool,
    /// Omitted on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// `{}`
#[derive(Debug, Default, Serialize, ToSchema)]
pub struct Empty {}

/// Distinguishes an absent field (`None`) from an explicit `null` (`Some(None)`).
fn nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

// ---- apis ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateApiRequest {
    /// 3..=255 characters: a letter, then letters, digits, `.`, `_` or `-`.
    pub name: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateApiData {
    pub api_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ApiIdRequest {
    pub api_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GetApiData {
    pub id: String,
    pub name: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListKeysRequest {
    pub api_id: String,
    /// 1..=100, default 100.
    pub limit: Option<u32>,
    pub cursor: Option<String>,
    pub external_id: Option<String>,
    /// Must be `false`: creditgate stores only hashes.
    pub decrypt: Option<bool>,
    /// Accepted and ignored: every listing reads the store.
    pub revalidate_keys_cache: Option<bool>,
}

// ---- keys ----

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RefillWire {
    /// `daily` or `monthly`.
    pub interval: String,
    /// The balance is set to this when below it, once per period (>= 1).
    pub amount: i64,
    /// Day of month (1..=31) for monthly refills; the last day of shorter months.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill_day: Option<i64>,
}

/// A balance threshold (creditgate's extension): a spend that takes the balance from
/// at or above it to below it sends `credits.low` to the workspace's webhook endpoints.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AlertWire {
    /// 1..=2^53 - 1.
    pub threshold: i64,
}

/// Credits of a key: `remaining = null` is unlimited.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreditsWire {
    #[serde(deserialize_with = "nullable")]
    #[schema(value_type = Option<i64>)]
    pub remaining: Option<Option<i64>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill: Option<RefillWire>,
    /// Balance thresholds (creditgate's extension): at most 10, distinct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Vec<AlertWire>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateKeyRequest {
    pub api_id: String,
    /// 1..=16 characters of `[a-zA-Z0-9_]`; the key becomes `<prefix>_<random>`.
    pub prefix: Option<String>,
    pub name: Option<String>,
    /// Random bytes in the key, 16..=255 (default 16).
    pub byte_length: Option<i64>,
    pub external_id: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Map<String, Value>>,
    /// Unix milliseconds after which the key is `EXPIRED`.
    pub expires: Option<i64>,
    pub enabled: Option<bool>,
    pub credits: Option<CreditsWire>,
    /// Must be `false`: creditgate stores only hashes.
    pub recoverable: Option<bool>,
    /// Not supported (only an empty list is accepted).
    #[schema(value_type = Option<Vec<String>>)]
    pub roles: Option<Vec<Value>>,
    /// Not supported (only an empty list is accepted).
    #[schema(value_type = Option<Vec<String>>)]
    pub permissions: Option<Vec<Value>>,
    /// Named rate limits of the key (at most 50, names unique).
    pub ratelimits: Option<Vec<RatelimitWire>>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateKeyData {
    pub key_id: String,
    /// The secret: returned once, stored only as a SHA-256 hash.
    pub key: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetKeyRequest {
    pub key_id: String,
    /// Must be `false`.
    pub decrypt: Option<bool>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyCreditsData {
    /// `null` = unlimited. The balance outside holds.
    pub remaining: Option<i64>,
    /// Credits in open holds (creditgate's extension); omitted when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reserved: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill: Option<RefillWire>,
    /// Balance thresholds (creditgate's extension), descending; omitted when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Vec<AlertWire>>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct KeyData {
    pub key_id: String,
    pub start: String,
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Map<String, Value>>,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updated_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<KeyCreditsData>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityData>,
    /// The key's own rate limits; omitted when it has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratelimits: Option<Vec<RatelimitData>>,
}

/// A named rate limit to set on a key or an identity.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RatelimitWire {
    /// 1..=128 characters of `[a-zA-Z0-9_.:/-]`, unique among the owner's limits.
    pub name: String,
    /// What a window allows: 1..=10^12 (the sum of the costs of passed checks).
    pub limit: i64,
    /// The window in milliseconds: 1,000..=2,592,000,000 (30 days).
    pub duration: i64,
    /// Checked (at cost 1) on every verification when true; otherwise only when a
    /// verification names it. Default false.
    #[serde(default)]
    pub auto_apply: bool,
}

/// A named rate limit of a key or an identity.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RatelimitData {
    pub id: String,
    pub name: String,
    pub limit: u64,
    /// The window in milliseconds.
    pub duration: u64,
    pub auto_apply: bool,
}

/// A rate limit a verification checks: one of the key's, else one of its identity's
/// (a key's limit wins over its identity's of the same name).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VerifyRatelimitWire {
    /// The limit's name.
    pub name: String,
    /// What this verification counts: 0..=10^12 (default 1).
    pub cost: Option<i64>,
    /// Overrides the limit for this check: 0..=10^12.
    pub limit: Option<i64>,
    /// Overrides the window for this check (ms): 1,000..=2,592,000,000. Another window
    /// is another counter.
    pub duration: Option<i64>,
}

/// A rate limit a verification checked, with its window after the check.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyRatelimitData {
    pub id: String,
    pub name: String,
    pub limit: u64,
    /// The window in milliseconds.
    pub duration: u64,
    /// What the window still allows.
    pub remaining: u64,
    /// When the window ends: Unix milliseconds.
    pub reset: u64,
    /// Whether this limit refused the verification.
    pub exceeded: bool,
    pub auto_apply: bool,
}

/// An identity, as `verifyKey`, `getKey` and the identities routes show it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityData {
    pub id: String,
    pub external_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Map<String, Value>>,
    /// The identity's rate limits, shared by all its keys.
    pub ratelimits: Vec<RatelimitData>,
    /// The identity's shared credit pool (creditgate's extension); omitted when it has
    /// none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<PoolCreditsData>,
}

// ---- identities ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateIdentityRequest {
    /// 1..=255 characters of `[a-zA-Z0-9_.-]`, unique in the workspace.
    pub external_id: String,
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Map<String, Value>>,
    /// Named rate limits shared by the identity's keys (at most 50, names unique).
    pub ratelimits: Option<Vec<RatelimitWire>>,
    /// A shared credit pool (creditgate's extension): every verification of the
    /// identity's keys spends its cost from the key (if limited) and from the pool, both
    /// or neither.
    pub credits: Option<PoolCreditsWire>,
}

/// An identity's shared credit pool.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PoolCreditsWire {
    /// The pool's balance: 0..=2^53 - 1.
    pub remaining: i64,
    pub refill: Option<RefillWire>,
    /// Balance thresholds of the pool: at most 10, distinct.
    pub alerts: Option<Vec<AlertWire>>,
}

/// A pool's balance as verifications and identities show it.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PoolCreditsData {
    /// The exact balance (after this verification, in `verifyKey`).
    pub remaining: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill: Option<RefillWire>,
    /// Balance thresholds of the pool, descending; omitted when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alerts: Option<Vec<AlertWire>>,
}

/// `identities.updateCredits` (creditgate's extension).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateIdentityCreditsRequest {
    /// The identity's id or external id.
    pub identity: String,
    /// `set` (opens the pool when the identity has none), `increment` or `decrement`.
    pub operation: String,
    /// 0..=2^53 - 1.
    pub value: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct IdentityCreditsData {
    pub identity_id: String,
    /// The pool's exact balance after the change.
    pub remaining: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreateIdentityData {
    pub identity_id: String,
}

/// `getIdentity` / `deleteIdentity`: the identity's id or its external id.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IdentityRequest {
    pub identity: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListIdentitiesRequest {
    /// 1..=100 (default 100).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateIdentityRequest {
    pub identity: String,
    /// Replaces the meta; `null` clears it; absent leaves it as it is.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Option<Map<String, Value>>>,
    /// Replaces the identity's rate limits (`[]` removes them); absent leaves them.
    /// A limit keeps its id when its name stays.
    pub ratelimits: Option<Vec<RatelimitWire>>,
    /// The identity's pool (it must have one): `alerts` replaces its thresholds.
    pub credits: Option<PoolAlertsWire>,
}

/// What `identities.updateIdentity` changes of a pool.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PoolAlertsWire {
    /// Replaces the pool's thresholds (`[]` removes them): at most 10, distinct.
    pub alerts: Vec<AlertWire>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateKeyRequest {
    pub key_id: String,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub name: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>)]
    pub external_id: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Option<Map<String, Value>>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i64>)]
    pub expires: Option<Option<i64>>,
    /// `null` makes the key unlimited; `remaining` sets the balance; `refill` replaces
    /// the schedule (`null` removes it).
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<UpdateCreditsWire>)]
    pub credits: Option<Option<UpdateCreditsWire>>,
    pub enabled: Option<bool>,
    #[schema(value_type = Option<Vec<String>>)]
    pub roles: Option<Vec<Value>>,
    #[schema(value_type = Option<Vec<String>>)]
    pub permissions: Option<Vec<Value>>,
    /// Replaces the key's rate limits (`[]` removes them); absent leaves them. A limit
    /// keeps its id when its name stays.
    pub ratelimits: Option<Vec<RatelimitWire>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateCreditsWire {
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i64>)]
    pub remaining: Option<Option<i64>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<RefillWire>)]
    pub refill: Option<Option<RefillWire>>,
    /// Replaces the balance thresholds (`[]` removes them); absent leaves them.
    pub alerts: Option<Vec<AlertWire>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpdateCreditsRequest {
    pub key_id: String,
    /// `set`, `increment` or `decrement`.
    pub operation: String,
    /// Required for increment/decrement; `null` (or absent) with `set` = unlimited.
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<i64>)]
    pub value: Option<Option<i64>>,
    /// Makes the request idempotent (as the `Idempotency-Key` header does, for clients
    /// that cannot send headers): 1..=255 printable ASCII characters, unique per request
    /// in the workspace. A retry with the same key and body within 24 h answers the
    /// first decision and changes nothing again.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DeleteKeyRequest {
    pub key_id: String,
    /// Accepted; keys are always soft-deleted (their analytics stay meaningful).
    pub permanent: Option<bool>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VerifyCreditsWire {
    /// Credits this verification spends: 0..=10^12 (default 1).
    pub cost: u64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct VerifyKeyRequest {
    /// The secret to verify (1..=512 characters).
    pub key: String,
    pub credits: Option<VerifyCreditsWire>,
    /// Up to 20 tags of 1..=128 characters, stored with the analytics row.
    pub tags: Option<Vec<String>>,
    /// Not supported (only absent or empty is accepted).
    pub permissions: Option<String>,
    /// Rate limits to check besides the auto-applied ones (at most 50, names unique).
    /// All are counted or none; a refused verification spends no credits.
    pub ratelimits: Option<Vec<VerifyRatelimitWire>>,
    /// Not supported.
    pub migration_id: Option<String>,
    /// Makes the request idempotent (as the `Idempotency-Key` header does, for clients
    /// that cannot send headers): 1..=255 printable ASCII characters, unique per request
    /// in the workspace. A retry with the same key and body within 24 h answers the
    /// first decision and changes nothing again.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct VerifyKeyData {
    pub valid: bool,
    /// VALID, NOT_FOUND, DISABLED, EXPIRED, USAGE_EXCEEDED, …
    #[schema(value_type = String)]
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub key_id: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Map<String, Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires: Option<i64>,
    /// Exact remaining balance after this decision (see `creditsExact`); omitted for
    /// unlimited keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityData>,
    /// The rate limits checked (named, then auto-applied); omitted when none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ratelimits: Option<Vec<VerifyRatelimitData>>,
    /// creditgate's extension, present (always `false`) only when the node that answered
    /// could not reach the hot store and spent on the ledger alone: `credits` (and
    /// `identity.credits.remaining`) then count only the ledger's part, and the balance
    /// is at least that. Omitted when `credits` is exact.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits_exact: Option<bool>,
}

// ---- holds (creditgate's extension) ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReserveCreditsRequest {
    /// The secret to verify (1..=512 characters).
    pub key: String,
    /// Credits to move into the hold: 0..=10^12.
    pub amount: u64,
    /// How long the hold stays open, in ms: 1..=86,400,000 (default 60,000). Then it
    /// expires and its credits return.
    pub ttl_ms: Option<u64>,
    /// Makes the request idempotent (as the `Idempotency-Key` header does, for clients
    /// that cannot send headers): 1..=255 printable ASCII characters, unique per request
    /// in the workspace. A retry with the same key and body within 24 h answers the
    /// first decision and changes nothing again.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ReserveCreditsData {
    pub valid: bool,
    /// VALID (held), USAGE_EXCEEDED (nothing moved), NOT_FOUND, DISABLED, EXPIRED.
    #[schema(value_type = String)]
    pub code: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub key_id: Option<Arc<str>>,
    /// The hold, when VALID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<String>,
    /// Exact balance outside holds after this decision; omitted for unlimited keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<i64>,
    /// When the hold expires (Unix ms), when VALID.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SettleCreditsRequest {
    /// The hold `keys.reserveCredits` returned.
    pub hold_id: String,
    /// Credits the work cost: 0..=10^12. Above the hold, the difference is spent only if
    /// the balance covers it.
    pub cost: u64,
    /// Makes the request idempotent (as the `Idempotency-Key` header does, for clients
    /// that cannot send headers): 1..=255 printable ASCII characters, unique per request
    /// in the workspace. A retry with the same key and body within 24 h answers the
    /// first decision and changes nothing again.
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HoldIdRequest {
    /// The hold `keys.reserveCredits` returned.
    pub hold_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReleaseCreditsRequest {
    /// The hold `keys.reserveCredits` returned.
    pub hold_id: String,
    /// Makes the request idempotent (as the `Idempotency-Key` header does, for clients
    /// that cannot send headers): 1..=255 printable ASCII characters, unique per request
    /// in the workspace. A retry with the same key and body within 24 h answers the
    /// first decision and changes nothing again.
    pub idempotency_key: Option<String>,
}

/// A request type that may carry `idempotencyKey` in its body.
pub trait BodyIdempotencyKey {
    fn idempotency_key(&self) -> Option<&str>;
}

macro_rules! body_idempotency_key {
    ($($t:ty),*) => {$(
        impl BodyIdempotencyKey for $t {
            fn idempotency_key(&self) -> Option<&str> {
                self.idempotency_key.as_deref()
            }
        }
    )*};
}

body_idempotency_key!(
    VerifyKeyRequest,
    ReserveCreditsRequest,
    SettleCreditsRequest,
    ReleaseCreditsRequest,
    UpdateCreditsRequest
);

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CloseHoldData {
    /// `false`: a cost above the hold that the balance could not cover; the hold stays
    /// open and nothing moved.
    pub valid: bool,
    /// VALID or USAGE_EXCEEDED.
    #[schema(value_type = String)]
    pub code: &'static str,
    /// Exact balance outside holds after this decision; omitted for unlimited keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<i64>,
    /// Credits the hold spent (the settled cost; 0 for a release).
    pub spent: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct HoldData {
    pub hold_id: String,
    pub key_id: String,
    pub amount: u64,
    /// open, settled, released or expired.
    #[schema(value_type = String)]
    pub state: &'static str,
    /// The settled cost.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<u64>,
    pub created_at: i64,
    pub expires_at: i64,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WhoamiRequest {
    pub key: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct LivenessData {
    pub message: String,
}

// ---- ratelimit ----

/// One check of `ratelimit.limit` (and one item of `ratelimit.multiLimit`).
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RatelimitLimitRequest {
    /// 1..=255 characters of `[a-zA-Z0-9_.:/-]`; created on first use.
    pub namespace: String,
    /// Who is limited: 1..=255 characters of `[a-zA-Z0-9_.:/-]`.
    pub identifier: String,
    /// Most cost a window passes: 1..=10^12.
    pub limit: i64,
    /// The window in milliseconds: 1,000..=2,592,000,000 (30 days).
    pub duration: i64,
    /// What this check counts: 0..=10^12 (default 1).
    pub cost: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RatelimitLimitData {
    pub limit: u64,
    pub remaining: u64,
    /// When the window ends: Unix milliseconds.
    pub reset: u64,
    pub success: bool,
    /// The override whose limit and window applied, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub override_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RatelimitMultiLimitCheck {
    pub namespace: String,
    pub identifier: String,
    pub limit: u64,
    pub remaining: u64,
    pub reset: u64,
    /// Whether this check alone fits its window (the call passes only if all do).
    pub passed: bool,
    /// The override whose limit and window applied, when one did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub override_id: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RatelimitMultiLimitData {
    /// Every check passed (and all were counted); otherwise none was counted.
    pub passed: bool,
    pub limits: Vec<RatelimitMultiLimitCheck>,
}

// ---- rate-limit overrides ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SetOverrideRequest {
    /// The namespace (created on first use).
    pub namespace: String,
    /// An identifier, or a pattern where `*` stands for any run of characters
    /// (`*@acme.com`). The exact identifier wins over patterns; among patterns, the one
    /// with the most characters other than `*`.
    pub identifier: String,
    /// What a window allows the matching identifiers: 0..=10^12 (0 blocks them).
    pub limit: i64,
    /// The window in milliseconds: 1,000..=2,592,000,000.
    pub duration: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct SetOverrideData {
    pub override_id: String,
}

/// `getOverride` / `deleteOverride`: the override of exactly this identifier (or
/// pattern).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct OverrideRequest {
    pub namespace: String,
    pub identifier: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListOverridesRequest {
    pub namespace: String,
    pub cursor: Option<String>,
    /// 1..=100 (default 10).
    pub limit: Option<u32>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct OverrideData {
    pub override_id: String,
    /// The window in milliseconds.
    pub duration: u64,
    pub identifier: String,
    pub limit: u64,
}

// ---- reroll and migration ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RerollKeyRequest {
    pub key_id: String,
    /// How long the old secret keeps verifying, in ms: 0 (it stops at once) to
    /// 31,536,000,000 (a year).
    pub expiration: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct RerollKeyData {
    /// The same key: its id, balance, limits and identity stay.
    pub key_id: String,
    /// The new secret: returned once, stored only as a SHA-256 hash.
    pub key: String,
}

/// A key to import: the SHA-256 of its secret and its settings (as `createKey`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MigrateKeyWire {
    /// SHA-256 of the secret: 64 hexadecimal digits, or base64 (standard or URL-safe,
    /// padded or not).
    pub hash: String,
    pub name: Option<String>,
    pub external_id: Option<String>,
    #[schema(value_type = Option<Object>)]
    pub meta: Option<Map<String, Value>>,
    /// Not supported (only an empty list is accepted).
    #[schema(value_type = Option<Vec<String>>)]
    pub roles: Option<Vec<Value>>,
    /// Not supported (only an empty list is accepted).
    #[schema(value_type = Option<Vec<String>>)]
    pub permissions: Option<Vec<Value>>,
    pub expires: Option<i64>,
    pub enabled: Option<bool>,
    pub credits: Option<CreditsWire>,
    pub ratelimits: Option<Vec<RatelimitWire>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct MigrateKeysRequest {
    /// Names the import (1..=255 characters); creditgate keeps no migration providers,
    /// so it only has to be present.
    pub migration_id: String,
    pub api_id: String,
    /// 1..=100 keys.
    pub keys: Vec<MigrateKeyWire>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigratedKey {
    /// The hash as sent.
    pub hash: String,
    pub key_id: String,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrateKeysData {
    pub migrated: Vec<MigratedKey>,
    /// Hashes of keys not created: a key with that secret exists already.
    pub failed: Vec<String>,
}

// ---- analytics (creditgate's extension) ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetUsageRequest {
    /// Only verifications of keys of this API.
    pub api_id: Option<String>,
    /// Only verifications of this key.
    pub key_id: Option<String>,
    /// Only verifications of keys of this identity (its external id or id).
    pub external_id: Option<String>,
    /// Start of the range, Unix ms, inclusive.
    pub from: i64,
    /// End of the range, Unix ms, exclusive; at most 400 days after `from`.
    pub to: i64,
    /// `minute`, `hour` or `day` (UTC); at most 1,440 buckets in the range.
    pub granularity: String,
    /// Split each bucket by `outcome`, `keyId` or `tag`.
    pub group_by: Option<String>,
}

/// One bucket: the verifications of one time span (and group). Spans without any are
/// left out.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageBucketData {
    /// Start of the span, Unix ms.
    pub time: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Verifications (hold steps included: each is a row of its own).
    pub count: u64,
    /// Credits they spent.
    pub spent_credits: u64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct UsageData {
    pub granularity: String,
    pub buckets: Vec<UsageBucketData>,
}

// ---- webhooks (creditgate's extension) ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct CreateWebhookEndpointRequest {
    /// The receiver: http(s), at most 2,048 bytes; loopback, private, link-local and
    /// cloud-metadata hosts only on a node started with `--webhook-allow-private`.
    pub url: String,
    /// 1..=4 of `credits.low`, `credits.exhausted`, `credits.refilled`, `hold.expired`.
    pub events: Vec<String>,
    /// Up to 1,000 characters.
    pub description: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookEndpointData {
    pub endpoint_id: String,
    pub url: String,
    pub events: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Unix ms.
    pub created_at: i64,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreatedWebhookEndpointData {
    #[serde(flatten)]
    pub endpoint: WebhookEndpointData,
    /// The signing secret (`whsec_…`, Standard Webhooks): shown once, here.
    pub secret: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListWebhookEndpointsRequest {
    /// 1..=100 (default 100).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebhookEndpointIdRequest {
    pub endpoint_id: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListWebhookDeliveriesRequest {
    pub endpoint_id: String,
    /// 1..=100 (default 100).
    pub limit: Option<u32>,
    pub cursor: Option<String>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookAttemptData {
    pub attempt: u64,
    /// Unix ms.
    pub at: i64,
    /// The receiver's status; absent when no answer came (`error` says why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub latency_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the next attempt was scheduled; absent after the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<i64>,
}

#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDeliveryData {
    /// The event's id, sent as `webhook-id` with every attempt.
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed` (given up after 25 h of retries).
    pub state: String,
    pub next_attempt_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<i64>,
    pub created_at: i64,
    pub attempts: Vec<WebhookAttemptData>,
}

/// `keys.getCreditHistory`: a page of a key's credit history, newest first.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetCreditHistoryRequest {
    pub key_id: String,
    /// The previous page's `pagination.cursor` (entries older than it); absent: from the
    /// newest.
    pub cursor: Option<String>,
    /// 1..=100 (default 100).
    pub limit: Option<u32>,
}

/// `identities.getCreditHistory`: a page of the credit history of an identity's shared
/// pool (the identity's id or its external id), newest first.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct GetIdentityCreditHistoryRequest {
    pub identity: String,
    /// The previous page's `pagination.cursor` (entries older than it); absent: from the
    /// newest.
    pub cursor: Option<String>,
    /// 1..=100 (default 100).
    pub limit: Option<u32>,
}

/// One change of an account's credits other than a single spend (a verification), with
/// the balance before and after it, written in the same transaction as the change.
///
/// Single spends are not entries: `spentTotal` counts them, so the entries chain without
/// a gap. For two consecutive entries (`seq` n-1 and n, both with balances):
/// `balanceBefore(n) = balanceAfter(n-1) - (spentTotal(n) - spentTotal(n-1))`; and the
/// balance now is `balanceAfter(newest) - (credits spent since it)`.
///
/// Spends on the hot store are counted in `spentTotal` when the ledger learns of them (the
/// hot store reports them with its next refill, return of an idle balance, or balance
/// change), so an entry written while the hot store held credits of the key may count
/// fewer than were spent: its balances are then upper bounds (`exact: false`) and later
/// entries count the rest. Credits spent by a hold's settle are in the `hold.settle`
/// entry, not in `spentTotal`.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct CreditHistoryEntryData {
    /// 1, 2, ... per key (or pool), without gaps: entry n is the n-th change.
    pub seq: i64,
    /// Unix ms of the change.
    pub time: i64,
    /// `create`, `increment`, `decrement`, `set`, `refill` (a periodic refill applied),
    /// `hold.reserve`, `hold.settle`, `hold.release`, `hold.expire`, `write_off` (credits a
    /// hot store that lost its data held: the lost store may have spent part of them
    /// without reporting it, so `balanceBefore` is an upper bound and the spends are never
    /// counted in `spentTotal`), or `late_return` (credits of an older generation given
    /// back after the balance change that replaced it had counted them spent).
    pub kind: String,
    /// The amount the change names: the balance created, set or refilled to; the amount
    /// added or taken; held, released or expired; a settle's cost; credits written off or
    /// returned. Absent for `set`/`create` to unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<i64>,
    /// The root key id that asked for the change (`keys.updateCredits`, `keys.updateKey`,
    /// `identities.updateCredits`); absent for system changes (create, refills, holds
    /// expiring, write-offs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The hold of a `hold.*` entry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_id: Option<String>,
    /// The balance outside holds just before the change; absent when unlimited (or, for
    /// `create`, when there was none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_before: Option<i64>,
    /// The balance outside holds just after the change; absent when unlimited.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance_after: Option<i64>,
    /// Credits in open holds just before the change.
    pub held_before: i64,
    /// Credits in open holds just after the change.
    pub held_after: i64,
    /// Credits of single spends counted up to this entry, since the key was created (or
    /// since history began, for keys created before it).
    pub spent_total: i64,
    /// `true`: both balances are the exact balance at that moment. `false`: upper bounds
    /// (the hot store held credits and may have spent some it had not reported yet; always
    /// for `write_off`).
    pub exact: bool,
}
