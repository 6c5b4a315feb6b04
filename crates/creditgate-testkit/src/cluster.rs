//! An N-node creditgate cluster on real backing services: nodes run in this process
//! (`App` on its own listener) or as child processes of the real binary (needed to
//! `kill -9` one). Used by the multi-node suite, `creditgate loadtest --spawn` and
//! `creditgate cluster`.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use creditgate_server::{App, ServeConfig};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{unique_name, ClickHouse, Postgres, RedisServer};

/// Which backing services the nodes use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backends {
    /// The embedded default: SQLite and an in-process hot store (one node only).
    Embedded,
    /// Redis + Postgres + ClickHouse, shared by every cluster of this process (each
    /// cluster gets its own databases).
    Shared,
    /// Redis, Postgres and ClickHouse of its own (for tests that kill or pause them).
    Own,
}

/// How nodes run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeKind {
    InProcess,
    /// Child processes of this `creditgate` binary.
    Process {
        binary: PathBuf,
    },
}

#[derive(Debug, Clone)]
pub struct ClusterOptions {
    pub nodes: usize,
    pub backends: Backends,
    pub kind: NodeKind,
    pub root_key: String,
}

impl ClusterOptions {
    pub fn new(nodes: usize, backends: Backends) -> Self {
        Self {
            nodes,
            backends,
            kind: NodeKind::InProcess,
            root_key: format!("root_{}", unique_name("k")),
        }
    }
}

enum Running {
    InProcess {
        stop: Option<oneshot::Sender<()>>,
        task: JoinHandle<anyhow::Result<()>>,
    },
    Process {
        child: Child,
        logs: PathBuf,
    },
    Stopped,
}

/// One node of a cluster.
pub struct Node {
    pub url: String,
    pub node_id: String,
    config: ServeConfig,
    running: Running,
}

impl Node {
    /// The node's data directory (its SQLite files on the embedded default).
    pub fn data_dir(&self) -> &Path {
        &self.config.data_dir
    }
}

/// A running cluster; dropping it stops the nodes (and owned services).
pub struct Cluster {
    pub nodes: Vec<Node>,
    pub root_key: String,
    /// Postgres database name (multi-node backends).
    pub pg_database: Option<String>,
    /// ClickHouse database name (multi-node backends).
    pub clickhouse_database: Option<String>,
    redis: Option<RedisServer>,
    postgres: Option<Postgres>,
    clickhouse: Option<ClickHouse>,
    kind: NodeKind,
    data: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(options: ClusterOptions) -> Result<Cluster> {
        let data = tempfile::Builder::new()
            .prefix("creditgate-cluster-")
            .tempdir()
            .context("cluster data dir")?;
        let mut cluster = Cluster {
            nodes: Vec::new(),
            root_key: options.root_key.clone(),
            pg_database: None,
            clickhouse_database: None,
            redis: None,
            postgres: None,
            clickhouse: None,
            kind: options.kind.clone(),
            data,
        };
        let base = match options.backends {
            Backends::Embedded => {
                if options.nodes != 1 {
                    bail!("the embedded default runs one node, not {}", options.nodes);
                }
                None
            }
            Backends::Shared => Some(cluster.databases(
                RedisServer::shared().url(),
                Postgres::shared(),
                ClickHouse::shared(),
            )?),
            Backends::Own => {
                let (redis, pg, ch) = tokio::task::spawn_blocking(|| {
                    Ok::<_, anyhow::Error>((
                        RedisServer::start()?,
                        Postgres::start()?,
                        ClickHouse::start()?,
                    ))
                })
                .await??;
                let urls = cluster.databases(redis.url(), &pg, &ch)?;
                cluster.redis = Some(redis);
                cluster.postgres = Some(pg);
                cluster.clickhouse = Some(ch);
                Some(urls)
            }
        };
        for i in 0..options.nodes {
            let dir = cluster.data.path().join(format!("node{i}"));
            std::fs::create_dir_all(&dir)?;
            let mut config = ServeConfig::for_data_dir(&dir);
            config.root_key = Some(options.root_key.clone());
            config.node_id = Some(format!("node-{i}"));
            if let Some((redis, pg, ch)) = &base {
                config.redis_url = Some(redis.clone());
                config.database_url = Some(pg.clone());
                config.clickhouse_url = Some(ch.clone());
            }
            let node = start_node(config, &cluster.kind, &dir).await?;
            cluster.nodes.push(node);
        }
        Ok(cluster)
    }

    /// Creates this cluster's Postgres and ClickHouse databases; returns the URLs.
    fn databases(
        &mut self,
        redis: String,
        pg: &Postgres,
        ch: &ClickHouse,
    ) -> Result<(String, String, String)> {
        let pg_db = unique_name("cg");
        let pg_url = pg.create_database(&pg_db)?;
        let ch_db = unique_name("cg");
        let ch_url = format!("{}/?database={ch_db}", ch.url());
        self.pg_database = Some(pg_db);
        self.clickhouse_database = Some(ch_db);
        Ok((redis, pg_url, ch_url))
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// The Redis of this cluster (own or shared); `None` for the embedded default.
    pub fn redis(&self) -> Option<&RedisServer> {
        match (&self.redis, self.pg_database.is_some()) {
            (Some(r), _) => Some(r),
            (None, true) => Some(RedisServer::shared()),
            (None, false) => None,
        }
    }

    pub fn postgres(&self) -> Option<&Postgres> {
        match (&self.postgres, self.pg_database.is_some()) {
            (Some(p), _) => Some(p),
            (None, true) => Some(Postgres::shared()),
            (None, false) => None,
        }
    }

    pub fn clickhouse(&self) -> Option<&ClickHouse> {
        match (&self.clickhouse, self.clickhouse_database.is_some()) {
            (Some(c), _) => Some(c),
            (None, true) => Some(ClickHouse::shared()),
            (None, false) => None,
        }
    }

    /// `SELECT remaining FROM keys WHERE id = …` on the ledger (Postgres, or the
    /// embedded SQLite file of node 0 through its own `sqlite3`-free path: use
    /// `keys.getKey` there instead).
    pub fn sql_remaining(&self, key_id: &str) -> Result<Option<i64>> {
        let (Some(pg), Some(db)) = (self.postgres(), &self.pg_database) else {
            bail!("sql_remaining needs a Postgres ledger");
        };
        let out = pg.query(
            db,
            &format!(
                "SELECT remaining FROM keys WHERE id = '{}'",
                key_id.replace('\'', "")
            ),
        )?;
        Ok(out.trim().parse().ok())
    }

    /// A query on this cluster's ClickHouse database.
    pub fn clickhouse_query(&self, sql: &str) -> Result<String> {
        let (Some(ch), Some(db)) = (self.clickhouse(), &self.clickhouse_database) else {
            bail!("no ClickHouse in this cluster");
        };
        ch.query_in(Some(db), sql)
    }

    /// Stops node `i` gracefully (in-process: shutdown and wait; process: SIGTERM).
    pub async fn stop_node(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        match std::mem::replace(&mut node.running, Running::Stopped) {
            Running::InProcess { stop, task } => {
                if let Some(stop) = stop {
                    let _ = stop.send(());
                }
                tokio::time::timeout(Duration::from_secs(20), task).await???;
            }
            Running::Process { mut child, .. } => {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
                wait_child(&mut child, Duration::from_secs(20))?;
            }
            Running::Stopped => {}
        }
        Ok(())
    }

    /// `kill -9` of node `i` (process nodes only).
    pub fn kill9_node(&mut self, i: usize) -> Result<()> {
        let node = &mut self.nodes[i];
        match &mut node.running {
            Running::Process { child, .. } => {
                child.kill().context("kill -9")?;
                let _ = child.wait();
                node.running = Running::Stopped;
                Ok(())
            }
            _ => bail!("kill -9 needs process nodes (NodeKind::Process)"),
        }
    }

    /// Starts node `i` again with the same configuration (a new port).
    pub async fn restart_node(&mut self, i: usize) -> Result<()> {
        self.stop_node(i).await?;
        let dir = self.data.path().join(format!("node{i}"));
        let config = self.nodes[i].config.clone();
        self.nodes[i] = start_node(config, &self.kind, &dir).await?;
        Ok(())
    }

    /// The stderr of a process node (engine reports such as written-off credits).
    pub fn node_log(&self, i: usize) -> String {
        match &self.nodes[i].running {
            Running::Process { logs, .. } => {
                std::fs::read_to_string(logs.join("stderr.log")).unwrap_or_default()
            }
            _ => String::new(),
        }
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
        if let (Some(pg), Some(db)) = (self.postgres(), &self.pg_database) {
            pg.query("postgres", &format!("DROP DATABASE IF EXISTS {db}"))?;
        }
        if let (Some(ch), Some(db)) = (self.clickhouse(), &self.clickhouse_database) {
            ch.query(&format!("DROP DATABASE IF EXISTS {db}"))?;
        }
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        match std::mem::replace(&mut self.running, Running::Stopped) {
            Running::InProcess { stop, task } => {
                if let Some(stop) = stop {
                    let _ = stop.send(());
                }
                task.abort();
            }
            Running::Process { mut child, .. } => {
                let _ = child.kill();
                let _ = child.wait();
            }
            Running::Stopped => {}
        }
    }
}

async fn start_node(config: ServeConfig, kind: &NodeKind, dir: &Path) -> Result<Node> {
    let node_id = config.node_id.clone().unwrap_or_default();
    match kind {
        NodeKind::InProcess => {
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let app = App::build(config.clone(), node_id.clone()).await?;
            let (stop, stopped) = oneshot::channel::<()>();
            let task = tokio::spawn(app.serve(listener, async move {
                let _ = stopped.await;
            }));
            wait_live(&url, None).await?;
            Ok(Node {
                url,
                node_id,
                config,
                running: Running::InProcess {
                    stop: Some(stop),
                    task,
                },
            })
        }
        NodeKind::Process { binary } => {
            let logs = dir.join("logs");
            std::fs::create_dir_all(&logs)?;
            let port = {
                let l = std::net::TcpListener::bind("127.0.0.1:0")?;
                l.local_addr()?.port()
            };
            let mut cmd = Command::new(binary);
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("CREDITGATE_") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(&config.data_dir)
                .arg("--node-id")
                .arg(&node_id)
                .env(
                    "CREDITGATE_ROOT_KEY",
                    config.root_key.clone().unwrap_or_default(),
                )
                .env("NO_COLOR", "1")
                .stdin(Stdio::null())
                .stdout(std::fs::File::create(logs.join("stdout.log"))?)
                .stderr(std::fs::File::create(logs.join("stderr.log"))?);
            for (flag, value) in [
                ("--redis-url", &config.redis_url),
                ("--database-url", &config.database_url),
                ("--clickhouse-url", &config.clickhouse_url),
            ] {
                if let Some(v) = value {
                    cmd.arg(flag).arg(v);
                }
            }
            let mut child = cmd
                .spawn()
                .with_context(|| format!("spawning {}", binary.display()))?;
            let url = format!("http://127.0.0.1:{port}");
            if let Err(e) = wait_live(&url, Some(&mut child)).await {
                let log = std::fs::read_to_string(logs.join("stderr.log")).unwrap_or_default();
                let _ = child.kill();
                bail!("node {node_id} did not start: {e}\n{log}");
            }
            Ok(Node {
                url,
                node_id,
                config,
                running: Running::Process { child, logs },
            })
        }
    }
}

async fn wait_live(url: &str, mut child: Option<&mut Child>) -> Result<()> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(c) = child.as_deref_mut() {
            if let Some(status) = c.try_wait()? {
                bail!("exited early with {status}");
            }
        }
        if let Ok(r) = client
            .get(format!("{url}/v2/liveness"))
            .timeout(Duration::from_secs(2))
            .send()
            .await
        {
            if r.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("no liveness at {url} within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn wait_child(child: &mut Child, bound: Duration) -> Result<()> {
    let deadline = Instant::now() + bound;
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("node did not exit within {bound:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
