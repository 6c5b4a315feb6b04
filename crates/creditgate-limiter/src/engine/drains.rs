//! Returns of hot balances to the ledger: idle keys, shutdown, and the bounded queue of
//! returns whose ledger step failed.

use super::*;

impl Engine {
    /// Returns one key's hot balance to the ledger if it has been idle `min_idle`.
    pub(super) async fn drain_key(
        &self,
        key: &KeyId,
        min_idle: Duration,
    ) -> Result<u64, EngineError> {
        let Some(token) = self
            .hot
            .lock(key, self.config.lock_ttl, Duration::ZERO)
            .await?
        else {
            return Ok(0);
        };
        let min_idle_ms = u64::try_from(min_idle.as_millis()).unwrap_or(u64::MAX);
        let transfer_id = new_id_for_transfer("drain");
        let result = self.hot.drain(key, &transfer_id, min_idle_ms).await;
        let out = match result {
            Ok(d) if d.amount > 0 || d.spent > 0 => {
                self.return_to_ledger(key, &transfer_id, d).await;
                Ok(d.amount)
            }
            Ok(_) => Ok(0),
            Err(e) => Err(e.into()),
        };
        self.unlock(key, &token).await;
        out
    }

    /// Ledger step of a drain; on failure the amount is queued for retry.
    pub(super) async fn return_to_ledger(&self, key: &KeyId, transfer_id: &str, d: Drained) {
        match self.ledger.return_drained(key, transfer_id, d).await {
            Ok(state) => {
                metrics::counter!(m::RETURNED_CREDITS).increment(d.amount);
                self.sync(key, &state).await;
            }
            Err(e) => {
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
        }
    }

    /// Returns every hot balance this node touched (shutdown). A key whose drain fails
    /// is logged and counted and the others go on; its balance stays in the hot store
    /// (spendable, and returned by a reconciler that sees it idle). Returns the credits
    /// returned, or, when some keys failed, an error saying how many.
    pub async fn drain_all(&self) -> Result<u64, EngineError> {
        let keys: Vec<KeyId> = lock_map(&self.activity).keys().cloned().collect();
        let mut total = 0;
        let mut failed = 0usize;
        for key in keys {
            match self.drain_key(&key, Duration::ZERO).await {
                Ok(amount) => {
                    total += amount;
                    lock_map(&self.activity).remove(&key);
                }
                Err(e) => {
                    failed += 1;
                    super::reconciler::key_failed("drain", &key, &e);
                }
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
