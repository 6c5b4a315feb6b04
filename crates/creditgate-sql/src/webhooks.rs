//! The webhook outbox on SQL. An event is inserted in the transaction of the change it
//! tells of ([`record_event`]), with one delivery per endpoint of the workspace that
//! subscribed to its type; a node's delivery worker claims due deliveries with a lease
//! ([`SqlStore::claim_deliveries`]), sends them, and records every attempt
//! ([`SqlStore::finish_attempt`]). A node that dies mid-delivery leaves the lease to
//! lapse: another node (or the same one restarted) sends the delivery again, so
//! delivery is at least once, and the event id lets receivers drop repeats.

use std::collections::BTreeMap;

use creditgate_domain::{KeyId, StoreError, WebhookDelivery, WorkspaceId};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, Row};

use crate::error::store_error;
use crate::SqlStore;

/// A delivery claimed for sending, with what sending needs.
#[derive(Debug, Clone)]
pub struct DueDelivery {
    pub event_id: String,
    pub endpoint_id: String,
    pub url: String,
    pub secret: String,
    pub payload: String,
    /// Attempts made before this one.
    pub attempts: u64,
    pub created_at: i64,
}

/// What one attempt got.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    /// The receiver's status; `None` when no answer came.
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
    /// When to try again; `None`: delivered (2xx) or given up.
    pub next_attempt_at: Option<i64>,
}

/// Inserts event `id` of the workspace of `account` (a key, or an identity's pool) and
/// a pending delivery to each of its endpoints subscribed to `event_type`, on `conn`
/// (inside the caller's transaction). An event no endpoint subscribes to is not kept;
/// inserting the same id again changes nothing. Answers whether it inserted.
pub(crate) async fn record_event(
    conn: &mut AnyConnection,
    id: &str,
    account: &KeyId,
    event_type: &str,
    payload: &str,
    now_ms: i64,
) -> Result<bool, sqlx::Error> {
    let workspace: Option<String> = sqlx::query_scalar(
        "SELECT workspace_id FROM keys WHERE id = $1 \
         UNION ALL SELECT workspace_id FROM pools WHERE id = $1",
    )
    .bind(account.as_str())
    .fetch_optional(&mut *conn)
    .await?;
    let Some(workspace) = workspace else {
        return Ok(false);
    };
    // `events` is a JSON array of names: match the quoted name.
    let subscribed = format!("%\"{event_type}\"%");
    let endpoints: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM webhook_endpoints WHERE workspace_id = $1 AND events LIKE $2",
    )
    .bind(workspace.as_str())
    .bind(subscribed.as_str())
    .fetch_all(&mut *conn)
    .await?;
    if endpoints.is_empty() {
        return Ok(false);
    }
    let inserted = sqlx::query(
        "INSERT INTO webhook_events (id, workspace_id, type, payload, created_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(workspace.as_str())
    .bind(event_type)
    .bind(payload)
    .bind(now_ms)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 0 {
        return Ok(false);
    }
    for endpoint in &endpoints {
        sqlx::query(
            "INSERT INTO webhook_deliveries (event_id, endpoint_id, workspace_id, state, \
             attempts, next_attempt_at, lease_until, created_at) \
             VALUES ($1, $2, $3, 'pending', 0, $4, 0, $4)",
        )
        .bind(id)
        .bind(endpoint.as_str())
        .bind(workspace.as_str())
        .bind(now_ms)
        .execute(&mut *conn)
        .await?;
    }
    Ok(true)
}

impl SqlStore {
    /// Claims up to `limit` due deliveries (pending, due, not leased) for `lease_ms`, so
    /// that no other node sends them meanwhile; at most `per_endpoint` per endpoint
    /// counting the `in_flight` ones.
    pub async fn claim_deliveries(
        &self,
        now_ms: i64,
        lease_ms: i64,
        limit: usize,
        in_flight: &BTreeMap<String, usize>,
        per_endpoint: usize,
    ) -> Result<Vec<DueDelivery>, StoreError> {
        // Endpoints with every slot taken are left out of the query: a dead endpoint's
        // backlog of due deliveries must not fill the page and starve the others.
        let full: Vec<&String> = in_flight
            .iter()
            .filter(|(_, &n)| n >= per_endpoint)
            .map(|(id, _)| id)
            .collect();
        let excluded = if full.is_empty() {
            String::new()
        } else {
            let marks: Vec<String> = (0..full.len()).map(|i| format!("${}", i + 3)).collect();
            format!(" AND d.endpoint_id NOT IN ({})", marks.join(", "))
        };
        let sql = format!(
            "SELECT d.event_id, d.endpoint_id, e.url, e.secret, v.payload, d.attempts, \
             d.created_at FROM webhook_deliveries d \
             JOIN webhook_endpoints e ON e.id = d.endpoint_id \
             JOIN webhook_events v ON v.id = d.event_id \
             WHERE d.state = 'pending' AND d.next_attempt_at <= $1 AND d.lease_until <= $1\
             {excluded} ORDER BY d.next_attempt_at, d.event_id LIMIT $2"
        );
        let mut query = sqlx::query(&sql)
            .bind(now_ms)
            .bind(i64::try_from(limit.saturating_mul(4)).unwrap_or(i64::MAX));
        for id in full {
            query = query.bind(id.as_str());
        }
        let rows = query.fetch_all(&self.read).await.map_err(store_error)?;
        let mut claimed: Vec<DueDelivery> = Vec::new();
        let mut per: BTreeMap<String, usize> = in_flight.clone();
        for row in &rows {
            let d = due_from_row(row)?;
            let n = per.entry(d.endpoint_id.clone()).or_default();
            if *n >= per_endpoint || claimed.len() >= limit {
                continue;
            }
            let won = sqlx::query(
                "UPDATE webhook_deliveries SET lease_until = $1 \
                 WHERE event_id = $2 AND endpoint_id = $3 AND state = 'pending' \
                 AND lease_until <= $4",
            )
            .bind(now_ms.saturating_add(lease_ms))
            .bind(d.event_id.as_str())
            .bind(d.endpoint_id.as_str())
            .bind(now_ms)
            .execute(&self.write)
            .await
            .map_err(store_error)?
            .rows_affected();
            if won == 1 {
                *n += 1;
                claimed.push(d);
            }
        }
        Ok(claimed)
    }

    /// Records an attempt of a claimed delivery and its new state, in one transaction:
    /// delivered (a 2xx), pending until `next_attempt_at`, or failed (given up).
    pub async fn finish_attempt(
        &self,
        d: &DueDelivery,
        outcome: &AttemptOutcome,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        let attempt = i64::try_from(d.attempts.saturating_add(1)).unwrap_or(i64::MAX);
        let delivered = outcome.status.is_some_and(|s| (200..300).contains(&s));
        let state = match (delivered, outcome.next_attempt_at) {
            (true, _) => "delivered",
            (false, Some(_)) => "pending",
            (false, None) => "failed",
        };
        let mut tx = self.begin_write().await.map_err(store_error)?;
        sqlx::query(
            "INSERT INTO webhook_attempts (event_id, endpoint_id, attempt, at, status, \
             latency_ms, error, next_retry_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT DO NOTHING",
        )
        .bind(d.event_id.as_str())
        .bind(d.endpoint_id.as_str())
        .bind(attempt)
        .bind(now_ms)
        .bind(outcome.status.map(i64::from))
        .bind(i64::try_from(outcome.latency_ms).unwrap_or(i64::MAX))
        .bind(outcome.error.as_deref())
        .bind(outcome.next_attempt_at.filter(|_| !delivered))
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        sqlx::query(
            "UPDATE webhook_deliveries SET state = $3, attempts = $4, lease_until = 0, \
             next_attempt_at = $5, last_status = $6, last_error = $7, delivered_at = $8 \
             WHERE event_id = $1 AND endpoint_id = $2",
        )
        .bind(d.event_id.as_str())
        .bind(d.endpoint_id.as_str())
        .bind(state)
        .bind(attempt)
        .bind(outcome.next_attempt_at.unwrap_or(now_ms))
        .bind(outcome.status.map(i64::from))
        .bind(outcome.error.as_deref())
        .bind(delivered.then_some(now_ms))
        .execute(&mut *tx)
        .await
        .map_err(store_error)?;
        tx.commit().await.map_err(store_error)
    }

    /// One page of an endpoint's deliveries, newest first, with their attempts.
    pub(crate) async fn deliveries_page(
        &self,
        workspace: &WorkspaceId,
        endpoint_id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<WebhookDelivery>, Option<String>), StoreError> {
        // The cursor is `<created_at>.<event_id>` of the last delivery of a page.
        let (before_at, after_id) = match cursor.and_then(|c| c.split_once('.')) {
            Some((at, id)) => (at.parse::<i64>().unwrap_or(i64::MAX), id.to_owned()),
            None => (i64::MAX, String::new()),
        };
        let rows = sqlx::query(
            "SELECT d.event_id, v.type, d.state, d.attempts, d.next_attempt_at, d.last_status, \
             d.last_error, d.delivered_at, d.created_at FROM webhook_deliveries d \
             JOIN webhook_events v ON v.id = d.event_id \
             WHERE d.workspace_id = $1 AND d.endpoint_id = $2 \
             AND (d.created_at < $3 OR (d.created_at = $3 AND d.event_id > $4)) \
             ORDER BY d.created_at DESC, d.event_id LIMIT $5",
        )
        .bind(workspace.as_str())
        .bind(endpoint_id)
        .bind(before_at)
        .bind(after_id)
        .bind(i64::from(limit.max(1)) + 1)
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        let page_len = usize::try_from(limit.max(1)).unwrap_or(usize::MAX);
        let mut out = Vec::new();
        for row in rows.iter().take(page_len) {
            let mut d = delivery_from_row(row)?;
            d.attempts = self.attempts_of(&d.event_id, endpoint_id).await?;
            out.push(d);
        }
        let next = (rows.len() > page_len)
            .then(|| {
                out.last()
                    .map(|d| format!("{}.{}", d.created_at, d.event_id))
            })
            .flatten();
        Ok((out, next))
    }

    async fn attempts_of(
        &self,
        event_id: &str,
        endpoint_id: &str,
    ) -> Result<Vec<creditgate_domain::WebhookAttempt>, StoreError> {
        let rows = sqlx::query(
            "SELECT attempt, at, status, latency_ms, error, next_retry_at FROM webhook_attempts \
             WHERE event_id = $1 AND endpoint_id = $2 ORDER BY attempt",
        )
        .bind(event_id)
        .bind(endpoint_id)
        .fetch_all(&self.read)
        .await
        .map_err(store_error)?;
        rows.iter()
            .map(|r| {
                Ok(creditgate_domain::WebhookAttempt {
                    attempt: unsigned(r, "attempt")?,
                    at: r.try_get("at").map_err(store_error)?,
                    status: r
                        .try_get::<Option<i64>, _>("status")
                        .map_err(store_error)?
                        .and_then(|s| u16::try_from(s).ok()),
                    latency_ms: unsigned(r, "latency_ms")?,
                    error: r.try_get("error").map_err(store_error)?,
                    next_retry_at: r.try_get("next_retry_at").map_err(store_error)?,
                })
            })
            .collect()
    }
}

fn unsigned(row: &AnyRow, column: &str) -> Result<u64, StoreError> {
    let v: i64 = row.try_get(column).map_err(store_error)?;
    u64::try_from(v).map_err(|_| StoreError::Backend(format!("negative {column} {v}")))
}

fn due_from_row(row: &AnyRow) -> Result<DueDelivery, StoreError> {
    let text = |c: &str| row.try_get::<String, _>(c).map_err(store_error);
    Ok(DueDelivery {
        event_id: text("event_id")?,
        endpoint_id: text("endpoint_id")?,
        url: text("url")?,
        secret: text("secret")?,
        payload: text("payload")?,
        attempts: unsigned(row, "attempts")?,
        created_at: row.try_get("created_at").map_err(store_error)?,
    })
}

fn delivery_from_row(row: &AnyRow) -> Result<WebhookDelivery, StoreError> {
    let text = |c: &str| row.try_get::<String, _>(c).map_err(store_error);
    Ok(WebhookDelivery {
        event_id: text("event_id")?,
        event_type: text("type")?,
        state: text("state")?,
        next_attempt_at: row.try_get("next_attempt_at").map_err(store_error)?,
        last_status: row
            .try_get::<Option<i64>, _>("last_status")
            .map_err(store_error)?
            .and_then(|s| u16::try_from(s).ok()),
        last_error: row.try_get("last_error").map_err(store_error)?,
        delivered_at: row.try_get("delivered_at").map_err(store_error)?,
        created_at: row.try_get("created_at").map_err(store_error)?,
        attempts: Vec::new(),
    })
}

/// `2025-12-06T05:46:15.123Z` for Unix ms, UTC: the `timestamp` of an event's body.
pub(crate) fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let milli = ms.rem_euclid(1000);
    let (y, m, d) = creditgate_domain::refill::civil_from_days(secs.div_euclid(86_400));
    let s = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn rfc3339_in_utc() {
        assert_eq!(
            super::rfc3339(1_765_000_123_456),
            "2025-12-06T05:48:43.456Z"
        );
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
    }
}
