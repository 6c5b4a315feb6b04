//! Names of the engine's Prometheus metrics, in one place.

pub const ALLOCATIONS: &str = "creditgate_engine_allocations_total";
pub const EVACUATIONS: &str = "creditgate_engine_evacuations_total";
pub const FENCES: &str = "creditgate_engine_fences_total";
/// Holds the reconciler expired (their credits returned).
pub const HOLDS_EXPIRED: &str = "creditgate_engine_holds_expired_total";
pub const DIRECT_SPENDS: &str = "creditgate_engine_direct_spends_total";
pub const SPEND_TIMEOUTS: &str = "creditgate_engine_spend_timeouts_total";
pub const LOST_CREDITS: &str = "creditgate_engine_lost_credits_total";
pub const RETURNED_CREDITS: &str = "creditgate_engine_returned_credits_total";
pub const RETURNS_RETRIED: &str = "creditgate_engine_returns_retried_total";
pub const RETURNS_QUEUED: &str = "creditgate_engine_failed_returns_queued";
/// Keys whose hot balance this node tracks (to return it when the key idles).
pub const TRACKED_KEYS: &str = "creditgate_engine_tracked_keys";
pub const RETURNS_DROPPED: &str = "creditgate_engine_returns_dropped_total";
pub const ORPHANS_RESOLVED: &str = "creditgate_engine_orphans_resolved_total";
pub const RECONCILE_ERRORS: &str = "creditgate_engine_reconcile_errors_total";
pub const PREFETCHES: &str = "creditgate_engine_prefetches_total";
pub const PREFETCH_DROPPED: &str = "creditgate_engine_prefetch_dropped_total";
/// Per-key failures inside a loop over keys (label `step`: drain | repair); the loop
/// goes on.
pub const KEY_ERRORS: &str = "creditgate_engine_key_errors_total";
/// Spends whose outcome is unknown (the hot store did not answer in time after the
/// call was sent), and the credits they asked for: `granted − spent − remaining` is
/// explained by these and `creditgate_engine_lost_credits_total`.
pub const OUTCOME_UNKNOWN: &str = "creditgate_engine_outcome_unknown_total";
pub const OUTCOME_UNKNOWN_CREDITS: &str = "creditgate_engine_outcome_unknown_credits_total";
/// Times the hot-store breaker opened (repeated timeouts: spends go to the ledger).
pub const BREAKER_OPENED: &str = "creditgate_engine_breaker_opened_total";
/// 1 while the breaker is open.
pub const BREAKER_OPEN: &str = "creditgate_engine_breaker_open";
/// Direct spends the ledger could not decide (credits held by the unreachable hot store).
pub const DIRECT_UNDECIDED: &str = "creditgate_engine_direct_undecided_total";
