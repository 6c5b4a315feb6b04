//! The usage-limiting engine of creditgate: escrow between a durable [`ports::Ledger`] and
//! a fast [`ports::HotStore`] (DESIGN.md §3), the in-memory implementations of both, and
//! the reconciler. It knows neither HTTP nor any concrete database.

#[cfg(feature = "testing")]
pub mod conformance;
pub mod engine;
#[cfg(feature = "testing")]
pub mod hot_conformance;
pub mod memory_hot;
#[cfg(feature = "testing")]
pub mod memory_ledger;
pub mod metrics;
pub mod ports;
pub mod ratelimit;
pub mod rules;

pub use engine::{
    CreditOp, Decision, Engine, EngineConfig, EngineError, ExpiryObserver, HoldAnswer,
    ReconcileReport, SharedDecision, SharedHoldAnswer, SharedOutcome, IDEMPOTENCY_RETENTION_MS,
};
pub use memory_hot::MemoryHotStore;
#[cfg(feature = "testing")]
pub use memory_ledger::MemoryLedger;
pub use ratelimit::{LimitCheck, LimitError, LimitState, MemoryRateLimiter, RateLimiter};
