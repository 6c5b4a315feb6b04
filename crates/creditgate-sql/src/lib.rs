//! SQL backends of creditgate, on SQLite (the embedded default) and Postgres, through
//! sqlx's `Any` driver: one [`SqlStore`] implements the [`KeyStore`] port (workspaces,
//! APIs, keys, root keys), the limiter's [`Ledger`] port (balances, transfers, fences)
//! and the analytics [`Sink`] port (`key_verifications`, `api_requests`).
//!
//! [`SqlStore::connect`] picks the backend from the URL, applies the migrations of
//! `migrations/sqlite` or `migrations/postgres` and returns a cheap-to-clone handle.
//! SQL text is shared between the backends: `$1`-style placeholders, `BIGINT` for
//! integers and booleans (0/1), `TEXT` for JSON.
//!
//! On SQLite reads use a small pool of connections (WAL lets them run beside a writer)
//! while every write goes through one dedicated connection, so writers queue in the
//! pool instead of polling SQLite's busy handler; multi-statement writes start with
//! `BEGIN IMMEDIATE` so that two processes sharing the file cannot deadlock on a lock
//! upgrade. On Postgres both are the same pool and row locks serialise writers.
//!
//! [`KeyStore`]: creditgate_domain::KeyStore
//! [`Ledger`]: creditgate_limiter::ports::Ledger
//! [`Sink`]: creditgate_analytics::Sink

mod alerts;
mod analytics;
mod error;
mod keys;
mod ledger;
mod rows;
mod webhooks;

pub use webhooks::{AttemptOutcome, DueDelivery};

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use creditgate_domain::{Clock, SystemClock};
use sqlx::any::AnyPoolOptions;
use sqlx::pool::PoolConnectionMetadata;
use sqlx::{AnyConnection, AnyPool, Executor};

/// Which database a [`SqlStore`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The backend a URL names: `sqlite:` / `sqlite://`, `postgres://` / `postgresql://`.
    pub fn from_url(url: &str) -> Option<Backend> {
        let scheme = url.split_once(':')?.0.to_ascii_lowercase();
        match scheme.as_str() {
            "sqlite" => Some(Backend::Sqlite),
            "postgres" | "postgresql" => Some(Backend::Postgres),
            _ => None,
        }
    }
}

/// Connection tuning; [`Default`] suits one node.
#[derive(Debug, Clone)]
pub struct SqlOptions {
    /// Postgres: connections in the pool. SQLite: connections for reads (writes always
    /// use one dedicated connection).
    pub max_connections: u32,
    /// How long a call waits for a free connection before failing as unavailable.
    pub acquire_timeout: Duration,
    /// SQLite: how long a statement waits for another process's write lock.
    pub sqlite_busy_timeout: Duration,
}

impl Default for SqlOptions {
    fn default() -> Self {
        Self {
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
            sqlite_busy_timeout: Duration::from_secs(5),
        }
    }
}

/// Failure to open a [`SqlStore`].
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error(
        "unsupported database URL scheme '{0}': expected sqlite:<path>, sqlite://<path> or \
         postgres://user@host/db"
    )]
    UnsupportedUrl(String),
    #[error("could not create the directory of the SQLite database {path}: {source}")]
    CreateDir {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("could not apply the database migrations: {0}")]
    Migrate(#[source] sqlx::migrate::MigrateError),
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The SQL key store, ledger and analytics sink. Cloning shares the pools.
#[derive(Clone)]
pub struct SqlStore {
    /// Pool for reads.
    read: AnyPool,
    /// Pool for writes: one connection on SQLite, the read pool on Postgres.
    write: AnyPool,
    backend: Backend,
    clock: Arc<dyn Clock>,
    /// SQLite in a file: the analytics rows' own writer (see `rows.rs`).
    rows: Option<Arc<rows::RowWriter>>,
}

impl std::fmt::Debug for SqlStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlStore")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl SqlStore {
    /// Opens the database at `url` with [`SqlOptions::default`] and applies migrations.
    ///
    /// `sqlite:<path>` / `sqlite://<path>` creates the file (and its directory) when
    /// missing; `sqlite::memory:` is a private in-memory database. `postgres://…`
    /// needs an existing database.
    pub async fn connect(url: &str) -> Result<SqlStore, SqlError> {
        Self::connect_with(url, &SqlOptions::default()).await
    }

    /// [`SqlStore::connect`] with explicit tuning.
    pub async fn connect_with(url: &str, options: &SqlOptions) -> Result<SqlStore, SqlError> {
        sqlx::any::install_default_drivers();
        let backend = Backend::from_url(url).ok_or_else(|| {
            let scheme = url.split_once(':').map_or("", |(s, _)| s);
            SqlError::UnsupportedUrl(scheme.to_owned())
        })?;
        let max = options.max_connections.max(1);
        let mut rows = None;
        let (read, write) = match backend {
            Backend::Postgres => {
                let pool = AnyPoolOptions::new()
                    .max_connections(max)
                    .acquire_timeout(options.acquire_timeout)
                    .connect(url)
                    .await
                    .map_err(SqlError::Connect)?;
                POSTGRES_MIGRATIONS
                    .run(&pool)
                    .await
                    .map_err(SqlError::Migrate)?;
                (pool.clone(), pool)
            }
            Backend::Sqlite => {
                let (url, in_memory) = sqlite_url(url).await?;
                if let Some(path) = sqlite_file(&url).filter(|_| !in_memory) {
                    rows = Some(Arc::new(rows::RowWriter::new(
                        path,
                        options.sqlite_busy_timeout,
                    )));
                }
                let busy_ms =
                    u64::try_from(options.sqlite_busy_timeout.as_millis()).unwrap_or(u64::MAX);
                let sqlite_pool = |size: u32| {
                    let pool = AnyPoolOptions::new()
                        .max_connections(size)
                        .acquire_timeout(options.acquire_timeout)
                        .after_connect(move |conn, meta| {
                            Box::pin(sqlite_pragmas(conn, meta, busy_ms))
                        });
                    if in_memory {
                        // The database lives as long as its one connection: keep it.
                        pool.min_connections(1)
                            .idle_timeout(None)
                            .max_lifetime(None)
                    } else {
                        pool
                    }
                };
                // The writer connects (and migrates) first, so the file exists in WAL
                // mode before any reader opens it.
                let write = sqlite_pool(1)
                    .connect(&url)
                    .await
                    .map_err(SqlError::Connect)?;
                SQLITE_MIGRATIONS
                    .run(&write)
                    .await
                    .map_err(SqlError::Migrate)?;
                let read = if in_memory {
                    // Every connection to `:memory:` would be a database of its own.
                    write.clone()
                } else {
                    sqlite_pool(max)
                        .connect(&url)
                        .await
                        .map_err(SqlError::Connect)?
                };
                (read, write)
            }
        };
        tracing::debug!(?backend, "sql store connected and migrated");
        Ok(SqlStore {
            read,
            write,
            backend,
            clock: Arc::new(SystemClock),
            rows,
        })
    }

    /// Uses `clock` for the timestamps the ports do not pass in (API deletion, returns).
    pub fn with_clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The pool writes go through, for tests and tools that query tables directly.
    pub fn pool(&self) -> &AnyPool {
        &self.write
    }

    /// Closes every connection; later calls fail as unavailable.
    pub async fn close(&self) {
        self.read.close().await;
        self.write.close().await;
    }

    /// Starts a write transaction: `BEGIN IMMEDIATE` on SQLite takes the write lock up
    /// front, so the transaction never has to upgrade a read lock.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        match self.backend {
            Backend::Sqlite => self.write.begin_with("BEGIN IMMEDIATE").await,
            Backend::Postgres => self.write.begin().await,
        }
    }
}

/// Normalises a SQLite URL: `mode=rwc` so the file is created, and the directory made.
/// Returns the URL and whether it is an in-memory database.
async fn sqlite_url(url: &str) -> Result<(String, bool), SqlError> {
    let (prefix, rest) = match url.strip_prefix("sqlite://") {
        Some(rest) => ("sqlite://", rest),
        None => ("sqlite:", url.strip_prefix("sqlite:").unwrap_or(url)),
    };
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    let in_memory = path == ":memory:" || query.split('&').any(|p| p == "mode=memory");
    if in_memory {
        return Ok((url.to_owned(), true));
    }
    if !path.contains('%') {
        if let Some(dir) = Path::new(path)
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
        {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(|source| SqlError::CreateDir {
                    path: path.to_owned(),
                    source,
                })?;
        }
    }
    let has_mode = query.split('&').any(|p| p.starts_with("mode="));
    let url = match (has_mode, query.is_empty()) {
        (true, _) => url.to_owned(),
        (false, true) => format!("{prefix}{path}?mode=rwc"),
        (false, false) => format!("{prefix}{path}?{query}&mode=rwc"),
    };
    Ok((url, false))
}

/// The file a normalised SQLite URL names, when it names one plainly (no
/// percent-encoding, which only sqlx would decode).
fn sqlite_file(url: &str) -> Option<std::path::PathBuf> {
    let rest = url
        .strip_prefix("sqlite://")
        .or_else(|| url.strip_prefix("sqlite:"))?;
    let path = rest.split_once('?').map_or(rest, |(path, _)| path);
    (!path.is_empty() && !path.contains('%')).then(|| path.into())
}

/// Per-connection SQLite settings.
async fn sqlite_pragmas(
    conn: &mut AnyConnection,
    _meta: PoolConnectionMetadata,
    busy_ms: u64,
) -> Result<(), sqlx::Error> {
    conn.execute(format!("PRAGMA busy_timeout = {busy_ms}").as_str())
        .await?;
    conn.execute("PRAGMA journal_mode = WAL").await?;
    conn.execute("PRAGMA synchronous = NORMAL").await?;
    conn.execute("PRAGMA foreign_keys = ON").await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_from_url() {
        assert_eq!(Backend::from_url("sqlite:data/x.db"), Some(Backend::Sqlite));
        assert_eq!(
            Backend::from_url("sqlite:///tmp/x.db"),
            Some(Backend::Sqlite)
        );
        assert_eq!(
            Backend::from_url("postgres://postgres@127.0.0.1/test"),
            Some(Backend::Postgres)
        );
        assert_eq!(
            Backend::from_url("postgresql://postgres@127.0.0.1/test"),
            Some(Backend::Postgres)
        );
        assert_eq!(Backend::from_url("mysql://x"), None);
        assert_eq!(Backend::from_url("no-scheme"), None);
    }

    #[tokio::test]
    async fn sqlite_urls_are_normalised() {
        let (u, mem) = sqlite_url("sqlite::memory:").await.unwrap();
        assert!(mem);
        assert_eq!(u, "sqlite::memory:");
        let dir = std::env::temp_dir().join(format!("cg-sql-url-{}", std::process::id()));
        let path = dir.join("sub").join("x.db");
        let (u, mem) = sqlite_url(&format!("sqlite:{}", path.display()))
            .await
            .unwrap();
        assert!(!mem);
        assert_eq!(u, format!("sqlite:{}?mode=rwc", path.display()));
        assert!(dir.join("sub").is_dir());
        let (u, _) = sqlite_url(&format!("sqlite://{}?mode=ro", path.display()))
            .await
            .unwrap();
        assert!(u.ends_with("?mode=ro"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn unsupported_scheme_is_refused_without_echoing_the_url() {
        let err = SqlStore::connect("mysql://user:secret@host/db")
            .await
            .unwrap_err();
        assert!(matches!(err, SqlError::UnsupportedUrl(ref s) if s == "mysql"));
        assert!(!err.to_string().contains("secret"));
    }
}
