//! Wire → command: each request type parses (`TryFrom`) into the service's command, so
//! every field rule exists once and a failure names the field and how to fix it. The
//! rules that `createKey` and `updateKey` share are [`key_fields`] and [`Checks::refill`].

use creditgate_analytics::{Granularity, UsageGroup};
use creditgate_domain::{
    ApiId, Cost, Credits, KeyId, RatelimitRule, Refill, RefillError, RefillInterval, WebhookEvent,
    MAX_ALERTS,
};
use creditgate_limiter::CreditOp;
use creditgate_service::{
    CreateIdentity, CreateKey, CreateWebhookEndpoint, FieldError, GetUsage, HistoryQuery,
    LimitRequest, ListIdentities, ListKeys, NamedLimit, Reserve, SetOverride, UpdateCredits,
    UpdateIdentity, UpdateKey, Verify, DEFAULT_HOLD_TTL_MS, MAX_HOLD_TTL_MS, MAX_LIMIT,
    MAX_USAGE_BUCKETS, MAX_USAGE_RANGE_MS, MAX_WEBHOOK_URL_LEN,
};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::wire::*;

/// The latest `expires` a key may have (2100-01-01).
pub const MAX_EXPIRES_MS: i64 = 4_102_444_800_000;

/// Collects field errors; `finish` turns them into one 400.
#[derive(Debug, Default)]
pub struct Checks(Vec<FieldError>);

impl Checks {
    pub fn push(&mut self, location: &str, message: impl Into<String>, fix: impl Into<String>) {
        self.0.push(FieldError::new(location, message).fix(fix));
    }

    pub fn len(&mut self, location: &str, value: &str, min: usize, max: usize) {
        let n = value.chars().count();
        if n < min || n > max {
            self.push(
                location,
                format!("must be {min} to {max} characters long, got {n}"),
                format!("send between {min} and {max} characters"),
            );
        }
    }

    pub fn charset(&mut self, location: &str, value: &str, allowed: &str, ok: fn(char) -> bool) {
        if !value.chars().all(ok) {
            self.push(
                location,
                format!("contains characters outside {allowed}"),
                format!("use only {allowed}"),
            );
        }
    }

    /// Only an absent or empty list is accepted for features creditgate does not have.
    pub fn unsupported_list(&mut self, location: &str, value: &Option<Vec<Value>>) {
        if value.as_ref().is_some_and(|v| !v.is_empty()) {
            self.push(
                location,
                "is not supported by creditgate",
                "omit the field or send an empty list",
            );
        }
    }

    /// `true` must not be sent: creditgate stores only hashes.
    fn hashes_only(&mut self, location: &str, value: Option<bool>, cannot: &str) {
        if value == Some(true) {
            self.push(
                location,
                format!("keys are stored only as hashes and cannot be {cannot}"),
                "omit it or send false",
            );
        }
    }

    pub fn credits(&mut self, location: &str, value: i64) -> Option<Credits> {
        match Credits::from_i64(value) {
            Ok(c) => Some(c),
            Err(e) => {
                self.push(
                    location,
                    format!("{e} (got {value})"),
                    format!("send an integer from 0 to {}", Credits::MAX),
                );
                None
            }
        }
    }

    /// A refill schedule's shape (whether the key has a balance to refill is the
    /// service's check).
    pub fn refill(&mut self, location: &str, wire: &RefillWire) -> Option<Refill> {
        let Some(interval) = RefillInterval::parse(&wire.interval) else {
            self.push(
                &format!("{location}.interval"),
                format!("must be 'daily' or 'monthly', got '{}'", wire.interval),
                "send 'daily' or 'monthly'",
            );
            return None;
        };
        let amount_loc = format!("{location}.amount");
        let amount = self.credits(&amount_loc, wire.amount)?;
        if amount.get() == 0 {
            self.push(&amount_loc, "must be at least 1", "send a positive amount");
            return None;
        }
        match Refill::new(interval, amount, wire.refill_day) {
            Ok(r) => Some(r),
            Err(e) => {
                let fix = match e {
                    RefillError::MissingRefillDay => "add refillDay (1-31) for monthly refills",
                    RefillError::RefillDayOutOfRange => "send a refillDay from 1 to 31",
                    RefillError::RefillDayOnDaily => "drop refillDay, or use interval 'monthly'",
                };
                self.push(&format!("{location}.refillDay"), e.to_string(), fix);
                None
            }
        }
    }

    /// Credits one request spends or holds: 0..=10^12.
    pub fn cost(&mut self, location: &str, raw: u64) -> Cost {
        Cost::new(raw).unwrap_or_else(|_| {
            self.push(
                location,
                format!("must be at most {}, got {raw}", Cost::MAX),
                format!("send a number from 0 to {}", Cost::MAX),
            );
            Cost::DEFAULT
        })
    }

    fn hold_id(&mut self, value: &str) {
        let body = value.strip_prefix("hold_").unwrap_or("");
        if body.is_empty() || value.len() > 64 || !body.chars().all(|c| c.is_ascii_alphanumeric()) {
            self.push(
                "body.holdId",
                "must be a hold id: 'hold_' then letters and digits, at most 64 characters",
                "send the holdId returned by keys.reserveCredits",
            );
        }
    }

    /// A key id as `keys.createKey` returned it.
    fn key_id(&mut self, value: &str) -> KeyId {
        if value.chars().count() < 3 {
            self.push(
                "body.keyId",
                "must be at least 3 characters",
                "send the keyId returned by keys.createKey",
            );
        }
        KeyId::from(value)
    }

    /// `Ok(value)` when no check failed, else one 400 naming every invalid field.
    pub fn finish<T>(self, value: T) -> Result<T, ApiError> {
        if self.0.is_empty() {
            return Ok(value);
        }
        Err(ApiError::invalid(self.0))
    }
}

/// Fields of a key that `createKey` sets and `updateKey` changes: one set of rules.
struct KeyFields<'a> {
    name: Option<&'a str>,
    external_id: Option<&'a str>,
    meta: Option<&'a Map<String, Value>>,
    expires: Option<i64>,
    roles: &'a Option<Vec<Value>>,
    permissions: &'a Option<Vec<Value>>,
}

impl Checks {
    /// An external id: 1..=255 characters of `[a-zA-Z0-9_.-]`.
    fn external_id(&mut self, value: &str) {
        self.len("body.externalId", value, 1, 255);
        self.charset(
            "body.externalId",
            value,
            "letters, digits, '_', '.' and '-'",
            is_external_id_char,
        );
    }

    /// A `meta` object: at most 100 properties.
    fn meta(&mut self, value: Option<&Map<String, Value>>) {
        if value.is_some_and(|m| m.len() > 100) {
            self.push(
                "body.meta",
                "has more than 100 properties",
                "send at most 100 properties",
            );
        }
    }

    /// A page size: 1..=100, default 100.
    fn limit(&mut self, value: Option<u32>) -> u32 {
        let limit = value.unwrap_or(100);
        if !(1..=100).contains(&limit) {
            self.push(
                "body.limit",
                format!("must be 1 to 100, got {limit}"),
                "send a limit from 1 to 100",
            );
        }
        limit
    }
}

fn key_fields(c: &mut Checks, f: KeyFields<'_>) {
    if let Some(n) = f.name {
        c.len("body.name", n, 1, 200);
    }
    if let Some(e) = f.external_id {
        c.external_id(e);
    }
    c.meta(f.meta);
    if let Some(x) = f.expires {
        if !(0..=MAX_EXPIRES_MS).contains(&x) {
            c.push(
                "body.expires",
                format!("must be a Unix time in milliseconds up to {MAX_EXPIRES_MS}"),
                "send milliseconds since 1970",
            );
        }
    }
    c.unsupported_list("body.roles", f.roles);
    c.unsupported_list("body.permissions", f.permissions);
}

/// Rate limits on one key or identity.
pub const MAX_RATELIMITS: usize = 50;

/// A key or an identity has one rate limit per name: a list naming one twice conflicts
/// with itself (`409`, as JSON Schema cannot say "unique by name").
fn unique_names(rules: &[RatelimitRule]) -> Result<(), ApiError> {
    for (i, r) in rules.iter().enumerate() {
        if rules[..i].iter().any(|earlier| earlier.name == r.name) {
            return Err(ApiError::Conflict(format!(
                "body.ratelimits[{i}].name: '{}' is named a second time, and a key or an \
                 identity has one rate limit per name; nothing was changed: send each name once",
                r.name
            )));
        }
    }
    Ok(())
}

impl Checks {
    /// A rate limit's name: 1..=128 characters of `[a-zA-Z0-9_.:/-]`.
    fn limit_name(&mut self, location: &str, name: &str) {
        self.len(location, name, 1, 128);
        self.charset(
            location,
            name,
            "letters, digits, '_', '.', ':', '/' and '-'",
            is_limit_name_char,
        );
    }

    /// An integer in `min..=max`, or a complaint naming `location` (and `min`).
    fn bounded(&mut self, location: &str, value: i64, min: i64, max: i64) -> u64 {
        if (min..=max).contains(&value) {
            return u64::try_from(value).unwrap_or(0);
        }
        self.push(
            location,
            format!("must be {min} to {max}, got {value}"),
            format!("send an integer from {min} to {max}"),
        );
        0
    }

    /// Balance thresholds at `location`: at most [`MAX_ALERTS`], each 1..=2^53 - 1,
    /// distinct; descending.
    fn alerts(&mut self, location: &str, list: &[AlertWire]) -> Vec<u64> {
        if list.len() > MAX_ALERTS {
            self.push(
                location,
                format!(
                    "has {} thresholds, at most {MAX_ALERTS} are allowed",
                    list.len()
                ),
                format!("send at most {MAX_ALERTS}"),
            );
        }
        let max = i64::try_from(Credits::MAX).unwrap_or(i64::MAX);
        let mut out: Vec<u64> = Vec::with_capacity(list.len());
        for (i, a) in list.iter().enumerate() {
            let at = format!("{location}[{i}].threshold");
            let t = self.bounded(&at, a.threshold, 1, max);
            if t > 0 && out.contains(&t) {
                self.push(
                    &at,
                    format!("repeats the threshold {t}"),
                    "send each threshold once",
                );
            }
            out.push(t);
        }
        out.sort_unstable_by(|a, b| b.cmp(a));
        out.dedup();
        out
    }

    /// At most [`MAX_RATELIMITS`] entries.
    fn limit_count(&mut self, len: usize) {
        if len > MAX_RATELIMITS {
            self.push(
                "body.ratelimits",
                format!("has {len} rate limits, at most {MAX_RATELIMITS} are allowed"),
                format!("send at most {MAX_RATELIMITS}"),
            );
        }
    }

    /// The rate limits to set on a key or an identity (ids assigned by the service).
    fn ratelimit_rules(&mut self, list: Option<Vec<RatelimitWire>>) -> Option<Vec<RatelimitRule>> {
        let list = list?;
        self.limit_count(list.len());
        let max = i64::try_from(MAX_LIMIT).unwrap_or(i64::MAX);
        let rules = list
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let at = format!("body.ratelimits[{i}]");
                self.limit_name(&format!("{at}.name"), &r.name);
                RatelimitRule {
                    id: String::new(),
                    limit: self.bounded(&format!("{at}.limit"), r.limit, 1, max),
                    duration_ms: self.bounded(
                        &format!("{at}.duration"),
                        r.duration,
                        MIN_LIMIT_DURATION_MS,
                        MAX_LIMIT_DURATION_MS,
                    ),
                    name: r.name,
                    auto_apply: r.auto_apply,
                }
            })
            .collect();
        Some(rules)
    }

    /// The rate limits a verification names.
    fn named_limits(&mut self, list: Option<Vec<VerifyRatelimitWire>>) -> Vec<NamedLimit> {
        let list = list.unwrap_or_default();
        self.limit_count(list.len());
        let max = i64::try_from(MAX_LIMIT).unwrap_or(i64::MAX);
        list.into_iter()
            .enumerate()
            .map(|(i, r)| {
                let at = format!("body.ratelimits[{i}]");
                self.limit_name(&format!("{at}.name"), &r.name);
                NamedLimit {
                    cost: self.bounded(&format!("{at}.cost"), r.cost.unwrap_or(1), 0, max),
                    limit: r
                        .limit
                        .map(|l| self.bounded(&format!("{at}.limit"), l, 0, max)),
                    duration_ms: r.duration.map(|d| {
                        self.bounded(
                            &format!("{at}.duration"),
                            d,
                            MIN_LIMIT_DURATION_MS,
                            MAX_LIMIT_DURATION_MS,
                        )
                    }),
                    name: r.name,
                }
            })
            .collect()
    }
}

impl TryFrom<VerifyKeyRequest> for Verify {
    type Error = ApiError;

    fn try_from(req: VerifyKeyRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        c.len("body.key", &req.key, 1, 512);
        let raw = req.credits.as_ref().map_or(Cost::DEFAULT.get(), |c| c.cost);
        let cost = c.cost("body.credits.cost", raw);
        let tags = req.tags.unwrap_or_default();
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
        if req.permissions.as_deref().is_some_and(|p| !p.is_empty()) {
            c.push(
                "body.permissions",
                "permission queries are not supported by creditgate",
                "omit permissions",
            );
        }
        let ratelimits = c.named_limits(req.ratelimits);
        if req.migration_id.is_some() {
            c.push(
                "body.migrationId",
                "key migrations are not supported by creditgate",
                "omit migrationId",
            );
        }
        c.finish(Verify {
            secret: req.key,
            cost,
            tags,
            ratelimits,
        })
    }
}

impl TryFrom<CreateKeyRequest> for CreateKey {
    type Error = ApiError;

    fn try_from(req: CreateKeyRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        c.len("body.apiId", &req.api_id, 3, 255);
        if let Some(p) = &req.prefix {
            c.len("body.prefix", p, 1, 16);
            c.charset("body.prefix", p, "letters, digits and '_'", is_id_char);
        }
        let byte_length = req.byte_length.unwrap_or(16);
        let byte_length = match usize::try_from(byte_length) {
            Ok(n) if (16..=255).contains(&n) => n,
            _ => {
                c.push(
                    "body.byteLength",
                    format!("must be 16 to 255, got {byte_length}"),
                    "send a byteLength from 16 to 255",
                );
                16
            }
        };
        key_fields(
            &mut c,
            KeyFields {
                name: req.name.as_deref(),
                external_id: req.external_id.as_deref(),
                meta: req.meta.as_ref(),
                expires: req.expires,
                roles: &req.roles,
                permissions: &req.permissions,
            },
        );
        let ratelimits = c.ratelimit_rules(req.ratelimits).unwrap_or_default();
        unique_names(&ratelimits)?;
        c.hashes_only("body.recoverable", req.recoverable, "recoverable");
        let (remaining, refill, credit_alerts) = match &req.credits {
            None => (None, None, Vec::new()),
            Some(cw) => {
                let remaining = match cw.remaining {
                    Some(Some(v)) => c.credits("body.credits.remaining", v),
                    _ => None,
                };
                let refill = cw
                    .refill
                    .as_ref()
                    .and_then(|r| c.refill("body.credits.refill", r));
                let alerts = cw
                    .alerts
                    .as_deref()
                    .map(|a| c.alerts("body.credits.alerts", a))
                    .unwrap_or_default();
                (remaining, refill, alerts)
            }
        };
        c.finish(CreateKey {
            api_id: ApiId::from(req.api_id),
            prefix: req.prefix,
            name: req.name,
            byte_length,
            external_id: req.external_id,
            meta: req.meta,
            expires: req.expires,
            enabled: req.enabled.unwrap_or(true),
            remaining,
            refill,
            ratelimits,
            credit_alerts,
        })
    }
}

impl TryFrom<UpdateKeyRequest> for UpdateKey {
    type Error = ApiError;

    fn try_from(req: UpdateKeyRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        let key_id = c.key_id(&req.key_id);
        key_fields(
            &mut c,
            KeyFields {
                name: req.name.as_ref().and_then(Option::as_deref),
                external_id: req.external_id.as_ref().and_then(Option::as_deref),
                meta: req.meta.as_ref().and_then(Option::as_ref),
                expires: req.expires.flatten(),
                roles: &req.roles,
                permissions: &req.permissions,
            },
        );
        let ratelimits = c.ratelimit_rules(req.ratelimits);
        unique_names(ratelimits.as_deref().unwrap_or_default())?;
        // Credits: the balance (through the engine) and the refill (in the store).
        let credit_alerts = req
            .credits
            .as_ref()
            .and_then(Option::as_ref)
            .and_then(|cw| cw.alerts.as_deref())
            .map(|a| c.alerts("body.credits.alerts", a));
        let (remaining, refill) = match &req.credits {
            None => (None, None),
            // `credits: null`: unlimited, no refill.
            Some(None) => (Some(None), Some(None)),
            Some(Some(cw)) => {
                let remaining = match cw.remaining {
                    None => None,
                    Some(None) => Some(None),
                    Some(Some(v)) => c.credits("body.credits.remaining", v).map(Some),
                };
                let refill = match &cw.refill {
                    None => None,
                    Some(None) => Some(None),
                    Some(Some(r)) => c.refill("body.credits.refill", r).map(Some),
                };
                (remaining, refill)
            }
        };
        c.finish(UpdateKey {
            key_id,
            name: req.name,
            external_id: req.external_id,
            meta: req.meta,
            expires: req.expires,
            enabled: req.enabled,
            remaining,
            refill,
            ratelimits,
            credit_alerts,
        })
    }
}

impl TryFrom<UpdateCreditsRequest> for (KeyId, UpdateCredits) {
    type Error = ApiError;

    fn try_from(req: UpdateCreditsRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        let key_id = c.key_id(&req.key_id);
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
                value.map(|v| match req.operation.as_str() {
                    "increment" => CreditOp::Increment(v),
                    _ => CreditOp::Decrement(v),
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
        // `op` is `None` only when a check above failed.
        let op = op.unwrap_or(CreditOp::Set(None));
        c.finish((key_id, UpdateCredits { op }))
    }
}

/// `identities.updateCredits`: the identity and the operation on its pool.
pub fn parse_identity_credits(
    req: &UpdateIdentityCreditsRequest,
) -> Result<(&str, CreditOp), ApiError> {
    let mut c = Checks::default();
    c.len("body.identity", &req.identity, 1, 255);
    let value = c.credits("body.value", req.value);
    let op = value.and_then(|v| match req.operation.as_str() {
        "set" => Some(CreditOp::Set(Some(v))),
        "increment" => Some(CreditOp::Increment(v)),
        "decrement" => Some(CreditOp::Decrement(v)),
        _ => None,
    });
    if !matches!(req.operation.as_str(), "set" | "increment" | "decrement") {
        c.push(
            "body.operation",
            format!(
                "must be set, increment or decrement, got '{}'",
                req.operation
            ),
            "send 'set', 'increment' or 'decrement'",
        );
    }
    // `op` is `None` only when a check above failed.
    c.finish((req.identity.as_str(), op.unwrap_or(CreditOp::Set(None))))
}

impl TryFrom<ListKeysRequest> for ListKeys {
    type Error = ApiError;

    fn try_from(req: ListKeysRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        api_id(&mut c, &req.api_id);
        let limit = c.limit(req.limit);
        c.hashes_only("body.decrypt", req.decrypt, "decrypted");
        if let Some(e) = &req.external_id {
            c.len("body.externalId", e, 1, 255);
        }
        c.finish(ListKeys {
            api_id: ApiId::from(req.api_id),
            limit,
            cursor: req.cursor,
            external_id: req.external_id,
        })
    }
}

impl TryFrom<CreateIdentityRequest> for CreateIdentity {
    type Error = ApiError;

    fn try_from(req: CreateIdentityRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        c.external_id(&req.external_id);
        c.meta(req.meta.as_ref());
        let ratelimits = c.ratelimit_rules(req.ratelimits).unwrap_or_default();
        unique_names(&ratelimits)?;
        let credits = req.credits.as_ref().and_then(|p| {
            let remaining = c.credits("body.credits.remaining", p.remaining);
            let refill = p
                .refill
                .as_ref()
                .and_then(|r| c.refill("body.credits.refill", r));
            let alerts = p
                .alerts
                .as_deref()
                .map(|a| c.alerts("body.credits.alerts", a))
                .unwrap_or_default();
            remaining.map(|r| (r, refill, alerts))
        });
        c.finish(CreateIdentity {
            external_id: req.external_id,
            meta: req.meta,
            ratelimits,
            credits,
        })
    }
}

impl TryFrom<ListIdentitiesRequest> for ListIdentities {
    type Error = ApiError;

    fn try_from(req: ListIdentitiesRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        let limit = c.limit(req.limit);
        c.finish(ListIdentities {
            limit,
            cursor: req.cursor,
        })
    }
}

/// The `identity` of a request: an identity id or an external id.
pub fn parse_identity(value: &str) -> Result<&str, ApiError> {
    let mut c = Checks::default();
    c.len("body.identity", value, 1, 255);
    c.finish(value)
}

impl TryFrom<UpdateIdentityRequest> for UpdateIdentity {
    type Error = ApiError;

    fn try_from(req: UpdateIdentityRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        c.len("body.identity", &req.identity, 1, 255);
        c.meta(req.meta.as_ref().and_then(Option::as_ref));
        let ratelimits = c.ratelimit_rules(req.ratelimits);
        unique_names(ratelimits.as_deref().unwrap_or_default())?;
        let credit_alerts = req
            .credits
            .as_ref()
            .map(|p| c.alerts("body.credits.alerts", &p.alerts));
        c.finish(UpdateIdentity {
            identity: req.identity,
            meta: req.meta,
            ratelimits,
            credit_alerts,
        })
    }
}

/// The window of a rate limit: 1 s to 30 days.
pub const MIN_LIMIT_DURATION_MS: i64 = 1_000;
pub const MAX_LIMIT_DURATION_MS: i64 = 2_592_000_000;
/// Checks in one `ratelimit.multiLimit`.
pub const MAX_LIMITS_PER_CALL: usize = 100;

pub fn is_limit_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '/' | '-')
}

/// One check; `at` is where it is in the body (`body` or `body[i]`).
fn limit_request(c: &mut Checks, at: &str, req: RatelimitLimitRequest) -> LimitRequest {
    let location = format!("{at}.namespace");
    c.len(&location, &req.namespace, 1, 255);
    c.charset(
        &location,
        &req.namespace,
        "letters, digits, '_', '.', ':', '/' and '-'",
        is_limit_name_char,
    );
    let location = format!("{at}.identifier");
    c.len(&location, &req.identifier, 1, 255);
    c.charset(
        &location,
        &req.identifier,
        "characters other than control characters",
        is_identifier_char,
    );
    let max = i64::try_from(MAX_LIMIT).unwrap_or(i64::MAX);
    let limit = c.bounded(&format!("{at}.limit"), req.limit, 1, max);
    let duration_ms = c.bounded(
        &format!("{at}.duration"),
        req.duration,
        MIN_LIMIT_DURATION_MS,
        MAX_LIMIT_DURATION_MS,
    );
    let cost = c.bounded(&format!("{at}.cost"), req.cost.unwrap_or(1), 0, max);
    LimitRequest {
        namespace: req.namespace,
        identifier: req.identifier,
        limit,
        duration_ms,
        cost,
    }
}

/// A limit identifier: 1..=255 characters, none a control character; with `*` a
/// pattern in overrides.
pub fn is_identifier_char(c: char) -> bool {
    !c.is_control()
}

impl TryFrom<SetOverrideRequest> for SetOverride {
    type Error = ApiError;

    fn try_from(req: SetOverrideRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        override_target(&mut c, &req.namespace, &req.identifier);
        let max = i64::try_from(MAX_LIMIT).unwrap_or(i64::MAX);
        let limit = c.bounded("body.limit", req.limit, 0, max);
        let duration_ms = c.bounded(
            "body.duration",
            req.duration,
            MIN_LIMIT_DURATION_MS,
            MAX_LIMIT_DURATION_MS,
        );
        c.finish(SetOverride {
            namespace: req.namespace,
            identifier: req.identifier,
            limit,
            duration_ms,
        })
    }
}

/// A namespace and an identifier (or pattern) of an override.
fn override_target(c: &mut Checks, namespace: &str, identifier: &str) {
    c.len("body.namespace", namespace, 1, 255);
    c.charset(
        "body.namespace",
        namespace,
        "letters, digits, '_', '.', ':', '/' and '-'",
        is_limit_name_char,
    );
    c.len("body.identifier", identifier, 1, 255);
    c.charset(
        "body.identifier",
        identifier,
        "characters other than control characters",
        is_identifier_char,
    );
}

/// `getOverride` / `deleteOverride`.
pub fn parse_override(req: &OverrideRequest) -> Result<(&str, &str), ApiError> {
    let mut c = Checks::default();
    override_target(&mut c, &req.namespace, &req.identifier);
    c.finish((req.namespace.as_str(), req.identifier.as_str()))
}

/// `listOverrides`: the page size (1..=100, default 10).
pub fn parse_list_overrides(req: &ListOverridesRequest) -> Result<u32, ApiError> {
    let mut c = Checks::default();
    c.len("body.namespace", &req.namespace, 1, 255);
    let limit = c.limit(Some(req.limit.unwrap_or(10)));
    c.finish(limit)
}

/// The longest grace period of a rerolled key's old secret: a year.
pub const MAX_REROLL_GRACE_MS: i64 = 31_536_000_000;

/// `keys.rerollKey`: the key and the old secret's grace period.
pub fn parse_reroll(req: &RerollKeyRequest) -> Result<(KeyId, u64), ApiError> {
    let mut c = Checks::default();
    let key_id = c.key_id(&req.key_id);
    let grace = c.bounded("body.expiration", req.expiration, 0, MAX_REROLL_GRACE_MS);
    c.finish((key_id, grace))
}

/// Keys in one `keys.migrateKeys`.
pub const MAX_MIGRATE_KEYS: usize = 100;

/// A SHA-256 in hexadecimal or base64 (either alphabet, padded or not), as the
/// lowercase hex the key store keeps.
pub fn sha256_hex(value: &str) -> Option<String> {
    if value.len() == 64 && value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Some(value.to_ascii_lowercase());
    }
    let trimmed = value.trim_end_matches('=');
    if trimmed.len() != 43 || value.len() > 44 {
        return None;
    }
    let mut bits: u32 = 0;
    let mut nbits = 0;
    let mut bytes = Vec::with_capacity(32);
    for b in trimmed.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        bits = (bits << 6) | u32::from(v);
        nbits += 6;
        if nbits >= 8 {
            nbits -= 8;
            bytes.push(u8::try_from((bits >> nbits) & 0xff).ok()?);
        }
    }
    // 43 characters carry 258 bits: 32 bytes, and 2 left-over bits (ignored, as
    // lenient base64 decoders do).
    if bytes.len() != 32 {
        return None;
    }
    Some(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// `keys.migrateKeys`: the API and each key's hash (as sent, and as the store keeps
/// it) and settings; field errors name the key (`body.keys[i].…`). A hash sent twice
/// is created once; the second fails as a key that exists.
#[allow(clippy::type_complexity)]
pub fn parse_migrate(
    req: MigrateKeysRequest,
) -> Result<(ApiId, Vec<(String, String, CreateKey)>), ApiError> {
    let mut c = Checks::default();
    c.len("body.migrationId", &req.migration_id, 1, 255);
    c.len("body.apiId", &req.api_id, 3, 255);
    if req.keys.is_empty() || req.keys.len() > MAX_MIGRATE_KEYS {
        c.push(
            "body.keys",
            format!(
                "must hold 1 to {MAX_MIGRATE_KEYS} keys, got {}",
                req.keys.len()
            ),
            format!("send between 1 and {MAX_MIGRATE_KEYS} keys per call"),
        );
    }
    let mut keys = Vec::with_capacity(req.keys.len());
    for (i, k) in req.keys.into_iter().enumerate() {
        let at = format!("body.keys[{i}]");
        let hash = match sha256_hex(&k.hash) {
            Some(h) => h,
            None => {
                c.push(
                    &format!("{at}.hash"),
                    "is not a SHA-256: 64 hexadecimal digits or 43/44 base64 characters",
                    "send the SHA-256 of the key's secret",
                );
                String::new()
            }
        };
        let as_create = CreateKeyRequest {
            api_id: req.api_id.clone(),
            prefix: None,
            name: k.name,
            byte_length: None,
            external_id: k.external_id,
            meta: k.meta,
            expires: k.expires,
            enabled: k.enabled,
            credits: k.credits,
            recoverable: None,
            roles: k.roles,
            permissions: k.permissions,
            ratelimits: k.ratelimits,
        };
        match CreateKey::try_from(as_create) {
            Ok(cmd) => keys.push((k.hash, hash, cmd)),
            Err(ApiError::BadRequest { errors, .. }) => {
                for mut e in errors {
                    e.location = e.location.replacen("body.", &format!("{at}."), 1);
                    c.0.push(e);
                }
            }
            Err(ApiError::Conflict(detail)) => {
                return Err(ApiError::Conflict(detail.replacen(
                    "body.",
                    &format!("{at}."),
                    1,
                )))
            }
            Err(other) => return Err(other),
        }
    }
    c.finish((ApiId::from(req.api_id), keys))
}

/// `ratelimit.limit`.
pub fn parse_limit(req: RatelimitLimitRequest) -> Result<LimitRequest, ApiError> {
    let mut c = Checks::default();
    let parsed = limit_request(&mut c, "body", req);
    c.finish(parsed)
}

/// `ratelimit.multiLimit`: 1..=100 checks.
pub fn parse_multi_limit(reqs: Vec<RatelimitLimitRequest>) -> Result<Vec<LimitRequest>, ApiError> {
    let mut c = Checks::default();
    if reqs.is_empty() || reqs.len() > MAX_LIMITS_PER_CALL {
        c.push(
            "body",
            format!(
                "must hold 1 to {MAX_LIMITS_PER_CALL} checks, got {}",
                reqs.len()
            ),
            format!("send between 1 and {MAX_LIMITS_PER_CALL} checks"),
        );
    }
    let parsed: Vec<LimitRequest> = reqs
        .into_iter()
        .enumerate()
        .map(|(i, r)| limit_request(&mut c, &format!("body[{i}]"), r))
        .collect();
    c.finish(parsed)
}

fn api_id(c: &mut Checks, value: &str) {
    if value.is_empty() {
        c.push(
            "body.apiId",
            "must not be empty",
            "send the id returned by apis.createApi",
        );
    }
}

/// `apis.getApi` / `apis.deleteApi`.
pub fn parse_api_id(req: ApiIdRequest) -> Result<ApiId, ApiError> {
    let mut c = Checks::default();
    api_id(&mut c, &req.api_id);
    c.finish(ApiId::from(req.api_id))
}

/// `apis.createApi`: the API's name.
pub fn parse_api_name(req: CreateApiRequest) -> Result<String, ApiError> {
    let mut c = Checks::default();
    c.len("body.name", &req.name, 3, 255);
    let well_formed = req.name.starts_with(|ch: char| ch.is_ascii_alphabetic())
        && req
            .name
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '.' | '_' | '-'));
    if !well_formed {
        c.push(
            "body.name",
            "must start with a letter and contain only letters, digits, '.', '_' or '-'",
            "for example: my-api",
        );
    }
    c.finish(req.name)
}

/// `keys.getKey` / `keys.deleteKey`: the key id.
pub fn parse_key_id(key_id: &str, decrypt: Option<bool>) -> Result<KeyId, ApiError> {
    let mut c = Checks::default();
    c.hashes_only("body.decrypt", decrypt, "decrypted");
    let id = c.key_id(key_id);
    c.finish(id)
}

impl TryFrom<ReserveCreditsRequest> for Reserve {
    type Error = ApiError;

    fn try_from(req: ReserveCreditsRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        c.len("body.key", &req.key, 1, 512);
        let amount = c.cost("body.amount", req.amount);
        let ttl = req.ttl_ms.unwrap_or(DEFAULT_HOLD_TTL_MS.unsigned_abs());
        let ttl_ms = match i64::try_from(ttl) {
            Ok(t) if (1..=MAX_HOLD_TTL_MS).contains(&t) => t,
            _ => {
                c.push(
                    "body.ttlMs",
                    format!("must be from 1 to {MAX_HOLD_TTL_MS} (24 h), got {ttl}"),
                    format!("send a ttlMs from 1 to {MAX_HOLD_TTL_MS}, or omit it for 60000"),
                );
                DEFAULT_HOLD_TTL_MS
            }
        };
        c.finish(Reserve {
            secret: req.key,
            amount,
            ttl_ms,
        })
    }
}

/// A hold id as `keys.reserveCredits` returned it.
pub fn parse_hold_id(hold_id: &str) -> Result<String, ApiError> {
    let mut c = Checks::default();
    c.hold_id(hold_id);
    c.finish(hold_id.to_owned())
}

/// `keys.settleCredits`: the hold and the cost.
pub fn parse_settle(req: &SettleCreditsRequest) -> Result<(String, Cost), ApiError> {
    let mut c = Checks::default();
    c.hold_id(&req.hold_id);
    let cost = c.cost("body.cost", req.cost);
    c.finish((req.hold_id.clone(), cost))
}

/// `keys.whoami`: the secret.
pub fn parse_secret(key: String) -> Result<String, ApiError> {
    let mut c = Checks::default();
    c.len("body.key", &key, 1, 512);
    c.finish(key)
}

pub fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

pub fn is_external_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')
}

pub fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '=' | '/' | '.' | ':' | '-')
}

pub fn refill_wire(r: &Refill) -> RefillWire {
    RefillWire {
        interval: r.interval.as_str().to_owned(),
        amount: r.amount.as_i64(),
        refill_day: r.refill_day.map(i64::from),
    }
}

impl TryFrom<GetUsageRequest> for GetUsage {
    type Error = ApiError;

    fn try_from(req: GetUsageRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        if let Some(a) = &req.api_id {
            api_id(&mut c, a);
        }
        let key_id = req.key_id.as_deref().map(|k| c.key_id(k));
        if let Some(e) = &req.external_id {
            c.len("body.externalId", e, 1, 255);
        }
        let granularity = Granularity::parse(&req.granularity);
        if granularity.is_none() {
            c.push(
                "body.granularity",
                format!("must be minute, hour or day, got {:?}", req.granularity),
                "send minute, hour or day",
            );
        }
        let group_by = match req.group_by.as_deref() {
            None => None,
            Some(g) => {
                let parsed = UsageGroup::parse(g);
                if parsed.is_none() {
                    c.push(
                        "body.groupBy",
                        format!("must be outcome, keyId or tag, got {g:?}"),
                        "send outcome, keyId or tag, or omit it",
                    );
                }
                parsed
            }
        };
        for (location, value, min) in [("body.from", req.from, 0), ("body.to", req.to, 1)] {
            if !(min..=MAX_EXPIRES_MS).contains(&value) {
                c.push(
                    location,
                    format!(
                        "must be a Unix time in ms from {min} to {MAX_EXPIRES_MS}, got {value}"
                    ),
                    "send a time in Unix milliseconds",
                );
            }
        }
        let query = c.finish(GetUsage {
            api_id: req.api_id.map(ApiId::from),
            key_id,
            external_id: req.external_id,
            from_ms: req.from,
            to_ms: req.to,
            granularity: granularity.unwrap_or(Granularity::Day),
            group_by,
        })?;
        usage_range(&query)?;
        Ok(query)
    }
}

/// The range a usage query spans, once each field is valid: after its start, at most
/// 400 days, at most 1,440 buckets. A 422 (not 400): no one field is wrong, the document
/// cannot state the rule, and the fix may be in either.
fn usage_range(q: &GetUsage) -> Result<(), ApiError> {
    let (location, message, fix) = if q.to_ms <= q.from_ms {
        (
            "body.to",
            format!("must be after body.from ({}), got {}", q.from_ms, q.to_ms),
            "send the end of the range (exclusive), later than body.from".to_owned(),
        )
    } else if q.to_ms - q.from_ms > MAX_USAGE_RANGE_MS {
        (
            "body.to",
            format!(
                "the range spans more than {} days",
                MAX_USAGE_RANGE_MS / 86_400_000
            ),
            "query a shorter range, in several requests if needed".to_owned(),
        )
    } else {
        let g = q.granularity;
        let width = g.millis();
        let buckets = (g.bucket_of(q.to_ms - 1) - g.bucket_of(q.from_ms)) / width + 1;
        if buckets <= i64::try_from(MAX_USAGE_BUCKETS).unwrap_or(i64::MAX) {
            return Ok(());
        }
        (
            "body.granularity",
            format!(
                "the range holds {buckets} buckets of a {}, more than {MAX_USAGE_BUCKETS}",
                g.as_str()
            ),
            "choose a coarser granularity or a shorter range".to_owned(),
        )
    };
    Err(ApiError::unprocessable(vec![FieldError::new(
        location, message,
    )
    .fix(fix)]))
}

/// Longest webhook endpoint description.
pub const MAX_WEBHOOK_DESCRIPTION_CHARS: usize = 1_000;

impl TryFrom<CreateWebhookEndpointRequest> for CreateWebhookEndpoint {
    type Error = ApiError;

    fn try_from(req: CreateWebhookEndpointRequest) -> Result<Self, ApiError> {
        let mut c = Checks::default();
        c.len("body.url", &req.url, 1, MAX_WEBHOOK_URL_LEN);
        if req.events.is_empty() || req.events.len() > WebhookEvent::ALL.len() {
            c.push(
                "body.events",
                format!(
                    "must list 1 to {} events, got {}",
                    WebhookEvent::ALL.len(),
                    req.events.len()
                ),
                "send the events to receive, e.g. [\"credits.low\"]",
            );
        }
        let mut events = Vec::new();
        for (i, name) in req.events.iter().enumerate() {
            match WebhookEvent::parse(name) {
                Some(e) => events.push(e),
                None => c.push(
                    &format!("body.events[{i}]"),
                    format!("is not an event: {name:?}"),
                    "send credits.low, credits.exhausted, credits.refilled or hold.expired",
                ),
            }
        }
        if let Some(d) = &req.description {
            c.len("body.description", d, 0, MAX_WEBHOOK_DESCRIPTION_CHARS);
        }
        c.finish(CreateWebhookEndpoint {
            url: req.url,
            events,
            description: req.description,
        })
    }
}

/// `webhooks.listEndpoints`: (limit, cursor).
pub fn parse_list_webhooks(
    req: ListWebhookEndpointsRequest,
) -> Result<(u32, Option<String>), ApiError> {
    let mut c = Checks::default();
    let limit = c.limit(req.limit);
    c.finish((limit, req.cursor))
}

/// `webhooks.deleteEndpoint`.
pub fn parse_webhook_endpoint_id(req: WebhookEndpointIdRequest) -> Result<String, ApiError> {
    let mut c = Checks::default();
    c.len("body.endpointId", &req.endpoint_id, 1, 64);
    c.finish(req.endpoint_id)
}

/// `webhooks.listDeliveries`: (endpoint id, limit, cursor).
pub fn parse_list_deliveries(
    req: ListWebhookDeliveriesRequest,
) -> Result<(String, u32, Option<String>), ApiError> {
    let mut c = Checks::default();
    c.len("body.endpointId", &req.endpoint_id, 1, 64);
    let limit = c.limit(req.limit);
    c.finish((req.endpoint_id, limit, req.cursor))
}

impl Checks {
    /// A credit history page: the cursor a previous page answered (a seq, 1 to 18 digits
    /// without a leading zero) and a limit.
    fn history_query(&mut self, cursor: Option<&str>, limit: Option<u32>) -> HistoryQuery {
        let before = cursor.and_then(|c| {
            let well_formed = (1..=18).contains(&c.len())
                && !c.starts_with('0')
                && c.bytes().all(|b| b.is_ascii_digit());
            let parsed = well_formed.then(|| c.parse::<u64>().ok()).flatten();
            if parsed.is_none() {
                self.push(
                    "body.cursor",
                    "must be the pagination.cursor a previous page answered",
                    "send pagination.cursor as it came, or omit it for the newest entries",
                );
            }
            parsed
        });
        HistoryQuery {
            before,
            limit: self.limit(limit),
        }
    }
}

/// `keys.getCreditHistory`: the key id and the page.
pub fn parse_credit_history(
    req: &GetCreditHistoryRequest,
) -> Result<(KeyId, HistoryQuery), ApiError> {
    let mut c = Checks::default();
    let id = c.key_id(&req.key_id);
    let query = c.history_query(req.cursor.as_deref(), req.limit);
    c.finish((id, query))
}

/// `identities.getCreditHistory`: the identity (id or external id) and the page.
pub fn parse_identity_credit_history(
    req: &GetIdentityCreditHistoryRequest,
) -> Result<(&str, HistoryQuery), ApiError> {
    let mut c = Checks::default();
    c.len("body.identity", &req.identity, 1, 255);
    let query = c.history_query(req.cursor.as_deref(), req.limit);
    c.finish((req.identity.as_str(), query))
}
