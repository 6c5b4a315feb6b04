//! A local multi-node deployment: [`Services`] (one Redis, Postgres and ClickHouse
//! process each), [`Databases`] (one cluster's own Postgres and ClickHouse databases on
//! them) and [`LocalCluster`] (N [`NodeProcess`]es on those), as `creditgate cluster`
//! and `creditgate loadtest --spawn` run them.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::node::{NodeOptions, NodeProcess};
use crate::{unique_name, ClickHouse, Postgres, RedisCluster, RedisServer};

/// Bound on stopping one node gracefully.
const NODE_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// What a node of the multi-node mode connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceUrls {
    /// `--redis-url`.
    pub redis_url: String,
    /// `--redis-cluster` (comma-separated seeds): when set, the nodes use this Redis
    /// Cluster instead of `redis_url`.
    pub redis_cluster: Option<String>,
    /// `--database-url` (Postgres).
    pub database_url: String,
    /// `--clickhouse-url`, with its `?database=`.
    pub clickhouse_url: String,
}

/// A Redis, a Postgres and a ClickHouse server of their own, stopped on drop.
#[derive(Debug)]
pub struct Services {
    pub redis: RedisServer,
    pub postgres: Postgres,
    pub clickhouse: ClickHouse,
}

impl Services {
    /// Starts the three servers side by side (each bounded, see the launchers).
    pub fn start() -> Result<Self> {
        std::thread::scope(|s| {
            let redis = s.spawn(RedisServer::start);
            let postgres = s.spawn(Postgres::start);
            let clickhouse = s.spawn(ClickHouse::start);
            Ok(Self {
                redis: joined("redis-server", redis.join())?,
                postgres: joined("postgres", postgres.join())?,
                clickhouse: joined("clickhouse-server", clickhouse.join())?,
            })
        })
    }
}

/// The result of a launcher thread, with context.
fn joined<T>(name: &str, result: std::thread::Result<Result<T>>) -> Result<T> {
    match result {
        Ok(r) => r.with_context(|| format!("starting {name}")),
        Err(_) => bail!("the thread starting {name} panicked"),
    }
}

/// One cluster's own databases on shared servers: a Postgres database and a ClickHouse
/// database with fresh names, and the URLs that point the nodes at them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Databases {
    pub urls: ServiceUrls,
    pub postgres_database: String,
    pub clickhouse_database: String,
}

impl Databases {
    /// Creates the databases (Redis is shared as it is; the engine's keys carry ids).
    pub fn create(
        redis: &RedisServer,
        postgres: &Postgres,
        clickhouse: &ClickHouse,
    ) -> Result<Self> {
        let postgres_database = unique_name("cg");
        let database_url = postgres
            .create_database(&postgres_database)
            .context("creating the cluster's Postgres database")?;
        let clickhouse_database = unique_name("cg");
        let clickhouse_url = clickhouse
            .create_database(&clickhouse_database)
            .context("creating the cluster's ClickHouse database")?;
        Ok(Self {
            urls: ServiceUrls {
                redis_url: redis.url(),
                redis_cluster: None,
                database_url,
                clickhouse_url,
            },
            postgres_database,
            clickhouse_database,
        })
    }

    /// Drops both databases; both are tried even when the first fails.
    pub fn drop_from(&self, postgres: &Postgres, clickhouse: &ClickHouse) -> Result<()> {
        // A stopped node's pool closes its connections in the background: FORCE ends
        // any still open instead of failing on them.
        let pg = postgres.query(
            "postgres",
            &format!(
                "DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)",
                self.postgres_database
            ),
        );
        let ch = clickhouse.query(&format!(
            "DROP DATABASE IF EXISTS `{}`",
            self.clickhouse_database
        ));
        pg.context("dropping the Postgres database")?;
        ch.context("dropping the ClickHouse database")?;
        Ok(())
    }
}

/// How to start a [`LocalCluster`].
#[derive(Debug, Clone)]
pub struct LocalClusterOptions {
    pub nodes: usize,
    /// The `creditgate` executable the nodes run.
    pub binary: PathBuf,
    /// The cluster's root key (every node bootstraps it).
    pub root_key: String,
    /// `Some(n)`: the hot store is a Redis Cluster of `n` masters with one replica each
    /// (instead of one Redis).
    pub redis_cluster_shards: Option<usize>,
}

impl LocalClusterOptions {
    /// `nodes` nodes of `binary` with a fresh random root key.
    pub fn new(nodes: usize, binary: impl Into<PathBuf>) -> Self {
        Self {
            nodes,
            binary: binary.into(),
            root_key: format!("cg_root_local_{:032x}", rand::random::<u128>()),
            redis_cluster_shards: None,
        }
    }
}

/// N nodes (child processes, `node-0`…) on their own Redis, Postgres and ClickHouse, and
/// the data directories of the nodes. Dropping it kills everything; [`LocalCluster::shutdown`]
/// stops the nodes gracefully first.
pub struct LocalCluster {
    // Declared in stop order: nodes, then the services, then the data directories.
    nodes: Vec<NodeProcess>,
    redis_cluster: Option<RedisCluster>,
    services: Services,
    databases: Databases,
    root_key: String,
    data: TempDir,
}

impl LocalCluster {
    /// Starts the services, then the nodes one by one (each bounded).
    pub fn start(options: LocalClusterOptions) -> Result<Self> {
        if options.nodes == 0 {
            bail!("a cluster needs at least one node");
        }
        let data = tempfile::Builder::new()
            .prefix("creditgate-cluster-")
            .tempdir()
            .context("creating the cluster's data directory")?;
        let services = Services::start()?;
        let mut databases =
            Databases::create(&services.redis, &services.postgres, &services.clickhouse)?;
        let redis_cluster = options
            .redis_cluster_shards
            .map(|shards| RedisCluster::start(shards, 1))
            .transpose()
            .context("starting the Redis Cluster")?;
        if let Some(rc) = &redis_cluster {
            databases.urls.redis_cluster = Some(rc.seeds().join(","));
        }
        let mut nodes = Vec::with_capacity(options.nodes);
        for i in 0..options.nodes {
            let dir = data.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let mut node = NodeOptions::new(&options.binary, dir);
            node.node_id = Some(format!("node-{i}"));
            node.root_key = Some(options.root_key.clone());
            node.services = Some(databases.urls.clone());
            nodes.push(NodeProcess::start(node).with_context(|| format!("starting node-{i}"))?);
        }
        Ok(Self {
            nodes,
            redis_cluster,
            services,
            databases,
            root_key: options.root_key,
            data,
        })
    }

    pub fn nodes(&self) -> &[NodeProcess] {
        &self.nodes
    }

    /// Base URLs of the nodes, in node order.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NodeProcess::url).collect()
    }

    pub fn root_key(&self) -> &str {
        &self.root_key
    }

    /// The Redis Cluster of the hot store, when started with `redis_cluster_shards`.
    pub fn redis_cluster(&self) -> Option<&RedisCluster> {
        self.redis_cluster.as_ref()
    }

    pub fn services(&self) -> &Services {
        &self.services
    }

    pub fn databases(&self) -> &Databases {
        &self.databases
    }

    /// Where the nodes keep their data (`node<i>/`).
    pub fn data_dir(&self) -> &std::path::Path {
        self.data.path()
    }

    /// SIGTERM to every node (each bounded; a failing node is logged and the others
    /// still stopped), then the services stop as the cluster drops. Returns the first
    /// node's failure, if any.
    pub fn shutdown(self) -> Result<()> {
        let mut first_error = None;
        for node in &self.nodes {
            match node.sigterm(NODE_STOP_TIMEOUT) {
                Ok(status) if status.success() => {}
                Ok(status) => {
                    tracing::warn!(url = %node.url(), %status, "node exited with a failure status");
                    first_error.get_or_insert_with(|| {
                        anyhow::anyhow!("node {} exited with {status}", node.url())
                    });
                }
                Err(e) => {
                    tracing::warn!(url = %node.url(), error = %format!("{e:#}"), "node did not stop gracefully");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
