//! The Redis side of multi-node mode (DESIGN.md §3): [`RedisHotStore`], the escrow
//! engine's hot store as one Lua script per operation with epoch fencing, and
//! [`CacheBus`], cross-node cache invalidation over pub/sub.
//!
//! Needs Redis ≥ 6 (RESP3). Every per-key script touches one hash slot, so the scripts
//! run unchanged on Redis Cluster; the connection itself is a single-node
//! `ConnectionManager`.

mod bus;
mod error;
mod hot;
pub mod metrics;
mod ratelimit;
mod scripts;

pub use bus::{CacheBus, CHANNEL};
pub use error::RedisError;
pub use hot::{RedisHotStore, RedisOptions};
pub use ratelimit::RedisRateLimiter;

/// Largest integer the scripts handle exactly (Lua numbers are doubles); equals
/// `Credits::MAX`.
pub(crate) const MAX_INT: u64 = (1 << 53) - 1;
