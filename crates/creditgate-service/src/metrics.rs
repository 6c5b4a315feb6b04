//! Metric names of the service (the engine's are in `creditgate_limiter::metrics`, the
//! HTTP layer's in the server's telemetry).

pub const VERIFICATIONS: &str = "creditgate_verifications_total";
pub const VERIFY_SECONDS: &str = "creditgate_verification_duration_seconds";
pub const FAIL_OPEN: &str = "creditgate_verifications_fail_open_total";
/// `credits.low` and `credits.exhausted` events written to the outbox.
pub const ALERT_EVENTS: &str = "creditgate_alert_events_total";
/// Crossings whose outbox write failed (logged; the verification was answered).
pub const ALERT_FAILURES: &str = "creditgate_alert_failures_total";

use std::collections::HashMap;
use std::sync::{OnceLock, RwLock};

use creditgate_domain::Outcome;
use metrics::{Counter, Histogram};

/// The verification counter of `outcome`, looked up in the recorder once per outcome
/// rather than once per verification.
pub fn verifications(outcome: Outcome) -> Counter {
    static CACHE: OnceLock<RwLock<HashMap<Outcome, Counter>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(c) = cache
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .get(&outcome)
    {
        return c.clone();
    }
    let c = metrics::counter!(VERIFICATIONS, "outcome" => outcome.as_str());
    cache
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .entry(outcome)
        .or_insert(c)
        .clone()
}

/// The verification duration histogram (one handle for the process).
pub fn verify_seconds() -> Histogram {
    static HANDLE: OnceLock<Histogram> = OnceLock::new();
    HANDLE
        .get_or_init(|| metrics::histogram!(VERIFY_SECONDS))
        .clone()
}
