//! `MemoryLedger`: the [`Ledger`] contract in process memory, for the engine's model
//! tests and the conformance suite's reference. Like the SQL ledger it only locks,
//! loads, applies [`crate::rules`] and stores, so both run the same rules.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use creditgate_domain::{Clock, Cost, Credits, KeyId, SystemClock};

use crate::ports::{
    AllocateOutcome, AllocateRequest, BeginFence, ClaimOutcome, CreditEntry, DirectSpend, Drained,
    FenceOp, Hold, HoldClose, HoldOutcome, HoldState, IdemClaim, IdemMark, IdemRecord, IdemState,
    IncrementOutcome, Ledger, LedgerError, LedgerState, PairHoldOutcome, PendingAllocation,
    PendingFence, ReserveRequest,
};
use crate::rules::{self, Account, Arrival, FenceState, Transfer, TransferState};

#[derive(Debug, Clone)]
struct Fence {
    pending: PendingFence,
    state: FenceState,
    created_at_ms: i64,
}

#[derive(Debug, Default)]
struct Inner {
    accounts: HashMap<KeyId, Account>,
    transfers: HashMap<String, Transfer>,
    fences: HashMap<String, Fence>,
    holds: HashMap<String, Hold>,
    idem: HashMap<(String, String), IdemRecord>,
    /// Each account's credit history, oldest first.
    history: HashMap<KeyId, Vec<CreditEntry>>,
    /// Credits written off so far (hot-store epochs that lost their data), for tests.
    written_off: u64,
}

impl Inner {
    /// Moves the history entries the rules wrote into the accounts' histories: what the
    /// SQL ledger's transaction inserts with the row.
    fn keep_entries(&mut self) {
        let Inner {
            accounts, history, ..
        } = self;
        for (key, a) in accounts.iter_mut() {
            if !a.entries.is_empty() {
                history
                    .entry(key.clone())
                    .or_default()
                    .append(&mut a.entries);
            }
        }
    }

    /// How a transfer of `key` at `generation` reaches the ledger now.
    fn arrival(&self, key: &KeyId, generation: u64, now_ms: i64) -> Arrival {
        Arrival {
            overwritten: self.set_since(key, generation),
            fence_pending: self.fence_pending(key),
            now_ms,
        }
    }

    /// Whether a finished `Set` fenced `key` at a generation above `generation`.
    fn set_since(&self, key: &KeyId, generation: u64) -> bool {
        self.fences.values().any(|f| {
            f.state == FenceState::Done
                && f.pending.key == *key
                && f.pending.generation > generation
                && matches!(f.pending.op, FenceOp::Set(_))
        })
    }

    fn fence_pending(&self, key: &KeyId) -> bool {
        self.fences
            .values()
            .any(|f| f.state == FenceState::Pending && f.pending.key == *key)
    }

    /// A call with `mark` may decide only while its token holds the claim.
    fn check_mark(&self, mark: Option<&IdemMark<'_>>) -> Result<(), LedgerError> {
        match mark {
            Some(m) if !rules::holds_claim(self.idem.get(&idem_id(m)), m.token) => {
                Err(LedgerError::Superseded)
            }
            _ => Ok(()),
        }
    }

    /// Records the decision of the call that carried `mark` (it changed something).
    fn decided(&mut self, mark: Option<&IdemMark<'_>>, changed: bool) {
        if let (Some(m), true) = (mark, changed) {
            if let Some(r) = self.idem.get_mut(&idem_id(m)) {
                r.state = IdemState::Decided;
            }
        }
    }

    /// Stores a write-off decided by the rules: the key's pending allocations are lost.
    fn mark_lost(&mut self, key: &KeyId, lost: u64) {
        self.written_off = self.written_off.saturating_add(lost);
        for t in self.transfers.values_mut() {
            if t.key == *key && t.state == TransferState::Pending {
                t.state = TransferState::Lost;
            }
        }
    }
}

/// The in-memory ledger.
#[derive(Debug)]
pub struct MemoryLedger {
    inner: Mutex<Inner>,
    clock: Arc<dyn Clock>,
}

impl Default for MemoryLedger {
    fn default() -> Self {
        Self::with_clock(Arc::new(SystemClock))
    }
}

impl MemoryLedger {
    pub fn new() -> Self {
        Self::default()
    }

    /// A ledger that stamps returns with `clock` (as the SQL ledger does).
    pub fn with_clock(clock: Arc<dyn Clock>) -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            clock,
        }
    }

    /// Creates a key's ledger row (what `keys.createKey` does in the SQL store).
    pub fn create_key(&self, key: impl Into<KeyId>, remaining: Option<u64>, now_ms: i64) {
        self.lock()
            .accounts
            .insert(key.into(), Account::new(remaining, now_ms));
    }

    /// Credits written off so far (reported lost with a hot store's data).
    pub fn written_off(&self) -> u64 {
        self.lock().written_off
    }

    fn lock(&self) -> Guard<'_> {
        // A poisoned lock only means another thread panicked mid-update of plain data.
        Guard(self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The lock on the ledger's state: on release, the history entries the rules wrote are
/// kept (as a SQL transaction inserts them with the rows it writes).
struct Guard<'a>(std::sync::MutexGuard<'a, Inner>);

impl std::ops::Deref for Guard<'_> {
    type Target = Inner;

    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl std::ops::DerefMut for Guard<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.0
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        self.0.keep_entries();
    }
}

fn idem_id(m: &IdemMark<'_>) -> (String, String) {
    (m.scope.to_owned(), m.key.to_owned())
}

fn no_row(key: &KeyId) -> LedgerError {
    LedgerError::Other(format!("no ledger row for {key}"))
}

#[async_trait]
impl Ledger for MemoryLedger {
    async fn state(&self, key: &KeyId) -> Result<Option<LedgerState>, LedgerError> {
        Ok(self.lock().accounts.get(key).map(Account::state))
    }

    async fn allocate(&self, req: &AllocateRequest<'_>) -> Result<AllocateOutcome, LedgerError> {
        let mut inner = self.lock();
        if let Some(first) = inner.transfers.get(req.transfer_id) {
            return Ok(rules::retried_allocation(
                inner.accounts.get(req.key),
                first,
            ));
        }
        let fence_pending = inner.fence_pending(req.key);
        let Some(account) = inner.accounts.get_mut(req.key) else {
            return Ok(AllocateOutcome::NotFound);
        };
        let allocation = rules::allocate(account, req, fence_pending);
        if let Some(lost) = allocation.written_off {
            inner.mark_lost(req.key, lost);
        }
        if let Some(t) = allocation.transfer {
            inner.transfers.insert(req.transfer_id.to_owned(), t);
        }
        Ok(allocation.outcome)
    }

    async fn settle_allocation(
        &self,
        key: &KeyId,
        transfer_id: &str,
        credited: bool,
        spent: u64,
    ) -> Result<(), LedgerError> {
        let mut inner = self.lock();
        let Some(t) = inner.transfers.get(transfer_id).cloned() else {
            return Ok(());
        };
        let arrival = inner.arrival(key, t.generation, self.clock.now_ms());
        let account = inner.accounts.get_mut(key);
        if let Some(state) = rules::settle(account, key, &t, credited, spent, arrival) {
            if let Some(t) = inner.transfers.get_mut(transfer_id) {
                t.state = state;
            }
        }
        Ok(())
    }

    async fn return_drained(
        &self,
        key: &KeyId,
        transfer_id: &str,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError> {
        let now_ms = self.clock.now_ms();
        let mut inner = self.lock();
        if !inner.transfers.contains_key(transfer_id) {
            let arrival = inner.arrival(key, drained.generation, now_ms);
            let account = inner.accounts.get_mut(key).ok_or_else(|| no_row(key))?;
            let t = rules::return_drained(account, key, drained, arrival);
            inner.transfers.insert(transfer_id.to_owned(), t);
        }
        inner
            .accounts
            .get(key)
            .map(Account::state)
            .ok_or_else(|| no_row(key))
    }

    async fn increment(
        &self,
        key: &KeyId,
        amount: Credits,
        max: u64,
        mark: Option<&IdemMark<'_>>,
        actor: Option<&str>,
    ) -> Result<IncrementOutcome, LedgerError> {
        let now_ms = self.clock.now_ms();
        let mut inner = self.lock();
        inner.check_mark(mark)?;
        let outcome = match inner.accounts.get_mut(key) {
            Some(account) => rules::increment(account, amount.get(), max, now_ms, actor),
            None => IncrementOutcome::NotFound,
        };
        inner.decided(mark, matches!(outcome, IncrementOutcome::Done(_)));
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
        let mut inner = self.lock();
        inner.check_mark(mark)?;
        if let Some(f) = inner.fences.get(op_id) {
            return Ok(BeginFence::Begun(f.pending.clone()));
        }
        let Some(account) = inner.accounts.get_mut(key) else {
            return Ok(BeginFence::NotFound);
        };
        let Some(generation) = rules::begin_fence(account, op, now_ms) else {
            return Ok(BeginFence::NotDue);
        };
        let pending = PendingFence {
            key: key.to_owned(),
            op_id: op_id.to_owned(),
            op,
            generation,
            actor: actor.map(str::to_owned),
        };
        inner.fences.insert(
            op_id.to_owned(),
            Fence {
                pending: pending.clone(),
                state: FenceState::Pending,
                created_at_ms: now_ms,
            },
        );
        inner.decided(mark, true);
        Ok(BeginFence::Begun(pending))
    }

    async fn finish_fence(
        &self,
        fence: &PendingFence,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError> {
        let now_ms = self.clock.now_ms();
        let mut inner = self.lock();
        let pending = inner
            .fences
            .get(&fence.op_id)
            .is_some_and(|f| f.state == FenceState::Pending);
        let account = inner
            .accounts
            .get_mut(&fence.key)
            .ok_or_else(|| no_row(&fence.key))?;
        if pending {
            rules::finish_fence(account, fence.op, drained, now_ms, fence.actor.as_deref());
        }
        let state = account.state();
        if let Some(f) = inner.fences.get_mut(&fence.op_id) {
            f.state = FenceState::Done;
        }
        Ok(state)
    }

    async fn spend_direct(
        &self,
        key: &KeyId,
        cost: Cost,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<DirectSpend, LedgerError> {
        let mut inner = self.lock();
        inner.check_mark(mark)?;
        let outcome = match inner.accounts.get_mut(key) {
            Some(account) => rules::spend_direct(account, cost.get()),
            None => DirectSpend::NotFound,
        };
        inner.decided(mark, matches!(outcome, DirectSpend::Valid { .. }));
        Ok(outcome)
    }

    async fn spend_direct_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<(bool, Vec<DirectSpend>), LedgerError> {
        let mut inner = self.lock();
        inner.check_mark(mark)?;
        let found: Option<Vec<Account>> = accounts
            .iter()
            .map(|a| inner.accounts.get(a).cloned())
            .collect();
        let Some(mut found) = found else {
            let outcomes = accounts
                .iter()
                .map(|a| match inner.accounts.get(a) {
                    Some(_) => DirectSpend::Unlimited,
                    None => DirectSpend::NotFound,
                })
                .collect();
            return Ok((false, outcomes));
        };
        let (spent, outcomes) = rules::spend_direct_all(&mut found, cost.get());
        if spent {
            for (a, account) in accounts.iter().zip(found) {
                inner.accounts.insert(a.clone(), account);
            }
        }
        inner.decided(mark, spent);
        Ok((spent, outcomes))
    }

    async fn pending_allocations(
        &self,
        key: Option<&KeyId>,
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
                    && key.is_none_or(|k| *k == t.key)
            })
            .map(|(id, t)| PendingAllocation {
                key: t.key.clone(),
                transfer_id: id.clone(),
                amount: t.amount,
                generation: t.generation,
                created_at_ms: t.created_at_ms,
            })
            .collect();
        out.sort_by(|a, b| {
            (a.created_at_ms, &a.transfer_id).cmp(&(b.created_at_ms, &b.transfer_id))
        });
        out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(out)
    }

    async fn pending_fences(
        &self,
        key: Option<&KeyId>,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingFence>, LedgerError> {
        let inner = self.lock();
        let mut out: Vec<(i64, PendingFence)> = inner
            .fences
            .values()
            .filter(|f| {
                f.state == FenceState::Pending
                    && f.created_at_ms < older_than_ms
                    && key.is_none_or(|k| *k == f.pending.key)
            })
            .map(|f| (f.created_at_ms, f.pending.clone()))
            .collect();
        out.sort_by(|a, b| {
            (a.0, a.1.generation, &a.1.op_id).cmp(&(b.0, b.1.generation, &b.1.op_id))
        });
        out.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        Ok(out.into_iter().map(|(_, f)| f).collect())
    }

    async fn write_off_other_epochs(&self, epoch: &str) -> Result<Vec<(KeyId, u64)>, LedgerError> {
        let now_ms = self.clock.now_ms();
        let mut inner = self.lock();
        let mut keys: Vec<KeyId> = inner
            .accounts
            .iter()
            .filter(|(_, a)| a.hot_epoch.as_deref().is_some_and(|e| e != epoch))
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        let mut out = Vec::new();
        for key in keys {
            let Some(account) = inner.accounts.get_mut(&key) else {
                continue;
            };
            if let Some(lost) = rules::write_off(account, epoch, now_ms) {
                inner.mark_lost(&key, lost);
                if lost > 0 {
                    out.push((key, lost));
                }
            }
        }
        Ok(out)
    }

    async fn hot_epoch(&self, key: &KeyId) -> Result<Option<String>, LedgerError> {
        Ok(self
            .lock()
            .accounts
            .get(key)
            .and_then(|a| a.hot_epoch.clone()))
    }

    async fn write_off_key(&self, key: &KeyId, epoch: &str) -> Result<u64, LedgerError> {
        let now_ms = self.clock.now_ms();
        let mut inner = self.lock();
        let Some(account) = inner.accounts.get_mut(key) else {
            return Ok(0);
        };
        if account.hot_epoch.is_none() {
            return Ok(0);
        }
        let lost = rules::write_off(account, epoch, now_ms);
        if let Some(lost) = lost {
            inner.mark_lost(key, lost);
        }
        Ok(lost.unwrap_or(0))
    }

    async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<HoldOutcome, LedgerError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.check_mark(req.mark)?;
        let Some(account) = inner.accounts.get_mut(req.key) else {
            return Ok(HoldOutcome::NotFound);
        };
        if let Some(first) = inner.holds.get(req.hold_id) {
            return Ok(HoldOutcome::Hold {
                hold: first.clone(),
                changed: false,
                state: Some(account.state()),
            });
        }
        match rules::reserve(account, req) {
            Ok(hold) => {
                let state = Some(account.state());
                inner.holds.insert(hold.id.clone(), hold.clone());
                inner.decided(req.mark, true);
                Ok(HoldOutcome::Hold {
                    hold,
                    changed: true,
                    state,
                })
            }
            Err(short) => Ok(short.into()),
        }
    }

    async fn reserve_pair(
        &self,
        req: &ReserveRequest<'_>,
        pool: &KeyId,
    ) -> Result<PairHoldOutcome, LedgerError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.check_mark(req.mark)?;
        let (Some(mut k), Some(mut p)) = (
            inner.accounts.get(req.key).cloned(),
            inner.accounts.get(pool).cloned(),
        ) else {
            return Ok(PairHoldOutcome::NotFound);
        };
        if let Some(first) = inner.holds.get(req.hold_id) {
            return Ok(PairHoldOutcome::Hold {
                hold: first.clone(),
                changed: false,
                key_state: Some(k.state()),
                pool_state: Some(p.state()),
            });
        }
        match rules::reserve_pair(&mut k, &mut p, pool, req) {
            Ok((key_hold, pool_hold)) => {
                let (key_state, pool_state) = (Some(k.state()), Some(p.state()));
                inner.accounts.insert(req.key.clone(), k);
                inner.accounts.insert(pool.clone(), p);
                inner.holds.insert(pool_hold.id.clone(), pool_hold);
                inner.holds.insert(key_hold.id.clone(), key_hold.clone());
                inner.decided(req.mark, true);
                Ok(PairHoldOutcome::Hold {
                    hold: key_hold,
                    changed: true,
                    key_state,
                    pool_state,
                })
            }
            Err(e) => Ok(e.into()),
        }
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
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.check_mark(mark)?;
        let pool_hold_id = rules::pool_hold_id(hold_id);
        let (Some(mut kh), Some(mut ph)) = (
            inner.holds.get(hold_id).filter(|h| h.key == *key).cloned(),
            inner
                .holds
                .get(&pool_hold_id)
                .filter(|h| h.key == *pool)
                .cloned(),
        ) else {
            return Ok(PairHoldOutcome::NotFound);
        };
        let mut k = inner.accounts.get(key).cloned();
        let mut p = inner.accounts.get(pool).cloned();
        match rules::close_pair(k.as_mut(), p.as_mut(), &mut kh, &mut ph, close, now_ms) {
            Ok(changed) => {
                let (key_state, pool_state) =
                    (k.as_ref().map(|a| a.state()), p.as_ref().map(|a| a.state()));
                if let Some(k) = k {
                    inner.accounts.insert(key.clone(), k);
                }
                if let Some(p) = p {
                    inner.accounts.insert(pool.clone(), p);
                }
                inner.holds.insert(pool_hold_id, ph);
                inner.holds.insert(hold_id.to_owned(), kh.clone());
                inner.decided(mark, changed);
                Ok(PairHoldOutcome::Hold {
                    hold: kh,
                    changed,
                    key_state,
                    pool_state,
                })
            }
            Err(e) => Ok(e.into()),
        }
    }

    async fn close_hold(
        &self,
        key: &KeyId,
        hold_id: &str,
        close: HoldClose,
        now_ms: i64,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<HoldOutcome, LedgerError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        inner.check_mark(mark)?;
        let Some(stored) = inner.holds.get_mut(hold_id).filter(|h| h.key == *key) else {
            return Ok(HoldOutcome::NotFound);
        };
        let mut account = inner.accounts.get_mut(key);
        let mut hold = stored.clone();
        match rules::close_hold(account.as_deref_mut(), &mut hold, close, now_ms) {
            Ok(changed) => {
                *stored = hold.clone();
                let state = account.map(|a| a.state());
                inner.decided(mark, changed);
                Ok(HoldOutcome::Hold {
                    hold,
                    changed,
                    state,
                })
            }
            Err(short) => Ok(short.into()),
        }
    }

    async fn expire_holds(
        &self,
        key: &KeyId,
        now_ms: i64,
        limit: u32,
    ) -> Result<(Vec<Hold>, Option<LedgerState>), LedgerError> {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let mut account = inner.accounts.get_mut(key);
        let mut due: Vec<&mut Hold> = inner
            .holds
            .values_mut()
            .filter(|h| h.key == *key && h.state == HoldState::Open && h.expires_at_ms <= now_ms)
            .collect();
        due.sort_by(|a, b| (a.expires_at_ms, &a.id).cmp(&(b.expires_at_ms, &b.id)));
        due.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let mut out = Vec::with_capacity(due.len());
        for hold in due {
            if rules::close_hold(account.as_deref_mut(), hold, HoldClose::Expire, now_ms)
                == Ok(true)
            {
                out.push(hold.clone());
            }
        }
        Ok((out, account.map(|a| a.state())))
    }

    async fn hold(&self, hold_id: &str) -> Result<Option<Hold>, LedgerError> {
        Ok(self.lock().holds.get(hold_id).cloned())
    }

    async fn keys_with_due_holds(
        &self,
        now_ms: i64,
        limit: u32,
    ) -> Result<Vec<KeyId>, LedgerError> {
        let inner = self.lock();
        let mut due: Vec<&Hold> = inner
            .holds
            .values()
            .filter(|h| h.state == HoldState::Open && h.expires_at_ms <= now_ms)
            .collect();
        due.sort_by(|a, b| (a.expires_at_ms, &a.id).cmp(&(b.expires_at_ms, &b.id)));
        let mut keys: Vec<KeyId> = Vec::new();
        for h in due {
            if keys.len() >= usize::try_from(limit).unwrap_or(usize::MAX) {
                break;
            }
            if !keys.contains(&h.key) {
                keys.push(h.key.clone());
            }
        }
        Ok(keys)
    }

    async fn claim_idempotency(&self, claim: &IdemClaim<'_>) -> Result<ClaimOutcome, LedgerError> {
        let mut inner = self.lock();
        let id = (claim.scope.to_owned(), claim.key.to_owned());
        let (outcome, store) = rules::claim(inner.idem.get(&id), claim);
        if let Some(record) = store {
            inner.idem.insert(id, record);
        }
        Ok(outcome)
    }

    async fn answer_idempotency(
        &self,
        mark: &IdemMark<'_>,
        answer: &str,
    ) -> Result<bool, LedgerError> {
        let mut inner = self.lock();
        Ok(match inner.idem.get_mut(&idem_id(mark)) {
            Some(r) if r.token == mark.token && r.state != IdemState::Answered => {
                r.state = IdemState::Answered;
                r.answer = Some(answer.to_owned());
                true
            }
            _ => false,
        })
    }

    async fn abandon_idempotency(&self, mark: &IdemMark<'_>) -> Result<(), LedgerError> {
        let mut inner = self.lock();
        let id = idem_id(mark);
        if rules::holds_claim(inner.idem.get(&id), mark.token) {
            inner.idem.remove(&id);
        }
        Ok(())
    }

    async fn idempotency(&self, scope: &str, key: &str) -> Result<Option<IdemRecord>, LedgerError> {
        Ok(self
            .lock()
            .idem
            .get(&(scope.to_owned(), key.to_owned()))
            .cloned())
    }

    async fn purge_idempotency(&self, before_ms: i64, limit: u32) -> Result<u64, LedgerError> {
        let mut inner = self.lock();
        let mut old: Vec<(String, String)> = inner
            .idem
            .iter()
            .filter(|(_, r)| r.created_at_ms < before_ms)
            .map(|(id, _)| id.clone())
            .collect();
        old.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        for id in &old {
            inner.idem.remove(id);
        }
        Ok(u64::try_from(old.len()).unwrap_or(u64::MAX))
    }

    async fn credit_history(
        &self,
        account: &KeyId,
        before_seq: Option<u64>,
        limit: u32,
    ) -> Result<Vec<CreditEntry>, LedgerError> {
        let inner = self.lock();
        Ok(inner
            .history
            .get(account)
            .map(|h| {
                h.iter()
                    .rev()
                    .filter(|e| before_seq.is_none_or(|b| e.seq < b))
                    .take(usize::try_from(limit).unwrap_or(usize::MAX))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }
}
