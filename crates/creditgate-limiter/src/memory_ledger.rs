//! `MemoryLedger`: the reference implementation of the [`Ledger`] contract, kept in
//! process memory. The engine's model tests run on it, and the SQL ledger mirrors it
//! method by method (the conformance suite checks both the same way).

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;

use crate::ports::{
    AllocateOutcome, AllocateRequest, BeginFence, DirectSpend, Drained, FenceOp, IncrementOutcome,
    Ledger, LedgerError, LedgerState, PendingAllocation, PendingFence,
};

#[derive(Debug, Clone, Default)]
struct Row {
    remaining: Option<u64>,
    hot_allocated: u64,
    generation: u64,
    version: u64,
    hot_epoch: Option<String>,
    last_refill_at: Option<i64>,
}

impl Row {
    fn state(&self) -> LedgerState {
        LedgerState {
            remaining: self.remaining,
            hot_allocated: self.hot_allocated,
            generation: self.generation,
            version: self.version,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TransferState {
    Pending,
    Credited,
    Cancelled,
    Applied,
    Lost,
}

#[derive(Debug, Clone)]
struct Transfer {
    key: String,
    amount: u64,
    generation: u64,
    state: TransferState,
    created_at_ms: i64,
}

#[derive(Debug, Clone)]
struct Fence {
    pending: PendingFence,
    done: bool,
    created_at_ms: i64,
}

#[derive(Debug, Default)]
struct Inner {
    rows: HashMap<String, Row>,
    transfers: HashMap<String, Transfer>,
    fences: HashMap<String, Fence>,
}

impl Inner {
    /// Whether a finished `Set` fenced `key` at a generation above `generation`: credits
    /// of that older generation were overwritten and must not come back.
    fn set_since(&self, key: &str, generation: u64) -> bool {
        self.fences.values().any(|f| {
            f.done
                && f.pending.key == key
                && f.pending.generation > generation
                && matches!(f.pending.op, FenceOp::Set(_))
        })
    }

    fn fence_pending(&self, key: &str) -> bool {
        self.fences
            .values()
            .any(|f| !f.done && f.pending.key == key)
    }

    /// Writes off what the key had allocated to a hot-store epoch other than `epoch`.
    fn write_off(&mut self, key: &str, epoch: &str) -> u64 {
        let Some(row) = self.rows.get_mut(key) else {
            return 0;
        };
        if row.hot_epoch.as_deref() == Some(epoch) {
            return 0;
        }
        let lost = row.hot_allocated;
        row.hot_allocated = 0;
        row.hot_epoch = Some(epoch.to_owned());
        for t in self.transfers.values_mut() {
            if t.key == key && t.state == TransferState::Pending {
                t.state = TransferState::Lost;
            }
        }
        lost
    }
}

/// The in-memory ledger.
#[derive(Debug, Default)]
pub struct MemoryLedger {
    inner: Mutex<Inner>,
}

impl MemoryLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Creates a key's ledger row (what `keys.createKey` does in the SQL store).
    pub fn create_key(&self, key: &str, remaining: Option<u64>, now_ms: i64) {
        self.lock().rows.insert(
            key.to_owned(),
            Row {
                remaining,
                last_refill_at: Some(now_ms),
                ..Row::default()
            },
        );
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn state(&self, key: &str) -> Result<Option<LedgerState>, LedgerError> {
        Ok(self.lock().rows.get(key).map(Row::state))
    }

    async fn allocate(&self, req: &AllocateRequest<'_>) -> Result<AllocateOutcome, LedgerError> {
        let mut inner = self.lock();
        if let Some(t) = inner.transfers.get(req.transfer_id) {
            // A retried allocation: answer what the first one did.
            let (amount, generation) = (t.amount, t.generation);
            let row = inner.rows.get(req.key).cloned().unwrap_or_default();
            return Ok(AllocateOutcome::Granted {
                amount,
                remaining: row.remaining.unwrap_or(0),
                generation,
                version: row.version,
                lost: 0,
            });
        }
        let Some(row) = inner.rows.get(req.key) else {
            return Ok(AllocateOutcome::NotFound);
        };
        if row.remaining.is_none() {
            return Ok(AllocateOutcome::Unlimited);
        }
        let lost = inner.write_off(req.key, req.epoch);
        let fence_pending = inner.fence_pending(req.key);
        let Some(row) = inner.rows.get_mut(req.key) else {
            return Ok(AllocateOutcome::NotFound);
        };
        if fence_pending || req.generation.is_some_and(|g| g != row.generation) {
            return Ok(AllocateOutcome::GenerationMoved {
                generation: row.generation,
            });
        }
        let remaining = row.remaining.unwrap_or(0);
        if remaining < req.need {
            return Ok(AllocateOutcome::Insufficient {
                remaining,
                generation: row.generation,
                version: row.version,
                lost,
            });
        }
        let amount = req.need.max(req.chunk.min(remaining));
        let remaining = remaining - amount;
        row.remaining = Some(remaining);
        row.hot_allocated = row.hot_allocated.saturating_add(amount);
        row.version += 1;
        let (generation, version) = (row.generation, row.version);
        inner.transfers.insert(
            req.transfer_id.to_owned(),
            Transfer {
                key: req.key.to_owned(),
                amount,
                generation,
                state: TransferState::Pending,
                created_at_ms: req.now_ms,
            },
        );
        Ok(AllocateOutcome::Granted {
            amount,
            remaining,
            generation,
            version,
            lost,
        })
    }

    async fn settle_allocation(
        &self,
        key: &str,
        transfer_id: &str,
        credited: bool,
        spent: u64,
    ) -> Result<(), LedgerError> {
        let mut inner = self.lock();
        let Some(t) = inner.transfers.get(transfer_id).cloned() else {
            return Ok(());
        };
        if t.state != TransferState::Pending || t.key != key {
            return Ok(());
        }
        if credited {
            if let Some(row) = inner.rows.get_mut(key) {
                if t.generation == row.generation {
                    row.hot_allocated = row.hot_allocated.saturating_sub(spent);
                }
            }
            if let Some(t) = inner.transfers.get_mut(transfer_id) {
                t.state = TransferState::Credited;
            }
            return Ok(());
        }
        let overwritten = inner.set_since(key, t.generation);
        if let Some(row) = inner.rows.get_mut(key) {
            if t.generation == row.generation {
                row.hot_allocated = row.hot_allocated.saturating_sub(t.amount);
            }
            if !overwritten {
                if let Some(r) = row.remaining.as_mut() {
                    *r = r.saturating_add(t.amount);
                }
                row.version += 1;
            }
        }
        if let Some(t) = inner.transfers.get_mut(transfer_id) {
            t.state = TransferState::Cancelled;
        }
        Ok(())
    }

    async fn return_drained(
        &self,
        key: &str,
        transfer_id: &str,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError> {
        let mut inner = self.lock();
        if !inner.rows.contains_key(key) {
            return Err(LedgerError::Other(format!("no ledger row for {key}")));
        }
        if !inner.transfers.contains_key(transfer_id) {
            let overwritten = inner.set_since(key, drained.generation);
            if let Some(row) = inner.rows.get_mut(key) {
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
            }
            inner.transfers.insert(
                transfer_id.to_owned(),
                Transfer {
                    key: key.to_owned(),
                    amount: drained.amount,
                    generation: drained.generation,
                    state: TransferState::Applied,
                    created_at_ms: 0,
                },
            );
        }
        inner
            .rows
            .get(key)
            .map(Row::state)
            .ok_or_else(|| LedgerError::Other(format!("no ledger row for {key}")))
    }

    async fn increment(
        &self,
        key: &str,
        amount: u64,
        max: u64,
    ) -> Result<IncrementOutcome, LedgerError> {
        let mut inner = self.lock();
        let Some(row) = inner.rows.get_mut(key) else {
            return Ok(IncrementOutcome::NotFound);
        };
        let Some(remaining) = row.remaining else {
            return Ok(IncrementOutcome::Unlimited);
        };
        let total = remaining
            .checked_add(row.hot_allocated)
            .and_then(|t| t.checked_add(amount));
        if total.is_none_or(|t| t > max) {
            return Ok(IncrementOutcome::Overflow);
        }
        row.remaining = Some(remaining + amount);
        row.version += 1;
        Ok(IncrementOutcome::Done(row.state()))
    }

    async fn begin_fence(
        &self,
        key: &str,
        op_id: &str,
        op: FenceOp,
        now_ms: i64,
    ) -> Result<BeginFence, LedgerError> {
        let mut inner = self.lock();
        if let Some(f) = inner.fences.get(op_id) {
            return Ok(BeginFence::Begun(f.pending.clone()));
        }
        let Some(row) = inner.rows.get_mut(key) else {
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
        let pending = PendingFence {
            key: key.to_owned(),
            op_id: op_id.to_owned(),
            op,
            generation: row.generation,
        };
        inner.fences.insert(
            op_id.to_owned(),
            Fence {
                pending: pending.clone(),
                done: false,
                created_at_ms: now_ms,
            },
        );
        Ok(BeginFence::Begun(pending))
    }

    async fn finish_fence(
        &self,
        fence: &PendingFence,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError> {
        let mut inner = self.lock();
        let done = inner.fences.get(&fence.op_id).is_none_or(|f| f.done);
        let row = inner
            .rows
            .get_mut(&fence.key)
            .ok_or_else(|| LedgerError::Other(format!("no ledger row for {}", fence.key)))?;
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
        let state = row.state();
        if let Some(f) = inner.fences.get_mut(&fence.op_id) {
            f.done = true;
        }
        Ok(state)
    }

    async fn spend_direct(&self, key: &str, cost: u64) -> Result<DirectSpend, LedgerError> {
        let mut inner = self.lock();
        let Some(row) = inner.rows.get_mut(key) else {
            return Ok(DirectSpend::NotFound);
        };
        let Some(remaining) = row.remaining else {
            return Ok(DirectSpend::Unlimited);
        };
        if remaining < cost {
            return Ok(DirectSpend::Exceeded { remaining });
        }
        row.remaining = Some(remaining - cost);
        row.version += 1;
        Ok(DirectSpend::Valid {
            remaining: remaining - cost,
        })
    }

    async fn pending_allocations(
        &self,
        key: Option<&str>,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingAllocation>, LedgerError> {
        let inner = self.lock();
        let mut out: Vec<PendingAllocation> = inner
            .transfers
            .iter()
            .filter(|(_, t)| {
                t.state == TransferState::Pending
                    && t.created_at_ms < older_than_ms
                    && key.is_none_or(|k| k == t.key)
            })
            .map(|(id, t)| PendingAllocation {
                key: t.key.clone(),
                transfer_id: id.clone(),
                amount: t.amount,
                generation: t.generation,
                created_at_ms: t.created_at_ms,
            })
            .collect();
        out.sort_by_key(|a| a.created_at_ms);
        out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(out)
    }

    async fn pending_fences(
        &self,
        key: Option<&str>,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingFence>, LedgerError> {
        let inner = self.lock();
        let mut out: Vec<(i64, PendingFence)> = inner
            .fences
            .values()
            .filter(|f| {
                !f.done && f.created_at_ms < older_than_ms && key.is_none_or(|k| k == f.pending.key)
            })
            .map(|f| (f.created_at_ms, f.pending.clone()))
            .collect();
        out.sort_by_key(|a| (a.0, a.1.generation));
        out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(out.into_iter().map(|(_, f)| f).collect())
    }

    async fn write_off_other_epochs(&self, epoch: &str) -> Result<Vec<(String, u64)>, LedgerError> {
        let mut inner = self.lock();
        let keys: Vec<String> = inner
            .rows
            .iter()
            .filter(|(_, r)| r.hot_epoch.as_deref().is_some_and(|e| e != epoch))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in keys {
            let lost = inner.write_off(&key, epoch);
            if lost > 0 {
                out.push((key, lost));
            }
        }
        Ok(out)
    }
}
