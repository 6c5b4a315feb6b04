//! Balance changes (set / increment / decrement / refill) as fences, and the repair of
//! fences and allocations a crashed holder left half-done.

use super::*;

impl Engine {
    /// Applies a balance change exactly: a spend in flight is counted either before or
    /// after it. Returns the ledger state after the change (`NotDue` refills: unchanged).
    #[tracing::instrument(level = "debug", skip(self), fields(key_id = %key))]
    pub async fn update(&self, key: &KeyId, op: CreditOp) -> Result<LedgerState, EngineError> {
        self.update_marked(key, op, None, None).await
    }

    /// [`Engine::update`] deciding an idempotency claim: the transaction that changes the
    /// balance records the decision. `actor` (a root key id) asked for it: the change's
    /// credit history entry names it.
    #[tracing::instrument(level = "debug", skip(self, mark), fields(key_id = %key))]
    pub async fn update_marked(
        &self,
        key: &KeyId,
        op: CreditOp,
        mark: Option<&IdemMark<'_>>,
        actor: Option<&str>,
    ) -> Result<LedgerState, EngineError> {
        let at = self.home(key).await?;
        let token = self.lock_waiting(&at).await?;
        let result = self.update_locked(&at, op, mark, actor).await;
        self.unlock(&at, &token).await;
        result
    }

    pub(super) async fn update_locked(
        &self,
        key: &KeyId,
        op: CreditOp,
        mark: Option<&IdemMark<'_>>,
        actor: Option<&str>,
    ) -> Result<LedgerState, EngineError> {
        self.settle_pending(key).await?;
        let account = account_of(key);
        let fence_op = match op {
            CreditOp::Increment(v) => {
                // The hot balance goes back first (its spends reported with it), so the
                // increment's history entry has the exact balance before and after.
                let transfer_id = drain_transfer_id();
                let drained = self.hot.drain(key, &transfer_id, 0).await?;
                if drained.amount > 0 || drained.spent > 0 {
                    self.return_to_ledger(key, &transfer_id, drained).await;
                }
                // Mark the snapshot unknown first, so no node answers USAGE_EXCEEDED from a
                // snapshot older than the increment.
                self.hot.sync_unalloc(key, None, 0).await?;
                let state = match self
                    .ledger
                    .increment(&account, v, Credits::MAX, mark, actor)
                    .await?
                {
                    IncrementOutcome::Done(s) => s,
                    IncrementOutcome::Unlimited => return Err(EngineError::Unlimited),
                    IncrementOutcome::Overflow => {
                        return Err(EngineError::Overflow { max: Credits::MAX })
                    }
                    IncrementOutcome::NotFound => return Err(EngineError::NotFound),
                };
                self.sync(key, &state).await;
                return Ok(state);
            }
            CreditOp::Set(v) => FenceOp::Set(v.map(Credits::get)),
            CreditOp::Decrement(v) => FenceOp::Decrement(v.get()),
            CreditOp::Refill {
                amount,
                period_start,
            } => FenceOp::Refill {
                amount: amount.get(),
                period_start,
            },
        };
        let op_id = new_id_for_transfer("fence");
        match self
            .ledger
            .begin_fence(&account, &op_id, fence_op, self.clock.now_ms(), mark, actor)
            .await?
        {
            BeginFence::Begun(fence) => {
                metrics::counter!(m::FENCES).increment(1);
                self.complete_fence(&fence).await
            }
            BeginFence::NotDue => self
                .ledger
                .state(&account)
                .await?
                .ok_or(EngineError::NotFound),
            BeginFence::NotFound => Err(EngineError::NotFound),
        }
    }

    /// The ledger is at a newer generation than the hot entry and no fence is pending
    /// (it was completed elsewhere): adopt the generation, returning what the entry held.
    pub(super) async fn align_generation(
        &self,
        key: &KeyId,
        generation: u64,
    ) -> Result<(), EngineError> {
        if !self
            .ledger
            .pending_fences(Some(&account_of(key)), i64::MAX, 16)
            .await?
            .is_empty()
        {
            return self.settle_pending(key).await;
        }
        let drained = self.hot.fence(key, generation).await?;
        self.return_to_ledger(key, &new_id_for_transfer("align"), drained)
            .await;
        Ok(())
    }

    /// Completes, for one key, fences begun and allocations made by holders that lost
    /// their lock (crash, timeout). Call with the key's lock held.
    pub(super) async fn settle_pending(&self, key: &KeyId) -> Result<(), EngineError> {
        let account = account_of(key);
        // A drain whose ledger step failed, maybe on another node: its credits are
        // the ledger's before anything reads the ledger's balance.
        if let Some((transfer_id, drained)) = self.hot.pending_return(key).await? {
            let state = self
                .ledger
                .return_drained(&account, &transfer_id, drained)
                .await?;
            self.hot.returned(key, &transfer_id).await?;
            self.sync_after_return(key, &state).await;
        }
        for fence in self
            .ledger
            .pending_fences(Some(&account), i64::MAX, 16)
            .await?
        {
            self.complete_fence(&fence).await?;
        }
        self.resolve_orphans(&account).await?;
        Ok(())
    }

    /// Settles `account`'s pending allocations, each as the hot store at the account's
    /// home says (credited, or refused from now on).
    pub(super) async fn resolve_orphans(&self, account: &KeyId) -> Result<usize, EngineError> {
        let orphans = self
            .ledger
            .pending_allocations(Some(account), i64::MAX, 64)
            .await?;
        if orphans.is_empty() {
            return Ok(0);
        }
        // Pending allocations keep the account's credits at one home (rules::held_elsewhere).
        let key = &self.home(account).await?;
        let mut cancelled = false;
        for a in &orphans {
            let fate = self
                .hot
                .resolve_transfer(key, &a.transfer_id, a.generation)
                .await?;
            let (credited, spent) = match fate {
                TransferFate::Credited { spent } => (true, spent),
                TransferFate::Refused => (false, 0),
            };
            if !credited && !cancelled {
                // Cancelling adds credits back to the ledger: the snapshot is stale until
                // re-synced below.
                self.hot.sync_unalloc(key, None, 0).await?;
                cancelled = true;
            }
            self.ledger
                .settle_allocation(account, &a.transfer_id, credited, spent)
                .await?;
            metrics::counter!(m::ORPHANS_RESOLVED).increment(1);
        }
        if cancelled {
            if let Some(state) = self.ledger.state(account).await? {
                self.sync(key, &state).await;
            }
        }
        Ok(orphans.len())
    }

    pub(super) async fn complete_fence(
        &self,
        fence: &PendingFence,
    ) -> Result<LedgerState, EngineError> {
        // A begun fence stops allocations: the home stays where the credits are.
        let at = self.home(&fence.key).await?;
        let drained = self.hot.fence(&at, fence.generation).await?;
        self.resolve_orphans(&fence.key).await?;
        let state = self.ledger.finish_fence(fence, drained).await?;
        self.sync(&at, &state).await;
        Ok(state)
    }
}
