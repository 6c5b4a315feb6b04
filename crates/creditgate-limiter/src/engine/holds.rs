//! Holds (DESIGN.md §6): a hold is one more owner in the escrow's partition. The
//! ledger owns it: reserve, settle, release and expiry are each one ledger transaction,
//! under the key's lock, so a hold survives the loss of the hot store and of the node
//! that made it. Credits the ledger's part cannot cover are first drained back from the
//! hot store.
//!
//! Around each step the hot snapshot is marked unknown (spends that need it then wait
//! for the key's lock) and synced again after, so no spend states a balance that a
//! hold's move has made false, and the answer's balance is exact.

use super::*;

/// The engine's answer to a hold call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldAnswer {
    /// The hold after the call. `changed`: this call made or closed it (else it had
    /// been, and nothing changed). `remaining`: the exact balance outside holds after it
    /// (`None`: unlimited, or the key was deleted).
    Hold {
        hold: Hold,
        changed: bool,
        remaining: Option<u64>,
    },
    /// The balance cannot cover it: nothing moved, and `remaining` is the exact balance.
    Exceeded { remaining: u64 },
    /// No such key (reserve) or no such hold of this key (close).
    NotFound,
}

/// Most open holds one reconciler pass expires per key, and keys per pass.
const EXPIRE_BATCH: u32 = 1_000;
/// Keys whose holds one pass expires at once.
const EXPIRE_CONCURRENCY: usize = 32;

#[derive(Debug, Clone, Copy)]
enum HoldCall<'a> {
    Reserve(&'a ReserveRequest<'a>),
    Close {
        hold_id: &'a str,
        close: HoldClose,
        mark: Option<&'a IdemMark<'a>>,
    },
}

impl Engine {
    /// Moves `req.amount` of the key's balance into a new hold, if the balance covers it.
    /// Idempotent on the hold id: a second reserve answers the first hold.
    #[tracing::instrument(level = "debug", skip(self), fields(key_id = %req.key))]
    pub async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<HoldAnswer, EngineError> {
        self.hold_call(req.key, HoldCall::Reserve(req)).await
    }

    /// Settles, releases or (its time being up) expires an open hold of `key`, once: a
    /// closed hold is answered as it is.
    #[tracing::instrument(level = "debug", skip(self), fields(key_id = %key))]
    pub async fn close_hold(
        &self,
        key: &KeyId,
        hold_id: &str,
        close: HoldClose,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<HoldAnswer, EngineError> {
        self.hold_call(
            key,
            HoldCall::Close {
                hold_id,
                close,
                mark,
            },
        )
        .await
    }

    /// A spend decided on the ledger, in the transaction that records `mark`'s decision
    /// (an idempotent verification): under the key's lock, the hot balance drained back
    /// first if the ledger's part cannot cover it. The answer's balance is exact.
    #[tracing::instrument(level = "debug", skip(self, mark), fields(key_id = %key))]
    pub async fn spend_once(
        &self,
        key: &KeyId,
        cost: Cost,
        mark: &IdemMark<'_>,
    ) -> Result<Decision, EngineError> {
        let at = self.home(key).await?;
        let token = self.lock_waiting(&at).await?;
        let result = self.spend_once_locked(&at, cost, mark).await;
        self.unlock(&at, &token).await;
        result
    }

    async fn spend_once_locked(
        &self,
        key: &KeyId,
        cost: Cost,
        mark: &IdemMark<'_>,
    ) -> Result<Decision, EngineError> {
        self.settle_pending(key).await?;
        self.hot.sync_unalloc(key, None, 0).await?;
        let account = account_of(key);
        let mut drained = false;
        loop {
            let spent = match self.ledger.spend_direct(&account, cost, Some(mark)).await? {
                DirectSpend::Undecided { .. } if !drained => {
                    self.drain_for_hold(key).await?;
                    drained = true;
                    continue;
                }
                DirectSpend::Valid { .. } => true,
                DirectSpend::Unlimited => return Ok(Decision::Valid { remaining: None }),
                DirectSpend::NotFound => return Ok(Decision::NotFound),
                DirectSpend::Exceeded { .. } | DirectSpend::Undecided { .. } => false,
            };
            let Some(state) = self.ledger.state(&account).await? else {
                return Ok(Decision::NotFound);
            };
            let remaining = self.exact_and_sync(key, &state).await?;
            return Ok(match (spent, remaining) {
                (true, remaining) => Decision::Valid { remaining },
                (false, Some(remaining)) => Decision::Exceeded { remaining },
                (false, None) => Decision::Valid { remaining: None },
            });
        }
    }

    async fn hold_call(&self, key: &KeyId, call: HoldCall<'_>) -> Result<HoldAnswer, EngineError> {
        let at = self.home(key).await?;
        let token = self.lock_waiting(&at).await?;
        let result = self.hold_locked(&at, call).await;
        self.unlock(&at, &token).await;
        result
    }

    async fn hold_locked(
        &self,
        key: &KeyId,
        call: HoldCall<'_>,
    ) -> Result<HoldAnswer, EngineError> {
        self.settle_pending(key).await?;
        // The ledger's part is about to change: spends that would state it wait for us.
        self.hot.sync_unalloc(key, None, 0).await?;
        let account = account_of(key);
        let mut drained = false;
        loop {
            let outcome = match call {
                HoldCall::Reserve(req) => self.ledger.reserve(req).await?,
                HoldCall::Close {
                    hold_id,
                    close,
                    mark,
                } => {
                    self.ledger
                        .close_hold(&account, hold_id, close, self.clock.now_ms(), mark)
                        .await?
                }
            };
            match outcome {
                HoldOutcome::Short { hot_allocated, .. } if hot_allocated > 0 && !drained => {
                    self.drain_for_hold(key).await?;
                    drained = true;
                }
                HoldOutcome::Short { .. } | HoldOutcome::NotFound => {
                    let remaining = match self.ledger.state(&account).await? {
                        Some(state) => self.exact_and_sync(key, &state).await?,
                        None => None,
                    };
                    return Ok(match (outcome, remaining) {
                        (HoldOutcome::Short { .. }, Some(remaining)) => {
                            HoldAnswer::Exceeded { remaining }
                        }
                        _ => HoldAnswer::NotFound,
                    });
                }
                HoldOutcome::Hold {
                    hold,
                    changed,
                    state,
                } => {
                    let remaining = match state {
                        Some(state) => self.exact_and_sync(key, &state).await?,
                        None => None,
                    };
                    return Ok(HoldAnswer::Hold {
                        hold,
                        changed,
                        remaining,
                    });
                }
            }
        }
    }

    /// Under the key's lock with the snapshot unknown (so no spend completes on the hot
    /// store, and no refill moves credits): the exact balance outside holds, `remaining
    /// + bal`; then the snapshot is synced again.
    pub(super) async fn exact_and_sync(
        &self,
        key: &KeyId,
        state: &LedgerState,
    ) -> Result<Option<u64>, EngineError> {
        let Some(remaining) = state.remaining else {
            return Ok(None);
        };
        let bal = match self.hot.peek(key).await? {
            Some(e) if e.generation == state.generation => e.bal,
            _ => 0,
        };
        self.sync(key, state).await;
        Ok(Some(remaining.saturating_add(bal)))
    }

    /// The whole hot balance back to the ledger, so a hold can use it; the snapshot
    /// stays unknown. A failed ledger step is queued for retry and fails the call (the
    /// credits are not lost, but the ledger cannot use them yet).
    pub(super) async fn drain_for_hold(&self, key: &KeyId) -> Result<(), EngineError> {
        let transfer_id = drain_transfer_id();
        let drained = self.hot.drain(key, &transfer_id, 0).await?;
        match self
            .ledger
            .return_drained(&account_of(key), &transfer_id, drained)
            .await
        {
            Ok(_) => {
                metrics::counter!(m::RETURNED_CREDITS).increment(drained.amount);
                Ok(())
            }
            Err(e) => {
                self.queue_failed_return(key, &transfer_id, drained, &e);
                Err(e.into())
            }
        }
    }

    /// Reconciler step: expires the open holds whose time is up, key by key under each
    /// key's lock (a key locked elsewhere is left to the next pass, or the other node).
    /// Tells the expiry observer; returns how many expired.
    pub(super) async fn expire_due_holds(&self) -> Result<usize, EngineError> {
        let now = self.clock.now_ms();
        let keys = self.ledger.keys_with_due_holds(now, EXPIRE_BATCH).await?;
        let mut expired = Vec::new();
        for chunk in keys.chunks(EXPIRE_CONCURRENCY) {
            let results =
                futures_util::future::join_all(chunk.iter().map(|k| self.expire_key(k, now))).await;
            for (key, result) in chunk.iter().zip(results) {
                match result {
                    Ok(holds) => expired.extend(holds),
                    Err(e) => reconciler::key_failed("expire holds", key, &e),
                }
            }
        }
        let count = expired.len();
        if count > 0 {
            metrics::counter!(m::HOLDS_EXPIRED).increment(u64::try_from(count).unwrap_or(0));
            if let Some(observer) = self.on_expired.get() {
                observer(expired);
            }
        }
        Ok(count)
    }

    async fn expire_key(&self, key: &KeyId, now_ms: i64) -> Result<Vec<Hold>, EngineError> {
        let at = self.home(key).await?;
        let Some(token) = self
            .hot
            .lock(&at, self.config.lock_ttl, Duration::ZERO)
            .await?
        else {
            return Ok(Vec::new());
        };
        let result = async {
            self.hot.sync_unalloc(&at, None, 0).await?;
            let (holds, state) = self.ledger.expire_holds(key, now_ms, EXPIRE_BATCH).await?;
            if let Some(state) = state {
                self.sync(&at, &state).await;
            }
            Ok(holds)
        }
        .await;
        self.unlock(&at, &token).await;
        result
    }
}
