//! The limiter's [`Ledger`] port on SQL. Like every ledger adapter it only locks, loads,
//! applies [`creditgate_limiter::rules`] and stores: the rules themselves live once, in
//! the limiter.
//!
//! The ledger lives in the ledger columns of `keys` (`remaining`, `hot_allocated`,
//! `generation`, `version`, `hot_epoch`, `last_refill_at`, `held`, and the history's
//! `booked`, `spent`, `history_seq`), the `transfers` log, the `fences` log and the
//! `credit_history` the rules write (inserted by `write_account` with the row). Every
//! method is one transaction that first locks the key's row (`SELECT … FOR UPDATE` on
//! Postgres; on SQLite `BEGIN IMMEDIATE` already holds the database's write lock), then
//! loads what the rule needs, applies it, and writes back.
//! Every change to the transfers and fences of a key happens under that key's lock, so
//! idempotency checks on their ids cannot race.

use async_trait::async_trait;
use creditgate_domain::{Cost, Credits, IdentityId, KeyId};
use creditgate_limiter::ports::{
    allocate_each, return_each, settle_each, AllocateOutcome, AllocateRequest, BeginFence,
    ClaimOutcome, CreditEntry, DirectSpend, Drained, EntryKind, FenceOp, Hold, HoldClose,
    HoldOutcome, HoldState, IdemClaim, IdemMark, IdemRecord, IdemState, IncrementOutcome, Ledger,
    LedgerError, LedgerState, PairHoldOutcome, PendingAllocation, PendingFence, ReserveRequest,
    Settlement,
};
use creditgate_limiter::rules::{
    self, Account, Arrival, FenceState, Transfer, TransferKind, TransferState,
};
use sqlx::any::AnyRow;
use sqlx::AnyConnection;
use sqlx::Row as _;

use crate::alerts::{rearm, TopUp};
use crate::error::{from_db, ledger_error, to_db};
use crate::{Backend, SqlStore};

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

fn get_text<T>(row: &AnyRow, column: &str, parse: fn(&str) -> Option<T>) -> Result<T, LedgerError> {
    let text: String = row.try_get(column).map_err(ledger_error)?;
    parse(&text).ok_or_else(|| other(format!("corrupt ledger: {column} '{text}'")))
}

/// The ledger columns of one key, as locked at the start of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeyRow {
    account: Account,
    deleted: bool,
}

impl KeyRow {
    fn from_row(row: &AnyRow) -> Result<Self, LedgerError> {
        Ok(Self {
            account: Account {
                remaining: get_opt_u64(row, "remaining")?,
                hot_allocated: get_u64(row, "hot_allocated")?,
                generation: get_u64(row, "generation")?,
                version: get_u64(row, "version")?,
                hot_epoch: row.try_get("hot_epoch").map_err(ledger_error)?,
                last_refill_at: row.try_get("last_refill_at").map_err(ledger_error)?,
                held: get_u64(row, "held")?,
                booked: get_u64(row, "booked")?,
                spent: get_u64(row, "spent")?,
                history_seq: get_u64(row, "history_seq")?,
                entries: Vec::new(),
            },
            deleted: row
                .try_get::<Option<i64>, _>("deleted_at")
                .map_err(ledger_error)?
                .is_some(),
        })
    }

    /// The account of a live key (deleted keys have none).
    fn live(self) -> Option<Account> {
        (!self.deleted).then_some(self.account)
    }
}

/// The table of an account's ledger row: `pools` for an identity's shared pool (its id
/// is the identity's), `keys` for a key.
pub(crate) fn account_table(account: &KeyId) -> &'static str {
    let is_pool = account
        .as_str()
        .strip_prefix(IdentityId::PREFIX)
        .is_some_and(|rest| rest.starts_with('_'));
    if is_pool {
        "pools"
    } else {
        "keys"
    }
}

/// The tables that hold ledger accounts.
const ACCOUNT_TABLES: [&str; 2] = ["keys", "pools"];

/// `SELECT` of an account's ledger row (`FOR UPDATE` where the backend locks rows).
fn select_row(account: &KeyId, for_update: bool) -> String {
    format!(
        "SELECT remaining, hot_allocated, generation, version, hot_epoch, last_refill_at, \
         held, booked, spent, history_seq, deleted_at FROM {} WHERE id = $1{}",
        account_table(account),
        if for_update { " FOR UPDATE" } else { "" }
    )
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
        key: KeyId::from(row.try_get::<String, _>("key_id").map_err(ledger_error)?),
        op_id: row.try_get("op_id").map_err(ledger_error)?,
        op: fence_op(&kind, value, period_start).map_err(other)?,
        generation: get_u64(row, "generation")?,
        actor: row.try_get("actor").map_err(ledger_error)?,
    })
}

/// The columns of a fence row that make a [`PendingFence`].
const FENCE_COLUMNS: &str = "op_id, key_id, kind, value, period_start, generation, actor";

impl SqlStore {
    /// Locks and reads the ledger row of `key` inside a write transaction.
    async fn lock_key(
        &self,
        conn: &mut AnyConnection,
        key: &KeyId,
    ) -> Result<Option<KeyRow>, LedgerError> {
        // SQLite: the transaction began IMMEDIATE, no other writer can run.
        let sql = select_row(key, self.backend == Backend::Postgres);
        let row = sqlx::query(&sql)
            .bind(key.as_str())
            .fetch_optional(&mut *conn)
            .await
            .map_err(ledger_error)?;
        row.as_ref().map(KeyRow::from_row).transpose()
    }
}

impl SqlStore {
    /// Locks and reads the live accounts of a key and its pool, in id order.
    async fn lock_pair(
        &self,
        conn: &mut AnyConnection,
        key: &KeyId,
        pool: &KeyId,
    ) -> Result<(Option<Account>, Option<Account>), LedgerError> {
        if key.as_str() <= pool.as_str() {
            let k = self.lock_key(conn, key).await?.and_then(KeyRow::live);
            let p = self.lock_key(conn, pool).await?.and_then(KeyRow::live);
            Ok((k, p))
        } else {
            let p = self.lock_key(conn, pool).await?.and_then(KeyRow::live);
            let k = self.lock_key(conn, key).await?.and_then(KeyRow::live);
            Ok((k, p))
        }
    }

    /// [`Ledger::allocate`] inside the write transaction `conn`.
    async fn allocate_in(
        &self,
        conn: &mut AnyConnection,
        req: &AllocateRequest<'_>,
    ) -> Result<AllocateOutcome, LedgerError> {
        let row = self.lock_key(conn, req.key).await?;
        if let Some(first) = find_transfer(conn, req.transfer_id).await? {
            return Ok(rules::retried_allocation(
                row.as_ref().map(|r| &r.account),
                &first,
            ));
        }
        let Some(before) = row.and_then(KeyRow::live) else {
            return Ok(AllocateOutcome::NotFound);
        };
        let fence_pending = fence_pending(conn, req.key).await?;
        let mut account = before.clone();
        let allocation = rules::allocate(&mut account, req, fence_pending);
        if allocation.written_off.is_some() {
            mark_lost(conn, req.key).await?;
        }
        if let Some(t) = &allocation.transfer {
            insert_transfer(conn, req.transfer_id, t).await?;
        }
        store_account(conn, req.key, &before, &account).await?;
        Ok(allocation.outcome)
    }

    /// [`Ledger::settle_allocation`] inside the write transaction `conn`.
    async fn settle_in(
        &self,
        conn: &mut AnyConnection,
        key: &KeyId,
        transfer_id: &str,
        credited: bool,
        spent: u64,
    ) -> Result<(), LedgerError> {
        let row = self.lock_key(conn, key).await?;
        let Some(t) = find_transfer(conn, transfer_id).await? else {
            return Ok(());
        };
        let before = row.map(|r| r.account);
        let arrival = self
            .arrival(conn, key, t.generation, before.as_ref())
            .await?;
        let mut account = before.clone();
        let Some(state) = rules::settle(account.as_mut(), key, &t, credited, spent, arrival) else {
            return Ok(());
        };
        if let (Some(before), Some(after)) = (&before, &account) {
            store_account(conn, key, before, after).await?;
        }
        set_transfer_state(conn, transfer_id, state).await
    }

    /// [`Ledger::return_drained`] inside the write transaction `conn`.
    async fn return_in(
        &self,
        conn: &mut AnyConnection,
        key: &KeyId,
        transfer_id: &str,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError> {
        let Some(row) = self.lock_key(conn, key).await? else {
            return Err(other(format!("no ledger row for {key}")));
        };
        let mut account = row.account;
        if find_transfer(conn, transfer_id).await?.is_none() {
            let arrival = self
                .arrival(conn, key, drained.generation, Some(&account))
                .await?;
            let t = rules::return_drained(&mut account, key, drained, arrival);
            write_account(conn, key, &account).await?;
            insert_transfer(conn, transfer_id, &t).await?;
        }
        Ok(account.state())
    }
}

impl SqlStore {
    /// How a transfer of `key` at `generation` reaches the locked `account` now. Whether
    /// a fence is pending matters only to credits of an older generation.
    async fn arrival(
        &self,
        conn: &mut AnyConnection,
        key: &KeyId,
        generation: u64,
        account: Option<&Account>,
    ) -> Result<Arrival, LedgerError> {
        let older = account.is_some_and(|a| a.generation != generation);
        Ok(Arrival {
            overwritten: set_since(conn, key, generation).await?,
            fence_pending: older && fence_pending(conn, key).await?,
            now_ms: self.clock.now_ms(),
        })
    }
}

/// Indices of a batch's items sorted by key, so that every batch (on every node) locks
/// key rows in the same order and two batches cannot deadlock on Postgres.
fn key_order<'a>(keys: impl Iterator<Item = &'a KeyId>) -> Vec<usize> {
    let keys: Vec<&KeyId> = keys.collect();
    let mut order: Vec<usize> = (0..keys.len()).collect();
    order.sort_by(|&a, &b| keys[a].as_str().cmp(keys[b].as_str()));
    order
}

fn missing() -> LedgerError {
    other("a batch item had no result".to_owned())
}

/// Commits a ledger write transaction, counting it.
async fn commit(tx: sqlx::Transaction<'static, sqlx::Any>) -> Result<(), LedgerError> {
    tx.commit().await.map_err(ledger_error)?;
    metrics::counter!(TRANSACTIONS).increment(1);
    Ok(())
}

/// Ledger write transactions committed.
pub const TRANSACTIONS: &str = "creditgate_ledger_transactions_total";
/// Rows the ledger inserted or updated (keys, transfers, fences): the figure the escrow
/// keeps far below one per verification.
pub const ROW_WRITES: &str = "creditgate_ledger_row_writes_total";

/// Counts the rows a ledger statement wrote.
fn wrote(result: sqlx::any::AnyQueryResult) {
    metrics::counter!(ROW_WRITES).increment(result.rows_affected());
}

/// Inside a write transaction about to make a change: the claim of `mark` becomes
/// decided, in the same transaction as the change (`Superseded` if its token no longer
/// holds it). A call that then changes nothing does not commit, so the mark goes too.
async fn decide_mark(
    conn: &mut AnyConnection,
    mark: Option<&IdemMark<'_>>,
) -> Result<(), LedgerError> {
    let Some(m) = mark else {
        return Ok(());
    };
    let done = sqlx::query(
        "UPDATE idempotency SET state = $4 WHERE scope = $1 AND idem_key = $2 \
         AND token = $3 AND state = $5",
    )
    .bind(m.scope)
    .bind(m.key)
    .bind(m.token)
    .bind(IdemState::Decided.as_str())
    .bind(IdemState::Claimed.as_str())
    .execute(&mut *conn)
    .await
    .map_err(ledger_error)?;
    if done.rows_affected() == 0 {
        return Err(LedgerError::Superseded);
    }
    wrote(done);
    Ok(())
}

const IDEM_COLUMNS: &str = "fingerprint, token, state, answer, created_at, lease_until";

fn idem_from_row(row: &AnyRow) -> Result<IdemRecord, LedgerError> {
    Ok(IdemRecord {
        fingerprint: row.try_get("fingerprint").map_err(ledger_error)?,
        token: row.try_get("token").map_err(ledger_error)?,
        state: get_text(row, "state", IdemState::parse)?,
        answer: row.try_get("answer").map_err(ledger_error)?,
        created_at_ms: row.try_get("created_at").map_err(ledger_error)?,
        lease_until_ms: row.try_get("lease_until").map_err(ledger_error)?,
    })
}

/// Writes back the ledger columns of a locked row, and inserts the history entries the
/// rules wrote: they commit with the change they record.
async fn write_account(
    conn: &mut AnyConnection,
    key: &KeyId,
    a: &Account,
) -> Result<(), LedgerError> {
    sqlx::query(&format!(
        "UPDATE {} SET remaining = $2, hot_allocated = $3, generation = $4, version = $5, \
         hot_epoch = $6, last_refill_at = $7, held = $8, booked = $9, spent = $10, \
         history_seq = $11 WHERE id = $1",
        account_table(key)
    ))
    .bind(key.as_str())
    .bind(a.remaining.map(|r| db(r, "remaining")).transpose()?)
    .bind(db(a.hot_allocated, "hot_allocated")?)
    .bind(db(a.generation, "generation")?)
    .bind(db(a.version, "version")?)
    .bind(a.hot_epoch.as_deref())
    .bind(a.last_refill_at)
    .bind(db(a.held, "held")?)
    .bind(db(a.booked, "booked")?)
    .bind(db(a.spent, "spent")?)
    .bind(db(a.history_seq, "history_seq")?)
    .execute(&mut *conn)
    .await
    .map_err(ledger_error)
    .map(wrote)?;
    insert_entries(conn, key, &a.entries)
        .await
        .map_err(ledger_error)
}

const ENTRY_COLUMNS: &str = "seq, at, kind, value, actor, hold_id, balance_before, \
     balance_after, held_before, held_after, spent_total, exact";

/// Inserts history entries of `account` (in the transaction of the change they record).
pub(crate) async fn insert_entries(
    conn: &mut AnyConnection,
    account: &KeyId,
    entries: &[CreditEntry],
) -> Result<(), sqlx::Error> {
    let big = |v: u64| i64::try_from(v).map_err(|_| sqlx::Error::Protocol(format!("{v} > i64")));
    for e in entries {
        let done = sqlx::query(&format!(
            "INSERT INTO credit_history (account_id, {ENTRY_COLUMNS}) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)"
        ))
        .bind(account.as_str())
        .bind(big(e.seq)?)
        .bind(e.at_ms)
        .bind(e.kind.as_str())
        .bind(e.value.map(big).transpose()?)
        .bind(e.actor.as_deref())
        .bind(e.hold_id.as_deref())
        .bind(e.balance_before.map(big).transpose()?)
        .bind(e.balance_after.map(big).transpose()?)
        .bind(big(e.held_before)?)
        .bind(big(e.held_after)?)
        .bind(big(e.spent_total)?)
        .bind(i64::from(e.exact))
        .execute(&mut *conn)
        .await?;
        wrote(done);
    }
    Ok(())
}

fn entry_from_row(row: &AnyRow) -> Result<CreditEntry, LedgerError> {
    Ok(CreditEntry {
        seq: get_u64(row, "seq")?,
        at_ms: row.try_get("at").map_err(ledger_error)?,
        kind: get_text(row, "kind", EntryKind::parse)?,
        value: get_opt_u64(row, "value")?,
        actor: row.try_get("actor").map_err(ledger_error)?,
        hold_id: row.try_get("hold_id").map_err(ledger_error)?,
        balance_before: get_opt_u64(row, "balance_before")?,
        balance_after: get_opt_u64(row, "balance_after")?,
        held_before: get_u64(row, "held_before")?,
        held_after: get_u64(row, "held_after")?,
        spent_total: get_u64(row, "spent_total")?,
        exact: row.try_get::<i64, _>("exact").map_err(ledger_error)? != 0,
    })
}

/// Writes `after` back if the rule changed it.
async fn store_account(
    conn: &mut AnyConnection,
    key: &KeyId,
    before: &Account,
    after: &Account,
) -> Result<(), LedgerError> {
    if before != after {
        write_account(conn, key, after).await?;
    }
    Ok(())
}

async fn find_transfer(
    conn: &mut AnyConnection,
    transfer_id: &str,
) -> Result<Option<Transfer>, LedgerError> {
    let row = sqlx::query(
        "SELECT key_id, kind, amount, generation, state, created_at FROM transfers WHERE id = $1",
    )
    .bind(transfer_id)
    .fetch_optional(&mut *conn)
    .await
    .map_err(ledger_error)?;
    row.map(|r| {
        Ok(Transfer {
            key: KeyId::from(r.try_get::<String, _>("key_id").map_err(ledger_error)?),
            kind: get_text(&r, "kind", TransferKind::parse)?,
            amount: get_u64(&r, "amount")?,
            generation: get_u64(&r, "generation")?,
            state: get_text(&r, "state", TransferState::parse)?,
            created_at_ms: r.try_get("created_at").map_err(ledger_error)?,
        })
    })
    .transpose()
}

async fn insert_transfer(
    conn: &mut AnyConnection,
    id: &str,
    t: &Transfer,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO transfers (id, key_id, kind, amount, generation, state, created_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(id)
    .bind(t.key.as_str())
    .bind(t.kind.as_str())
    .bind(db(t.amount, "amount")?)
    .bind(db(t.generation, "generation")?)
    .bind(t.state.as_str())
    .bind(t.created_at_ms)
    .execute(&mut *conn)
    .await
    .map_err(ledger_error)
    .map(wrote)?;
    Ok(())
}

async fn set_transfer_state(
    conn: &mut AnyConnection,
    id: &str,
    state: TransferState,
) -> Result<(), LedgerError> {
    sqlx::query("UPDATE transfers SET state = $2 WHERE id = $1")
        .bind(id)
        .bind(state.as_str())
        .execute(&mut *conn)
        .await
        .map_err(ledger_error)
        .map(wrote)?;
    Ok(())
}

/// Stores a write-off decided by the rules: the key's pending allocations are lost.
async fn mark_lost(conn: &mut AnyConnection, key: &KeyId) -> Result<(), LedgerError> {
    sqlx::query("UPDATE transfers SET state = $2 WHERE key_id = $1 AND state = $3")
        .bind(key.as_str())
        .bind(TransferState::Lost.as_str())
        .bind(TransferState::Pending.as_str())
        .execute(&mut *conn)
        .await
        .map_err(ledger_error)
        .map(wrote)?;
    Ok(())
}

/// Whether a finished `Set` fenced `key` at a generation above `generation`: credits
/// of that older generation were overwritten and must not come back.
async fn set_since(
    conn: &mut AnyConnection,
    key: &KeyId,
    generation: u64,
) -> Result<bool, LedgerError> {
    let row = sqlx::query(
        "SELECT op_id FROM fences WHERE key_id = $1 AND state = $3 AND kind = 'set' \
         AND generation > $2 LIMIT 1",
    )
    .bind(key.as_str())
    .bind(db(generation, "generation")?)
    .bind(FenceState::Done.as_str())
    .fetch_optional(&mut *conn)
    .await
    .map_err(ledger_error)?;
    Ok(row.is_some())
}

async fn fence_pending(conn: &mut AnyConnection, key: &KeyId) -> Result<bool, LedgerError> {
    let row = sqlx::query("SELECT op_id FROM fences WHERE key_id = $1 AND state = $2 LIMIT 1")
        .bind(key.as_str())
        .bind(FenceState::Pending.as_str())
        .fetch_optional(&mut *conn)
        .await
        .map_err(ledger_error)?;
    Ok(row.is_some())
}

async fn fence_state(
    conn: &mut AnyConnection,
    op_id: &str,
) -> Result<Option<FenceState>, LedgerError> {
    let row = sqlx::query("SELECT state FROM fences WHERE op_id = $1")
        .bind(op_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(ledger_error)?;
    row.map(|r| get_text(&r, "state", FenceState::parse))
        .transpose()
}

const HOLD_COLUMNS: &str =
    "id, key_id, amount, funded, state, cost, created_at, expires_at, closed_at";

fn hold_from_row(row: &AnyRow) -> Result<Hold, LedgerError> {
    Ok(Hold {
        id: row.try_get("id").map_err(ledger_error)?,
        key: KeyId::from(row.try_get::<String, _>("key_id").map_err(ledger_error)?),
        amount: get_u64(row, "amount")?,
        funded: row.try_get::<i64, _>("funded").map_err(ledger_error)? != 0,
        state: get_text(row, "state", HoldState::parse)?,
        cost: get_opt_u64(row, "cost")?,
        created_at_ms: row.try_get("created_at").map_err(ledger_error)?,
        expires_at_ms: row.try_get("expires_at").map_err(ledger_error)?,
        closed_at_ms: row.try_get("closed_at").map_err(ledger_error)?,
    })
}

async fn find_hold(conn: &mut AnyConnection, hold_id: &str) -> Result<Option<Hold>, LedgerError> {
    let row = sqlx::query(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1"))
        .bind(hold_id)
        .fetch_optional(&mut *conn)
        .await
        .map_err(ledger_error)?;
    row.as_ref().map(hold_from_row).transpose()
}

async fn insert_hold(conn: &mut AnyConnection, h: &Hold) -> Result<(), LedgerError> {
    sqlx::query(&format!(
        "INSERT INTO holds ({HOLD_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
    ))
    .bind(h.id.as_str())
    .bind(h.key.as_str())
    .bind(db(h.amount, "amount")?)
    .bind(i64::from(h.funded))
    .bind(h.state.as_str())
    .bind(h.cost.map(|c| db(c, "cost")).transpose()?)
    .bind(h.created_at_ms)
    .bind(h.expires_at_ms)
    .bind(h.closed_at_ms)
    .execute(&mut *conn)
    .await
    .map_err(ledger_error)
    .map(wrote)?;
    Ok(())
}

/// Stores a hold the rules closed.
async fn store_closed_hold(conn: &mut AnyConnection, h: &Hold) -> Result<(), LedgerError> {
    sqlx::query("UPDATE holds SET state = $2, cost = $3, closed_at = $4 WHERE id = $1")
        .bind(h.id.as_str())
        .bind(h.state.as_str())
        .bind(h.cost.map(|c| db(c, "cost")).transpose()?)
        .bind(h.closed_at_ms)
        .execute(&mut *conn)
        .await
        .map_err(ledger_error)
        .map(wrote)?;
    // The `hold.expired` webhook event commits with the expiry, once per hold; a pooled
    // key's hold is told once, by the key's (its pool's twin has the same fate).
    if h.state == HoldState::Expired && account_table(&h.key) == "keys" {
        let at = h.closed_at_ms.unwrap_or(h.expires_at_ms);
        let payload = serde_json::json!({
            "type": "hold.expired",
            "timestamp": crate::webhooks::rfc3339(at),
            "data": {
                "holdId": h.id,
                "keyId": h.key.as_str(),
                "amount": h.amount,
                "expiredAt": at,
            }
        });
        crate::webhooks::record_event(
            conn,
            &format!("evt_{}", h.id),
            &h.key,
            "hold.expired",
            &payload.to_string(),
            at,
        )
        .await
        .map_err(ledger_error)?;
    }
    Ok(())
}

impl SqlStore {
    /// A key's ledger row, read on the read pool (no lock).
    async fn read_row(&self, key: &KeyId) -> Result<Option<KeyRow>, LedgerError> {
        let row = sqlx::query(&select_row(key, false))
            .bind(key.as_str())
            .fetch_optional(&self.read)
            .await
            .map_err(ledger_error)?;
        row.as_ref().map(KeyRow::from_row).transpose()
    }
}

#[async_trait]
impl Ledger for SqlStore {
    async fn state(&self, key: &KeyId) -> Result<Option<LedgerState>, LedgerError> {
        Ok(self.read_row(key).await?.map(|r| r.account.state()))
    }

    async fn allocate(&self, req: &AllocateRequest<'_>) -> Result<AllocateOutcome, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let outcome = self.allocate_in(&mut tx, req).await?;
        commit(tx).await?;
        Ok(outcome)
    }

    async fn allocate_many(
        &self,
        reqs: &[AllocateRequest<'_>],
    ) -> Vec<Result<AllocateOutcome, LedgerError>> {
        let order = key_order(reqs.iter().map(|r| r.key));
        let batch = async {
            let mut tx = self.begin_write().await.map_err(ledger_error)?;
            let mut out = vec![None; reqs.len()];
            for &i in &order {
                out[i] = Some(self.allocate_in(&mut tx, &reqs[i]).await?);
            }
            commit(tx).await?;
            Ok::<_, LedgerError>(out)
        };
        match batch.await {
            Ok(out) => out.into_iter().map(|o| o.ok_or_else(missing)).collect(),
            // One failing step rolled the whole batch back: run them one by one, so each
            // gets its own answer.
            Err(_) if reqs.len() > 1 => allocate_each(self, reqs).await,
            Err(e) => vec![Err(e)],
        }
    }

    async fn settle_allocation(
        &self,
        key: &KeyId,
        transfer_id: &str,
        credited: bool,
        spent: u64,
    ) -> Result<(), LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        self.settle_in(&mut tx, key, transfer_id, credited, spent)
            .await?;
        commit(tx).await
    }

    async fn settle_many(&self, items: &[Settlement<'_>]) -> Vec<Result<(), LedgerError>> {
        let order = key_order(items.iter().map(|s| s.key));
        let batch = async {
            let mut tx = self.begin_write().await.map_err(ledger_error)?;
            for &i in &order {
                let s = &items[i];
                self.settle_in(&mut tx, s.key, s.transfer_id, s.credited, s.spent)
                    .await?;
            }
            commit(tx).await
        };
        match batch.await {
            Ok(()) => items.iter().map(|_| Ok(())).collect(),
            Err(_) if items.len() > 1 => settle_each(self, items).await,
            Err(e) => vec![Err(e)],
        }
    }

    async fn return_drained(
        &self,
        key: &KeyId,
        transfer_id: &str,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let state = self.return_in(&mut tx, key, transfer_id, drained).await?;
        commit(tx).await?;
        Ok(state)
    }

    async fn return_many(
        &self,
        items: &[(&KeyId, &str, Drained)],
    ) -> Vec<Result<LedgerState, LedgerError>> {
        let order = key_order(items.iter().map(|(k, _, _)| *k));
        let batch = async {
            let mut tx = self.begin_write().await.map_err(ledger_error)?;
            let mut out = vec![None; items.len()];
            for &i in &order {
                let (key, transfer_id, drained) = items[i];
                out[i] = Some(self.return_in(&mut tx, key, transfer_id, drained).await?);
            }
            commit(tx).await?;
            Ok::<_, LedgerError>(out)
        };
        match batch.await {
            Ok(out) => out.into_iter().map(|o| o.ok_or_else(missing)).collect(),
            Err(_) if items.len() > 1 => return_each(self, items).await,
            Err(e) => vec![Err(e)],
        }
    }

    async fn increment(
        &self,
        key: &KeyId,
        amount: Credits,
        max: u64,
        mark: Option<&IdemMark<'_>>,
        actor: Option<&str>,
    ) -> Result<IncrementOutcome, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let Some(row) = self.lock_key(&mut tx, key).await? else {
            return Ok(IncrementOutcome::NotFound);
        };
        let mut account = row.account.clone();
        let outcome = rules::increment(&mut account, amount.get(), max, self.clock.now_ms(), actor);
        if account != row.account {
            decide_mark(&mut tx, mark).await?;
            write_account(&mut tx, key, &account).await?;
            // The engine returns the hot balance first; if that failed, the hot store
            // may have spent some of `hot_allocated`, and this is an upper bound.
            let at_most = account
                .remaining
                .unwrap_or(0)
                .saturating_add(account.hot_allocated);
            let top_up = TopUp {
                operation: "increment",
                value: Some(amount.get()),
                exact: (account.hot_allocated == 0).then_some(at_most),
                event_id: None,
            };
            rearm(&mut tx, key, at_most, top_up, self.clock.now_ms())
                .await
                .map_err(ledger_error)?;
            commit(tx).await?;
        }
        Ok(outcome)
    }

    async fn begin_fence(
        &self,
        key: &KeyId,
        op_id: &str,
        op: FenceOp,
        now_ms: i64,
        mark: Option<&IdemMark<'_>>,
        actor: Option<&str>,
    ) -> Result<BeginFence, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let row = self.lock_key(&mut tx, key).await?;
        let existing = sqlx::query(&format!(
            "SELECT {FENCE_COLUMNS} FROM fences WHERE op_id = $1"
        ))
        .bind(op_id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(ledger_error)?;
        if let Some(existing) = existing {
            return Ok(BeginFence::Begun(pending_fence_from_row(&existing)?));
        }
        let Some(row) = row else {
            return Ok(BeginFence::NotFound);
        };
        let mut account = row.account;
        let Some(generation) = rules::begin_fence(&mut account, op, now_ms) else {
            return Ok(BeginFence::NotDue);
        };
        decide_mark(&mut tx, mark).await?;
        write_account(&mut tx, key, &account).await?;
        let (kind, value, period_start) = fence_columns(op)?;
        sqlx::query(
            "INSERT INTO fences (op_id, key_id, kind, value, period_start, generation, state, \
             created_at, actor) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(op_id)
        .bind(key.as_str())
        .bind(kind)
        .bind(value)
        .bind(period_start)
        .bind(db(generation, "generation")?)
        .bind(FenceState::Pending.as_str())
        .bind(now_ms)
        .bind(actor)
        .execute(&mut *tx)
        .await
        .map_err(ledger_error)
        .map(wrote)?;
        commit(tx).await?;
        Ok(BeginFence::Begun(PendingFence {
            key: key.to_owned(),
            op_id: op_id.to_owned(),
            op,
            generation,
            actor: actor.map(str::to_owned),
        }))
    }

    async fn finish_fence(
        &self,
        fence: &PendingFence,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let row = self.lock_key(&mut tx, &fence.key).await?;
        let pending = fence_state(&mut tx, &fence.op_id).await? == Some(FenceState::Pending);
        let Some(row) = row else {
            return Err(other(format!("no ledger row for {}", fence.key)));
        };
        let mut account = row.account;
        if !pending {
            return Ok(account.state());
        }
        rules::finish_fence(
            &mut account,
            fence.op,
            drained,
            self.clock.now_ms(),
            fence.actor.as_deref(),
        );
        write_account(&mut tx, &fence.key, &account).await?;
        // The fence drained the hot store: the balance is exact.
        let lifted = match fence.op {
            FenceOp::Set(v) => Some(("set", v)),
            FenceOp::Refill { amount, .. } => Some(("refill", Some(amount))),
            FenceOp::Decrement(_) => None,
        };
        if let (Some((operation, value)), Some(balance)) = (lifted, account.remaining) {
            let event_id = format!("evt_{}", fence.op_id);
            let top_up = TopUp {
                operation,
                value,
                exact: Some(balance),
                event_id: Some(&event_id),
            };
            rearm(&mut tx, &fence.key, balance, top_up, self.clock.now_ms())
                .await
                .map_err(ledger_error)?;
        }
        sqlx::query("UPDATE fences SET state = $2 WHERE op_id = $1")
            .bind(fence.op_id.as_str())
            .bind(FenceState::Done.as_str())
            .execute(&mut *tx)
            .await
            .map_err(ledger_error)
            .map(wrote)?;
        commit(tx).await?;
        Ok(account.state())
    }

    async fn spend_direct(
        &self,
        key: &KeyId,
        cost: Cost,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<DirectSpend, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let Some(before) = self.lock_key(&mut tx, key).await?.and_then(KeyRow::live) else {
            return Ok(DirectSpend::NotFound);
        };
        let mut account = before.clone();
        let outcome = rules::spend_direct(&mut account, cost.get());
        if account != before {
            decide_mark(&mut tx, mark).await?;
            write_account(&mut tx, key, &account).await?;
            commit(tx).await?;
        }
        Ok(outcome)
    }

    async fn spend_direct_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<(bool, Vec<DirectSpend>), LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        // Rows locked in id order, as every batch does (no deadlock on Postgres).
        let mut rows: Vec<Option<Account>> = vec![None; accounts.len()];
        for i in key_order(accounts.iter()) {
            rows[i] = self
                .lock_key(&mut tx, &accounts[i])
                .await?
                .and_then(KeyRow::live);
        }
        if rows.iter().any(Option::is_none) {
            let outcomes = rows
                .iter()
                .map(|r| match r {
                    Some(_) => DirectSpend::Unlimited,
                    None => DirectSpend::NotFound,
                })
                .collect();
            return Ok((false, outcomes));
        }
        let mut found: Vec<Account> = rows.into_iter().flatten().collect();
        let (spent, outcomes) = rules::spend_direct_all(&mut found, cost.get());
        if spent {
            decide_mark(&mut tx, mark).await?;
            for (key, account) in accounts.iter().zip(&found) {
                write_account(&mut tx, key, account).await?;
            }
            commit(tx).await?;
        }
        Ok((spent, outcomes))
    }

    async fn pending_allocations(
        &self,
        key: Option<&KeyId>,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingAllocation>, LedgerError> {
        let rows = sqlx::query(
            "SELECT id, key_id, amount, generation, created_at FROM transfers \
             WHERE state = $4 AND created_at < $1 AND ($2 IS NULL OR key_id = $2) \
             ORDER BY created_at, id LIMIT $3",
        )
        .bind(older_than_ms)
        .bind(key.map(KeyId::as_str))
        .bind(i64::from(limit))
        .bind(TransferState::Pending.as_str())
        .fetch_all(&self.read)
        .await
        .map_err(ledger_error)?;
        rows.iter()
            .map(|r| {
                Ok(PendingAllocation {
                    key: KeyId::from(r.try_get::<String, _>("key_id").map_err(ledger_error)?),
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
        key: Option<&KeyId>,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingFence>, LedgerError> {
        let rows = sqlx::query(&format!(
            "SELECT {FENCE_COLUMNS} FROM fences \
             WHERE state = $4 AND created_at < $1 AND ($2 IS NULL OR key_id = $2) \
             ORDER BY created_at, generation, op_id LIMIT $3"
        ))
        .bind(older_than_ms)
        .bind(key.map(KeyId::as_str))
        .bind(i64::from(limit))
        .bind(FenceState::Pending.as_str())
        .fetch_all(&self.read)
        .await
        .map_err(ledger_error)?;
        rows.iter().map(pending_fence_from_row).collect()
    }

    async fn write_off_other_epochs(&self, epoch: &str) -> Result<Vec<(KeyId, u64)>, LedgerError> {
        let now_ms = self.clock.now_ms();
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        // Locks every candidate in id order (no deadlock with another such call).
        let lock = if self.backend == Backend::Postgres {
            " FOR UPDATE"
        } else {
            ""
        };
        let mut ids: Vec<KeyId> = Vec::new();
        for table in ACCOUNT_TABLES {
            let sql = format!(
                "SELECT id FROM {table} WHERE hot_epoch IS NOT NULL AND hot_epoch <> $1 \
                 ORDER BY id{lock}"
            );
            let rows = sqlx::query(&sql)
                .bind(epoch)
                .fetch_all(&mut *tx)
                .await
                .map_err(ledger_error)?;
            for r in &rows {
                ids.push(KeyId::from(
                    r.try_get::<String, _>("id").map_err(ledger_error)?,
                ));
            }
        }
        let mut out = Vec::new();
        for key in ids {
            let Some(row) = self.lock_key(&mut tx, &key).await? else {
                continue;
            };
            let mut account = row.account;
            if let Some(lost) = rules::write_off(&mut account, epoch, now_ms) {
                mark_lost(&mut tx, &key).await?;
                write_account(&mut tx, &key, &account).await?;
                if lost > 0 {
                    out.push((key, lost));
                }
            }
        }
        commit(tx).await?;
        Ok(out)
    }

    async fn hot_epoch(&self, key: &KeyId) -> Result<Option<String>, LedgerError> {
        Ok(self.read_row(key).await?.and_then(|r| r.account.hot_epoch))
    }

    async fn write_off_key(&self, key: &KeyId, epoch: &str) -> Result<u64, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let Some(row) = self.lock_key(&mut tx, key).await? else {
            return Ok(0);
        };
        let mut account = row.account;
        if account.hot_epoch.is_none() {
            return Ok(0);
        }
        let Some(lost) = rules::write_off(&mut account, epoch, self.clock.now_ms()) else {
            return Ok(0);
        };
        mark_lost(&mut tx, key).await?;
        write_account(&mut tx, key, &account).await?;
        commit(tx).await?;
        Ok(lost)
    }

    async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<HoldOutcome, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let Some(before) = self
            .lock_key(&mut tx, req.key)
            .await?
            .and_then(KeyRow::live)
        else {
            return Ok(HoldOutcome::NotFound);
        };
        if let Some(first) = find_hold(&mut tx, req.hold_id).await? {
            return Ok(HoldOutcome::Hold {
                hold: first,
                changed: false,
                state: Some(before.state()),
            });
        }
        let mut account = before.clone();
        let hold = match rules::reserve(&mut account, req) {
            Ok(hold) => hold,
            Err(short) => return Ok(short.into()),
        };
        decide_mark(&mut tx, req.mark).await?;
        insert_hold(&mut tx, &hold).await?;
        store_account(&mut tx, req.key, &before, &account).await?;
        commit(tx).await?;
        Ok(HoldOutcome::Hold {
            hold,
            changed: true,
            state: Some(account.state()),
        })
    }

    async fn reserve_pair(
        &self,
        req: &ReserveRequest<'_>,
        pool: &KeyId,
    ) -> Result<PairHoldOutcome, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let (key_before, pool_before) = self.lock_pair(&mut tx, req.key, pool).await?;
        let (Some(key_before), Some(pool_before)) = (key_before, pool_before) else {
            return Ok(PairHoldOutcome::NotFound);
        };
        if let Some(first) = find_hold(&mut tx, req.hold_id).await? {
            return Ok(PairHoldOutcome::Hold {
                hold: first,
                changed: false,
                key_state: Some(key_before.state()),
                pool_state: Some(pool_before.state()),
            });
        }
        let (mut k, mut p) = (key_before.clone(), pool_before.clone());
        let (key_hold, pool_hold) = match rules::reserve_pair(&mut k, &mut p, pool, req) {
            Ok(holds) => holds,
            Err(e) => return Ok(e.into()),
        };
        decide_mark(&mut tx, req.mark).await?;
        insert_hold(&mut tx, &key_hold).await?;
        insert_hold(&mut tx, &pool_hold).await?;
        store_account(&mut tx, req.key, &key_before, &k).await?;
        store_account(&mut tx, pool, &pool_before, &p).await?;
        commit(tx).await?;
        Ok(PairHoldOutcome::Hold {
            hold: key_hold,
            changed: true,
            key_state: Some(k.state()),
            pool_state: Some(p.state()),
        })
    }

    async fn close_hold_pair(
        &self,
        key: &KeyId,
        pool: &KeyId,
        hold_id: &str,
        close: HoldClose,
        now_ms: i64,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<PairHoldOutcome, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let (key_before, pool_before) = self.lock_pair(&mut tx, key, pool).await?;
        let pool_hold_id = rules::pool_hold_id(hold_id);
        let (Some(mut kh), Some(mut ph)) = (
            find_hold(&mut tx, hold_id).await?.filter(|h| h.key == *key),
            find_hold(&mut tx, &pool_hold_id)
                .await?
                .filter(|h| h.key == *pool),
        ) else {
            return Ok(PairHoldOutcome::NotFound);
        };
        let (mut k, mut p) = (key_before.clone(), pool_before.clone());
        let changed =
            match rules::close_pair(k.as_mut(), p.as_mut(), &mut kh, &mut ph, close, now_ms) {
                Ok(changed) => changed,
                Err(e) => return Ok(e.into()),
            };
        if changed {
            decide_mark(&mut tx, mark).await?;
            store_closed_hold(&mut tx, &kh).await?;
            store_closed_hold(&mut tx, &ph).await?;
            if let (Some(before), Some(after)) = (&key_before, &k) {
                store_account(&mut tx, key, before, after).await?;
            }
            if let (Some(before), Some(after)) = (&pool_before, &p) {
                store_account(&mut tx, pool, before, after).await?;
            }
            commit(tx).await?;
        }
        Ok(PairHoldOutcome::Hold {
            hold: kh,
            changed,
            key_state: k.map(|a| a.state()),
            pool_state: p.map(|a| a.state()),
        })
    }

    async fn close_hold(
        &self,
        key: &KeyId,
        hold_id: &str,
        close: HoldClose,
        now_ms: i64,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<HoldOutcome, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let before = self.lock_key(&mut tx, key).await?.and_then(KeyRow::live);
        let Some(mut hold) = find_hold(&mut tx, hold_id).await?.filter(|h| h.key == *key) else {
            return Ok(HoldOutcome::NotFound);
        };
        let mut account = before.clone();
        let changed = match rules::close_hold(account.as_mut(), &mut hold, close, now_ms) {
            Ok(changed) => changed,
            Err(short) => return Ok(short.into()),
        };
        if changed {
            decide_mark(&mut tx, mark).await?;
            store_closed_hold(&mut tx, &hold).await?;
            if let (Some(before), Some(after)) = (&before, &account) {
                store_account(&mut tx, key, before, after).await?;
            }
            commit(tx).await?;
        }
        Ok(HoldOutcome::Hold {
            hold,
            changed,
            state: account.map(|a| a.state()),
        })
    }

    async fn expire_holds(
        &self,
        key: &KeyId,
        now_ms: i64,
        limit: u32,
    ) -> Result<(Vec<Hold>, Option<LedgerState>), LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let before = self.lock_key(&mut tx, key).await?.and_then(KeyRow::live);
        let rows = sqlx::query(&format!(
            "SELECT {HOLD_COLUMNS} FROM holds WHERE key_id = $1 AND state = $2 \
             AND expires_at <= $3 ORDER BY expires_at, id LIMIT $4"
        ))
        .bind(key.as_str())
        .bind(HoldState::Open.as_str())
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await
        .map_err(ledger_error)?;
        let mut account = before.clone();
        let mut expired = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut hold = hold_from_row(row)?;
            if rules::close_hold(account.as_mut(), &mut hold, HoldClose::Expire, now_ms) == Ok(true)
            {
                store_closed_hold(&mut tx, &hold).await?;
                expired.push(hold);
            }
        }
        if !expired.is_empty() {
            if let (Some(before), Some(after)) = (&before, &account) {
                store_account(&mut tx, key, before, after).await?;
            }
            commit(tx).await?;
        }
        Ok((expired, account.map(|a| a.state())))
    }

    async fn hold(&self, hold_id: &str) -> Result<Option<Hold>, LedgerError> {
        let row = sqlx::query(&format!("SELECT {HOLD_COLUMNS} FROM holds WHERE id = $1"))
            .bind(hold_id)
            .fetch_optional(&self.read)
            .await
            .map_err(ledger_error)?;
        row.as_ref().map(hold_from_row).transpose()
    }

    async fn keys_with_due_holds(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyId>, LedgerError> {
        let rows = sqlx::query(
            "SELECT key_id, MIN(expires_at) AS due FROM holds WHERE state = $1 \
             AND expires_at <= $2 GROUP BY key_id ORDER BY due, key_id LIMIT $3",
        )
        .bind(HoldState::Open.as_str())
        .bind(now_ms)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(ledger_error)?;
        rows.iter()
            .map(|r| {
                r.try_get::<String, _>("key_id")
                    .map(KeyId::from)
                    .map_err(ledger_error)
            })
            .collect()
    }

    async fn claim_idempotency(&self, claim: &IdemClaim<'_>) -> Result<ClaimOutcome, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let lock = match self.backend {
            Backend::Postgres => " FOR UPDATE",
            Backend::Sqlite => "",
        };
        // A first claim inserts; a racing one waits for it here (Postgres) or for the
        // database's write lock (SQLite), then reads the row it made.
        let inserted = sqlx::query(
            "INSERT INTO idempotency (scope, idem_key, fingerprint, token, state, created_at, \
             lease_until) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING",
        )
        .bind(claim.scope)
        .bind(claim.key)
        .bind(claim.fingerprint)
        .bind(claim.token)
        .bind(IdemState::Claimed.as_str())
        .bind(claim.now_ms)
        .bind(claim.lease_until_ms)
        .execute(&mut *tx)
        .await
        .map_err(ledger_error)?;
        if inserted.rows_affected() == 1 {
            wrote(inserted);
            commit(tx).await?;
            return Ok(ClaimOutcome::Claimed);
        }
        let row = sqlx::query(&format!(
            "SELECT {IDEM_COLUMNS} FROM idempotency WHERE scope = $1 AND idem_key = $2{lock}"
        ))
        .bind(claim.scope)
        .bind(claim.key)
        .fetch_optional(&mut *tx)
        .await
        .map_err(ledger_error)?;
        let existing = row.as_ref().map(idem_from_row).transpose()?;
        let (outcome, store) = rules::claim(existing.as_ref(), claim);
        if let Some(r) = store {
            sqlx::query(
                "UPDATE idempotency SET fingerprint = $3, token = $4, state = $5, answer = $6, \
                 created_at = $7, lease_until = $8 WHERE scope = $1 AND idem_key = $2",
            )
            .bind(claim.scope)
            .bind(claim.key)
            .bind(&r.fingerprint)
            .bind(&r.token)
            .bind(r.state.as_str())
            .bind(r.answer.as_deref())
            .bind(r.created_at_ms)
            .bind(r.lease_until_ms)
            .execute(&mut *tx)
            .await
            .map_err(ledger_error)
            .map(wrote)?;
            commit(tx).await?;
        }
        Ok(outcome)
    }

    async fn answer_idempotency(
        &self,
        mark: &IdemMark<'_>,
        answer: &str,
    ) -> Result<bool, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let done = sqlx::query(
            "UPDATE idempotency SET state = $4, answer = $5 WHERE scope = $1 AND idem_key = $2 \
             AND token = $3 AND state <> $4",
        )
        .bind(mark.scope)
        .bind(mark.key)
        .bind(mark.token)
        .bind(IdemState::Answered.as_str())
        .bind(answer)
        .execute(&mut *tx)
        .await
        .map_err(ledger_error)?;
        let stored = done.rows_affected() == 1;
        wrote(done);
        commit(tx).await?;
        Ok(stored)
    }

    async fn abandon_idempotency(&self, mark: &IdemMark<'_>) -> Result<(), LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        sqlx::query(
            "DELETE FROM idempotency WHERE scope = $1 AND idem_key = $2 AND token = $3 \
             AND state = $4",
        )
        .bind(mark.scope)
        .bind(mark.key)
        .bind(mark.token)
        .bind(IdemState::Claimed.as_str())
        .execute(&mut *tx)
        .await
        .map_err(ledger_error)
        .map(wrote)?;
        commit(tx).await
    }

    async fn idempotency(&self, scope: &str, key: &str) -> Result<Option<IdemRecord>, LedgerError> {
        // From the writer's pool: the lookup after an ambiguous commit must see it.
        let row = sqlx::query(&format!(
            "SELECT {IDEM_COLUMNS} FROM idempotency WHERE scope = $1 AND idem_key = $2"
        ))
        .bind(scope)
        .bind(key)
        .fetch_optional(&self.write)
        .await
        .map_err(ledger_error)?;
        row.as_ref().map(idem_from_row).transpose()
    }

    async fn purge_idempotency(&self, before_ms: i64, limit: u32) -> Result<u64, LedgerError> {
        let mut tx = self.begin_write().await.map_err(ledger_error)?;
        let done = sqlx::query(
            "DELETE FROM idempotency WHERE (scope, idem_key) IN (SELECT scope, idem_key \
             FROM idempotency WHERE created_at < $1 LIMIT $2)",
        )
        .bind(before_ms)
        .bind(i64::from(limit))
        .execute(&mut *tx)
        .await
        .map_err(ledger_error)?;
        let n = done.rows_affected();
        if n > 0 {
            wrote(done);
            commit(tx).await?;
        }
        Ok(n)
    }

    async fn credit_history(
        &self,
        account: &KeyId,
        before_seq: Option<u64>,
        limit: u32,
    ) -> Result<Vec<CreditEntry>, LedgerError> {
        let before = match before_seq {
            Some(b) => db(b, "cursor")?,
            None => i64::MAX,
        };
        let rows = sqlx::query(&format!(
            "SELECT {ENTRY_COLUMNS} FROM credit_history WHERE account_id = $1 AND seq < $2 \
             ORDER BY seq DESC LIMIT $3"
        ))
        .bind(account.as_str())
        .bind(before)
        .bind(i64::from(limit))
        .fetch_all(&self.read)
        .await
        .map_err(ledger_error)?;
        rows.iter().map(entry_from_row).collect()
    }
}

impl SqlStore {
    /// Opens the ledger account of an identity's shared pool with `remaining` credits
    /// (`None`: unlimited), for tests of the ledger on pool accounts; `Conflict` when it
    /// exists.
    pub async fn create_pool(
        &self,
        identity: &IdentityId,
        workspace: &str,
        remaining: Option<u64>,
        now_ms: i64,
    ) -> Result<(), creditgate_domain::StoreError> {
        let remaining = remaining
            .map(Credits::new)
            .transpose()
            .map_err(|e| creditgate_domain::StoreError::Backend(e.to_string()))?;
        let mut tx = self
            .begin_write()
            .await
            .map_err(crate::error::store_error)?;
        crate::keys::insert_pool(
            &mut tx,
            identity,
            &creditgate_domain::WorkspaceId::from(workspace),
            remaining,
            None,
            &[],
            now_ms,
        )
        .await?;
        tx.commit().await.map_err(crate::error::store_error)
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
