//! The analytics [`Sink`] on SQL: a batch lands in `key_verifications` and
//! `api_requests` in one transaction (all or nothing), as multi-row `INSERT`s of at
//! most [`ROWS_PER_INSERT`] rows, which keeps every statement far below SQLite's limit
//! of 32766 bound parameters (and Postgres's 65535).

use async_trait::async_trait;
use creditgate_analytics::{Batch, RequestEvent, Sink, SinkError, VerificationEvent};
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::Any;

use crate::error::sink_error;
use crate::{Backend, SqlStore};

/// Rows per `INSERT` statement: 15 columns × 500 = 7500 parameters.
pub(crate) const ROWS_PER_INSERT: usize = 500;

const VERIFICATION_COLUMNS: &[&str] = &[
    "request_id",
    "time",
    "workspace_id",
    "api_id",
    "key_id",
    "node_id",
    "region",
    "outcome",
    "cost",
    "spent_credits",
    "remaining",
    "latency_us",
    "tags",
    "identity_id",
    "exceeded_ratelimits",
];

const REQUEST_COLUMNS: &[&str] = &[
    "request_id",
    "time",
    "workspace_id",
    "method",
    "path",
    "status",
    "latency_us",
    "node_id",
];

/// `INSERT INTO table (cols) VALUES ($1, …), (…)` for `rows` rows.
/// A multi-row INSERT. SQLite gets positional `?` placeholders: its `$N` are *named*
/// parameters, and binding thousands of them by name scans the list each time
/// (quadratic; it made 10,000-row batches take about a second). Postgres gets `$N`.
fn insert_sql(backend: Backend, table: &str, columns: &[&str], rows: usize) -> String {
    let mut sql = format!("INSERT INTO {table} ({}) VALUES ", columns.join(", "));
    let mut n = 0usize;
    for r in 0..rows {
        if r > 0 {
            sql.push_str(", ");
        }
        sql.push('(');
        for c in 0..columns.len() {
            if c > 0 {
                sql.push_str(", ");
            }
            n += 1;
            match backend {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    sql.push('$');
                    sql.push_str(&n.to_string());
                }
            }
        }
        sql.push(')');
    }
    sql
}

/// Splits `rows` into `ROWS_PER_INSERT`-row chunks and a remainder in power-of-two
/// chunks, so every batch uses one of at most ten statement shapes per table and the
/// connection's statement cache serves them (a statement of a new size is parsed and
/// planned again; at 13 columns × 234 rows that is most of the write's cost).
fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
    std::iter::from_fn(move || {
        if rows.is_empty() {
            return None;
        }
        let n = if rows.len() >= ROWS_PER_INSERT {
            ROWS_PER_INSERT
        } else {
            1 << rows.len().ilog2()
        };
        let (chunk, rest) = rows.split_at(n);
        rows = rest;
        Some(chunk)
    })
}

fn clamp(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn bind_verification<'q>(
    q: Query<'q, Any, AnyArguments<'q>>,
    e: &'q VerificationEvent,
) -> Result<Query<'q, Any, AnyArguments<'q>>, SinkError> {
    let tags = serde_json::to_string(&e.tags).map_err(|e| SinkError(e.to_string()))?;
    let exceeded =
        serde_json::to_string(&e.exceeded_ratelimits).map_err(|e| SinkError(e.to_string()))?;
    Ok(q.bind(&*e.request_id)
        .bind(e.time)
        .bind(&*e.workspace_id)
        .bind(&*e.api_id)
        .bind(&*e.key_id)
        .bind(&*e.node_id)
        .bind(&*e.region)
        .bind(e.outcome)
        .bind(clamp(e.cost))
        .bind(clamp(e.spent_credits))
        .bind(e.remaining.map(clamp))
        .bind(clamp(e.latency_us))
        .bind(tags)
        .bind(&*e.identity_id)
        .bind(exceeded))
}

fn bind_request<'q>(
    q: Query<'q, Any, AnyArguments<'q>>,
    e: &'q RequestEvent,
) -> Query<'q, Any, AnyArguments<'q>> {
    q.bind(&*e.request_id)
        .bind(e.time)
        .bind(&*e.workspace_id)
        .bind(&*e.method)
        .bind(&*e.path)
        .bind(i64::from(e.status))
        .bind(clamp(e.latency_us))
        .bind(&*e.node_id)
}

#[async_trait]
impl Sink for SqlStore {
    async fn write(&self, batch: &Batch) -> Result<(), SinkError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin_write().await.map_err(sink_error)?;
        for chunk in chunks(&batch.verifications) {
            let sql = insert_sql(
                self.backend(),
                "key_verifications",
                VERIFICATION_COLUMNS,
                chunk.len(),
            );
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = bind_verification(q, e)?;
            }
            q.execute(&mut *tx).await.map_err(sink_error)?;
        }
        for chunk in chunks(&batch.requests) {
            let sql = insert_sql(self.backend(), "api_requests", REQUEST_COLUMNS, chunk.len());
            let mut q = sqlx::query(&sql);
            for e in chunk {
                q = bind_request(q, e);
            }
            q.execute(&mut *tx).await.map_err(sink_error)?;
        }
        tx.commit().await.map_err(sink_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_sql_numbers_every_placeholder() {
        assert_eq!(
            insert_sql(Backend::Postgres, "t", &["a", "b"], 2),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)"
        );
        assert_eq!(
            insert_sql(Backend::Sqlite, "t", &["a", "b"], 2),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?)"
        );
        let params = VERIFICATION_COLUMNS.len() * ROWS_PER_INSERT;
        assert!(params < 32_766);
    }

    #[test]
    fn chunks_cover_every_row_once_in_few_shapes() {
        for n in [0usize, 1, 2, 3, 499, 500, 501, 1234, 10_007] {
            let rows: Vec<usize> = (0..n).collect();
            let parts: Vec<&[usize]> = chunks(&rows).collect();
            assert_eq!(parts.concat(), rows, "{n} rows");
            assert!(parts
                .iter()
                .all(|p| p.len() == ROWS_PER_INSERT || p.len().is_power_of_two()));
        }
    }
}
