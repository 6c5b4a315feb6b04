//! [`Cluster`]: N nodes of a test on shared or own Redis, Postgres and ClickHouse
//! ([`Cluster::builder`]), and the checks tests make on it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use creditgate_local::{ClickHouse, Databases, NodeOptions, Postgres, RedisCluster, RedisServer};
use creditgate_server::ServeConfig;

use crate::node::{reported_lost, Node};
use crate::proxy::TcpProxy;
use crate::{unique_name, Shared};

/// Whether a backing service is the test binary's shared one or the cluster's own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provision {
    /// [`Shared::shared`]: started once per test binary; the cluster gets its own
    /// databases on it.
    Shared,
    /// Started for this cluster, stopped with it: for tests that kill, stop or pause it.
    Own,
}

/// A service a node reaches over the network (through a [`TcpProxy`] where the
/// cluster puts one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Redis,
    Postgres,
    ClickHouse,
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Redis, Service::Postgres, Service::ClickHouse];
}

/// How the nodes run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    /// `App` on its own listener in the test process.
    InProcess,
    /// Child processes of this `creditgate` binary (needed for `kill -9` and for the
    /// nodes' logs).
    Process { binary: PathBuf },
}

/// Options of [`Cluster::builder`]; defaults: 1 in-process node on shared Redis,
/// Postgres and ClickHouse, a fresh root key.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    nodes: usize,
    /// `None`: the embedded default (SQLite, in-process hot store), one node.
    services: Option<[Provision; 3]>,
    kind: NodeKind,
    root_key: String,
    /// (node, service) pairs whose link goes through a [`TcpProxy`] of its own.
    proxied: Vec<(usize, Service)>,
    /// Every node's link to every service goes through a proxy.
    chaos: bool,
    /// Extra `redis-server` arguments of an own Redis.
    redis_args: Vec<String>,
    /// `Some(n)`: the hot store is an own Redis Cluster of `n` masters, 1 replica each.
    redis_cluster_shards: Option<usize>,
    /// Further `serve` arguments of every process node.
    args: Vec<String>,
    /// Further `serve` arguments of one node each.
    node_args: Vec<(usize, Vec<String>)>,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// The embedded default: SQLite and an in-process hot store (one node only).
    pub fn embedded(mut self) -> Self {
        self.services = None;
        self
    }

    /// Redis, Postgres and ClickHouse as given.
    pub fn services(
        mut self,
        redis: Provision,
        postgres: Provision,
        clickhouse: Provision,
    ) -> Self {
        self.services = Some([redis, postgres, clickhouse]);
        self
    }

    /// Every service shared (the default).
    pub fn shared_services(self) -> Self {
        self.services(Provision::Shared, Provision::Shared, Provision::Shared)
    }

    /// Nodes as child processes of `binary` (`env!("CARGO_BIN_EXE_creditgate")`).
    pub fn process_nodes(mut self, binary: impl Into<PathBuf>) -> Self {
        self.kind = NodeKind::Process {
            binary: binary.into(),
        };
        self
    }

    /// Node `i` reaches Redis through a [`TcpProxy`] ([`Cluster::redis_proxy`]).
    pub fn redis_through_proxy(mut self, i: usize) -> Self {
        self.proxied.push((i, Service::Redis));
        self
    }

    /// Every node reaches Redis, Postgres and ClickHouse through proxies of its own
    /// ([`Cluster::proxy`]), so a test can cut, slow or reset one node's link to one
    /// service while the others keep theirs.
    pub fn chaos_proxies(mut self) -> Self {
        self.chaos = true;
        self
    }

    /// The nodes' hot store is a Redis Cluster of this cluster's own: `shards` masters
    /// with one replica each ([`Cluster::redis_cluster`]).
    pub fn redis_cluster(mut self, shards: usize) -> Self {
        self.redis_cluster_shards = Some(shards);
        self
    }

    /// Further `creditgate serve` arguments for every node (process nodes only), e.g.
    /// `--clock-skew-ms`.
    pub fn node_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Further `creditgate serve` arguments for node `i` alone (after those of
    /// [`ClusterBuilder::node_args`]), e.g. one node's `--clock-skew-ms`.
    pub fn node_args_for<S: Into<String>>(
        mut self,
        i: usize,
        args: impl IntoIterator<Item = S>,
    ) -> Self {
        self.node_args
            .push((i, args.into_iter().map(Into::into).collect()));
        self
    }

    /// Extra `redis-server` arguments for the cluster's own Redis (e.g. `--appendonly
    /// yes`); ignored for a shared one.
    pub fn redis_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.redis_args.extend(args.into_iter().map(Into::into));
        self
    }

    pub fn root_key(mut self, key: impl Into<String>) -> Self {
        self.root_key = key.into();
        self
    }

    /// Starts the services (own ones side by side), creates the cluster's databases and
    /// starts the nodes one by one; every step is bounded.
    pub async fn start(self) -> Result<Cluster> {
        if !(self.args.is_empty() && self.node_args.is_empty()) && self.kind == NodeKind::InProcess
        {
            bail!("node arguments need process nodes");
        }
        let redis_args = self.redis_args.clone();
        let data = tempfile::Builder::new()
            .prefix("creditgate-cluster-")
            .tempdir()
            .context("cluster data dir")?;
        let services = match self.services {
            None if self.nodes != 1 => {
                bail!("the embedded default runs one node, not {}", self.nodes)
            }
            None => None,
            Some([redis, postgres, clickhouse]) => Some(
                tokio::task::spawn_blocking(move || {
                    Services::provide(redis, postgres, clickhouse, redis_args)
                })
                .await
                .context("the service start task failed")??,
            ),
        };
        let redis_cluster = match self.redis_cluster_shards {
            Some(shards) => Some(
                tokio::task::spawn_blocking(move || RedisCluster::start(shards, 1))
                    .await
                    .context("the Redis Cluster start task failed")??,
            ),
            None => None,
        };
        let seeds = redis_cluster.as_ref().map(|rc| rc.seeds().join(","));
        let mut cluster = Cluster {
            nodes: Vec::new(),
            root_key: self.root_key.clone(),
            services,
            redis_cluster,
            data,
            proxies: BTreeMap::new(),
            retired_logs: String::new(),
        };
        for i in 0..self.nodes {
            // This node's URLs of the services, through its proxies where it has them.
            let urls = match cluster.databases() {
                Some(d) => {
                    let mut urls = d.urls.clone();
                    for (service, url) in [
                        (Service::Redis, &mut urls.redis_url),
                        (Service::Postgres, &mut urls.database_url),
                        (Service::ClickHouse, &mut urls.clickhouse_url),
                    ] {
                        if self.chaos || self.proxied.contains(&(i, service)) {
                            let target = loopback_addr(url)?;
                            let proxy = TcpProxy::start(target).await?;
                            *url = url.replacen(&target.to_string(), &proxy.addr().to_string(), 1);
                            cluster.proxies.insert((i, service), proxy);
                        }
                    }
                    Some(urls)
                }
                None => None,
            };
            let redis_url = urls.as_ref().map(|u| u.redis_url.clone());
            let dir = cluster.data.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir)?;
            let node = match &self.kind {
                NodeKind::InProcess => {
                    let mut config = ServeConfig::for_data_dir(&dir);
                    config.root_key = Some(self.root_key.clone());
                    config.node_id = Some(format!("node-{i}"));
                    if let Some(u) = &urls {
                        config.redis_url = redis_url.clone().filter(|_| seeds.is_none());
                        config.redis_cluster = seeds.clone();
                        config.database_url = Some(u.database_url.clone());
                        config.clickhouse_url = Some(u.clickhouse_url.clone());
                    }
                    Node::in_process(config).await?
                }
                NodeKind::Process { binary } => {
                    let mut options = NodeOptions::new(binary, &dir);
                    options.root_key = Some(self.root_key.clone());
                    options.node_id = Some(format!("node-{i}"));
                    options.args = self.args.clone();
                    for (_, extra) in self.node_args.iter().filter(|(n, _)| *n == i) {
                        options.args.extend(extra.iter().cloned());
                    }
                    options.services = urls.map(|mut urls| {
                        urls.redis_cluster = seeds.clone();
                        urls
                    });
                    Node::process(options).await?
                }
            };
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }
}

/// The `127.0.0.1:port` a local service's URL names (`redis://127.0.0.1:6380/0`,
/// `postgres://postgres@127.0.0.1:5433/db`, `http://127.0.0.1:8123/?database=db`).
fn loopback_addr(url: &str) -> Result<std::net::SocketAddr> {
    let at = url
        .find("127.0.0.1:")
        .with_context(|| format!("no 127.0.0.1:<port> in {url}"))?;
    let rest = &url[at..];
    let end = rest[10..]
        .find(|c: char| !c.is_ascii_digit())
        .map_or(rest.len(), |e| e + 10);
    rest[..end]
        .parse()
        .with_context(|| format!("the address of {url}"))
}

/// A service of a cluster: the test binary's shared one or the cluster's own.
enum Svc<T: 'static> {
    Shared(&'static T),
    Own(Arc<T>),
}

impl<T> Svc<T> {
    fn provide(
        p: Provision,
        shared: fn() -> &'static T,
        start: impl FnOnce() -> Result<T>,
    ) -> Result<Self> {
        Ok(match p {
            Provision::Shared => Svc::Shared(shared()),
            Provision::Own => Svc::Own(Arc::new(start()?)),
        })
    }
}

impl<T> std::ops::Deref for Svc<T> {
    type Target = T;
    fn deref(&self) -> &T {
        match self {
            Svc::Shared(t) => t,
            Svc::Own(t) => t,
        }
    }
}

/// The services of a multi-node cluster and its databases on them.
struct Services {
    databases: Databases,
    redis: Svc<RedisServer>,
    postgres: Svc<Postgres>,
    clickhouse: Svc<ClickHouse>,
}

impl Services {
    /// Starts the own services side by side (the shared ones on first use) and creates
    /// the cluster's databases. Blocking, bounded by the launchers.
    fn provide(
        redis: Provision,
        postgres: Provision,
        clickhouse: Provision,
        redis_args: Vec<String>,
    ) -> Result<Self> {
        let (redis, postgres, clickhouse) = std::thread::scope(|s| {
            let r = s.spawn(|| {
                Svc::provide(redis, RedisServer::shared, || {
                    RedisServer::start_with(redis_args)
                })
            });
            let p = s.spawn(|| Svc::provide(postgres, Postgres::shared, Postgres::start));
            let c = s.spawn(|| Svc::provide(clickhouse, ClickHouse::shared, ClickHouse::start));
            let r = r
                .join()
                .unwrap_or_else(|_| bail!("the Redis launcher panicked"));
            let p = p
                .join()
                .unwrap_or_else(|_| bail!("the Postgres launcher panicked"));
            let c = c
                .join()
                .unwrap_or_else(|_| bail!("the ClickHouse launcher panicked"));
            Ok::<_, anyhow::Error>((r?, p?, c?))
        })?;
        let databases = Databases::create(&redis, &postgres, &clickhouse)?;
        Ok(Self {
            databases,
            redis,
            postgres,
            clickhouse,
        })
    }
}

/// A running cluster; dropping it stops the nodes and the services it owns.
pub struct Cluster {
    // Declared in stop order: nodes, then the owned services.
    pub nodes: Vec<Node>,
    pub root_key: String,
    /// Proxies between nodes and services, by node index and service.
    proxies: BTreeMap<(usize, Service), TcpProxy>,
    /// The logs of nodes replaced by a restart, so that what they reported (e.g. credits
    /// written off) is not lost with them.
    retired_logs: String,
    services: Option<Services>,
    redis_cluster: Option<RedisCluster>,
    data: tempfile::TempDir,
}

impl Cluster {
    /// `Cluster::builder().nodes(3).services(Own, Shared, Shared).process_nodes(BIN).start()`.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            nodes: 1,
            services: Some([Provision::Shared; 3]),
            kind: NodeKind::InProcess,
            root_key: format!("root_{}", unique_name("k")),
            proxied: Vec::new(),
            chaos: false,
            redis_args: Vec::new(),
            redis_cluster_shards: None,
            args: Vec::new(),
            node_args: Vec::new(),
        }
    }

    /// The proxy between node `i` and Redis ([`ClusterBuilder::redis_through_proxy`]).
    pub fn redis_proxy(&self, i: usize) -> &TcpProxy {
        self.proxy(i, Service::Redis)
    }

    /// The proxy between node `i` and `service` ([`ClusterBuilder::chaos_proxies`]).
    pub fn proxy(&self, i: usize, service: Service) -> &TcpProxy {
        self.proxies
            .get(&(i, service))
            .unwrap_or_else(|| panic!("node {i} reaches {service:?} directly"))
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// The cluster's Postgres and ClickHouse databases (`None` on the embedded default).
    pub fn databases(&self) -> Option<&Databases> {
        self.services.as_ref().map(|s| &s.databases)
    }

    /// The Redis of this cluster (own or shared); `None` for the embedded default.
    pub fn redis(&self) -> Option<&RedisServer> {
        self.services.as_ref().map(|s| &*s.redis)
    }

    /// The nodes' Redis Cluster ([`ClusterBuilder::redis_cluster`]).
    pub fn redis_cluster(&self) -> Option<&RedisCluster> {
        self.redis_cluster.as_ref()
    }

    pub fn postgres(&self) -> Option<&Postgres> {
        self.services.as_ref().map(|s| &*s.postgres)
    }

    pub fn clickhouse(&self) -> Option<&ClickHouse> {
        self.services.as_ref().map(|s| &*s.clickhouse)
    }

    /// An API and a key with `credits` through node 0; returns (key id, secret).
    pub async fn key(&self, credits: u64) -> (String, String) {
        let api = self.nodes[0].create_api(&self.root_key, "testkit").await;
        self.nodes[0]
            .create_key(&self.root_key, &api, credits)
            .await
    }

    /// `SELECT remaining FROM keys WHERE id = …` on the Postgres ledger.
    pub fn sql_remaining(&self, key_id: &str) -> Result<Option<i64>> {
        let out = self.postgres_query(&format!(
            "SELECT remaining FROM keys WHERE id = '{}'",
            key_id.replace('\'', "")
        ))?;
        Ok(out.trim().parse().ok())
    }

    /// A query on this cluster's Postgres database; its output as `psql` prints it
    /// unaligned.
    pub fn postgres_query(&self, sql: &str) -> Result<String> {
        let Some(s) = &self.services else {
            bail!("no Postgres in this cluster");
        };
        s.postgres.query(&s.databases.postgres_database, sql)
    }

    /// A query on this cluster's ClickHouse database.
    pub fn clickhouse_query(&self, sql: &str) -> Result<String> {
        let Some(s) = &self.services else {
            bail!("no ClickHouse in this cluster");
        };
        s.clickhouse
            .query_in(Some(&s.databases.clickhouse_database), sql)
    }

    /// `credits.remaining` of `key_id` as every node answers `keys.getKey`, in node order.
    pub async fn remaining_on_every_node(&self, key_id: &str) -> Vec<Option<u64>> {
        let mut out = Vec::with_capacity(self.nodes.len());
        for node in &self.nodes {
            out.push(node.remaining(&self.root_key, key_id).await);
        }
        out
    }

    /// Waits at most `bound` until every node answers the same remaining balance for
    /// `key_id` and the ledger (Postgres) holds exactly it; returns it. Panics with the
    /// last figures when the bound passes.
    pub async fn assert_converged(&self, key_id: &str, bound: Duration) -> u64 {
        let started = Instant::now();
        loop {
            let nodes = self.remaining_on_every_node(key_id).await;
            let sql = self.sql_remaining(key_id).expect("reading the ledger");
            let first = nodes.first().copied().flatten();
            if let Some(r) = first {
                if nodes.iter().all(|n| *n == Some(r)) && sql == i64::try_from(r).ok() {
                    println!("converged on {r} after {:?}", started.elapsed());
                    return r;
                }
            }
            assert!(
                started.elapsed() < bound,
                "no convergence within {bound:?}: nodes answer {nodes:?}, the ledger holds {sql:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Verification rows of `key_id` per `node_id`, from the analytics in ClickHouse: the
    /// spread as the servers saw it.
    pub fn verifications_per_node(&self, key_id: &str) -> Result<BTreeMap<String, u64>> {
        let rows = self.clickhouse_query(&format!(
            "SELECT node_id, count() FROM key_verifications WHERE key_id = '{}' GROUP BY node_id ORDER BY node_id FORMAT TabSeparated",
            key_id.replace('\'', "")
        ))?;
        rows.lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (node, n) = l
                    .split_once('\t')
                    .with_context(|| format!("unexpected row {l:?}"))?;
                Ok((node.to_owned(), n.trim().parse().context("count")?))
            })
            .collect()
    }

    /// Waits at most `bound` until ClickHouse holds `total` verification rows of
    /// `key_id`; returns them per node.
    pub async fn wait_verifications_per_node(
        &self,
        key_id: &str,
        total: u64,
        bound: Duration,
    ) -> BTreeMap<String, u64> {
        let started = Instant::now();
        loop {
            let per_node = self
                .verifications_per_node(key_id)
                .expect("reading analytics");
            let n: u64 = per_node.values().sum();
            if n >= total || started.elapsed() >= bound {
                assert_eq!(n, total, "verification rows in ClickHouse: {per_node:?}");
                return per_node;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every process node's stderr, including that of nodes replaced by a restart.
    pub fn logs(&self) -> String {
        let mut logs = self.retired_logs.clone();
        for node in &self.nodes {
            logs.push_str(&node.stderr());
            logs.push('\n');
        }
        logs
    }

    /// Credits the nodes logged as written off (process nodes).
    pub fn reported_lost(&self) -> u64 {
        reported_lost(&self.logs())
    }

    /// Stops node `i` gracefully (bounded).
    pub async fn stop_node(&mut self, i: usize) -> Result<()> {
        self.nodes[i].stop(Duration::from_secs(20)).await.map(drop)
    }

    /// Starts node `i` again with the same configuration (a new port); stops it first
    /// when it still runs.
    pub async fn restart_node(&mut self, i: usize) -> Result<()> {
        self.stop_node(i).await?;
        let again = self.nodes[i].start_again().await?;
        let retired = std::mem::replace(&mut self.nodes[i], again);
        self.retired_logs.push_str(&retired.stderr());
        self.retired_logs.push('\n');
        Ok(())
    }

    /// Stops every node gracefully.
    pub async fn shutdown(mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.stop_node(i).await?;
        }
        Ok(())
    }

    /// Stops every node and drops this cluster's Postgres and ClickHouse databases.
    pub async fn destroy(mut self) -> Result<()> {
        for i in 0..self.nodes.len() {
            self.stop_node(i).await?;
        }
        if let Some(s) = self.services.take() {
            tokio::task::spawn_blocking(move || s.databases.drop_from(&s.postgres, &s.clickhouse))
                .await
                .context("the teardown task failed")??;
        }
        Ok(())
    }
}
