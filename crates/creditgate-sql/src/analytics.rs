//! The analytics [`Sink`] on SQL: a batch lands in `key_verifications` and
//! `api_requests` in one transaction (all or nothing), as multi-row `INSERT`s of at
//! most [`ROWS_PER_INSERT`] rows, which keeps every statement far below SQLite's limit
//! of 32766 bound parameters (and Postgres's 65535).

use std::sync::Arc;

use async_trait::async_trait;
use creditgate_analytics::{
    Batch, RequestEvent, Sink, SinkError, UsageBucket, UsageGroup, UsageQuery, UsageSource,
    VerificationEvent,
};
use sqlx::any::AnyArguments;
use sqlx::query::Query;
use sqlx::{Any, Row};

use crate::error::sink_error;
use crate::{Backend, SqlStore};

/// Rows per `INSERT` statement: 15 columns × 500 = 7500 parameters.
pub(crate) const ROWS_PER_INSERT: usize = 500;

pub(crate) const VERIFICATION_COLUMNS: &[&str] = &[
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

pub(crate) const REQUEST_COLUMNS: &[&str] = &[
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
pub(crate) fn insert_sql(backend: Backend, table: &str, columns: &[&str], rows: usize) -> String {
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

/// The row counts [`chunks`] makes: `ROWS_PER_INSERT` and every power of two below it.
pub(crate) fn chunk_sizes() -> impl Iterator<Item = usize> {
    std::iter::once(ROWS_PER_INSERT).chain((0..=ROWS_PER_INSERT.ilog2()).rev().map(|b| 1 << b))
}

/// Splits `rows` into `ROWS_PER_INSERT`-row chunks and a remainder in power-of-two
/// chunks, so every batch uses one of at most ten statement shapes per table and the
/// connection's statement cache serves them (a statement of a new size is parsed and
/// planned again; at 13 columns × 234 rows that is most of the write's cost).
pub(crate) fn chunks<T>(mut rows: &[T]) -> impl Iterator<Item = &[T]> {
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
        if let Some(rows) = &self.rows {
            return rows.write(Arc::new(batch.clone())).await;
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

    async fn write_shared(&self, batch: Arc<Batch>) -> Result<(), SinkError> {
        match &self.rows {
            Some(rows) if !batch.is_empty() => rows.write(batch).await,
            _ => self.write(&batch).await,
        }
    }
}

/// Usage buckets from `key_verifications` (on the pool readers use). A bucket is
/// `(time / g) * g` in integer arithmetic, the same on both backends; grouping by tag
/// expands the JSON array of tags (`json_each` on SQLite,
/// `jsonb_array_elements_text` on Postgres).
#[async_trait]
impl UsageSource for SqlStore {
    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageBucket>, SinkError> {
        let g = q.granularity.millis();
        let (group, from) = match (q.group_by, self.backend()) {
            (None, _) => ("''", "key_verifications v"),
            (Some(UsageGroup::Outcome), _) => ("v.outcome", "key_verifications v"),
            (Some(UsageGroup::KeyId), _) => ("v.key_id", "key_verifications v"),
            (Some(UsageGroup::Tag), Backend::Sqlite) => {
                ("t.value", "key_verifications v, json_each(v.tags) t")
            }
            (Some(UsageGroup::Tag), Backend::Postgres) => (
                "t.value",
                "key_verifications v \
                 CROSS JOIN LATERAL jsonb_array_elements_text(v.tags::jsonb) AS t(value)",
            ),
        };
        let mut filter = String::from("v.workspace_id = $1 AND v.time >= $2 AND v.time < $3");
        let mut values = Vec::new();
        for (column, value) in [
            ("api_id", &q.api_id),
            ("key_id", &q.key_id),
            ("identity_id", &q.identity_id),
        ] {
            if let Some(v) = value {
                values.push(v.as_str());
                filter.push_str(&format!(" AND v.{column} = ${}", 3 + values.len()));
            }
        }
        let sql = format!(
            "SELECT (v.time / {g}) * {g} AS bucket, {group} AS grp, COUNT(*) AS n, \
             CAST(COALESCE(SUM(v.spent_credits), 0) AS BIGINT) AS spent \
             FROM {from} WHERE {filter} GROUP BY 1, 2 ORDER BY 1, 2 LIMIT {limit}",
            limit = q.max_buckets.saturating_add(1),
        );
        let mut query = sqlx::query(&sql)
            .bind(q.workspace_id.as_str())
            .bind(q.from_ms)
            .bind(q.to_ms);
        for v in values {
            query = query.bind(v);
        }
        let rows = query.fetch_all(&self.read).await.map_err(sink_error)?;
        rows.iter()
            .map(|row| {
                let number = |name: &str| -> Result<u64, SinkError> {
                    let v: i64 = row.try_get(name).map_err(sink_error)?;
                    u64::try_from(v).map_err(|_| SinkError(format!("usage {name} {v} < 0")))
                };
                let group: String = row.try_get("grp").map_err(sink_error)?;
                Ok(UsageBucket {
                    time: row.try_get("bucket").map_err(sink_error)?,
                    group: q.group_by.map(|_| group),
                    count: number("n")?,
                    spent_credits: number("spent")?,
                })
            })
            .collect()
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

    /// The writer prepares `chunk_sizes` up front: every size `chunks` makes is one of
    /// them, and they fit the writer's statement cache (32) for both tables.
    #[test]
    fn chunk_sizes_are_the_sizes_chunks_make() {
        let sizes: Vec<usize> = chunk_sizes().collect();
        assert_eq!(sizes, [500, 256, 128, 64, 32, 16, 8, 4, 2, 1]);
        for n in 0..=1_100usize {
            let rows: Vec<usize> = (0..n).collect();
            assert!(chunks(&rows).all(|p| sizes.contains(&p.len())), "{n} rows");
        }
        assert!(2 * sizes.len() <= 32);
    }
}
