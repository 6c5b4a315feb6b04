//! Names of this crate's Prometheus metrics, in one place.

/// Hot-store calls that failed, by `kind` (`unreachable`, `ambiguous`, `other`).
pub const ERRORS: &str = "creditgate_redis_errors_total";
/// Times the hot store's epoch changed (Redis lost or replaced its data).
pub const EPOCH_CHANGES: &str = "creditgate_redis_epoch_changes_total";
/// Cache-bus subscriptions established (first connect and every reconnect).
pub const BUS_SUBSCRIBES: &str = "creditgate_cache_bus_subscribes_total";
/// Invalidations a slow subscriber missed (each followed by one `"*"`).
pub const BUS_DROPPED: &str = "creditgate_cache_bus_dropped_total";
/// Invalidations that could not be published.
pub const BUS_PUBLISH_ERRORS: &str = "creditgate_cache_bus_publish_errors_total";
/// Spends that reached Redis after their deadline and did nothing (the caller had
/// stopped waiting for them).
pub const SPENDS_TOO_LATE: &str = "creditgate_redis_spends_too_late_total";
/// Spends per batched script call (`SPEND_MANY`).
pub const SPEND_BATCH_SIZE: &str = "creditgate_redis_spend_batch_size";
