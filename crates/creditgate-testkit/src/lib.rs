//! The test harness of creditgate, a thin layer over `creditgate-local`:
//!
//! - [`Cluster::builder`]: N nodes, in this process (`App` on its own listener) or as
//!   child processes of the real binary (needed to `kill -9` one), on the embedded
//!   default or on Redis, Postgres and ClickHouse, each either shared by the test binary
//!   ([`Shared`]) or the cluster's own (for tests that kill, stop or pause it); every
//!   start retries on a taken port (the launchers do). Helpers check what the tests
//!   assert: [`Cluster::remaining_on_every_node`], [`Cluster::verifications_per_node`]
//!   (server side, from the analytics `node_id`), [`Cluster::reported_lost`].
//! - [`Node`]: one node with the HTTP calls tests make (`call`, `ok`, `verify`, …).
//! - [`Shared`]: `RedisServer::shared()` & co, one instance per test binary.
//! - [`TcpProxy`]: a proxy that can black-hole a link and deliver what it held on heal
//!   ([`ClusterBuilder::redis_through_proxy`] puts one between a node and Redis).
//!
//! Test code: helpers panic with context instead of returning errors where a test
//! could do nothing but unwrap.

mod cluster;
pub mod history;
mod node;
mod proxy;
pub mod webhooks;

pub use cluster::{Cluster, ClusterBuilder, NodeKind, Provision, Service};
pub use creditgate_local::{
    unique_name, ClickHouse, Databases, NodeOptions, NodeProcess, Postgres, RedisServer,
    ServiceUrls,
};
pub use node::{reported_lost, Node, Remote};
pub use proxy::{ProxyMode, TcpProxy};

use std::sync::OnceLock;

/// One server per test binary, started on first use; never dropped (the launcher's
/// watchdog stops it when the test binary exits). Panics with the server's log when it
/// cannot start. Tests that kill, stop or pause a server start their own.
pub trait Shared: Sized + 'static {
    fn shared() -> &'static Self;
}

fn shared_or_panic<T>(cell: &'static OnceLock<T>, start: fn() -> anyhow::Result<T>) -> &'static T {
    cell.get_or_init(|| start().unwrap_or_else(|e| panic!("{e:#}")))
}

impl Shared for RedisServer {
    fn shared() -> &'static Self {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        shared_or_panic(&SHARED, RedisServer::start)
    }
}

impl Shared for Postgres {
    fn shared() -> &'static Self {
        static SHARED: OnceLock<Postgres> = OnceLock::new();
        shared_or_panic(&SHARED, Postgres::start)
    }
}

impl Shared for ClickHouse {
    fn shared() -> &'static Self {
        static SHARED: OnceLock<ClickHouse> = OnceLock::new();
        shared_or_panic(&SHARED, ClickHouse::start)
    }
}
