//! The reconciler (DESIGN.md §3.6): one cheap pass every few seconds on every node.

use super::*;

/// What one reconciler pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    pub drained_keys: usize,
    pub returned_credits: u64,
    pub retried_returns: usize,
    pub fences_completed: usize,
    pub orphans_resolved: usize,
    pub lost_credits: u64,
    pub expired_entries: usize,
    /// Holds whose time was up, expired (their credits returned).
    pub expired_holds: usize,
    /// Idempotency records past the retention window, deleted.
    pub purged_idempotency: u64,
    /// Keys whose step failed this pass (logged and counted; the pass went on, the next
    /// pass tries them again).
    pub key_errors: usize,
}

/// Most idempotency records one pass deletes.
const PURGE_BATCH: u32 = 10_000;

impl Engine {
    /// Writes off what `key` had allocated to an epoch of its shard that is gone.
    async fn write_off_lost_shard(
        &self,
        key: &KeyId,
        report: &mut ReconcileReport,
    ) -> Result<(), EngineError> {
        let epoch = self.hot.epoch_of(key).await?;
        let account = account_of(key);
        let lost = self.ledger.write_off_key(&account, &epoch).await?;
        self.report_lost(&account, lost);
        report.lost_credits += lost;
        Ok(())
    }

    /// One pass of the reconciler (DESIGN.md §3.6). Cheap when there is nothing to do.
    pub async fn reconcile_once(&self) -> Result<ReconcileReport, EngineError> {
        let mut report = ReconcileReport::default();

        // 1. A hot store that lost its data: write off what it held, once. (With one
        // epoch per shard, a key's next allocation writes off what a lost shard held.)
        if self.hot.one_epoch() {
            let epoch = self.hot.epoch().await?;
            let changed = lock_map(&self.epoch_seen).as_deref() != Some(epoch.as_str());
            if changed {
                for (key, lost) in self.ledger.write_off_other_epochs(&epoch).await? {
                    self.report_lost(&key, lost);
                    report.lost_credits += lost;
                }
                *lock_map(&self.epoch_seen) = Some(epoch);
            }
        }

        // 2. Idle balances go back to the ledger.
        // With many active keys each return (and the refill after it) is ledger load:
        // a key counts as idle after `idle_return × load factor`, the factor of the keys
        // used within `idle_return`. Once traffic stops, that is none: every balance
        // goes back after `idle_return`, so the ledger converges soon after.
        let (idle, idle_return): (Vec<KeyId>, Duration) = {
            let map = lock_map(&self.activity);
            metrics::gauge!(m::TRACKED_KEYS).set(map.len() as f64);
            let base = self.config.idle_return;
            let active = map
                .values()
                .filter(|a| a.last_used.elapsed() < base)
                .count();
            let factor = u32::try_from(self.load_factor(active)).unwrap_or(u32::MAX);
            let idle_return = self.config.idle_return.saturating_mul(factor);
            // While this node has traffic, a key spent every few seconds keeps its
            // balance across its gaps (a return and a refill per spend would put the
            // ledger on its every request). Once traffic stops, every balance goes back
            // after `idle_return`, as above.
            let gaps_up_to = if active > 0 {
                base.saturating_mul(MAX_IDLE_RETURNS)
            } else {
                Duration::ZERO
            };
            let idle = map
                .iter()
                .filter(|(_, a)| a.last_used.elapsed() >= keep_for(a, idle_return, gaps_up_to))
                .map(|(k, _)| k.clone())
                .collect();
            (idle, idle_return)
        };
        lock_map(&self.returned).retain(|_, r| {
            r.last_spent.elapsed() < self.config.idle_return.saturating_mul(MAX_IDLE_RETURNS)
        });
        let results = self.drain_keys(&idle, idle_return).await;
        for (key, result) in idle.into_iter().zip(results) {
            let amount = match result {
                Ok(Some(amount)) => amount,
                // Locked by another holder: kept, tried again next pass.
                Ok(None) => continue,
                Err(e) => {
                    report.key_errors += 1;
                    key_failed("drain", &key, &e);
                    continue;
                }
            };
            report.returned_credits += amount;
            report.drained_keys += 1;
            // One epoch per shard: an idle key whose shard lost its data has nothing
            // to drain; what its old epoch held is written off now, not at its next use.
            if amount == 0 && !self.hot.one_epoch() {
                if let Err(e) = self.write_off_lost_shard(&key, &mut report).await {
                    report.key_errors += 1;
                    key_failed("write off", &key, &e);
                }
            }
            let mut map = lock_map(&self.activity);
            let gone = match map.get(&key) {
                Some(a) if a.last_used.elapsed() >= idle_return => map.remove(&key),
                _ => None,
            };
            drop(map);
            if let Some(Activity {
                last_spent: Some(last_spent),
                gap,
                ..
            }) = gone
            {
                lock_map(&self.returned).insert(key, Returned { last_spent, gap });
            }
        }

        // 3. Returns whose ledger step failed.
        report.retried_returns = self.retry_failed_returns().await;

        // 4. Fences and allocations left half-done by a holder that lost its lock.
        let ttl_ms = i64::try_from(self.config.lock_ttl.as_millis()).unwrap_or(i64::MAX);
        let stale = self.clock.now_ms().saturating_sub(ttl_ms.saturating_mul(2));
        let mut keys: Vec<KeyId> = self
            .ledger
            .pending_fences(None, stale, 100)
            .await?
            .into_iter()
            .map(|f| f.key)
            .collect();
        keys.extend(
            self.ledger
                .pending_allocations(None, stale, 100)
                .await?
                .into_iter()
                .map(|a| a.key),
        );
        keys.sort();
        keys.dedup();
        for key in keys {
            let at = match self.home(&key).await {
                Ok(at) => at,
                Err(e) => {
                    report.key_errors += 1;
                    key_failed("repair", &key, &e);
                    continue;
                }
            };
            let token = match self
                .hot
                .lock(&at, self.config.lock_ttl, Duration::ZERO)
                .await
            {
                Ok(Some(token)) => token,
                Ok(None) => continue,
                Err(e) => {
                    report.key_errors += 1;
                    key_failed("repair", &key, &e.into());
                    continue;
                }
            };
            let result = async {
                let mut fences = 0;
                for f in self.ledger.pending_fences(Some(&key), i64::MAX, 16).await? {
                    self.complete_fence(&f).await?;
                    fences += 1;
                }
                let orphans = self.resolve_orphans(&key).await?;
                Ok::<_, EngineError>((fences, orphans))
            }
            .await;
            self.unlock(&at, &token).await;
            match result {
                Ok((fences, orphans)) => {
                    report.fences_completed += fences;
                    report.orphans_resolved += orphans;
                }
                Err(e) => {
                    report.key_errors += 1;
                    key_failed("repair", &key, &e);
                }
            }
        }

        // 5. Holds whose time is up return their credits.
        report.expired_holds = self.expire_due_holds().await?;

        // 6. Idempotency records older than the retention window.
        report.purged_idempotency = self
            .ledger
            .purge_idempotency(
                self.clock.now_ms().saturating_sub(IDEMPOTENCY_RETENTION_MS),
                PURGE_BATCH,
            )
            .await?;

        // 7. Entries that hold nothing and have been idle a long while.
        let expiry_ms = u64::try_from(self.config.hot_expiry.as_millis()).unwrap_or(u64::MAX);
        report.expired_entries = self.hot.expire_idle(expiry_ms).await?;
        Ok(report)
    }

    /// Runs [`Engine::reconcile_once`] every `every` until `shutdown` resolves.
    pub async fn run_reconciler(
        self: Arc<Self>,
        every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = tick.tick() => {
                    if let Err(e) = self.reconcile_once().await {
                        metrics::counter!(m::RECONCILE_ERRORS).increment(1);
                        tracing::warn!(error = %e, "reconciler pass failed");
                    }
                }
            }
        }
    }
}

/// One key's step failed: logged and counted; the loop goes on with the next key.
pub(super) fn key_failed(step: &'static str, key: &KeyId, e: &EngineError) {
    metrics::counter!(m::KEY_ERRORS, "step" => step).increment(1);
    tracing::warn!(key_id = %key, step, error = %e, "key step failed; going on with the next key");
}

/// How long `a` may stay unused before its hot balance goes back: `idle_return` (already
/// scaled by the load factor), or [`IDLE_GAPS`] of the key's own gaps if longer, at most
/// `gaps_up_to`.
fn keep_for(a: &Activity, idle_return: Duration, gaps_up_to: Duration) -> Duration {
    idle_return.max(a.gap.saturating_mul(IDLE_GAPS).min(gaps_up_to))
}
