//! Configuration of one node: every field is a `creditgate serve` flag and a
//! `CREDITGATE_*` environment variable.

use std::net::SocketAddr;
use std::path::PathBuf;

/// How a node answers when neither the hot store nor the ledger can decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BackendFailure {
    /// Fail closed: HTTP 503, nothing spent.
    Deny,
    /// Fail open: answer VALID (no credits spent, no `credits` field).
    Allow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

/// `creditgate serve` options.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeConfig {
    /// Address to listen on.
    #[arg(long, env = "CREDITGATE_LISTEN", default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,

    /// Directory for the embedded default (SQLite file `creditgate.db`).
    #[arg(long, env = "CREDITGATE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Ledger and key store: `sqlite:<path>` or `postgres://…`. Default: SQLite in the
    /// data dir.
    #[arg(long, env = "CREDITGATE_DATABASE_URL")]
    pub database_url: Option<String>,

    /// Hot store: `redis://host:port` (multi-node mode). Default: in-process memory
    /// (only correct for a single node).
    #[arg(long, env = "CREDITGATE_REDIS_URL", conflicts_with = "redis_cluster")]
    pub redis_url: Option<String>,

    /// Hot store on a Redis Cluster: seed nodes `redis://host:port[,redis://…]`
    /// (multi-node mode; instead of `--redis-url`).
    #[arg(long, env = "CREDITGATE_REDIS_CLUSTER")]
    pub redis_cluster: Option<String>,

    /// Analytics: `http://host:8123[?database=db]` (ClickHouse HTTP interface).
    /// Default: the SQL database (`analytics.db` beside a SQLite ledger).
    #[arg(long, env = "CREDITGATE_CLICKHOUSE_URL")]
    pub clickhouse_url: Option<String>,

    /// Name of this node in analytics and metrics. Default: `node-<port>`.
    #[arg(long, env = "CREDITGATE_NODE_ID")]
    pub node_id: Option<String>,

    /// Region recorded with every verification.
    #[arg(long, env = "CREDITGATE_REGION", default_value = "local")]
    pub region: String,

    /// Makes sure a workspace and a root key with this secret (every permission) exist.
    #[arg(long, env = "CREDITGATE_ROOT_KEY", hide_env_values = true)]
    pub root_key: Option<String>,

    /// Log output format.
    #[arg(
        long,
        env = "CREDITGATE_LOG_FORMAT",
        value_enum,
        default_value = "pretty"
    )]
    pub log_format: LogFormat,

    /// What to answer when the backends cannot decide a verification.
    #[arg(
        long,
        env = "CREDITGATE_ON_BACKEND_FAILURE",
        value_enum,
        default_value = "deny"
    )]
    pub on_backend_failure: BackendFailure,

    /// Largest accepted request body, in bytes (larger: 413).
    #[arg(long, env = "CREDITGATE_MAX_BODY_BYTES", default_value_t = 256 * 1024)]
    pub max_body_bytes: usize,

    /// A key idle this long returns its hot balance to the ledger, in milliseconds (a key
    /// spent every few seconds: after four of its gaps, at most 30 times this).
    #[arg(long, env = "CREDITGATE_IDLE_RETURN_MS", default_value_t = 2000)]
    pub idle_return_ms: u64,

    /// How often the reconciler runs, in milliseconds.
    #[arg(long, env = "CREDITGATE_RECONCILE_INTERVAL_MS", default_value_t = 500)]
    pub reconcile_interval_ms: u64,

    /// Requests this node works on at once; past it a request is answered 503 with
    /// `Retry-After` at once and changes nothing (liveness and metrics are exempt).
    #[arg(long, env = "CREDITGATE_MAX_IN_FLIGHT", default_value_t = 4096)]
    pub max_in_flight: usize,

    /// At shutdown, how long in-flight requests may take to finish before their
    /// connections are closed, in milliseconds.
    #[arg(long, env = "CREDITGATE_DRAIN_TIMEOUT_MS", default_value_t = 5_000)]
    pub drain_timeout_ms: u64,

    /// Upper bound on each later shutdown step (returning hot balances, flushing
    /// analytics), in milliseconds.
    #[arg(long, env = "CREDITGATE_SHUTDOWN_TIMEOUT_MS", default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,

    /// Tokio worker threads that serve requests (default: the number of CPUs).
    #[arg(long, env = "CREDITGATE_WORKERS")]
    pub workers: Option<usize>,

    /// Runs this node's clock ahead (or, negative, behind) the system clock by this
    /// many milliseconds, at most a year either way: for tests of refill periods, key
    /// expiry and clock skew between nodes. Leave it at 0 in production.
    #[arg(
        long,
        env = "CREDITGATE_CLOCK_SKEW_MS",
        default_value_t = 0,
        allow_hyphen_values = true,
        value_parser = clap::value_parser!(i64).range(-MAX_SKEW_MS..=MAX_SKEW_MS)
    )]
    pub clock_skew_ms: i64,

    /// Accept webhook endpoints on loopback, private, link-local and cloud-metadata
    /// hosts. Off by default: a root key must not reach into the server's own network.
    #[arg(long, env = "CREDITGATE_WEBHOOK_ALLOW_PRIVATE")]
    pub webhook_allow_private: bool,

    /// The wait before a failed webhook delivery's first retry, in milliseconds; each
    /// later wait doubles it (at most 1 h), with ±25 % jitter, for 25 h.
    #[arg(
        long,
        env = "CREDITGATE_WEBHOOK_FIRST_RETRY_MS",
        default_value_t = 5_000,
        value_parser = clap::value_parser!(u64).range(100..=3_600_000)
    )]
    pub webhook_first_retry_ms: u64,
}

/// Bound of `--clock-skew-ms`: a year.
const MAX_SKEW_MS: i64 = 366 * 24 * 3600 * 1000;

impl ServeConfig {
    /// A configuration for tests and tools: everything default, data in `data_dir`.
    pub fn for_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: data_dir.into(),
            database_url: None,
            redis_url: None,
            redis_cluster: None,
            clickhouse_url: None,
            node_id: None,
            region: "local".into(),
            root_key: None,
            log_format: LogFormat::Pretty,
            on_backend_failure: BackendFailure::Deny,
            max_body_bytes: 256 * 1024,
            idle_return_ms: 2000,
            reconcile_interval_ms: 500,
            max_in_flight: 4096,
            drain_timeout_ms: 5_000,
            shutdown_timeout_ms: 10_000,
            workers: None,
            clock_skew_ms: 0,
            webhook_allow_private: false,
            webhook_first_retry_ms: 5_000,
        }
    }

    /// Where analytics go when the ledger is SQLite: `analytics.db` beside it.
    pub fn analytics_sqlite_url(&self) -> Option<String> {
        let url = self.database_url();
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))?;
        if path.starts_with(":memory:") {
            return None;
        }
        let dir = std::path::Path::new(path)
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        Some(format!("sqlite:{}", dir.join("analytics.db").display()))
    }

    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("creditgate.db").display()))
    }
}
