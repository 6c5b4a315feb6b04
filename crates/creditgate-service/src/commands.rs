//! Commands: what a caller asks for, already parsed into domain types. The HTTP layer
//! builds them from its wire types (`TryFrom`), so a command that exists is well-formed;
//! the rules that need the stored key (a refill needs a balance) are checked here.

use creditgate_domain::{ApiId, Cost, Credits, KeyId, RatelimitRule, Refill};
use creditgate_limiter::CreditOp;
use serde_json::{Map, Value};

/// `keys.verifyKey`.
#[derive(Debug, Clone)]
pub struct Verify {
    pub secret: String,
    pub cost: Cost,
    pub tags: Vec<String>,
    /// Rate limits of the key or its identity this verification names.
    pub ratelimits: Vec<NamedLimit>,
}

/// A rate limit a verification names: one of the key's or its identity's, with
/// optional overrides of its limit and window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedLimit {
    pub name: String,
    pub cost: u64,
    pub limit: Option<u64>,
    pub duration_ms: Option<u64>,
}

/// `keys.createKey`.
#[derive(Debug, Clone)]
pub struct CreateKey {
    pub api_id: ApiId,
    pub prefix: Option<String>,
    pub name: Option<String>,
    /// Random bytes in the secret.
    pub byte_length: usize,
    pub external_id: Option<String>,
    pub meta: Option<Map<String, Value>>,
    pub expires: Option<i64>,
    pub enabled: bool,
    /// Initial balance; `None` = unlimited.
    pub remaining: Option<Credits>,
    pub refill: Option<Refill>,
    /// Rate limits (ids not assigned yet).
    pub ratelimits: Vec<RatelimitRule>,
    /// Balance thresholds, distinct, descending.
    pub credit_alerts: Vec<u64>,
}

/// `keys.updateKey`: `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone)]
pub struct UpdateKey {
    pub key_id: KeyId,
    pub name: Option<Option<String>>,
    pub external_id: Option<Option<String>>,
    pub meta: Option<Option<Map<String, Value>>>,
    pub expires: Option<Option<i64>>,
    pub enabled: Option<bool>,
    /// `Some(None)`: unlimited (which also drops the refill); `Some(Some(n))`: set to n.
    pub remaining: Option<Option<Credits>>,
    pub refill: Option<Option<Refill>>,
    /// Replaces the rate limits (ids not assigned yet).
    pub ratelimits: Option<Vec<RatelimitRule>>,
    /// Replaces the balance thresholds (distinct, descending).
    pub credit_alerts: Option<Vec<u64>>,
}

/// `keys.updateCredits`.
#[derive(Debug, Clone, Copy)]
pub struct UpdateCredits {
    pub op: CreditOp,
}

/// `apis.listKeys`.
#[derive(Debug, Clone)]
pub struct ListKeys {
    pub api_id: ApiId,
    pub limit: u32,
    pub cursor: Option<String>,
    pub external_id: Option<String>,
}
