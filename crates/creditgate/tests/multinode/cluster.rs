//! A cluster of real `creditgate serve` processes on real Redis, Postgres and ClickHouse
//! (testkit), and a load driver that records every answer.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate_testkit::{unique_name, ClickHouse, Postgres, RedisServer};
use serde_json::{json, Value};

use crate::node::{Node, NodeOptions};

pub const ROOT: &str = "multinode-root-key";

/// Where a cluster's nodes keep their state.
pub struct Backends {
    pub redis_url: String,
    pub database_url: String,
    pub clickhouse_url: String,
    pub clickhouse_db: String,
    pub pg_db: String,
}

impl Backends {
    /// A fresh Postgres database and ClickHouse database on the shared servers, and the
    /// given Redis.
    pub fn on(redis: &RedisServer, pg: &Postgres) -> Backends {
        let pg_db = unique_name("cg");
        let database_url = pg.create_database(&pg_db).expect("postgres database");
        let clickhouse_db = unique_name("cg");
        let clickhouse_url = format!("{}/?database={clickhouse_db}", ClickHouse::shared().url());
        Backends {
            redis_url: redis.url(),
            database_url,
            clickhouse_url,
            clickhouse_db,
            pg_db,
        }
    }
}

pub struct Cluster {
    pub nodes: Vec<Node>,
    pub backends: Backends,
    _data: tempfile::TempDir,
}

impl Cluster {
    pub async fn start(n: usize, backends: Backends) -> Cluster {
        let data = tempfile::tempdir().expect("data dir");
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(start_node(data.path(), &backends, i).await);
        }
        Cluster {
            nodes,
            backends,
            _data: data,
        }
    }

    pub async fn restart_node(&mut self, i: usize) {
        let data = self._data.path().to_owned();
        self.nodes[i] = start_node(&data, &self.backends, i).await;
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url.clone()).collect()
    }

    /// An API and a key with `credits`; returns (key id, secret).
    pub async fn key(&self, credits: u64) -> (String, String) {
        let api = self.nodes[0].create_api(ROOT, "multinode").await;
        self.nodes[0].create_key(ROOT, &api, credits).await
    }

    /// `SELECT remaining FROM keys WHERE id = …` on Postgres.
    pub fn sql_remaining(&self, pg: &Postgres, key_id: &str) -> Option<i64> {
        let out = pg
            .query(
                &self.backends.pg_db,
                &format!("SELECT remaining FROM keys WHERE id = '{key_id}'"),
            )
            .expect("postgres query");
        out.trim().parse().ok()
    }

    /// Waits (bounded) until the Postgres balance equals `want`; returns the time taken.
    pub async fn wait_sql_remaining(
        &self,
        pg: &Postgres,
        key_id: &str,
        want: i64,
        bound: Duration,
    ) -> Duration {
        let started = Instant::now();
        loop {
            let got = self.sql_remaining(pg, key_id);
            if got == Some(want) {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < bound,
                "Postgres remaining for {key_id} is {got:?}, expected {want} within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn clickhouse(&self, sql: &str) -> String {
        ClickHouse::shared()
            .query_in(Some(&self.backends.clickhouse_db), sql)
            .expect("clickhouse query")
    }

    /// Every node's stderr, for the "lost" reports of the engine.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(Node::stderr)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

async fn start_node(data: &Path, b: &Backends, i: usize) -> Node {
    let dir = data.join(format!("node{i}"));
    std::fs::create_dir_all(&dir).expect("node dir");
    Node::start_with(
        &dir,
        NodeOptions {
            root_key: Some(ROOT.into()),
            args: vec![
                "--node-id".into(),
                format!("node-{i}"),
                "--database-url".into(),
                b.database_url.clone(),
                "--redis-url".into(),
                b.redis_url.clone(),
                "--clickhouse-url".into(),
                b.clickhouse_url.clone(),
            ],
        },
    )
    .await
}

/// What a load run saw.
#[derive(Debug, Default)]
pub struct Seen {
    pub valid: u64,
    pub exceeded: u64,
    /// Non-200 answers and transport errors, by kind.
    pub errors: BTreeMap<String, u64>,
    /// `credits` of every VALID answer.
    pub valid_credits: Vec<u64>,
    pub request_ids: BTreeSet<String>,
    pub per_node: BTreeMap<String, u64>,
}

impl Seen {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    fn merge(&mut self, o: Seen) {
        self.valid += o.valid;
        self.exceeded += o.exceeded;
        for (k, v) in o.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.valid_credits.extend(o.valid_credits);
        self.request_ids.extend(o.request_ids);
        for (k, v) in o.per_node {
            *self.per_node.entry(k).or_default() += v;
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(64)
        .build()
        .expect("client")
}

async fn verify_once(client: &reqwest::Client, url: &str, key: &str, cost: u64, seen: &mut Seen) {
    *seen.per_node.entry(url.to_owned()).or_default() += 1;
    let r = client
        .post(format!("{url}/v2/keys.verifyKey"))
        .bearer_auth(ROOT)
        .json(&json!({"key": key, "credits": {"cost": cost}}))
        .send()
        .await;
    let r = match r {
        Ok(r) => r,
        Err(e) => {
            let kind = if e.is_timeout() {
                "timeout"
            } else {
                "transport"
            };
            *seen.errors.entry(kind.into()).or_default() += 1;
            return;
        }
    };
    let status = r.status().as_u16();
    let body: Value = match r.json().await {
        Ok(b) => b,
        Err(_) => {
            *seen
                .errors
                .entry(format!("http {status} (no json)"))
                .or_default() += 1;
            return;
        }
    };
    if status != 200 {
        *seen.errors.entry(format!("http {status}")).or_default() += 1;
        return;
    }
    if let Some(id) = body["meta"]["requestId"].as_str() {
        seen.request_ids.insert(id.to_owned());
    }
    match body["data"]["code"].as_str() {
        Some("VALID") => {
            seen.valid += 1;
            if let Some(c) = body["data"]["credits"].as_u64() {
                seen.valid_credits.push(c);
            }
        }
        Some("USAGE_EXCEEDED") => seen.exceeded += 1,
        other => *seen.errors.entry(format!("code {other:?}")).or_default() += 1,
    }
}

/// `total` verifications by `concurrency` workers, request `i` to node `i % n`.
pub async fn burst(
    urls: &[String],
    key: &str,
    cost: u64,
    total: usize,
    concurrency: usize,
) -> Seen {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let urls = Arc::new(urls.to_vec());
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, urls, key) = (next.clone(), urls.clone(), key.to_owned());
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut seen = Seen::default();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= total {
                    return seen;
                }
                verify_once(&client, &urls[i % urls.len()], &key, cost, &mut seen).await;
            }
        }));
    }
    let mut all = Seen::default();
    for t in tasks {
        all.merge(t.await.expect("worker"));
    }
    all
}

/// Verifications for `duration` by `concurrency` workers spread over the nodes, each
/// worker pausing `gap` between requests.
pub async fn sustained(
    urls: Vec<String>,
    key: String,
    cost: u64,
    duration: Duration,
    concurrency: usize,
    gap: Duration,
) -> Seen {
    let deadline = Instant::now() + duration;
    let mut tasks = Vec::new();
    for w in 0..concurrency {
        let (urls, key) = (urls.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut seen = Seen::default();
            let mut i = w;
            while Instant::now() < deadline {
                verify_once(&client, &urls[i % urls.len()], &key, cost, &mut seen).await;
                i += 1;
                tokio::time::sleep(gap).await;
            }
            seen
        }));
    }
    let mut all = Seen::default();
    for t in tasks {
        all.merge(t.await.expect("worker"));
    }
    all
}

/// The credits the engine logged as written off ("lost=<n>") across the given logs.
pub fn reported_lost(logs: &str) -> u64 {
    logs.lines()
        .filter(|l| l.contains("hot store lost its data"))
        .filter_map(|l| {
            let i = l.find("lost=")?;
            l[i + 5..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u64>()
                .ok()
        })
        .sum()
}
