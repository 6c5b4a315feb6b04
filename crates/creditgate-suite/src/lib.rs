//! The multi-node usage-limiting suite (the Rust form of the Go suite in
//! `shared/seeds`): a generated matrix of cases, accuracy, decrement and performance
//! tests, on real clusters from the testkit, driven by the shared load generator.
//! Every test prints its key metrics: success rate, credit accuracy, latency
//! distribution, node distribution and error patterns.

pub mod cases;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use creditgate_loadgen::{run, Admin, Mode, NodeChoice, Plan, Report, Stop};
use creditgate_testkit::Cluster;

pub use cases::Case;

/// Where a case runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// N nodes on Redis + Postgres + ClickHouse.
    Cluster,
    /// One node on the embedded default (SQLite, in-process hot store).
    Embedded,
}

/// `CREDITGATE_TEST_TIME_SCALE` (0 < s ≤ 1, default 1): compresses every paced run by
/// this factor (same number of requests, higher rate) for quick local runs.
pub fn time_scale() -> f64 {
    std::env::var("CREDITGATE_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| *s > 0.0 && *s <= 1.0)
        .unwrap_or(1.0)
}

/// A cluster with one API and one key.
pub struct Setup {
    pub cluster: Cluster,
    pub admin: Admin,
    pub api_id: String,
    pub key_id: String,
    pub secret: String,
    pub target: Target,
}

/// Logs of in-process nodes go to stderr (level from `CREDITGATE_LOG`, default warn), so a
/// 5xx in a test comes with its cause.
fn init_logging() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_env("CREDITGATE_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .try_init();
    });
}

pub async fn setup(nodes: usize, target: Target, credits: u64) -> Result<Setup> {
    init_logging();
    let builder = match target {
        Target::Cluster => Cluster::builder().shared_services(),
        Target::Embedded => Cluster::builder().embedded(),
    };
    let cluster = builder.nodes(nodes).start().await?;
    let admin = Admin::new(&cluster.nodes[0].url, &cluster.root_key);
    let api_id = admin.create_api("suite").await?;
    let (key_id, secret) = admin.create_key(&api_id, Some(credits)).await?;
    Ok(Setup {
        cluster,
        admin,
        api_id,
        key_id,
        secret,
        target,
    })
}

impl Setup {
    pub fn plan(&self, cost: u64, mode: Mode, stop: Stop) -> Plan {
        Plan {
            nodes: self.cluster.urls(),
            root_key: self.cluster.root_key.clone(),
            keys: vec![self.secret.clone()],
            cost,
            mode,
            stop,
            node_choice: NodeChoice::Random { seed: seed() },
            request_timeout: Duration::from_secs(10),
            max_in_flight: 1024,
            keep_request_ids: true,
        }
    }

    /// The ledger's own balance column: Postgres `keys.remaining`, or the embedded
    /// SQLite file.
    pub async fn sql_remaining(&self) -> Result<Option<i64>> {
        match self.target {
            Target::Cluster => self.cluster.sql_remaining(&self.key_id),
            Target::Embedded => {
                let db = self.cluster.nodes[0].data_dir().join("creditgate.db");
                let store =
                    creditgate_sql::SqlStore::connect(&format!("sqlite:{}", db.display())).await?;
                let v: Option<i64> = sqlx::query_scalar("SELECT remaining FROM keys WHERE id = ?")
                    .bind(self.key_id.as_str())
                    .fetch_one(store.pool())
                    .await?;
                store.close().await;
                Ok(v)
            }
        }
    }

    /// Waits (bounded) until the SQL balance is `expected`.
    pub async fn assert_sql_balance(&self, expected: u64, bound: Duration) {
        let started = Instant::now();
        loop {
            let got = self.sql_remaining().await.expect("reading the ledger");
            if got == i64::try_from(expected).ok() {
                println!("SQL balance {expected} after {:?}", started.elapsed());
                return;
            }
            assert!(
                started.elapsed() < bound,
                "SQL balance {got:?}, expected {expected} within {bound:?}"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Analytics rows for the key: (verification rows, VALID rows, distinct request ids
    /// of verify requests in `api_requests`).
    pub async fn analytics_counts(&self) -> Result<(u64, u64, u64)> {
        let key = self.key_id.replace('\'', "");
        match self.target {
            Target::Cluster => {
                let q = |sql: String| -> Result<u64> {
                    self.cluster
                        .clickhouse_query(&sql)?
                        .trim()
                        .parse::<u64>()
                        .context("count")
                };
                Ok((
                    q(format!("SELECT uniqExact(request_id) FROM key_verifications WHERE key_id = '{key}'"))?,
                    q(format!("SELECT uniqExact(request_id) FROM key_verifications WHERE key_id = '{key}' AND outcome = 'VALID'"))?,
                    q("SELECT uniqExact(request_id) FROM api_requests WHERE path = '/v2/keys.verifyKey'".into())?,
                ))
            }
            Target::Embedded => {
                let db = self.cluster.nodes[0].data_dir().join("analytics.db");
                let store =
                    creditgate_sql::SqlStore::connect(&format!("sqlite:{}", db.display())).await?;
                let one = |sql: &'static str| {
                    let key = key.clone();
                    let pool = store.pool().clone();
                    async move {
                        let n: i64 = sqlx::query_scalar(sql).bind(key).fetch_one(&pool).await?;
                        Ok::<u64, anyhow::Error>(u64::try_from(n).unwrap_or(0))
                    }
                };
                let rows = one(
                    "SELECT count(DISTINCT request_id) FROM key_verifications WHERE key_id = ?",
                )
                .await?;
                let valid = one("SELECT count(DISTINCT request_id) FROM key_verifications WHERE key_id = ? AND outcome = 'VALID'").await?;
                let n: i64 = sqlx::query_scalar("SELECT count(DISTINCT request_id) FROM api_requests WHERE path = '/v2/keys.verifyKey'")
                    .fetch_one(store.pool())
                    .await?;
                store.close().await;
                Ok((rows, valid, u64::try_from(n).unwrap_or(0)))
            }
        }
    }

    /// Waits (bounded) for the analytics to hold exactly these counts.
    pub async fn assert_analytics(&self, requests: u64, valid: u64, bound: Duration) {
        let started = Instant::now();
        loop {
            let got = self.analytics_counts().await.expect("reading analytics");
            if got == (requests, valid, requests) {
                println!("analytics: {requests} verification rows, {valid} VALID, {requests} request ids after {:?}", started.elapsed());
                return;
            }
            assert!(
                started.elapsed() < bound,
                "analytics (verification rows, VALID rows, verify request ids) = {got:?}, expected ({requests}, {valid}, {requests})"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Asserts, from the analytics the nodes wrote (ClickHouse `node_id`), that every node
    /// served some of the key's `requests` verifications and none more than 70 %
    /// (clusters of 2+): the spread as the servers saw it, not as the client dispatched.
    ///
    /// Only with at least 20 requests per node: the requests go to nodes at random, and
    /// with fewer a node that got none is a matter of chance, not of the servers (10
    /// requests on 3 nodes leave one empty 5 % of the time: 3 × (2/3)^10).
    pub async fn assert_spread(&self, nodes: usize, requests: u64) {
        if nodes < 2 || requests < 20 * u64::try_from(nodes).unwrap_or(u64::MAX) {
            return;
        }
        let per_node = self
            .cluster
            .wait_verifications_per_node(&self.key_id, requests, Duration::from_secs(15))
            .await;
        println!("verifications per node_id: {per_node:?}");
        assert_eq!(
            per_node.len(),
            nodes,
            "every node served verifications: {per_node:?}"
        );
        for (node, n) in &per_node {
            assert!(
                (*n as f64) <= 0.7 * requests as f64,
                "node {node} served {n} of {requests} verifications (> 70 %)"
            );
        }
    }

    /// Deletes the API and stops the cluster, dropping its databases.
    pub async fn teardown(self) {
        self.admin
            .delete_api(&self.api_id)
            .await
            .expect("deleting the API");
        self.cluster.destroy().await.expect("stopping the cluster");
    }
}

/// The seed of random node choice: `CREDITGATE_TEST_SEED` or random (printed).
pub fn seed() -> u64 {
    use std::sync::OnceLock;
    static SEED: OnceLock<u64> = OnceLock::new();
    *SEED.get_or_init(|| {
        let s = std::env::var("CREDITGATE_TEST_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos().into())
                    .unwrap_or(1)
            });
        println!("node choice seed {s} (re-run with CREDITGATE_TEST_SEED={s})");
        s
    })
}

/// Prints the key metrics of a run.
pub fn print_metrics(name: &str, r: &Report, expected_valid: u64, granted: u64, cost: u64) {
    let success = if r.requests == 0 {
        0.0
    } else {
        r.valid as f64 * 100.0 / r.requests as f64
    };
    println!("== {name}");
    println!(
        "success rate {success:.1}% ({} VALID of {} requests), USAGE_EXCEEDED {}",
        r.valid, r.requests, r.usage_exceeded
    );
    println!(
        "credit accuracy: {} credits spent of {granted} granted, expected {} ({} VALID expected)",
        r.valid * cost,
        expected_valid * cost,
        expected_valid
    );
    println!(
        "latency ms: p50 {:.2} p95 {:.2} p99 {:.2} max {:.2}; {:.1} RPS over {:.1} s",
        r.latency_ms.p50, r.latency_ms.p95, r.latency_ms.p99, r.latency_ms.max, r.rps, r.duration_s
    );
    println!("node distribution: {:?}", r.nodes);
    println!(
        "error patterns: {:?}, other outcomes: {:?}",
        r.errors, r.other_outcomes
    );
}

/// Asserts what every exactness test asserts.
pub fn assert_exact(r: &Report, credits: u64, cost: u64) -> u64 {
    let expected = r.requests.min(credits / cost.max(1));
    assert!(
        r.errors.is_empty(),
        "every response is 200: errors {:?}",
        r.errors
    );
    assert!(
        r.other_outcomes.is_empty(),
        "every invalid answer is USAGE_EXCEEDED: {:?}",
        r.other_outcomes
    );
    assert_eq!(
        r.valid, expected,
        "successes = min(requests, credits/cost) exactly"
    );
    assert_eq!(r.valid + r.usage_exceeded, r.requests);
    if r.valid > 0 {
        assert_eq!(
            r.min_remaining,
            Some(credits - r.valid * cost),
            "lowest remaining in a VALID answer"
        );
    }
    expected
}

/// The generated test's name of a case (as `build.rs` writes it).
pub fn plan_name(c: &Case) -> String {
    let hundredths = format!("{:.2}", c.load).replace('.', "_");
    format!(
        "usagelimit_nodes{:02}_credits{:04}_cost{:02}_load{hundredths:0>5}_duration{:03}",
        c.nodes, c.credits, c.cost, c.seconds
    )
}

/// One generated case: paced open-loop load at the suite's rate for the case's duration.
pub async fn run_generated(case: &Case, target: Target) {
    let scale = time_scale();
    let rate = Plan::rate_for(case.credits, case.cost, case.seconds, case.load);
    let seconds = case.seconds as f64 * scale;
    let requests = rate * case.seconds;
    let s = setup(case.nodes, target, case.credits)
        .await
        .expect("cluster setup");
    let plan = s.plan(
        case.cost,
        Mode::Open {
            rate_per_sec: rate as f64 / scale,
        },
        Stop::Requests(requests),
    );
    println!(
        "case {case:?} on {target:?}: {rate} rps × {} s = {requests} requests (time scale {scale})",
        case.seconds
    );
    let started = Instant::now();
    let r = run(&plan, None).await;
    let expected = r.requests.min(case.credits / case.cost);
    print_metrics(&format!("{case:?}"), &r, expected, case.credits, case.cost);
    assert_eq!(r.requests, requests, "requests sent");
    assert!(
        started.elapsed().as_secs_f64() >= seconds * 0.9,
        "the run was paced over {seconds} s, took {:?}",
        started.elapsed()
    );
    println!(
        "SUITE-RESULT | {} | {:?} | {requests} | {} | {expected} | {:.2} | {:.1} |",
        plan_name(case),
        target,
        r.valid,
        r.latency_ms.p99,
        started.elapsed().as_secs_f64()
    );
    let valid = assert_exact(&r, case.credits, case.cost);
    let balance = case.credits - valid * case.cost;
    s.assert_sql_balance(balance, Duration::from_secs(10)).await;
    s.assert_analytics(requests, valid, Duration::from_secs(15))
        .await;
    let ids: std::collections::BTreeSet<&String> = r.request_ids.iter().collect();
    assert_eq!(
        u64::try_from(ids.len()).unwrap_or(0),
        requests,
        "distinct request ids answered"
    );
    s.teardown().await;
}

/// A closed-loop accuracy run: `concurrency` workers, `requests` in all, a little jitter.
pub async fn run_accuracy(
    name: &str,
    nodes: usize,
    credits: u64,
    cost: u64,
    concurrency: usize,
    requests: u64,
) -> Report {
    let s = setup(nodes, Target::Cluster, credits)
        .await
        .expect("cluster setup");
    let plan = s.plan(
        cost,
        Mode::Closed {
            concurrency,
            think_time: Some((Duration::ZERO, Duration::from_millis(3))),
        },
        Stop::Requests(requests),
    );
    let r = run(&plan, None).await;
    let expected = requests.min(credits / cost);
    print_metrics(name, &r, expected, credits, cost);
    assert_eq!(r.requests, requests);
    let valid = assert_exact(&r, credits, cost);
    s.assert_spread(nodes, requests).await;
    s.assert_sql_balance(credits - valid * cost, Duration::from_secs(10))
        .await;
    s.teardown().await;
    r
}
