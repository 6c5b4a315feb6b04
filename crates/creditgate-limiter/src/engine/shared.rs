//! Spends from a key and its identity's shared pool together: the cost leaves both or
//! neither, in one atomic hot-store step ([`HotStore::spend_all`]) or, when the hot
//! store is unreachable, in one ledger transaction ([`Ledger::spend_direct_all`]). Each
//! account keeps an escrow of its own — chunks, refills, drains, fences — exactly as a
//! key does; only the spend is joint. An account the hot store cannot pay from yet is
//! refilled under its own lock without spending, then the joint step runs again.

use super::*;
use crate::ports::PairHoldOutcome;

/// The decision on a spend from a key and its pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedDecision {
    pub outcome: SharedOutcome,
    /// The key's exact balance after the decision, where known (`None`: unlimited, or
    /// not known).
    pub key: Option<u64>,
    /// The pool's exact balance after the decision, where known.
    pub pool: Option<u64>,
    /// Spent on the ledger alone while the hot store was unreachable: `key` and `pool`
    /// are then the ledger's parts, and the balances are at least these.
    pub on_ledger: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedOutcome {
    /// Spent from both.
    Valid,
    /// Nothing spent: the key's balance cannot cover the cost.
    KeyExceeded,
    /// Nothing spent: the pool cannot cover the cost.
    PoolExceeded,
    /// The key or the pool has no ledger row.
    NotFound,
}

impl SharedDecision {
    fn of(outcome: SharedOutcome, key: Option<u64>, pool: Option<u64>) -> Self {
        Self {
            outcome,
            key,
            pool,
            on_ledger: false,
        }
    }
}

/// The exact balance a reply states, if it states one.
fn stated(reply: &SpendReply) -> Option<u64> {
    match *reply {
        SpendReply::Valid { remaining, .. } | SpendReply::Exceeded { remaining } => Some(remaining),
        SpendReply::Low { .. } | SpendReply::Miss => None,
    }
}

impl Engine {
    /// Spends `cost` from `key` and from `pool` (its identity's shared pool), both or
    /// neither, or says exactly which cannot pay.
    #[tracing::instrument(level = "debug", skip(self), fields(key_id = %key, pool_id = %pool))]
    pub async fn spend_shared(
        &self,
        key: &KeyId,
        pool: &KeyId,
        cost: Cost,
    ) -> Result<SharedDecision, EngineError> {
        let accounts = [key.clone(), pool.clone()];
        // Where the hot store keeps them: on a store that colocates, the key's entries
        // sit at its pool's home, so one atomic step reaches both.
        let hot = [self.pooled_address(key, pool), pool.clone()];
        let deadline = Instant::now() + self.config.spend_deadline;
        loop {
            if !(self.hot.joint_spends() || self.hot.colocates())
                || self.breaker.skip(self.config.breaker_cooldown)
            {
                return self.spend_shared_direct(&accounts, cost, None).await;
            }
            let (spent, replies) = match self.hot_spend_all(&hot, cost).await {
                Ok(r) => r,
                Err(HotError::Unreachable(e)) => {
                    return self.spend_shared_direct(&accounts, cost, Some(&e)).await
                }
                Err(e) => return Err(e.into()),
            };
            let mut known = [stated(&replies[0]), stated(&replies[1])];
            if spent {
                for (a, r) in hot.iter().zip(&replies) {
                    if let SpendReply::Valid { remaining, bal } = *r {
                        let chunk = self.note_spend(a, cost.get());
                        if bal.saturating_mul(2) < chunk && remaining > bal {
                            self.request_prefetch(a, cost.get());
                        }
                    }
                }
                return Ok(SharedDecision::of(SharedOutcome::Valid, known[0], known[1]));
            }
            // An account whose whole balance cannot pay decides.
            for (i, outcome) in [
                (0, SharedOutcome::KeyExceeded),
                (1, SharedOutcome::PoolExceeded),
            ] {
                if matches!(replies[i], SpendReply::Exceeded { .. }) {
                    return Ok(SharedDecision::of(outcome, known[0], known[1]));
                }
            }
            // Refill the accounts the hot store cannot pay from yet, spending nothing.
            for i in 0..2 {
                if !matches!(replies[i], SpendReply::Low { .. } | SpendReply::Miss) {
                    continue;
                }
                let refilled = self.refill_for(&hot[i], cost).await?;
                // Credits it moved to the hot store are returned when the account idles
                // (the drains follow the addresses the engine saw in use).
                self.note_spend(&hot[i], 0);
                match refilled {
                    // Another holder had the lock, or it can pay now: try again.
                    None
                    | Some(Decision::Valid { remaining: Some(_) })
                    | Some(Decision::ValidOnLedger { .. }) => {}
                    // Unlimited: only the other account pays.
                    Some(Decision::Valid { remaining: None }) => {
                        return self.spend_one_of(&accounts[1 - i], i, cost).await;
                    }
                    Some(Decision::Exceeded { remaining }) => {
                        known[i] = Some(remaining);
                        let outcome = if i == 0 {
                            SharedOutcome::KeyExceeded
                        } else {
                            SharedOutcome::PoolExceeded
                        };
                        return Ok(SharedDecision::of(outcome, known[0], known[1]));
                    }
                    Some(Decision::NotFound) => {
                        return Ok(SharedDecision::of(SharedOutcome::NotFound, None, None))
                    }
                }
            }
            if Instant::now() >= deadline {
                metrics::counter!(m::SPEND_TIMEOUTS).increment(1);
                return Err(EngineError::Busy(
                    "could not refill the hot balances in time".into(),
                ));
            }
        }
    }

    /// [`Engine::spend_shared`] deciding an idempotency claim: under both accounts'
    /// locks (taken in id order), the ledger spends from both or neither in the
    /// transaction that records the decision; a hot balance that keeps the ledger from
    /// deciding is drained to it first.
    pub async fn spend_shared_once(
        &self,
        key: &KeyId,
        pool: &KeyId,
        cost: Cost,
        mark: &IdemMark<'_>,
    ) -> Result<SharedDecision, EngineError> {
        let at = self.home(key).await?;
        let tokens = self.lock_pair(&at, pool).await?;
        let result = self.spend_shared_once_locked(&at, pool, cost, mark).await;
        self.unlock_pair(&at, pool, tokens).await;
        result
    }

    /// The hot-store address of a pooled key's entries: at its pool's home where the
    /// store colocates accounts spent together, else its own.
    fn pooled_address(&self, key: &KeyId, pool: &KeyId) -> KeyId {
        if self.hot.colocates() {
            crate::ports::hot_address(key, pool.as_str())
        } else {
            key.clone()
        }
    }

    /// `at`: where the key's hot credits are held.
    async fn spend_shared_once_locked(
        &self,
        at: &KeyId,
        pool: &KeyId,
        cost: Cost,
        mark: &IdemMark<'_>,
    ) -> Result<SharedDecision, EngineError> {
        let accounts = [account_of(at), pool.clone()];
        let hot = [at.clone(), pool.clone()];
        for a in &hot {
            self.settle_pending(a).await?;
            // The ledger's part is about to change: spends that would state it wait.
            self.hot.sync_unalloc(a, None, 0).await?;
        }
        let mut drained = [false, false];
        loop {
            let (spent, outcomes) = self
                .ledger
                .spend_direct_all(&accounts, cost, Some(mark))
                .await?;
            if !spent {
                let mut again = false;
                for i in 0..2 {
                    if matches!(outcomes[i], DirectSpend::Undecided { .. }) && !drained[i] {
                        self.drain_for_hold(&hot[i]).await?;
                        drained[i] = true;
                        again = true;
                    }
                }
                if again {
                    continue;
                }
                if outcomes.iter().any(|o| matches!(o, DirectSpend::NotFound)) {
                    return Ok(SharedDecision::of(SharedOutcome::NotFound, None, None));
                }
            }
            let mut exact = [None, None];
            for i in 0..2 {
                if let Some(state) = self.ledger.state(&accounts[i]).await? {
                    exact[i] = self.exact_and_sync(&hot[i], &state).await?;
                }
            }
            if spent {
                return Ok(SharedDecision::of(SharedOutcome::Valid, exact[0], exact[1]));
            }
            let short = |o: &DirectSpend| {
                matches!(
                    o,
                    DirectSpend::Exceeded { .. } | DirectSpend::Undecided { .. }
                )
            };
            let outcome = if short(&outcomes[0]) {
                SharedOutcome::KeyExceeded
            } else if short(&outcomes[1]) {
                SharedOutcome::PoolExceeded
            } else {
                return Err(EngineError::Unavailable(
                    "the ledger could not decide the shared spend; nothing was spent".into(),
                ));
            };
            return Ok(SharedDecision::of(outcome, exact[0], exact[1]));
        }
    }

    /// Takes the locks of a key and its pool, in id order (no deadlock between two
    /// callers); the tokens come back in the same order as the arguments.
    async fn lock_pair(
        &self,
        key: &KeyId,
        pool: &KeyId,
    ) -> Result<(LockToken, LockToken), EngineError> {
        let key_first = key.as_str() <= pool.as_str();
        let (first, second) = if key_first { (key, pool) } else { (pool, key) };
        let t1 = self.lock_waiting(first).await?;
        let t2 = match self.lock_waiting(second).await {
            Ok(t) => t,
            Err(e) => {
                self.unlock(first, &t1).await;
                return Err(e);
            }
        };
        Ok(if key_first { (t1, t2) } else { (t2, t1) })
    }

    async fn unlock_pair(&self, key: &KeyId, pool: &KeyId, tokens: (LockToken, LockToken)) {
        self.unlock(key, &tokens.0).await;
        self.unlock(pool, &tokens.1).await;
    }

    /// One of the two accounts is unlimited (`unlimited`: its index): the other alone
    /// pays.
    async fn spend_one_of(
        &self,
        payer: &KeyId,
        unlimited: usize,
        cost: Cost,
    ) -> Result<SharedDecision, EngineError> {
        let decision = self.spend(payer, cost).await?;
        let on_ledger = matches!(decision, Decision::ValidOnLedger { .. });
        let (outcome, remaining) = match decision {
            Decision::Valid { remaining } => (SharedOutcome::Valid, remaining),
            Decision::ValidOnLedger { at_least } => (SharedOutcome::Valid, Some(at_least)),
            Decision::Exceeded { remaining } if unlimited == 0 => {
                (SharedOutcome::PoolExceeded, Some(remaining))
            }
            Decision::Exceeded { remaining } => (SharedOutcome::KeyExceeded, Some(remaining)),
            Decision::NotFound => (SharedOutcome::NotFound, None),
        };
        let mut d = if unlimited == 0 {
            SharedDecision::of(outcome, None, remaining)
        } else {
            SharedDecision::of(outcome, remaining, None)
        };
        d.on_ledger = on_ledger;
        Ok(d)
    }

    /// `HotStore::spend_all`, feeding the breaker as [`Engine::hot_spend`] does.
    async fn hot_spend_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
    ) -> Result<(bool, Vec<SpendReply>), HotError> {
        let reply = self.hot.spend_all(accounts, cost, false).await;
        match &reply {
            Ok(_) => self.breaker.success(),
            Err(HotError::Ambiguous(why)) => {
                metrics::counter!(m::OUTCOME_UNKNOWN).increment(1);
                metrics::counter!(m::OUTCOME_UNKNOWN_CREDITS)
                    .increment(cost.get().saturating_mul(2));
                tracing::warn!(
                    accounts = ?accounts,
                    cost = cost.get(),
                    error = %why,
                    "shared spend outcome unknown: the hot store did not answer in time"
                );
                self.breaker.timeout(&self.config);
            }
            Err(_) => {}
        }
        reply
    }

    /// The hot store is unreachable (`why`) or the breaker is open: one ledger
    /// transaction that spends from both rows or neither, never touching credits the hot
    /// store holds.
    async fn spend_shared_direct(
        &self,
        accounts: &[KeyId; 2],
        cost: Cost,
        why: Option<&str>,
    ) -> Result<SharedDecision, EngineError> {
        metrics::counter!(m::DIRECT_SPENDS).increment(1);
        if let Some(why) = why {
            tracing::warn!(
                key_id = %accounts[0],
                pool_id = %accounts[1],
                error = why,
                "hot store unreachable, spending on the ledger"
            );
        }
        let (spent, outcomes) = self.ledger.spend_direct_all(accounts, cost, None).await?;
        let exact = |o: &DirectSpend| match *o {
            DirectSpend::Valid { remaining } | DirectSpend::Exceeded { remaining } => {
                Some(remaining)
            }
            _ => None,
        };
        let (key, pool) = (exact(&outcomes[0]), exact(&outcomes[1]));
        if spent {
            let mut d = SharedDecision::of(SharedOutcome::Valid, key, pool);
            d.on_ledger = true;
            return Ok(d);
        }
        if outcomes.iter().any(|o| matches!(o, DirectSpend::NotFound)) {
            return Ok(SharedDecision::of(SharedOutcome::NotFound, None, None));
        }
        if let Some(i) = outcomes
            .iter()
            .position(|o| matches!(o, DirectSpend::Exceeded { .. }))
        {
            let outcome = if i == 0 {
                SharedOutcome::KeyExceeded
            } else {
                SharedOutcome::PoolExceeded
            };
            return Ok(SharedDecision::of(outcome, key, pool));
        }
        metrics::counter!(m::DIRECT_UNDECIDED).increment(1);
        Err(EngineError::Unavailable(
            "the ledger cannot cover the cost from its part of the key's or the pool's \
             balance, and the unreachable hot store holds more; nothing was spent"
                .into(),
        ))
    }
}

/// The answer to a hold call on a pooled key (its hold and its pool's hold together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SharedHoldAnswer {
    /// The key's hold after the call; `changed` as in [`HoldAnswer::Hold`]; the exact
    /// balances outside holds of the key (`None`: unlimited or deleted) and the pool.
    Hold {
        hold: Hold,
        changed: bool,
        key: Option<u64>,
        pool: Option<u64>,
    },
    /// Nothing moved: the key (`pool_short` false) or the pool cannot cover it; the
    /// exact balances after.
    Exceeded {
        pool_short: bool,
        key: Option<u64>,
        pool: Option<u64>,
    },
    /// No such key or pool (reserve), or no such pooled hold of this key (close).
    NotFound,
}

#[derive(Debug, Clone, Copy)]
enum PairCall<'a> {
    Reserve(&'a ReserveRequest<'a>),
    Close {
        hold_id: &'a str,
        close: HoldClose,
        mark: Option<&'a IdemMark<'a>>,
    },
}

impl Engine {
    /// [`Engine::reserve`] on a key of an identity with a shared pool: the amount moves
    /// into the key's hold and the pool's, both or neither.
    pub async fn reserve_shared(
        &self,
        req: &ReserveRequest<'_>,
        pool: &KeyId,
    ) -> Result<SharedHoldAnswer, EngineError> {
        self.pair_call(req.key, pool, PairCall::Reserve(req)).await
    }

    /// [`Engine::close_hold`] on a pooled key's hold: both holds close together.
    pub async fn close_hold_shared(
        &self,
        key: &KeyId,
        pool: &KeyId,
        hold_id: &str,
        close: HoldClose,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<SharedHoldAnswer, EngineError> {
        self.pair_call(
            key,
            pool,
            PairCall::Close {
                hold_id,
                close,
                mark,
            },
        )
        .await
    }

    async fn pair_call(
        &self,
        key: &KeyId,
        pool: &KeyId,
        call: PairCall<'_>,
    ) -> Result<SharedHoldAnswer, EngineError> {
        let at = self.home(key).await?;
        let tokens = self.lock_pair(&at, pool).await?;
        let result = self.pair_call_locked(&at, pool, call).await;
        self.unlock_pair(&at, pool, tokens).await;
        result
    }

    /// `at`: where the key's hot credits are held.
    async fn pair_call_locked(
        &self,
        at: &KeyId,
        pool: &KeyId,
        call: PairCall<'_>,
    ) -> Result<SharedHoldAnswer, EngineError> {
        let key = &account_of(at);
        let accounts = [key.clone(), pool.clone()];
        let hot = [at.clone(), pool.clone()];
        for a in &hot {
            self.settle_pending(a).await?;
            // The ledger's parts are about to change: spends that would state them wait.
            self.hot.sync_unalloc(a, None, 0).await?;
        }
        let mut drained = [false, false];
        loop {
            let outcome = match call {
                PairCall::Reserve(req) => self.ledger.reserve_pair(req, pool).await?,
                PairCall::Close {
                    hold_id,
                    close,
                    mark,
                } => {
                    self.ledger
                        .close_hold_pair(key, pool, hold_id, close, self.clock.now_ms(), mark)
                        .await?
                }
            };
            if let PairHoldOutcome::Short {
                account,
                hot_allocated,
                ..
            } = outcome
            {
                if hot_allocated > 0 && !drained[account] {
                    self.drain_for_hold(&hot[account]).await?;
                    drained[account] = true;
                    continue;
                }
            }
            // Every path leaves both snapshots valid again, with the exact balances.
            let mut exact = [None, None];
            for (i, (a, at)) in accounts.iter().zip(&hot).enumerate() {
                if let Some(state) = self.ledger.state(a).await? {
                    exact[i] = self.exact_and_sync(at, &state).await?;
                }
            }
            return Ok(match outcome {
                PairHoldOutcome::Hold { hold, changed, .. } => SharedHoldAnswer::Hold {
                    hold,
                    changed,
                    key: exact[0],
                    pool: exact[1],
                },
                PairHoldOutcome::Short { account, .. } => SharedHoldAnswer::Exceeded {
                    pool_short: account == 1,
                    key: exact[0],
                    pool: exact[1],
                },
                PairHoldOutcome::NotFound => SharedHoldAnswer::NotFound,
            });
        }
    }
}
