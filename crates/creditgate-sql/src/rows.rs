//! The analytics rows of a SQLite file, written without sqlx: the multi-row `INSERT`s
//! of `analytics.rs` (the same few statement shapes, kept prepared), bound value by
//! value, inside one `BEGIN IMMEDIATE` transaction, on a connection of its own.
//! (Single-row statements cost more: each one seeks every index from its root, where
//! one statement's cursor stays at the end of the index between its rows.)
//!
//! Through sqlx's `Any` driver every value was converted twice (to `AnyArguments`,
//! then to SQLite's) and every statement crossed to sqlx's connection thread and back.
//! Measured on one hot key (2026-12-07): the writer's instructions per verification went
//! from about 26k to 24k (most of what was left was SQLite's own binding and B-tree
//! work for two rows and the three indexes of the time), the server's CPU per
//! verification fell about 4 % and its throughput rose about 5 %
//! (`../shared/bench/side-by-side.sh`, A/B).
//!
//! The connection is opened on the first write, after [`SqlStore::connect`] created
//! and migrated the file, and is kept. Writes run on tokio's blocking pool, off the
//! threads that serve requests.
//!
//! [`SqlStore::connect`]: crate::SqlStore::connect

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use creditgate_analytics::{Batch, RequestEvent, SinkError, VerificationEvent};
use rusqlite::{Connection, OpenFlags, TransactionBehavior};

use crate::analytics::{chunk_sizes, chunks, insert_sql, REQUEST_COLUMNS, VERIFICATION_COLUMNS};
use crate::Backend;

/// The writer of one SQLite file's `key_verifications` and `api_requests`.
pub(crate) struct RowWriter {
    path: PathBuf,
    busy_timeout: Duration,
    conn: Mutex<Option<Connection>>,
}

impl RowWriter {
    pub(crate) fn new(path: PathBuf, busy_timeout: Duration) -> RowWriter {
        RowWriter {
            path,
            busy_timeout,
            conn: Mutex::new(None),
        }
    }

    /// Writes the whole batch or nothing, on a thread of the blocking pool.
    pub(crate) async fn write(self: &Arc<Self>, batch: Arc<Batch>) -> Result<(), SinkError> {
        let writer = self.clone();
        tokio::task::spawn_blocking(move || writer.write_blocking(&batch))
            .await
            .map_err(|e| SinkError(format!("the analytics row writer stopped: {e}")))?
    }

    fn write_blocking(&self, batch: &Batch) -> Result<(), SinkError> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        let conn = match &mut *conn {
            Some(conn) => conn,
            empty => empty.insert(self.open().map_err(|e| {
                SinkError(format!(
                    "opening the analytics rows of {}: {e}",
                    self.path.display()
                ))
            })?),
        };
        self.insert(conn, batch)
            .map_err(|e| SinkError(e.to_string()))
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(self.busy_timeout)?;
        // The file is in WAL mode already (sqlx set it when it created the file); the
        // durability setting is per connection, the same as the pool's.
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // Every statement shape of both tables (see `chunks`) stays prepared, from the
        // start: a shape first met later would cost that batch the parse and plan of a
        // statement of up to 7,500 parameters (about 5 million instructions for the
        // largest), and make the writer's cost per row depend on which batch sizes
        // happened so far.
        conn.set_prepared_statement_cache_capacity(32);
        for rows in chunk_sizes() {
            conn.prepare_cached(&insert_sql(
                Backend::Sqlite,
                "key_verifications",
                VERIFICATION_COLUMNS,
                rows,
            ))?;
            conn.prepare_cached(&insert_sql(
                Backend::Sqlite,
                "api_requests",
                REQUEST_COLUMNS,
                rows,
            ))?;
        }
        Ok(conn)
    }

    fn insert(&self, conn: &mut Connection, batch: &Batch) -> rusqlite::Result<()> {
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        insert_rows(
            &tx,
            "key_verifications",
            VERIFICATION_COLUMNS,
            &batch.verifications,
            bind_verification,
        )?;
        insert_rows(
            &tx,
            "api_requests",
            REQUEST_COLUMNS,
            &batch.requests,
            bind_request,
        )?;
        tx.commit()
    }
}

/// The rows of one table, in multi-row statements of the shapes `chunks` makes.
fn insert_rows<T>(
    tx: &rusqlite::Transaction<'_>,
    table: &str,
    columns: &[&str],
    rows: &[T],
    bind_row: fn(&mut rusqlite::CachedStatement<'_>, &mut usize, &T) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    for chunk in chunks(rows) {
        let sql = insert_sql(Backend::Sqlite, table, columns, chunk.len());
        let mut insert = tx.prepare_cached(&sql)?;
        let mut n = 0;
        for row in chunk {
            bind_row(&mut insert, &mut n, row)?;
        }
        insert.raw_execute()?;
    }
    Ok(())
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A list of names as the JSON array the `TEXT` column holds (`[]` without a copy).
fn json_list(names: &[String]) -> rusqlite::Result<std::borrow::Cow<'static, str>> {
    if names.is_empty() {
        return Ok("[]".into());
    }
    serde_json::to_string(names)
        .map(Into::into)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))
}

/// Binds the next value of a multi-row statement (parameters count from 1).
fn bind(
    insert: &mut rusqlite::CachedStatement<'_>,
    n: &mut usize,
    value: impl rusqlite::ToSql,
) -> rusqlite::Result<()> {
    *n += 1;
    insert.raw_bind_parameter(*n, value)
}

fn bind_verification(
    insert: &mut rusqlite::CachedStatement<'_>,
    n: &mut usize,
    e: &VerificationEvent,
) -> rusqlite::Result<()> {
    bind(insert, n, &*e.request_id)?;
    bind(insert, n, e.time)?;
    bind(insert, n, &*e.workspace_id)?;
    bind(insert, n, &*e.api_id)?;
    bind(insert, n, &*e.key_id)?;
    bind(insert, n, &*e.node_id)?;
    bind(insert, n, &*e.region)?;
    bind(insert, n, e.outcome)?;
    bind(insert, n, clamp(e.cost))?;
    bind(insert, n, clamp(e.spent_credits))?;
    bind(insert, n, e.remaining.map(clamp))?;
    bind(insert, n, clamp(e.latency_us))?;
    bind(insert, n, &*json_list(&e.tags)?)?;
    bind(insert, n, &*e.identity_id)?;
    bind(insert, n, &*json_list(&e.exceeded_ratelimits)?)
}

fn bind_request(
    insert: &mut rusqlite::CachedStatement<'_>,
    n: &mut usize,
    e: &RequestEvent,
) -> rusqlite::Result<()> {
    bind(insert, n, &*e.request_id)?;
    bind(insert, n, e.time)?;
    bind(insert, n, &*e.workspace_id)?;
    bind(insert, n, &*e.method)?;
    bind(insert, n, &*e.path)?;
    bind(insert, n, i64::from(e.status))?;
    bind(insert, n, clamp(e.latency_us))?;
    bind(insert, n, &*e.node_id)
}
