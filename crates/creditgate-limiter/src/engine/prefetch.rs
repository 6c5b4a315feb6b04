//! Prefetch: tops up hot balances in the background before they run out, so steady
//! traffic never waits on the ledger.

use super::*;

/// Keys waiting for a prefetch; beyond it, requests are dropped (and counted).
pub(super) const PREFETCH_QUEUE: usize = 4096;
/// Prefetches running at once per node.
pub(super) const PREFETCH_CONCURRENCY: usize = 32;

impl Engine {
    /// Asks the prefetcher to top up `key`'s hot balance (never blocks; at most one
    /// request per key in flight; dropped when the queue is full).
    pub(super) fn request_prefetch(&self, key: &KeyId, cost: u64) {
        {
            let mut map = lock_map(&self.activity);
            match map.get_mut(key) {
                Some(a) if !a.prefetching => a.prefetching = true,
                _ => return,
            }
        }
        if self.prefetch_tx.try_send((key.to_owned(), cost)).is_err() {
            metrics::counter!(m::PREFETCH_DROPPED).increment(1);
            if let Some(a) = lock_map(&self.activity).get_mut(key) {
                a.prefetching = false;
            }
        }
    }

    /// Tops up hot balances in the background so spends under steady load never wait
    /// for the ledger: up to `PREFETCH_CONCURRENCY` refills at once. Runs until
    /// `shutdown`; refills in progress then finish.
    pub async fn run_prefetcher(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let Some(mut rx) = lock_map(&self.prefetch_rx).take() else {
            return;
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(PREFETCH_CONCURRENCY));
        tokio::pin!(shutdown);
        loop {
            let (key, cost) = tokio::select! {
                _ = &mut shutdown => break,
                next = rx.recv() => match next {
                    Some(next) => next,
                    None => break,
                },
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let engine = self.clone();
            tokio::spawn(async move {
                if let Err(e) = engine.prefetch(&key, cost).await {
                    tracing::debug!(key_id = %key, error = %e, "prefetch failed");
                }
                if let Some(a) = lock_map(&engine.activity).get_mut(&key) {
                    a.prefetching = false;
                }
                drop(permit);
            });
        }
        // Let refills in flight finish (bounded by the engine's own call timeouts).
        let _ = permits
            .acquire_many(u32::try_from(PREFETCH_CONCURRENCY).unwrap_or(u32::MAX))
            .await;
    }

    pub(super) async fn prefetch(&self, key: &KeyId, cost: u64) -> Result<(), EngineError> {
        let Some(token) = self
            .hot
            .lock(key, self.config.lock_ttl, Duration::ZERO)
            .await?
        else {
            return Ok(());
        };
        let result = async {
            let Some(entry) = self.hot.peek(key).await? else {
                return Ok(());
            };
            let chunk = self.chunk_for(key, cost);
            if entry.unalloc.is_none() || entry.bal.saturating_mul(2) >= chunk {
                return Ok(());
            }
            let epoch = self.hot.epoch().await?;
            let transfer_id = new_id_for_transfer("prefetch");
            let req = AllocateRequest {
                key,
                transfer_id: &transfer_id,
                generation: Some(entry.generation),
                epoch: &epoch,
                need: 0,
                chunk,
                now_ms: self.clock.now_ms(),
            };
            if let AllocateOutcome::Granted {
                amount,
                remaining,
                generation,
                version,
                lost,
            } = self.ledger.allocate(&req).await?
            {
                self.report_lost(key, lost);
                metrics::counter!(m::PREFETCHES).increment(1);
                let credit = Credit {
                    transfer_id: &transfer_id,
                    generation,
                    amount,
                    unalloc: remaining,
                    version,
                };
                self.credit_allocation(key, &credit).await?;
            }
            Ok(())
        }
        .await;
        self.unlock(key, &token).await;
        result
    }
}
