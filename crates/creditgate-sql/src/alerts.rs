//! Balance alerts on SQL: the outbox side of `credits.low`, `credits.exhausted` and
//! `credits.refilled` (the crossing rule itself is `creditgate_domain::alerts`).
//!
//! A crossing fires at most once per arming: [`SqlStore::record_crossings`] inserts the
//! threshold's row in `credit_alert_fired` and, only if it was not there, the event with
//! its deliveries, in one transaction. A top-up ([`rearm`], in the transaction of the
//! increment or of the fence of a set or refill) deletes the rows of the thresholds it
//! lifted the balance to, and records one `credits.refilled` event naming them.

use creditgate_domain::{new_id, AlertKind, Crossing, KeyId, StoreError};
use sqlx::{AnyConnection, Row};

use crate::error::store_error;
use crate::ledger::account_table;
use crate::webhooks::{record_event, rfc3339};
use crate::SqlStore;

/// The field naming an account in an event: a key, or an identity (its pool).
fn subject(account: &KeyId) -> (&'static str, &str) {
    let field = if account_table(account) == "pools" {
        "identityId"
    } else {
        "keyId"
    };
    (field, account.as_str())
}

fn event_type(kind: AlertKind) -> &'static str {
    match kind {
        AlertKind::Low(_) => "credits.low",
        AlertKind::Exhausted => "credits.exhausted",
    }
}

/// The JSON body of a crossing's event.
fn crossing_payload(account: &KeyId, c: &Crossing, at: i64) -> String {
    let (field, id) = subject(account);
    let mut data = serde_json::Map::new();
    data.insert(field.into(), id.into());
    if let AlertKind::Low(t) = c.kind {
        data.insert("threshold".into(), t.into());
    }
    data.insert("remaining".into(), c.remaining.into());
    data.insert("cost".into(), c.cost.into());
    if c.kind == AlertKind::Exhausted {
        data.insert("refused".into(), (c.remaining < c.cost).into());
    }
    serde_json::json!({
        "type": event_type(c.kind),
        "timestamp": rfc3339(at),
        "data": data,
    })
    .to_string()
}

/// What lifted a balance: the operation and the value it was given.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TopUp<'a> {
    /// `increment`, `set` or `refill`.
    pub operation: &'a str,
    pub value: Option<u64>,
    /// The balance after it, when the ledger knows it exactly (a fence drains the hot
    /// store first; after an increment the hot store may have spent some of it).
    pub exact: Option<u64>,
    /// A stable id for the event (`None`: a new one).
    pub event_id: Option<&'a str>,
}

/// Re-arms the thresholds of `account` that `balance` (at most the balance after the
/// top-up) reaches again, inside the top-up's transaction, and records one
/// `credits.refilled` event naming them when there were any.
pub(crate) async fn rearm(
    conn: &mut AnyConnection,
    account: &KeyId,
    balance: u64,
    top_up: TopUp<'_>,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    let balance = i64::try_from(balance).unwrap_or(i64::MAX);
    let rows = sqlx::query(
        "SELECT kind, threshold FROM credit_alert_fired WHERE account_id = $1 AND threshold <= $2 \
         ORDER BY threshold DESC",
    )
    .bind(account.as_str())
    .bind(balance)
    .fetch_all(&mut *conn)
    .await?;
    if rows.is_empty() {
        return Ok(());
    }
    sqlx::query("DELETE FROM credit_alert_fired WHERE account_id = $1 AND threshold <= $2")
        .bind(account.as_str())
        .bind(balance)
        .execute(&mut *conn)
        .await?;
    let mut thresholds = Vec::new();
    let mut exhausted = false;
    for row in &rows {
        let kind: String = row.try_get("kind")?;
        if kind == AlertKind::Exhausted.as_str() {
            exhausted = true;
        } else {
            thresholds.push(row.try_get::<i64, _>("threshold")?);
        }
    }
    let (field, id) = subject(account);
    let mut data = serde_json::Map::new();
    data.insert(field.into(), id.into());
    data.insert("operation".into(), top_up.operation.into());
    if let Some(v) = top_up.value {
        data.insert("value".into(), v.into());
    }
    if let Some(r) = top_up.exact {
        data.insert("remaining".into(), r.into());
    }
    data.insert("thresholds".into(), thresholds.into());
    data.insert("exhaustedRearmed".into(), exhausted.into());
    let payload = serde_json::json!({
        "type": "credits.refilled",
        "timestamp": rfc3339(now_ms),
        "data": data,
    });
    let event_id = match top_up.event_id {
        Some(id) => id.to_owned(),
        None => new_id("evt"),
    };
    record_event(
        conn,
        &event_id,
        account,
        "credits.refilled",
        &payload.to_string(),
        now_ms,
    )
    .await
    .map(drop)
}

impl SqlStore {
    pub(crate) async fn record_crossings_now(
        &self,
        account: &KeyId,
        crossings: &[Crossing],
        now_ms: i64,
    ) -> Result<usize, StoreError> {
        let mut tx = self.begin_write().await.map_err(store_error)?;
        let mut recorded = 0;
        for c in crossings {
            let event_id = new_id("evt");
            let threshold = i64::try_from(c.kind.threshold()).unwrap_or(i64::MAX);
            let inserted = sqlx::query(
                "INSERT INTO credit_alert_fired (account_id, kind, threshold, event_id, fired_at) \
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (account_id, kind, threshold) DO NOTHING",
            )
            .bind(account.as_str())
            .bind(c.kind.as_str())
            .bind(threshold)
            .bind(event_id.as_str())
            .bind(now_ms)
            .execute(&mut *tx)
            .await
            .map_err(store_error)?
            .rows_affected();
            if inserted == 0 {
                continue;
            }
            let payload = crossing_payload(account, c, now_ms);
            let kept = record_event(
                &mut tx,
                &event_id,
                account,
                event_type(c.kind),
                &payload,
                now_ms,
            )
            .await
            .map_err(store_error)?;
            recorded += usize::from(kept);
        }
        tx.commit().await.map_err(store_error)?;
        Ok(recorded)
    }
}
