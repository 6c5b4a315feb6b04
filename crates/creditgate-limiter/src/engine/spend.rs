//! The spend path: the hot store first, then a refill from the ledger under the key's
//! lock, or a direct ledger spend when the hot store is unreachable; chunk sizing.

use super::*;

impl Engine {
    /// Spends `cost` from `key`'s balance, or says exactly why not.
    #[tracing::instrument(level = "debug", skip(self), fields(key_id = %key))]
    pub async fn spend(&self, key: &KeyId, cost: Cost) -> Result<Decision, EngineError> {
        let deadline = Instant::now() + self.config.spend_deadline;
        loop {
            if self.breaker.skip(self.config.breaker_cooldown) {
                return self.spend_direct(key, cost, None).await;
            }
            let reply = self.hot_spend(key, cost).await;
            match reply {
                Ok(r) => {
                    if let Some(decision) = self.hot_decision(key, cost, r) {
                        return Ok(decision);
                    }
                }
                Err(HotError::Unreachable(e)) => {
                    return self.spend_direct(key, cost, Some(&e)).await
                }
                Err(e) => return Err(e.into()),
            }
            if let Some(decision) = self.refill_and_spend(key, cost).await? {
                if matches!(decision, Decision::Valid { remaining: Some(_) }) {
                    self.note_spend(key, cost.get());
                }
                return Ok(decision);
            }
            if Instant::now() >= deadline {
                metrics::counter!(m::SPEND_TIMEOUTS).increment(1);
                return Err(EngineError::Busy(
                    "could not refill the hot balance in time".into(),
                ));
            }
        }
    }

    /// The decision a hot-store reply settles alone (`None`: a refill is needed), with
    /// the bookkeeping of a spend.
    fn hot_decision(&self, key: &KeyId, cost: Cost, reply: SpendReply) -> Option<Decision> {
        match reply {
            SpendReply::Valid { remaining, bal } => {
                let chunk = self.note_spend(key, cost.get());
                if bal.saturating_mul(2) < chunk && remaining > bal {
                    self.request_prefetch(key, cost.get());
                }
                Some(Decision::Valid {
                    remaining: Some(remaining),
                })
            }
            SpendReply::Exceeded { remaining } => Some(Decision::Exceeded { remaining }),
            SpendReply::Low { .. } | SpendReply::Miss => None,
        }
    }

    /// The spend's fast path, only where cancellation cannot cut it half-way (a hot store
    /// whose spend survives cancellation): one hot-store step, decided as
    /// [`Engine::spend`] decides it. `None` when that step does not decide and nothing
    /// was spent (a refill is due, the store is unreachable, the breaker is open): the
    /// caller then runs [`Engine::spend`] where cancellation cannot reach it.
    pub async fn spend_fast(
        &self,
        key: &KeyId,
        cost: Cost,
    ) -> Option<Result<Decision, EngineError>> {
        if !self.hot.spend_survives_cancellation()
            || self.breaker.skip(self.config.breaker_cooldown)
        {
            return None;
        }
        match self.hot_spend(key, cost).await {
            Ok(reply) => self.hot_decision(key, cost, reply).map(Ok),
            Err(HotError::Unreachable(_)) => None,
            // The outcome is unknown or the script failed: never tried again.
            Err(e) => Some(Err(e.into())),
        }
    }

    /// `HotStore::spend`, feeding the breaker; a timeout is counted and logged as a spend
    /// of unknown outcome.
    pub(super) async fn hot_spend(&self, key: &KeyId, cost: Cost) -> Result<SpendReply, HotError> {
        let reply = self.hot.spend(key, cost).await;
        match &reply {
            Ok(_) => self.breaker.success(),
            Err(HotError::Ambiguous(why)) => {
                metrics::counter!(m::OUTCOME_UNKNOWN).increment(1);
                metrics::counter!(m::OUTCOME_UNKNOWN_CREDITS).increment(cost.get());
                tracing::warn!(
                    key_id = %key,
                    cost = cost.get(),
                    error = %why,
                    "spend outcome unknown: the hot store did not answer in time"
                );
                self.breaker.timeout(&self.config);
            }
            Err(_) => {}
        }
        reply
    }

    /// The hot store is unreachable (`why`) or the breaker is open (`None`: the breaker
    /// logged it once): one atomic conditional update on the ledger, which never touches
    /// credits the hot store holds.
    pub(super) async fn spend_direct(
        &self,
        key: &KeyId,
        cost: Cost,
        why: Option<&str>,
    ) -> Result<Decision, EngineError> {
        metrics::counter!(m::DIRECT_SPENDS).increment(1);
        if let Some(why) = why {
            tracing::warn!(
                key_id = %key,
                error = why,
                "hot store unreachable, spending on the ledger"
            );
        }
        Ok(
            match self
                .ledger
                .spend_direct(&account_of(key), cost, None)
                .await?
            {
                DirectSpend::Valid { remaining } => Decision::ValidOnLedger {
                    at_least: remaining,
                },
                DirectSpend::Exceeded { remaining } => Decision::Exceeded { remaining },
                // Refusing would claim the balance cannot cover it; it may.
                DirectSpend::Undecided {
                    remaining,
                    hot_allocated,
                } => {
                    metrics::counter!(m::DIRECT_UNDECIDED).increment(1);
                    return Err(EngineError::Unavailable(format!(
                        "the ledger holds {remaining} credits of the key, less than the cost, and \
                     the unreachable hot store holds {hot_allocated} more; nothing was spent"
                    )));
                }
                DirectSpend::Unlimited => Decision::Valid { remaining: None },
                DirectSpend::NotFound => Decision::NotFound,
            },
        )
    }

    /// Under the key's lock: spend again, else move credits from the ledger and spend.
    /// `None` when another holder had the lock (the caller retries its spend).
    pub(super) async fn refill_and_spend(
        &self,
        key: &KeyId,
        cost: Cost,
    ) -> Result<Option<Decision>, EngineError> {
        self.refill_under_lock(key, cost, false).await
    }

    /// Under the key's lock: moves credits from the ledger until the hot store could pay
    /// `cost` from it, spending nothing (`Valid`: it could; `Exceeded`: the whole balance
    /// cannot). `None` when another holder had the lock.
    pub(super) async fn refill_for(
        &self,
        key: &KeyId,
        cost: Cost,
    ) -> Result<Option<Decision>, EngineError> {
        self.refill_under_lock(key, cost, true).await
    }

    /// [`Engine::refill_locked`] under the key's lock, if free (`None` otherwise).
    async fn refill_under_lock(
        &self,
        key: &KeyId,
        cost: Cost,
        probe: bool,
    ) -> Result<Option<Decision>, EngineError> {
        let Some(token) = self
            .hot
            .lock(key, self.config.lock_ttl, self.config.lock_wait)
            .await?
        else {
            return Ok(None);
        };
        let result = self.refill_locked(key, cost, probe).await;
        self.unlock(key, &token).await;
        result.map(Some)
    }

    /// One hot-store decision on `key`: a spend, or with `probe` the same decision
    /// without spending.
    async fn hot_step(&self, key: &KeyId, cost: Cost, probe: bool) -> Result<SpendReply, HotError> {
        if !probe {
            return self.hot_spend(key, cost).await;
        }
        let (_, replies) = self
            .hot
            .spend_all(std::slice::from_ref(key), cost, true)
            .await?;
        replies
            .into_iter()
            .next()
            .ok_or_else(|| HotError::Other("a probe answered nothing".into()))
    }

    pub(super) async fn refill_locked(
        &self,
        key: &KeyId,
        cost: Cost,
        probe: bool,
    ) -> Result<Decision, EngineError> {
        let started = Instant::now();
        let account = account_of(key);
        self.settle_pending(key).await?;
        // Spenders on other nodes may take a fresh chunk before our own spend does (they
        // need no lock): keep moving chunks, doubling them, until ours succeeds, the ledger
        // runs dry, or the lock's lifetime is near.
        let mut boost = 1u64;
        while started.elapsed() < self.config.lock_ttl / 2 {
            let (generation, bal) = match self.hot_step(key, cost, probe).await? {
                SpendReply::Valid { remaining, .. } => {
                    return Ok(Decision::Valid {
                        remaining: Some(remaining),
                    })
                }
                SpendReply::Exceeded { remaining } => return Ok(Decision::Exceeded { remaining }),
                SpendReply::Low { bal, generation } => (Some(generation), bal),
                SpendReply::Miss => (None, 0),
            };
            let need = cost.get().saturating_sub(bal);
            let epoch = self.hot.epoch_of(key).await?;
            let transfer_id = new_id_for_transfer("alloc");
            let req = AllocateRequest {
                key: &account,
                transfer_id: &transfer_id,
                generation,
                epoch: &epoch,
                need,
                chunk: self.chunk_for(key, cost.get()).saturating_mul(boost),
                now_ms: self.clock.now_ms(),
            };
            boost = boost.saturating_mul(2).min(1 << 20);
            match self.ledger.allocate(&req).await? {
                AllocateOutcome::Granted {
                    amount,
                    remaining,
                    generation,
                    version,
                    lost,
                } => {
                    self.report_lost(&account, lost);
                    metrics::counter!(m::ALLOCATIONS).increment(1);
                    if started.elapsed() >= self.config.lock_ttl {
                        // Our lock may have expired: leave the allocation to the reconciler.
                        return Err(EngineError::Busy("refill took longer than the lock".into()));
                    }
                    let credit = Credit {
                        transfer_id: &transfer_id,
                        generation,
                        amount,
                        unalloc: remaining,
                        version,
                        epoch: &epoch,
                    };
                    self.credit_allocation(key, &credit).await?;
                    // Whatever happens to the spend that asked for them, the credits
                    // moved here go back to the ledger when the key idles.
                    self.note_spend(key, 0);
                }
                AllocateOutcome::Insufficient {
                    remaining,
                    generation,
                    version,
                    lost,
                } => {
                    self.report_lost(&account, lost);
                    // Seed or refresh the snapshot so the next requests are answered by
                    // the hot store alone.
                    let seed = new_id_for_transfer("seed");
                    self.hot
                        .credit(
                            key,
                            &Credit {
                                transfer_id: &seed,
                                generation,
                                amount: 0,
                                unalloc: remaining,
                                version,
                                epoch: &epoch,
                            },
                        )
                        .await?;
                    return Ok(Decision::Exceeded {
                        remaining: bal.saturating_add(remaining),
                    });
                }
                AllocateOutcome::GenerationMoved { generation } => {
                    self.align_generation(key, generation).await?;
                }
                AllocateOutcome::Elsewhere => {
                    if !self.evacuate(&account).await? {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                AllocateOutcome::Unlimited => return Ok(Decision::Valid { remaining: None }),
                AllocateOutcome::NotFound => return Ok(Decision::NotFound),
            }
        }
        metrics::counter!(m::SPEND_TIMEOUTS).increment(1);
        Err(EngineError::Busy(
            "hot balance kept moving during refill".into(),
        ))
    }

    /// Allocation size: a few seconds of this key's spend on this node (more seconds
    /// when many keys are active, see [`EngineConfig::refill_budget_per_sec`]), at least
    /// `min_chunk_requests` requests, at most `max_chunk` (and never more than the ledger
    /// holds, which the ledger enforces).
    pub(super) fn chunk_for(&self, key: &KeyId, cost: u64) -> u64 {
        let map = lock_map(&self.activity);
        let rate = map
            .get(key)
            .map_or(0, |a| a.rate_per_sec.saturating_mul(a.share));
        let active = map.len();
        drop(map);
        self.chunk_from_rate(rate, cost, active)
    }

    /// How much more a chunk covers because `active` keys share the ledger: 1 up to
    /// `refill_budget_per_sec × chunk_seconds` active keys, growing with them, at most
    /// `max_chunk_seconds / chunk_seconds`.
    pub(super) fn load_factor(&self, active: usize) -> u64 {
        let c = &self.config;
        let per_factor = c
            .refill_budget_per_sec
            .saturating_mul(c.chunk_seconds)
            .max(1);
        let most = (c.max_chunk_seconds / c.chunk_seconds.max(1)).max(1);
        (u64::try_from(active).unwrap_or(u64::MAX) / per_factor).clamp(1, most)
    }

    /// A chunk covers `chunk_seconds × load factor` seconds of the key's spend rate on
    /// this node and at least `min_chunk_requests × load factor` requests (the minimum
    /// matters where several nodes share one hot balance: each sees only its part of
    /// the rate), at most `max_chunk`.
    pub(super) fn chunk_from_rate(&self, rate: u64, cost: u64, active: usize) -> u64 {
        let c = &self.config;
        let load = self.load_factor(active);
        rate.saturating_mul(c.chunk_seconds.max(1).saturating_mul(load))
            .max(
                cost.saturating_mul(c.min_chunk_requests)
                    .saturating_mul(load),
            )
            .min(c.max_chunk)
            .max(cost)
    }

    /// Records a spend; returns the chunk size this key's refills now use.
    pub(super) fn note_spend(&self, key: &KeyId, cost: u64) -> u64 {
        let now = Instant::now();
        let mut map = lock_map(&self.activity);
        let a = map.entry(key.to_owned()).or_insert_with(|| {
            // A key returned for idleness comes back with the pace it had.
            let before = lock_map(&self.returned).remove(key);
            Activity {
                window_start: now,
                window_credits: 0,
                rate_per_sec: 0,
                last_used: now,
                prefetching: false,
                own_since_report: 0,
                share: 1,
                last_spent: before.map(|r| r.last_spent),
                gap: before.map_or(Duration::ZERO, |r| r.gap),
            }
        });
        a.last_used = now;
        if cost > 0 {
            if let Some(last) = a.last_spent {
                a.gap = now.duration_since(last).max(a.gap - a.gap / 16);
            }
            a.last_spent = Some(now);
        }
        a.window_credits = a.window_credits.saturating_add(cost);
        a.own_since_report = a.own_since_report.saturating_add(cost);
        let elapsed = now.duration_since(a.window_start);
        let ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
        if elapsed >= Duration::from_secs(1) {
            a.rate_per_sec = a.window_credits.saturating_mul(1000) / ms.max(1);
            a.window_start = now;
            a.window_credits = 0;
        } else if cost > 0
            && a.window_credits > a.rate_per_sec
            && a.window_credits
                >= cost
                    .saturating_mul(self.config.min_chunk_requests)
                    .saturating_mul(FIRST_ESTIMATE_CHUNKS)
        {
            // What a busy key spent so far in this window is a lower bound of its rate
            // now: a new hot key (or one that sped up) is not refilled with chunks of
            // its old rate (for a new key the minimum: a ledger transaction every ten
            // requests) until the window closes. A key that spent less keeps its rate.
            a.rate_per_sec = a.window_credits;
        }
        let rate = a.rate_per_sec.saturating_mul(a.share);
        let active = map.len();
        drop(map);
        self.chunk_from_rate(rate, cost, active)
    }

    /// A credit of this node reported `spent`: what the whole hot store spent from the
    /// key since the last report (by any node). Against what this node spent since its
    /// own last credit, that is how many nodes' worth of rate the key has. When another
    /// node reported in between, `spent` covers less than this node's window and the
    /// factor comes out low: chunks err on the small side, never past the bound.
    pub(super) fn note_report(&self, key: &KeyId, spent: u64) {
        let mut map = lock_map(&self.activity);
        if let Some(a) = map.get_mut(key) {
            a.share = share_factor(spent, a.own_since_report).unwrap_or(a.share);
            a.own_since_report = 0;
        }
    }
}

/// A key that spent this many minimum chunks within a one-second window has its rate
/// raised to what it spent so far, before the window ends.
pub(super) const FIRST_ESTIMATE_CHUNKS: u64 = 10;

/// Most nodes' worth of rate one node's chunks cover (see [`Engine::note_report`]).
pub(super) const MAX_SHARE: u64 = 16;

/// `spent / own`, 1 to [`MAX_SHARE`]; `None` without own spends to compare with.
fn share_factor(spent: u64, own: u64) -> Option<u64> {
    (own > 0).then(|| (spent / own).clamp(1, MAX_SHARE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_is_the_stores_spend_over_this_nodes() {
        assert_eq!(share_factor(300, 100), Some(3), "three nodes alike");
        assert_eq!(share_factor(100, 100), Some(1), "alone");
        assert_eq!(
            share_factor(40, 100),
            Some(1),
            "another node reported meanwhile"
        );
        assert_eq!(share_factor(u64::MAX, 1), Some(MAX_SHARE));
        assert_eq!(share_factor(50, 0), None, "nothing to compare with");
    }
}
