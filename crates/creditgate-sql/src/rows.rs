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
//! The writer is a thread of its own that owns the connection and one prepared
//! statement per shape, all prepared when it opens the connection, and binds every
//! parameter of a statement on each use. (Through rusqlite's statement cache, each use
//! also built the statement's text to look it up, and each return to the cache cleared
//! every binding: the writer's instructions per verification written went from about
//! 14.9k to 13.2k in callgrind, embedded, 1,000 keys.) The connection is opened on the
//! first write, after [`SqlStore::connect`] created and migrated the file, and kept;
//! after an error opening it or preparing, the next write opens it again.
//!
//! [`SqlStore::connect`]: crate::SqlStore::connect

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use creditgate_analytics::{Batch, RequestEvent, SinkError, VerificationEvent};
use rusqlite::{Connection, OpenFlags, Statement, Transaction, TransactionBehavior};
use tokio::sync::oneshot;

use crate::analytics::{chunk_sizes, chunks, insert_sql, REQUEST_COLUMNS, VERIFICATION_COLUMNS};
use crate::Backend;

/// The writer of one SQLite file's `key_verifications` and `api_requests`.
pub(crate) struct RowWriter {
    path: PathBuf,
    busy_timeout: Duration,
    /// The writer thread's queue; `None` until the first write.
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
}

/// A batch to write and where its outcome goes.
struct Job {
    batch: Arc<Batch>,
    done: oneshot::Sender<Result<(), SinkError>>,
}

impl RowWriter {
    pub(crate) fn new(path: PathBuf, busy_timeout: Duration) -> RowWriter {
        RowWriter {
            path,
            busy_timeout,
            jobs: Mutex::new(None),
        }
    }

    /// Writes the whole batch or nothing, on the writer thread.
    pub(crate) async fn write(self: &Arc<Self>, batch: Arc<Batch>) -> Result<(), SinkError> {
        let (done, outcome) = oneshot::channel();
        self.submit(Job { batch, done })?;
        outcome
            .await
            .map_err(|_| SinkError("the analytics row writer stopped".into()))?
    }

    /// Queues `job` for the writer thread, starting the thread if there is none (the
    /// first write) or it ended (it panicked: a bug; the next writes start another).
    fn submit(&self, job: Job) -> Result<(), SinkError> {
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        let job = match &*jobs {
            Some(tx) => match tx.send(job) {
                Ok(()) => return Ok(()),
                Err(mpsc::SendError(job)) => job,
            },
            None => job,
        };
        let (tx, rx) = mpsc::channel();
        let (path, busy_timeout) = (self.path.clone(), self.busy_timeout);
        std::thread::Builder::new()
            .name("analytics-rows".into())
            .spawn(move || serve(&path, busy_timeout, &rx))
            .map_err(|e| SinkError(format!("starting the analytics row writer: {e}")))?;
        // The thread holds the receiver until it ends, and it ends only when every
        // sender is gone (or on a panic, which a later write notices above).
        tx.send(job)
            .map_err(|_| SinkError("the analytics row writer stopped".into()))?;
        *jobs = Some(tx);
        Ok(())
    }
}

/// The writer thread: opens the connection and prepares on the first job (and again
/// on the job after a failure to), then writes each job's batch in turn.
fn serve(path: &Path, busy_timeout: Duration, jobs: &mpsc::Receiver<Job>) {
    while let Ok(job) = jobs.recv() {
        let conn = match open(path, busy_timeout) {
            Ok(conn) => conn,
            Err(e) => {
                let _ = job.done.send(Err(SinkError(format!(
                    "opening the analytics rows of {}: {e}",
                    path.display()
                ))));
                continue;
            }
        };
        let mut statements = match Statements::prepare(&conn) {
            Ok(s) => s,
            Err(e) => {
                let _ = job.done.send(Err(SinkError(format!(
                    "preparing the analytics inserts of {}: {e}",
                    path.display()
                ))));
                continue;
            }
        };
        let mut job = job;
        loop {
            let outcome = statements
                .insert(&conn, &job.batch)
                .map_err(|e| SinkError(e.to_string()));
            // The caller may have stopped waiting (shutdown): nothing to tell.
            let _ = job.done.send(outcome);
            match jobs.recv() {
                Ok(next) => job = next,
                Err(_) => return,
            }
        }
    }
}

fn open(path: &Path, busy_timeout: Duration) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(busy_timeout)?;
    // The file is in WAL mode already (sqlx set it when it created the file); the
    // durability setting is per connection, the same as the pool's.
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    Ok(conn)
}

/// Every statement shape of both tables (see `chunks`), prepared from the start: a
/// shape first met later would cost that batch the parse and plan of a statement of up
/// to 7,500 parameters (about 5 million instructions for the largest), and make the
/// writer's cost per row depend on which batch sizes happened so far.
struct Statements<'c> {
    verifications: Shapes<'c>,
    requests: Shapes<'c>,
}

/// One table's statements with their row counts.
type Shapes<'c> = Vec<(usize, Statement<'c>)>;

impl<'c> Statements<'c> {
    fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
        let shapes = |table: &str, columns: &[&str]| {
            chunk_sizes()
                .map(|rows| {
                    let sql = insert_sql(Backend::Sqlite, table, columns, rows);
                    Ok((rows, conn.prepare(&sql)?))
                })
                .collect::<rusqlite::Result<Shapes<'c>>>()
        };
        Ok(Self {
            verifications: shapes("key_verifications", VERIFICATION_COLUMNS)?,
            requests: shapes("api_requests", REQUEST_COLUMNS)?,
        })
    }

    /// The batch in one `BEGIN IMMEDIATE` transaction: all of it or nothing (an error
    /// drops the transaction, which rolls it back).
    fn insert(&mut self, conn: &Connection, batch: &Batch) -> rusqlite::Result<()> {
        let tx = Transaction::new_unchecked(conn, TransactionBehavior::Immediate)?;
        insert_rows(
            &mut self.verifications,
            &batch.verifications,
            bind_verification,
        )?;
        insert_rows(&mut self.requests, &batch.requests, bind_request)?;
        tx.commit()
    }
}

/// The rows of one table, in multi-row statements of the shapes `chunks` makes. Each
/// use binds every parameter of the statement, so none keeps a value of the last use.
fn insert_rows<T>(
    shapes: &mut Shapes<'_>,
    rows: &[T],
    bind_row: fn(&mut Statement<'_>, &mut usize, &T) -> rusqlite::Result<()>,
) -> rusqlite::Result<()> {
    for chunk in chunks(rows) {
        let Some((_, insert)) = shapes.iter_mut().find(|(n, _)| *n == chunk.len()) else {
            // `chunks` makes only the sizes `chunk_sizes` lists (a unit test holds it).
            return Err(rusqlite::Error::ToSqlConversionFailure(
                format!("no insert prepared for {} rows", chunk.len()).into(),
            ));
        };
        let mut n = 0;
        for row in chunk {
            bind_row(insert, &mut n, row)?;
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
    insert: &mut Statement<'_>,
    n: &mut usize,
    value: impl rusqlite::ToSql,
) -> rusqlite::Result<()> {
    *n += 1;
    insert.raw_bind_parameter(*n, value)
}

fn bind_verification(
    insert: &mut Statement<'_>,
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
    insert: &mut Statement<'_>,
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
