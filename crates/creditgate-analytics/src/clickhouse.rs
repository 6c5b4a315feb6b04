//! The ClickHouse [`Sink`]: writes batches over ClickHouse's HTTP interface with
//! `INSERT INTO <table> FORMAT JSONEachRow`, one request per table per batch.
//!
//! Only SQL that ClickHouse 18.16 (the Debian package) and current releases both
//! understand is used: `ReplacingMergeTree` with `PARTITION BY`/`ORDER BY`, `DateTime('UTC')`
//! (18.16 has no `DateTime64`, so the millisecond time is a second column `time_ms`),
//! `Nullable`, `Array(String)`, no `LowCardinality`, no server-side query parameters.
//! Values only ever travel in the JSON body; identifiers are validated to
//! `[A-Za-z0-9_]` and back-quoted.
//!
//! # Idempotency
//! The batcher retries a failed batch, and this sink makes retries as safe as is cheap:
//! - Each insert of ≤ 1,048,576 rows (`max_insert_block_size`; the batcher flushes at
//!   10,000) is atomic in ClickHouse, so a failed request wrote nothing of its table.
//! - When the `key_verifications` insert landed but the `api_requests` one failed, the sink
//!   remembers a fingerprint of the verification rows and, when the same batch is retried,
//!   writes only the requests — a partial failure does not duplicate rows.
//! - A reply lost *after* ClickHouse applied an insert cannot be told apart from a failure,
//!   so the retry writes those rows a second time. The body of a batch is deterministic,
//!   so on `Replicated*MergeTree` tables the server's default `insert_deduplicate=1`
//!   drops the copy. On the tables this sink creates, the engine is `ReplacingMergeTree`
//!   whose sort key ends with `request_id`: duplicates share every sort-key column and
//!   collapse when parts merge. Until a merge, exact counts need `FINAL` or
//!   `uniqExact(request_id)`; plain `count()` can over-count by the rows of a batch whose
//!   reply was lost (rare: it needs a network failure after the server's commit).

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Url;
use serde::Serialize;

use crate::usage::{UsageBucket, UsageGroup, UsageQuery, UsageSource};
use crate::{Batch, RequestEvent, Sink, SinkError, VerificationEvent};

/// Columns of the verifications table added after its first version: (name, type).
const ADDED_VERIFICATION_COLUMNS: [(&str, &str); 2] = [
    ("identity_id", "String"),
    ("exceeded_ratelimits", "Array(String)"),
];

/// How long an idle HTTP connection is kept for the next batch.
const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest server error message kept in an error (ClickHouse can return stack traces).
const MAX_ERROR_MESSAGE_CHARS: usize = 2_000;

/// Settings of a [`ClickHouseSink`] besides its URL.
#[derive(Debug, Clone)]
pub struct ClickHouseOptions {
    /// Prepended to both table names: `<prefix>key_verifications`, `<prefix>api_requests`.
    /// Letters, digits and `_` only. Tests use a unique prefix each for isolation.
    pub table_prefix: String,
    /// Bound on each HTTP request (connect, send the batch, read the reply).
    pub request_timeout: Duration,
    /// Bound on establishing the TCP connection.
    pub connect_timeout: Duration,
    /// At connect, create the database named in the URL and both tables if missing.
    /// Turn off when the schema is managed elsewhere (the tables must then exist).
    pub create_tables: bool,
}

impl Default for ClickHouseOptions {
    fn default() -> Self {
        Self {
            table_prefix: String::new(),
            request_timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            create_tables: true,
        }
    }
}

/// What can go wrong talking to ClickHouse.
#[derive(Debug, thiserror::Error)]
pub enum ClickHouseError {
    /// The URL is not an `http://` / `https://` URL of a ClickHouse HTTP interface.
    #[error("invalid ClickHouse URL: {0}")]
    InvalidUrl(String),
    /// A database or table name outside `[A-Za-z0-9_]`.
    #[error("invalid ClickHouse identifier {0:?}: use letters, digits and '_' only")]
    InvalidIdentifier(String),
    /// No answer: connection refused, timeout, reset…
    #[error("ClickHouse unreachable: {0}")]
    Transport(String),
    /// ClickHouse answered with an error (its message, e.g. `Code: 60, … Table … doesn't exist`).
    #[error("ClickHouse error (HTTP {status}): {message}")]
    Server { status: u16, message: String },
}

impl From<ClickHouseError> for SinkError {
    fn from(e: ClickHouseError) -> Self {
        SinkError(e.to_string())
    }
}

/// Writes analytics batches to ClickHouse; see the module docs for the schema and the
/// retry semantics.
pub struct ClickHouseSink {
    client: reqwest::Client,
    /// Endpoint without credentials in the query; user info (if any) is sent as basic auth.
    endpoint: Url,
    /// Query parameters sent with every request (`database` and any ClickHouse settings
    /// given in the URL), minus `user` / `password`.
    params: Vec<(String, String)>,
    /// `user` / `password` from the query string, sent as HTTP basic auth.
    credentials: Option<(String, Option<String>)>,
    database: Option<String>,
    verifications_table: String,
    requests_table: String,
    /// Fingerprint of verification rows that landed while the requests of the same
    /// batch failed; a retry of that batch skips them.
    verifications_landed: Mutex<Option<u64>>,
}

impl std::fmt::Debug for ClickHouseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseSink")
            .field("host", &self.endpoint.host_str())
            .field("port", &self.endpoint.port_or_known_default())
            .field("database", &self.database)
            .field("verifications_table", &self.verifications_table)
            .field("requests_table", &self.requests_table)
            .finish_non_exhaustive()
    }
}

impl ClickHouseSink {
    /// Connects to the HTTP interface at `url` — `http://host:8123`, optionally
    /// `?database=<db>`, credentials as `http://user:pass@host:8123` or
    /// `?user=…&password=…`, and any other query parameter passed on as a ClickHouse
    /// setting — checks that the server answers, and (unless turned off) creates the
    /// database and the tables if missing.
    pub async fn connect(url: &str, options: ClickHouseOptions) -> Result<Self, ClickHouseError> {
        let mut endpoint =
            Url::parse(url).map_err(|e| ClickHouseError::InvalidUrl(format!("{url:?}: {e}")))?;
        if !matches!(endpoint.scheme(), "http" | "https") || endpoint.host_str().is_none() {
            return Err(ClickHouseError::InvalidUrl(format!(
                "{}: expected http://host:port",
                redacted(&endpoint)
            )));
        }
        let mut params = Vec::new();
        let mut user = None;
        let mut password = None;
        let mut database = None;
        for (name, value) in endpoint.query_pairs() {
            match &*name {
                "user" => user = Some(value.into_owned()),
                "password" => password = Some(value.into_owned()),
                "query" => {
                    return Err(ClickHouseError::InvalidUrl(
                        "the URL must not carry a `query` parameter".into(),
                    ))
                }
                _ => {
                    if name == "database" && !value.is_empty() {
                        database = Some(validated(&value)?.to_owned());
                    }
                    params.push((name.into_owned(), value.into_owned()));
                }
            }
        }
        endpoint.set_query(None);
        endpoint.set_fragment(None);
        let credentials = match (user, password) {
            (None, None) => None,
            (user, password) => {
                // The query string wins over user info in the authority.
                let _ = endpoint.set_username("");
                let _ = endpoint.set_password(None);
                Some((user.unwrap_or_else(|| "default".into()), password))
            }
        };
        let prefix = &options.table_prefix;
        if !prefix.is_empty() {
            validated(prefix)?;
        }
        let client = reqwest::Client::builder()
            .timeout(options.request_timeout)
            .connect_timeout(options.connect_timeout)
            // Below the server's keep-alive timeout (3 s in the packaged config), so an
            // idle connection is not reused just as the server closes it.
            .pool_idle_timeout(IDLE_CONNECTION_TIMEOUT)
            .build()
            .map_err(|e| ClickHouseError::Transport(error_chain(&e)))?;
        let sink = Self {
            client,
            endpoint,
            params,
            credentials,
            database,
            verifications_table: format!("{prefix}key_verifications"),
            requests_table: format!("{prefix}api_requests"),
            verifications_landed: Mutex::new(None),
        };
        if options.create_tables {
            sink.create_tables().await?;
        } else {
            sink.execute("SELECT 1", true).await?;
        }
        Ok(sink)
    }

    /// Name of the verification table (with the prefix).
    pub fn verifications_table(&self) -> &str {
        &self.verifications_table
    }

    /// Name of the request table (with the prefix).
    pub fn requests_table(&self) -> &str {
        &self.requests_table
    }

    /// The database from the URL, if one was named (otherwise the user's default).
    pub fn database(&self) -> Option<&str> {
        self.database.as_deref()
    }

    /// The DDL this sink runs at connect: `CREATE TABLE IF NOT EXISTS` for both tables
    /// (then the columns of [`ADDED_VERIFICATION_COLUMNS`] a table made before lacks).
    pub fn schema(&self) -> [String; 2] {
        [
            format!(
                "CREATE TABLE IF NOT EXISTS `{}` (\
                 request_id String, \
                 time DateTime('UTC'), \
                 time_ms UInt64, \
                 workspace_id String, \
                 api_id String, \
                 key_id String, \
                 node_id String, \
                 region String, \
                 outcome String, \
                 cost UInt64, \
                 spent_credits UInt64, \
                 remaining Nullable(UInt64), \
                 latency_us UInt64, \
                 tags Array(String), \
                 identity_id String, \
                 exceeded_ratelimits Array(String)\
                 ) ENGINE = ReplacingMergeTree() \
                 PARTITION BY toYYYYMM(time) \
                 ORDER BY (workspace_id, key_id, time, request_id)",
                self.verifications_table
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS `{}` (\
                 request_id String, \
                 time DateTime('UTC'), \
                 time_ms UInt64, \
                 workspace_id String, \
                 method String, \
                 path String, \
                 status UInt16, \
                 latency_us UInt64, \
                 node_id String\
                 ) ENGINE = ReplacingMergeTree() \
                 PARTITION BY toYYYYMM(time) \
                 ORDER BY (workspace_id, time, request_id)",
                self.requests_table
            ),
        ]
    }

    async fn create_tables(&self) -> Result<(), ClickHouseError> {
        if let Some(db) = &self.database {
            // Without `database=`: the server refuses any request naming a missing one.
            self.execute(&format!("CREATE DATABASE IF NOT EXISTS `{db}`"), false)
                .await?;
        }
        for ddl in self.schema() {
            self.execute(&ddl, true).await?;
        }
        // A table made by an earlier version gets the columns added since (18.16 has no
        // `ADD COLUMN IF NOT EXISTS`: ask `system.columns`).
        for (column, kind) in ADDED_VERIFICATION_COLUMNS {
            let found = self
                .execute(
                    &format!(
                        "SELECT count() FROM system.columns WHERE database = currentDatabase() \
                         AND table = '{}' AND name = '{column}'",
                        self.verifications_table
                    ),
                    true,
                )
                .await?;
            if found.trim() == "0" {
                self.execute(
                    &format!(
                        "ALTER TABLE `{}` ADD COLUMN {column} {kind}",
                        self.verifications_table
                    ),
                    true,
                )
                .await?;
            }
        }
        Ok(())
    }

    /// Runs one statement, sent as the POST body (18.16 answers HTTP 411 to a POST
    /// without a body, and reqwest sends no `Content-Length: 0`).
    async fn execute(&self, sql: &str, with_database: bool) -> Result<String, ClickHouseError> {
        self.post(None, sql.as_bytes().to_vec(), with_database)
            .await
    }

    /// The statement goes in the `query` parameter, the rows in the body.
    async fn insert(&self, table: &str, rows: Vec<u8>) -> Result<(), ClickHouseError> {
        let sql = format!("INSERT INTO `{table}` FORMAT JSONEachRow");
        self.post(Some(&sql), rows, true).await.map(drop)
    }

    async fn post(
        &self,
        query: Option<&str>,
        body: Vec<u8>,
        with_database: bool,
    ) -> Result<String, ClickHouseError> {
        let mut params: Vec<(&str, &str)> = self
            .params
            .iter()
            .filter(|(name, _)| with_database || name != "database")
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        if let Some(sql) = query {
            params.push(("query", sql));
        }
        let mut request = self
            .client
            .post(self.endpoint.clone())
            .query(&params)
            .body(body);
        if let Some((user, password)) = &self.credentials {
            request = request.basic_auth(user, password.as_ref());
        }
        let response = request
            .send()
            .await
            .map_err(|e| ClickHouseError::Transport(error_chain(&e.without_url())))?;
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|e| ClickHouseError::Transport(error_chain(&e.without_url())))?;
        if status.is_success() {
            Ok(text)
        } else {
            Err(ClickHouseError::Server {
                status: status.as_u16(),
                message: truncated(text.trim()),
            })
        }
    }
}

/// Usage buckets from the verifications table, read with `FINAL` so rows a retried
/// batch wrote twice count once (see the module docs). Values are written into the SQL
/// as literals (18.16 has no query parameters): strings quoted by [`quoted`], numbers
/// formatted from integers.
#[async_trait]
impl UsageSource for ClickHouseSink {
    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageBucket>, SinkError> {
        let g = q.granularity.millis();
        let (group, array_join) = match q.group_by {
            None => ("''", ""),
            Some(UsageGroup::Outcome) => ("outcome", ""),
            Some(UsageGroup::KeyId) => ("key_id", ""),
            Some(UsageGroup::Tag) => ("tag", " ARRAY JOIN tags AS tag"),
        };
        let mut filter = format!(
            "workspace_id = {} AND time_ms >= {} AND time_ms < {}",
            quoted(&q.workspace_id),
            q.from_ms.max(0),
            q.to_ms.max(0)
        );
        for (column, value) in [
            ("api_id", &q.api_id),
            ("key_id", &q.key_id),
            ("identity_id", &q.identity_id),
        ] {
            if let Some(v) = value {
                filter.push_str(&format!(" AND {column} = {}", quoted(v)));
            }
        }
        let sql = format!(
            "SELECT intDiv(time_ms, {g}) * {g} AS bucket, {group} AS grp, count() AS n, \
             sum(spent_credits) AS spent \
             FROM `{table}` FINAL{array_join} WHERE {filter} \
             GROUP BY bucket, grp ORDER BY bucket, grp LIMIT {limit} FORMAT JSONEachRow",
            table = self.verifications_table,
            limit = q.max_buckets.saturating_add(1),
        );
        let text = self.execute(&sql, true).await?;
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|line| {
                let row: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| SinkError(format!("ClickHouse usage row {line:?}: {e}")))?;
                let number = |name: &str| -> Result<u64, SinkError> {
                    // 64-bit integers come quoted by default
                    // (`output_format_json_quote_64bit_integers`).
                    match &row[name] {
                        serde_json::Value::Number(n) => n.as_u64(),
                        serde_json::Value::String(s) => s.parse().ok(),
                        _ => None,
                    }
                    .ok_or_else(|| {
                        SinkError(format!("ClickHouse usage row without {name}: {line}"))
                    })
                };
                let group = match (q.group_by, &row["grp"]) {
                    (None, _) => None,
                    (Some(_), serde_json::Value::String(s)) => Some(s.clone()),
                    (Some(_), _) => {
                        return Err(SinkError(format!(
                            "ClickHouse usage row without grp: {line}"
                        )))
                    }
                };
                Ok(UsageBucket {
                    time: i64::try_from(number("bucket")?).unwrap_or(i64::MAX),
                    group,
                    count: number("n")?,
                    spent_credits: number("spent")?,
                })
            })
            .collect()
    }
}

/// A ClickHouse string literal: quoted, with backslashes and quotes escaped.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('\'');
    for c in value.chars() {
        if c == '\\' || c == '\'' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('\'');
    out
}

#[async_trait]
impl Sink for ClickHouseSink {
    async fn write(&self, batch: &Batch) -> Result<(), SinkError> {
        let verifications = rows(batch.verifications.iter().map(VerificationRow::from))?;
        let requests = rows(batch.requests.iter().map(RequestRow::from))?;
        if !verifications.is_empty() {
            let fingerprint = fingerprint(&verifications);
            let landed = *lock(&self.verifications_landed) == Some(fingerprint);
            if !landed {
                self.insert(&self.verifications_table, verifications)
                    .await?;
                *lock(&self.verifications_landed) = Some(fingerprint);
            }
        }
        if !requests.is_empty() {
            self.insert(&self.requests_table, requests).await?;
        }
        *lock(&self.verifications_landed) = None;
        Ok(())
    }
}

/// A `key_verifications` row as ClickHouse receives it.
#[derive(Serialize)]
struct VerificationRow<'a> {
    request_id: &'a str,
    /// Unix seconds; `DateTime` parses a JSON number as a timestamp.
    time: u32,
    time_ms: u64,
    workspace_id: &'a str,
    api_id: &'a str,
    key_id: &'a str,
    node_id: &'a str,
    region: &'a str,
    outcome: &'a str,
    cost: u64,
    spent_credits: u64,
    remaining: Option<u64>,
    latency_us: u64,
    tags: &'a [String],
    identity_id: &'a str,
    exceeded_ratelimits: &'a [String],
}

impl<'a> From<&'a VerificationEvent> for VerificationRow<'a> {
    fn from(e: &'a VerificationEvent) -> Self {
        let (time, time_ms) = clickhouse_time(e.time);
        Self {
            request_id: &e.request_id,
            time,
            time_ms,
            workspace_id: &e.workspace_id,
            api_id: &e.api_id,
            key_id: &e.key_id,
            node_id: &e.node_id,
            region: &e.region,
            outcome: e.outcome,
            cost: e.cost,
            spent_credits: e.spent_credits,
            remaining: e.remaining,
            latency_us: e.latency_us,
            tags: &e.tags,
            identity_id: &e.identity_id,
            exceeded_ratelimits: &e.exceeded_ratelimits,
        }
    }
}

/// An `api_requests` row as ClickHouse receives it.
#[derive(Serialize)]
struct RequestRow<'a> {
    request_id: &'a str,
    time: u32,
    time_ms: u64,
    workspace_id: &'a str,
    method: &'a str,
    path: &'a str,
    status: u16,
    latency_us: u64,
    node_id: &'a str,
}

impl<'a> From<&'a RequestEvent> for RequestRow<'a> {
    fn from(e: &'a RequestEvent) -> Self {
        let (time, time_ms) = clickhouse_time(e.time);
        Self {
            request_id: &e.request_id,
            time,
            time_ms,
            workspace_id: &e.workspace_id,
            method: &e.method,
            path: &e.path,
            status: e.status,
            latency_us: e.latency_us,
            node_id: &e.node_id,
        }
    }
}

/// Unix ms → (`DateTime` seconds, `time_ms`), clamped to what the columns hold
/// (1970 … 2106); times before 1970 become 0.
fn clickhouse_time(unix_ms: i64) -> (u32, u64) {
    let ms = u64::try_from(unix_ms).unwrap_or(0);
    let secs = u32::try_from(ms / 1000).unwrap_or(u32::MAX);
    (secs, ms)
}

/// Newline-delimited JSON, one object per row.
fn rows<T: Serialize>(rows: impl Iterator<Item = T>) -> Result<Vec<u8>, SinkError> {
    let mut body = Vec::new();
    for row in rows {
        serde_json::to_writer(&mut body, &row)
            .map_err(|e| SinkError(format!("serialize analytics row: {e}")))?;
        body.push(b'\n');
    }
    Ok(body)
}

fn fingerprint(body: &[u8]) -> u64 {
    let mut hasher = DefaultHasher::new();
    body.hash(&mut hasher);
    hasher.finish()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn validated(name: &str) -> Result<&str, ClickHouseError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(name)
    } else {
        Err(ClickHouseError::InvalidIdentifier(name.to_owned()))
    }
}

fn truncated(message: &str) -> String {
    match message.char_indices().nth(MAX_ERROR_MESSAGE_CHARS) {
        Some((end, _)) => format!("{}…", &message[..end]),
        None => message.to_owned(),
    }
}

/// An error with its causes (reqwest's own message omits "connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn redacted(url: &Url) -> String {
    let mut url = url.clone();
    let _ = url.set_password(None);
    url.set_query(None);
    url.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_is_clamped_to_the_column_ranges() {
        assert_eq!(
            clickhouse_time(1_700_000_000_123),
            (1_700_000_000, 1_700_000_000_123)
        );
        assert_eq!(clickhouse_time(-5), (0, 0));
        assert_eq!(clickhouse_time(i64::MAX).0, u32::MAX);
    }

    #[test]
    fn rows_are_newline_delimited_json_with_the_table_columns() {
        let v = VerificationEvent {
            request_id: "req_1".into(),
            time: 1_700_000_000_123,
            workspace_id: "ws".into(),
            api_id: "api".into(),
            key_id: "key".into(),
            node_id: "n1".into(),
            region: "local".into(),
            outcome: "VALID",
            cost: 1,
            spent_credits: 1,
            remaining: None,
            latency_us: 42,
            tags: vec!["a".into()],
            identity_id: "id_1".into(),
            exceeded_ratelimits: vec!["requests".into()],
        };
        let body = rows([&v, &v].into_iter().map(VerificationRow::from)).unwrap();
        let text = String::from_utf8(body).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let row: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(row["time"], 1_700_000_000);
        assert_eq!(row["time_ms"], 1_700_000_000_123_u64);
        assert_eq!(row["remaining"], serde_json::Value::Null);
        assert_eq!(row["tags"][0], "a");
        assert_eq!(row["identity_id"], "id_1");
        assert_eq!(row["exceeded_ratelimits"][0], "requests");
        assert!(text.ends_with('\n'));
    }

    #[test]
    fn identifiers_are_restricted() {
        assert!(validated("cg_test_1").is_ok());
        for bad in ["", "a-b", "a`b", "a b", "db;DROP"] {
            assert!(validated(bad).is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn bad_urls_and_prefixes_are_rejected_before_any_request() {
        let err = ClickHouseSink::connect("redis://x", ClickHouseOptions::default()).await;
        assert!(
            matches!(err, Err(ClickHouseError::InvalidUrl(_))),
            "{err:?}"
        );
        let err = ClickHouseSink::connect(
            "http://127.0.0.1:1?database=a-b",
            ClickHouseOptions::default(),
        )
        .await;
        assert!(
            matches!(err, Err(ClickHouseError::InvalidIdentifier(_))),
            "{err:?}"
        );
        let options = ClickHouseOptions {
            table_prefix: "x;".into(),
            ..ClickHouseOptions::default()
        };
        let err = ClickHouseSink::connect("http://127.0.0.1:1", options).await;
        assert!(
            matches!(err, Err(ClickHouseError::InvalidIdentifier(_))),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn unreachable_server_is_a_transport_error() {
        let options = ClickHouseOptions {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(1),
            ..ClickHouseOptions::default()
        };
        // Port 1 on loopback: nothing listens there.
        let err = ClickHouseSink::connect("http://127.0.0.1:1", options).await;
        assert!(matches!(err, Err(ClickHouseError::Transport(_))), "{err:?}");
    }
}
