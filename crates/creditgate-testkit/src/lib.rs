//! Real servers for tests: [`RedisServer`], [`Postgres`] and [`ClickHouse`] run as child
//! processes on free loopback ports with temporary data directories.
//!
//! - **Lifecycle**: `start()` waits until the server answers (bounded); dropping the
//!   handle stops it and removes its directory. Errors include the tail of the server's
//!   log. A watchdog process stops a server whose test process died without dropping it
//!   (crash, `SIGKILL`, or a `shared()` static, which Rust never drops).
//! - **Sharing**: `shared()` returns one `&'static` instance per test binary, started on
//!   first use; isolate tests on it with [`unique_name`] (database names, key or table
//!   prefixes). Tests that inject faults (`kill9`, `stop`, `pause`) start their own.
//! - **Faults**: `kill9()`, `stop()`, `start_again()` / `restart()` on the same port,
//!   `pause()` / `resume()` (SIGSTOP / SIGCONT) for Redis and ClickHouse.
//!
//! Every call blocks the calling thread (bounded) and needs no async runtime, so it works
//! from `#[test]`, `#[tokio::test]` and `OnceLock` initialisers alike.

mod clickhouse;
pub mod cluster;
mod postgres;
mod process;
mod redis;

pub use clickhouse::ClickHouse;
pub use cluster::{Backends, Cluster, ClusterOptions, NodeKind};
pub use postgres::Postgres;
pub use redis::RedisServer;

use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh name for per-test isolation: `<prefix>_<pid>_<n>_<random>`, lower case,
/// letters, digits and `_` only — valid as a Postgres or ClickHouse database name, a
/// ClickHouse table prefix, or a Redis key prefix. Keep `prefix` short (Postgres
/// truncates names at 63 bytes).
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let random: u16 = rand::random();
    format!("{prefix}_{}_{n}_{random:04x}", std::process::id()).to_ascii_lowercase()
}

/// Database names are spliced into SQL: allow `[A-Za-z0-9_]` only.
fn valid_identifier(name: &str) -> anyhow::Result<&str> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    anyhow::ensure!(
        ok,
        "invalid name {name:?}: use letters, digits and '_' (≤ 63)"
    );
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_are_distinct_and_valid_identifiers() {
        let a = unique_name("t");
        let b = unique_name("t");
        assert_ne!(a, b);
        assert!(valid_identifier(&a).is_ok(), "{a}");
        assert!(valid_identifier("a;b").is_err());
        assert!(valid_identifier("").is_err());
    }
}
