//! The limiter's [`Ledger`] port on SQL, mirroring `MemoryLedger` (the reference
//! implementation in `creditgate-limiter`) method by method.
//!
//! The ledger lives in the ledger columns of `keys` (`remaining`, `hot_allocated`,
//! `generation`, `version`, `hot_epoch`, `last_refill_at`), the `transfers` log and
//! the `fences` log. Every method is one transaction that first locks the key's row
//! (`SELECT … FOR UPDATE` on Postgres; on SQLite `BEGIN IMMEDIATE` already holds the
//! database's write lock), then reads, decides in Rust exactly as the reference does,
//! and writes back. Every change to the transfers and fences of a key happens under
//! that key's lock, so idempotency checks on their ids cannot race. The one exception
//! is [`Ledger::spend_direct`]: a single conditional `UPDATE`, atomic on its own.

use async_trait::async_trait;
use creditgate_limiter::ports::{
    AllocateOutcome, AllocateRequest, BeginFence, DirectSpend, Drained, FenceOp, IncrementOutcome,
    Ledger, LedgerError, LedgerState, PendingAllocation, PendingFence,
};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use sqlx::Row as _;

use crate::error::{from_db, ledger_error, to_db};
use crate::{Backend, SqlStore};

/// Attempts of [`Ledger::spend_direct`] when the balance changed between its
/// conditional update and the read that explains a refusal.
const SPEND_DIRECT_ATTEMPTS: u32 = 3;

fn other(msg: String) -> LedgerError {
    LedgerError::Other(msg)
}

fn db(value: u64, what: &str) -> Result<i64, LedgerError> {
    to_db(value, what).map_err(other)
}

fn get_u64(row: &AnyRow, column: &str) -> Result<u64, LedgerError> {
    let v: i64 = row.try_get(column).map_err(ledger_error)?;
    from_db(v, column).map_err(other)
}

fn get_opt_u64(row: &AnyRow, column: &str) -> Result<Option<u64>, LedgerError> {
    let v: Option<i64> = row.try_get(column).map_err(ledger_error)?;
    v.map(|v| from_db(v, column).map_err(other)).transpose()
}

/// The ledger columns of one key, as locked at the start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyRow {
    remaining: Option<u64>,
    hot_allocated: u64,
    generation: u64,
    version: u64,
    hot_epoch: Option<String>,
    last_refill_at: Option<i64>,
    deleted: bool,
}

impl KeyRow {
    fn from_row(row: &AnyRow) -> Result<Self, LedgerError> {
        Ok(Self {
            remaining: get_opt_u64(row, "remaining")?,
            hot_allocated: get_u64(row, "hot_allocated")?,
            generation: get_u64(row, "generation")?,
            version: get_u64(row, "version")?,
            hot_epoch: row.try_get("hot_epoch").map_err(ledger_error)?,
            last_refill_at: row.try_get("last_refill_at").map_err(ledger_error)?,
            deleted: row
                .try_get::<Option<i64>, _>("deleted_at")
                .map_err(ledger_error)?
                .is_some(),
        })
    }

    fn state(&self) -> LedgerState {
        LedgerState {
            remaining: self.remaining,
            hot_allocated: self.hot_allocated,
            generation: self.generation,
            version: self.version,
        }
    }
}

const SELECT_KEY_ROW: &str = "SELECT remaining, hot_allocated, generation, version, hot_epoch, \
     last_refill_at, deleted_at FROM keys WHERE id = $1";
const SELECT_KEY_ROW_FOR_UPDATE: &str = "SELECT remaining, hot_allocated, generation, version, \
     hot_epoch, last_refill_at, deleted_at FROM keys WHERE id = $1 FOR UPDATE";

/// A transfer as logged.
#[derive(Debug, Clone)]
struct TransferRow {
    key: String,
    amount: u64,
    generation: u64,
    state: String,
}

fn fence_op(kind: &str, value: Option<i64>, period_start: Option<i64>) -> Result<FenceOp, String> {
    let amount = |v: Option<i64>| -> Result<u64, String> {
        from_db(
            v.ok_or_else(|| format!("corrupt fence: {kind} without value"))?,
            "value",
        )
    };
    match kind {
        "set" => Ok(FenceOp::Set(
            value.map(|v| from_db(v, "value")).transpose()?,
        )),
        "decrement" => Ok(FenceOp::Decrement(amount(value)?)),
        "refill" => Ok(FenceOp::Refill {
            amount: amount(value)?,
            period_start: period_start
                .ok_or_else(|| "corrupt fence: refill without period_start".to_owned())?,
        }),
        other => Err(format!("corrupt fence: unknown kind '{other}'")),
    }
}

/// `(kind, value, period_start)` columns of a fence operation.
fn fence_columns(op: FenceOp) -> Result<(&'static str, Option<i64>, Option<i64>), LedgerError> {
    Ok(match op {
        FenceOp::Set(v) => ("set", v.map(|v| db(v, "balance")).transpose()?, None),
        FenceOp::Decrement(v) => ("decrement", Some(db(v, "decrement")?), None),
        FenceOp::Refill {
            amount,
            period_start,
        } => (
            "refill",
            Some(db(amount, "refill amount")?),
            Some(period_start),
        ),
    })
}

fn pending_fence_from_row(row: &AnyRow) -> Result<PendingFence, LedgerError> {
    let kind: String = row.try_get("kind").map_err(ledger_error)?;
    let value: Option<i64> = row.try_get("value").map_err(ledger_error)?;
    let period_start: Option<i64> = row.try_get("period_start").map_err(ledger_error)?;
    Ok(PendingFence {
        key: row.try_get("key_id").map_err(ledger_error)?,
        op_id: row.try_get("op_id").map_err(ledger_error)?,
        op: fence_op(&kind, value, period_start).map_err(other)?,
        generation: get_u64(row, "generation")?,
    })
}

impl SqlStore {
    /// Locks and reads the ledger row of `key` inside a write transaction.
    async fn lock_key(
        &self,
        conn: &mut AnyConnection,
        key: &str,
    ) -> Result<Option<KeyRow>, LedgerError> {
        let sql = match self.backend {
            Backend::Postgres => SELECT_KEY_ROW_FOR_UPDATE,
            // The transaction began IMMEDIATE: no other writer can run.
            Backend::Sqlite => SELECT_KEY_ROW,
        };
        let row = sqlx::query(sql)
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(ledger_error)?;
        row.as_ref().map(KeyRow::from_row).transpose()
    }
}

/// Writes back the ledger columns of a locked row.
async fn write_key(conn: &mut AnyConnection, key: &str, row: &KeyRow) -> Result<(), LedgerError> {
    sqlx::query(
        "UPDATE keys SET remaining = $2, hot_allocated = $3, generation = $4, version = $5, \
         hot_epoch = $6, last_refill_at = $7 WHERE id = $1",
    )
    .bind(key)
    .bind(row.remaining.map(|r| db(r, "remaining")).transpose()?)
    .bind(db(row.hot_allocated, "hot_allocated")?)
    .bind(db(row.generation, "generation")?)
    .bind(db(row.version, "version")?)
    .bind(row.hot_epoch.as_deref())
    .bind(row.last_refill_at)
    .execute(&mut *conn)
    .await
    .map_err(ledger_error)?;
    Ok(())
}

async fn find_transfer(
    conn: &mut AnyConnection,
    transfer_id: &str,
) -> Result<Option<TransferRow>, LedgerError> {
    let row = sqlx::query("SELECT key_id, amount, generation, state FROM transfers WHERE id = $1")
        .bind(transfer_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(ledger_error)?;
    row.map(|r| {
        Ok(TransferRow {
            key: r.try_get("key_id").map_err(ledger_error)?,
            amount: get_u64(&r, "amount")?,
            generation: get_u64(&r, "generation")?,
            state: r.try_get("state").map_err(ledger_error)?,
        })
    })
    .transpose()
}

#[allow(clippy::too_many_arguments)]
async fn insert_transfer(
    conn: &mut AnyConnection,
    id: &str,
    key: &str,
    kind: &str,
    amount: u64,
    generation: u64,
    state: &str,
    created_at: i64,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO transfers (id, key_id, kind, amount, generation, state, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(key)
    .bind(kind)
    .bind(db(amount, "amount")?)
    .bind(db(generation, "generation")?)
    .bind(state)
    .bind(created_at)
    .execute(&mut *conn)
    .await
    .map_err(ledger_error)?;
    Ok(())
}

async fn set_transfer_state(
    conn: &mut AnyConnection,
    id: &str,
    state: &str,
) -> Result<(), LedgerError> {
    sqlx::query("UPDATE transfers SET state = $2 WHERE id = $1")
        .bind(id)
        .bind(state)
        .execute(&mut *conn)
        .await
        .map_err(ledger_error)?;
    Ok(())
}

/// Whether a finished `Set` fenced `key` at a generation above `generation`: credits
/// of that older generation were overwritten and must not come back.
async fn set_since(
    conn: &mut AnyConnection,
    key: &str,
    generation: u64,
) -> Result<bool, LedgerError> {
    let row = sqlx::query(
        "SELECT op_id FROM fences WHERE key_id = $1 AND state = 'done' AND kind = 'set' \
         AND generation > $2 LIMIT 1",
    )
    .bind(key)
    .bind(db(generation, "generation")?)
    .fetch_optional(&mut *conn)
    .await
    .map_err(ledger_error)?;
    Ok(row.is_some())
}

async fn fence_pending(conn: &mut AnyConnection, key: &str) -> Result<bool, LedgerError> {
    let row =
        sqlx::query("SELECT op_id FROM fences WHERE key_id = $1 AND state = 'pending' LIMIT 1")
            .bind(key)
            .fetch_optional(&mut *conn)
            .await
            .map_err(ledger_error)?;
    Ok(row.is_some())
}

/// Writes off what a locked key had allocated to a hot-store epoch other than `epoch`
/// (its pending allocations become `lost`); returns the credits lost. The caller
/// writes `row` back.
async fn write_off(
    conn: &mut AnyConnection,
    key: &str,
    row: &mut KeyRow,
    epoch: &str,
) -> Result<u64, LedgerError> {
    if row.hot_epoch.as_deref() == Some(epoch) {
        return Ok(0);
    }
    let lost = row.hot_allocated;
    row.hot_allocated = 0;
    row.hot_epoch = Some(epoch.to_owned());
    sqlx::query("UPDATE transfers SET state = 'lost' WHERE key_id = $1 AND state = 'pending'")
        .bind(key)
        .execute(&mut *conn)
        .await
        .map_err(ledger_error)?;
    Ok(lost)
}

#[async_trait]
impl Ledger for SqlStore {
    async fn state(&self, key: &str) -> Result<Option<LedgerState>, LedgerError> {
        let row = sqlx::query(SELECT_KEY_ROW)
            .bind(key)
            .fetch_optional(&self.read)
            .await
            .map_err(ledger_error)?;
        Ok(row
            .as_ref()
            .map(KeyRow::from_row)
            .transpose()?
            .map(|r| r.state()))
    }

    async fn allocate(&self, req: &AllocateRequest<'_>) -> Result<AllocateOutcome, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let row = self.lock_key(&mut tx, req.key).await?;
        if let Some(t) = find_transfer(&mut tx, req.transfer_id).await? {
            // A retried allocation: answer what the first one did.
            let (remaining, version) = row
                .as_ref()
                .map_or((0, 0), |r| (r.remaining.unwrap_or(0), r.version));
            return Ok(AllocateOutcome::Granted {
                amount: t.amount,
                remaining,
                generation: t.generation,
                version,
                lost: 0,
            });
        }
        let Some(mut row) = row.filter(|r| !r.deleted) else {
            return Ok(AllocateOutcome::NotFound);
        };
        let Some(remaining) = row.remaining else {
            return Ok(AllocateOutcome::Unlimited);
        };
        let locked = row.clone();
        let lost = write_off(&mut tx, req.key, &mut row, req.epoch).await?;
        let outcome = if fence_pending(&mut tx, req.key).await?
            || req.generation.is_some_and(|g| g != row.generation)
        {
            AllocateOutcome::GenerationMoved {
                generation: row.generation,
            }
        } else if remaining < req.need {
            AllocateOutcome::Insufficient {
                remaining,
                generation: row.generation,
                version: row.version,
                lost,
            }
        } else {
            let amount = req.need.max(req.chunk.min(remaining));
            let remaining = remaining - amount;
            row.remaining = Some(remaining);
            row.hot_allocated = row.hot_allocated.saturating_add(amount);
            row.version += 1;
            insert_transfer(
                &mut tx,
                req.transfer_id,
                req.key,
                "alloc",
                amount,
                row.generation,
                "pending",
                req.now_ms,
            )
            .await?;
            AllocateOutcome::Granted {
                amount,
                remaining,
                generation: row.generation,
                version: row.version,
                lost,
            }
        };
        // The write-off stands whatever the outcome.
        if row != locked {
            write_key(&mut tx, req.key, &row).await?;
        }
        tx.commit().await.map_err(ledger_error)?;
        Ok(outcome)
    }

    async fn settle_allocation(
        &self,
        key: &str,
        transfer_id: &str,
        credited: bool,
        spent: u64,
    ) -> Result<(), LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let row = self.lock_key(&mut tx, key).await?;
        let Some(t) = find_transfer(&mut tx, transfer_id).await? else {
            return Ok(());
        };
        if t.state != "pending" || t.key != key {
            return Ok(());
        }
        if credited {
            if let Some(mut row) = row {
                if t.generation == row.generation && spent > 0 {
                    row.hot_allocated = row.hot_allocated.saturating_sub(spent);
                    write_key(&mut tx, key, &row).await?;
                }
            }
            set_transfer_state(&mut tx, transfer_id, "credited").await?;
        } else {
            let overwritten = set_since(&mut tx, key, t.generation).await?;
            if let Some(mut row) = row {
                if t.generation == row.generation {
                    row.hot_allocated = row.hot_allocated.saturating_sub(t.amount);
                }
                if !overwritten {
                    if let Some(r) = row.remaining.as_mut() {
                        *r = r.saturating_add(t.amount);
                    }
                    row.version += 1;
                }
                write_key(&mut tx, key, &row).await?;
            }
            set_transfer_state(&mut tx, transfer_id, "cancelled").await?;
        }
        tx.commit().await.map_err(ledger_error)
    }

    async fn return_drained(
        &self,
        key: &str,
        transfer_id: &str,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let Some(mut row) = self.lock_key(&mut tx, key).await? else {
            return Err(other(format!("no ledger row for {key}")));
        };
        if find_transfer(&mut tx, transfer_id).await?.is_none() {
            let overwritten = set_since(&mut tx, key, drained.generation).await?;
            if drained.generation == row.generation {
                row.hot_allocated = row
                    .hot_allocated
                    .saturating_sub(drained.amount.saturating_add(drained.spent));
            }
            if !overwritten && drained.amount > 0 {
                if let Some(r) = row.remaining.as_mut() {
                    *r = r.saturating_add(drained.amount);
                }
                row.version += 1;
            }
            write_key(&mut tx, key, &row).await?;
            insert_transfer(
                &mut tx,
                transfer_id,
                key,
                "return",
                drained.amount,
                drained.generation,
                "applied",
                self.clock.now_ms(),
            )
            .await?;
            tx.commit().await.map_err(ledger_error)?;
        }
        Ok(row.state())
    }

    async fn increment(
        &self,
        key: &str,
        amount: u64,
        max: u64,
    ) -> Result<IncrementOutcome, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let Some(mut row) = self.lock_key(&mut tx, key).await? else {
            return Ok(IncrementOutcome::NotFound);
        };
        let Some(remaining) = row.remaining else {
            return Ok(IncrementOutcome::Unlimited);
        };
        let total = remaining
            .checked_add(row.hot_allocated)
            .and_then(|t| t.checked_add(amount));
        let Some(new_remaining) = remaining
            .checked_add(amount)
            .filter(|_| total.is_some_and(|t| t <= max))
        else {
            return Ok(IncrementOutcome::Overflow);
        };
        row.remaining = Some(new_remaining);
        row.version += 1;
        write_key(&mut tx, key, &row).await?;
        tx.commit().await.map_err(ledger_error)?;
        Ok(IncrementOutcome::Done(row.state()))
    }

    async fn begin_fence(
        &self,
        key: &str,
        op_id: &str,
        op: FenceOp,
        now_ms: i64,
    ) -> Result<BeginFence, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let row = self.lock_key(&mut tx, key).await?;
        let existing = sqlx::query(
            "SELECT op_id, key_id, kind, value, period_start, generation FROM fences \
             WHERE op_id = $1",
        )
        .bind(op_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(ledger_error)?;
        if let Some(existing) = existing {
            return Ok(BeginFence::Begun(pending_fence_from_row(&existing)?));
        }
        let Some(mut row) = row else {
            return Ok(BeginFence::NotFound);
        };
        if let FenceOp::Refill { period_start, .. } = op {
            let done = row.last_refill_at.is_some_and(|t| t >= period_start);
            if done || row.remaining.is_none() {
                return Ok(BeginFence::NotDue);
            }
            row.last_refill_at = Some(now_ms);
        }
        row.generation += 1;
        write_key(&mut tx, key, &row).await?;
        let (kind, value, period_start) = fence_columns(op)?;
        sqlx::query(
            "INSERT INTO fences (op_id, key_id, kind, value, period_start, generation, state, \
             created_at) VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7)",
        )
        .bind(op_id)
        .bind(key)
        .bind(kind)
        .bind(value)
        .bind(period_start)
        .bind(db(row.generation, "generation")?)
        .bind(now_ms)
        .execute(&mut *tx)
        .await
        .map_err(ledger_error)?;
        tx.commit().await.map_err(ledger_error)?;
        Ok(BeginFence::Begun(PendingFence {
            key: key.to_owned(),
            op_id: op_id.to_owned(),
            op,
            generation: row.generation,
        }))
    }

    async fn finish_fence(
        &self,
        fence: &PendingFence,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let row = self.lock_key(&mut tx, &fence.key).await?;
        let state: Option<String> = sqlx::query("SELECT state FROM fences WHERE op_id = $1")
            .bind(fence.op_id.as_str())
            .fetch_optional(&mut *tx)
            .await
            .map_err(ledger_error)?
            .map(|r| r.try_get("state"))
            .transpose()
            .map_err(ledger_error)?;
        let done = state.as_deref().is_none_or(|s| s == "done");
        let Some(mut row) = row else {
            return Err(other(format!("no ledger row for {}", fence.key)));
        };
        if done {
            return Ok(row.state());
        }
        let base = row.remaining.map(|r| r.saturating_add(drained.amount));
        row.remaining = match fence.op {
            FenceOp::Set(v) => v,
            FenceOp::Decrement(v) => base.map(|b| b.saturating_sub(v)),
            FenceOp::Refill { amount, .. } => base.map(|b| b.max(amount)),
        };
        row.hot_allocated = 0;
        row.version += 1;
        write_key(&mut tx, &fence.key, &row).await?;
        sqlx::query("UPDATE fences SET state = 'done' WHERE op_id = $1")
            .bind(fence.op_id.as_str())
            .execute(&mut *tx)
            .await
            .map_err(ledger_error)?;
        tx.commit().await.map_err(ledger_error)?;
        Ok(row.state())
    }

    async fn spend_direct(&self, key: &str, cost: u64) -> Result<DirectSpend, LedgerError> {
        // A cost past i64::MAX exceeds every balance; only the explaining read runs.
        let cost_db = i64::try_from(cost).ok();
        for _ in 0..SPEND_DIRECT_ATTEMPTS {
            if let Some(cost_db) = cost_db {
                let spent = sqlx::query(
                    "UPDATE keys SET remaining = remaining - $2, version = version + 1 \
                     WHERE id = $1 AND remaining >= $2 AND deleted_at IS NULL \
                     RETURNING remaining",
                )
                .bind(key)
                .bind(cost_db)
                .fetch_optional(&self.write)
                .await
                .map_err(ledger_error)?;
                if let Some(row) = spent {
                    return Ok(DirectSpend::Valid {
                        remaining: get_u64(&row, "remaining")?,
                    });
                }
            }
            // Nothing spent: say why.
            let Some(row) = sqlx::query(SELECT_KEY_ROW)
                .bind(key)
                .fetch_optional(&self.write)
                .await
                .map_err(ledger_error)?
            else {
                return Ok(DirectSpend::NotFound);
            };
            let row = KeyRow::from_row(&row)?;
            match row.remaining {
                _ if row.deleted => return Ok(DirectSpend::NotFound),
                None => return Ok(DirectSpend::Unlimited),
                Some(remaining) if remaining < cost => {
                    return Ok(DirectSpend::Exceeded { remaining })
                }
                // The balance grew since the update: try again.
                Some(_) => {}
            }
        }
        Err(LedgerError::Unavailable(format!(
            "direct spend on {key} raced with balance changes {SPEND_DIRECT_ATTEMPTS} times"
        )))
    }

    async fn pending_allocations(
        &self,
        key: Option<&str>,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingAllocation>, LedgerError> {
        let rows = sqlx::query(
            "SELECT id, key_id, amount, generation, created_at FROM transfers \
             WHERE state = 'pending' AND created_at < $1 AND ($2 IS NULL OR key_id = $2) \
             ORDER BY created_at, id LIMIT $3",
        )
        .bind(older_than_ms)
        .bind(key)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(ledger_error)?;
        rows.iter()
            .map(|r| {
                Ok(PendingAllocation {
                    key: r.try_get("key_id").map_err(ledger_error)?,
                    transfer_id: r.try_get("id").map_err(ledger_error)?,
                    amount: get_u64(r, "amount")?,
                    generation: get_u64(r, "generation")?,
                    created_at_ms: r.try_get("created_at").map_err(ledger_error)?,
                })
            })
            .collect()
    }

    async fn pending_fences(
        &self,
        key: Option<&str>,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingFence>, LedgerError> {
        let rows = sqlx::query(
            "SELECT op_id, key_id, kind, value, period_start, generation FROM fences \
             WHERE state = 'pending' AND created_at < $1 AND ($2 IS NULL OR key_id = $2) \
             ORDER BY created_at, generation, op_id LIMIT $3",
        )
        .bind(older_than_ms)
        .bind(key)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(ledger_error)?;
        rows.iter().map(pending_fence_from_row).collect()
    }

    async fn write_off_other_epochs(&self, epoch: &str) -> Result<Vec<(String, u64)>, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        // Locks every candidate in id order (no deadlock with another such call).
        let sql = match self.backend {
            Backend::Postgres => {
                "SELECT id FROM keys WHERE hot_epoch IS NOT NULL AND hot_epoch <> $1 \
                 ORDER BY id FOR UPDATE"
            }
            Backend::Sqlite => {
                "SELECT id FROM keys WHERE hot_epoch IS NOT NULL AND hot_epoch <> $1 ORDER BY id"
            }
        };
        let ids: Vec<String> = sqlx::query(sql)
            .bind(epoch)
            .fetch_all(&mut *tx)
            .await
            .map_err(ledger_error)?
            .iter()
            .map(|r| r.try_get("id"))
            .collect::<Result<_, _>>()
            .map_err(ledger_error)?;
        let mut out = Vec::new();
        for key in ids {
            let Some(mut row) = self.lock_key(&mut tx, &key).await? else {
                continue;
            };
            let lost = write_off(&mut tx, &key, &mut row, epoch).await?;
            write_key(&mut tx, &key, &row).await?;
            if lost > 0 {
                out.push((key, lost));
            }
        }
        tx.commit().await.map_err(ledger_error)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_ops_round_trip_through_columns() {
        for op in [
            FenceOp::Set(None),
            FenceOp::Set(Some(7)),
            FenceOp::Decrement(3),
            FenceOp::Refill {
                amount: 10,
                period_start: 86_400_000,
            },
        ] {
            let (kind, value, period_start) = fence_columns(op).unwrap();
            assert_eq!(fence_op(kind, value, period_start), Ok(op));
        }
        assert!(fence_op("refill", Some(1), None).is_err());
        assert!(fence_op("decrement", Some(-1), None).is_err());
        assert!(fence_op("bogus", None, None).is_err());
    }
}
