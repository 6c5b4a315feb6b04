//! Local processes for `creditgate cluster`, `creditgate loadtest --spawn` and the test
//! harness: [`RedisServer`], [`Postgres`] and [`ClickHouse`] as child processes on free
//! loopback ports with temporary data directories, [`NodeProcess`] (one `creditgate serve`
//! child) and [`LocalCluster`] (N nodes on their own [`Services`]).
//!
//! - **Lifecycle**: `start()` waits until the server answers (bounded) and retries with
//!   fresh ports when a port was taken between picking and binding it; dropping the
//!   handle stops it and removes its directory. Errors carry context and the tail of the
//!   server's log. A watchdog process stops a server whose parent died without dropping
//!   it (crash, `SIGKILL`, or a static, which Rust never drops).
//! - **Sharing**: every method takes `&self`; isolate the users of one server with
//!   [`unique_name`] (database names, key or table prefixes) and [`Databases`].
//! - **Faults**: `kill9()`, `stop()`, `start_again()` / `restart()` on the same port,
//!   `pause()` / `resume()` (SIGSTOP / SIGCONT) for Redis and ClickHouse.
//!
//! Every call blocks the calling thread (bounded) and needs no async runtime; async
//! callers use `tokio::task::spawn_blocking`.

mod clickhouse;
mod cluster;
mod node;
mod postgres;
mod process;
mod redis;
mod redis_cluster;

pub use clickhouse::ClickHouse;
pub use cluster::{Databases, LocalCluster, LocalClusterOptions, ServiceUrls, Services};
pub use node::{NodeOptions, NodeProcess, NODE_START_TIMEOUT};
pub use postgres::Postgres;
pub use redis::RedisServer;
pub use redis_cluster::{RedisCluster, CLUSTER_NODE_TIMEOUT_MS};

use std::sync::atomic::{AtomicU64, Ordering};

/// A fresh name for isolation: `<prefix>_<pid>_<n>_<random>`, lower case, letters,
/// digits and `_` only — valid as a Postgres or ClickHouse database name, a ClickHouse
/// table prefix, or a Redis key prefix. Keep `prefix` short (Postgres truncates names at
/// 63 bytes).
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
