//! The Redis side of multi-node mode (DESIGN.md §3): [`RedisHotStore`], the escrow
//! engine's hot store as one Lua script per operation with epoch fencing, and
//! [`CacheBus`], cross-node cache invalidation over pub/sub.
//!
//! Needs Redis ≥ 6 (RESP3). Runs on one Redis or on a Redis Cluster ([`Target`]): every
//! per-key script touches one hash slot, and epochs are kept per slot.

mod bus;
mod conn;
mod error;
mod hot;
mod link;
pub mod metrics;
mod ratelimit;
mod scripts;

pub use bus::{CacheBus, CHANNEL};
pub use conn::Target;
pub use error::RedisError;
pub use hot::{RedisHotStore, RedisOptions};
pub use ratelimit::RedisRateLimiter;

/// Largest integer the scripts handle exactly (Lua numbers are doubles); equals
/// `Credits::MAX`.
pub(crate) const MAX_INT: u64 = (1 << 53) - 1;
