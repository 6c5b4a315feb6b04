//! Returns of hot balances to the ledger: idle keys, shutdown, and the bounded queue of
//! returns whose ledger step failed.

use super::*;

/// Keys returned to the ledger in one transaction.
const DRAIN_BATCH: usize = 256;

/// One key's drain after its hot-store steps.
enum DrainStep {
    /// Nothing to return to the ledger; the key's result.
    Decided(Result<Option<u64>, EngineError>),
    /// Drained under the lock: the ledger step is next.
    Drained(LockToken, String, Drained),
}

impl Engine {
    /// Returns the hot balances of `keys` idle for `min_idle` to the ledger: each is
    /// drained under its lock, then all of them go back in one ledger call (group
    /// commit). One result per key, in order: the credits returned.
    pub(super) async fn drain_keys(
        &self,
        keys: &[KeyId],
        min_idle: Duration,
    ) -> Vec<Result<Option<u64>, EngineError>> {
        let mut results = Vec::with_capacity(keys.len());
        // Bounded batches, so no lock is held for long.
        for batch in keys.chunks(DRAIN_BATCH) {
            results.extend(self.drain_batch(batch, min_idle).await);
        }
        results
    }

    async fn drain_batch(
        &self,
        keys: &[KeyId],
        min_idle: Duration,
    ) -> Vec<Result<Option<u64>, EngineError>> {
        let min_idle_ms = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        // One key after another: run at once (32 keys), the drains of a pass over many
        // keys left some keys undrained after a Redis Cluster failover (not understood
        // yet; see docs/RELIABILITY.md).
        let mut results: Vec<Result<Option<u64>, EngineError>> = Vec::with_capacity(keys.len());
        // (index into keys, lock, transfer id, what was drained)
        let mut drained: Vec<(usize, LockToken, String, Drained)> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            match self.drain_locked(key, min_idle_ms).await {
                DrainStep::Decided(r) => results.push(r),
                DrainStep::Drained(token, transfer_id, d) => {
                    results.push(Ok(Some(0)));
                    drained.push((i, token, transfer_id, d));
                }
            }
        }
        let accounts: Vec<KeyId> = drained
            .iter()
            .map(|(i, ..)| account_of(&keys[*i]))
            .collect();
        let items: Vec<(&KeyId, &str, Drained)> = drained
            .iter()
            .zip(&accounts)
            .map(|((_, _, id, d), account)| (account, id.as_str(), *d))
            .collect();
        let returned = self.ledger.return_many(&items).await;
        for ((i, token, transfer_id, d), result) in drained.iter().zip(returned) {
            let key = &keys[*i];
            self.returned(key, transfer_id, *d, result).await;
            results[*i] = Ok(Some(d.amount));
            self.unlock(key, token).await;
        }
        results
    }

    /// The hot-store part of one key's drain: its lock, then the drain. `Drained`
    /// holds the lock for the ledger step; `Decided(Ok(None))`: another holder has the
    /// lock, or credits are there that another node used recently (tried again on the
    /// next pass).
    async fn drain_locked(&self, key: &KeyId, min_idle_ms: u64) -> DrainStep {
        let token = match self
            .hot
            .lock(key, self.config.lock_ttl, Duration::ZERO)
            .await
        {
            Ok(Some(token)) => token,
            Ok(None) => return DrainStep::Decided(Ok(None)),
            Err(e) => return DrainStep::Decided(Err(e.into())),
        };
        let transfer_id = drain_transfer_id();
        let decided = match self.hot.drain(key, &transfer_id, min_idle_ms).await {
            Ok(d) if d.amount > 0 || d.spent > 0 => {
                return DrainStep::Drained(token, transfer_id, d)
            }
            // Nothing drained: an earlier drain whose ledger step failed (on any node)
            // is completed now...
            Ok(_) => match self.hot.pending_return(key).await {
                Ok(Some((earlier, d))) => return DrainStep::Drained(token, earlier, d),
                Err(e) => Err(e.into()),
                // ...else credits there mean another node used or refilled the key
                // recently: kept, so they are returned once it is idle.
                Ok(None) => match self.hot.peek(key).await {
                    Ok(Some(e)) if e.bal > 0 || e.spent > 0 => Ok(None),
                    _ => Ok(Some(0)),
                },
            },
            Err(e) => Err(e.into()),
        };
        self.unlock(key, &token).await;
        DrainStep::Decided(decided)
    }

    /// Ledger step of a drain; on failure the amount is queued for retry.
    pub(super) async fn return_to_ledger(&self, key: &KeyId, transfer_id: &str, d: Drained) {
        let result = self
            .ledger
            .return_drained(&account_of(key), transfer_id, d)
            .await;
        self.returned(key, transfer_id, d, result).await;
    }

    /// After the ledger step of a drain: refresh the snapshot, or queue it for retry.
    async fn returned(
        &self,
        key: &KeyId,
        transfer_id: &str,
        d: Drained,
        result: Result<LedgerState, LedgerError>,
    ) {
        match result {
            Ok(state) => {
                metrics::counter!(m::RETURNED_CREDITS).increment(d.amount);
                if let Err(e) = self.hot.returned(key, transfer_id).await {
                    // The record stays: whoever finds it returns it again, which the
                    // ledger applies once.
                    tracing::warn!(key_id = %key, error = %e, "could not clear a return's record");
                }
                self.sync_after_return(key, &state).await;
            }
            Err(e) => self.queue_failed_return(key, transfer_id, d, &e),
        }
    }

    /// The snapshot after credits came back to the ledger. At a pool's home
    /// (`<key>@<pool>`) with nothing left handed out, the ledger names no home any more:
    /// the balance may next change at another one, so the snapshot here is marked
    /// unknown instead of refreshed (a spend here then asks the ledger).
    pub(super) async fn sync_after_return(&self, key: &KeyId, state: &LedgerState) {
        if state.hot_allocated == 0 && !crate::ports::split_address(key).1.is_empty() {
            if let Err(e) = self.hot.sync_unalloc(key, None, 0).await {
                tracing::warn!(key_id = %key, error = %e, "could not mark the hot snapshot unknown");
            }
            return;
        }
        self.sync(key, state).await;
    }

    /// A drained amount whose ledger step failed, kept for the reconciler to retry.
    pub(super) fn queue_failed_return(
        &self,
        key: &KeyId,
        transfer_id: &str,
        d: Drained,
        e: &LedgerError,
    ) {
        tracing::warn!(key_id = %key, amount = d.amount, error = %e, "return failed; will retry");
        let mut q = lock_map(&self.failed_returns);
        if q.len() >= self.config.max_failed_returns {
            metrics::counter!(m::RETURNS_DROPPED).increment(1);
            tracing::error!(
                key_id = %key,
                amount = d.amount,
                "return queue full: credits stay out of the ledger"
            );
        } else {
            q.push_back((key.to_owned(), transfer_id.to_owned(), d));
        }
        metrics::gauge!(m::RETURNS_QUEUED).set(q.len() as f64);
    }

    /// Returns every hot balance this node touched (shutdown). A key whose drain fails
    /// is logged and counted and the others go on; its balance stays in the hot store
    /// (spendable, and returned by a reconciler that sees it idle). Returns the credits
    /// returned, or, when some keys failed, an error saying how many.
    pub async fn drain_all(&self) -> Result<u64, EngineError> {
        let mut keys: Vec<KeyId> = lock_map(&self.activity).keys().cloned().collect();
        let mut total = 0;
        let mut failed = 0usize;
        // A key whose lock another holder has (a refill in flight) is tried again until
        // the lock's ttl: skipped, its credits would stay in the hot store.
        let deadline = Instant::now() + self.config.lock_ttl;
        while !keys.is_empty() {
            let results = self.drain_keys(&keys, Duration::ZERO).await;
            let mut locked = Vec::new();
            for (key, result) in keys.into_iter().zip(results) {
                match result {
                    Ok(Some(amount)) => {
                        total += amount;
                        lock_map(&self.activity).remove(&key);
                    }
                    Ok(None) if Instant::now() < deadline => locked.push(key),
                    Ok(None) => {
                        failed += 1;
                        tracing::warn!(key_id = %key, "drain: the key stayed locked; its hot balance stays for a reconciler");
                    }
                    Err(e) => {
                        failed += 1;
                        super::reconciler::key_failed("drain", &key, &e);
                    }
                }
            }
            keys = locked;
            if !keys.is_empty() {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        self.retry_failed_returns().await;
        if failed > 0 {
            return Err(EngineError::Unavailable(format!(
                "{failed} keys could not be drained; {total} credits were returned"
            )));
        }
        Ok(total)
    }

    pub(super) async fn retry_failed_returns(&self) -> usize {
        let batch: Vec<_> = lock_map(&self.failed_returns).drain(..).collect();
        let n = batch.len();
        metrics::counter!(m::RETURNS_RETRIED).increment(n as u64);
        for (key, transfer_id, d) in batch {
            self.return_to_ledger(&key, &transfer_id, d).await;
        }
        n
    }
}
