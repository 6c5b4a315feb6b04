//! Prefetch: tops up hot balances in the background before they run out, so steady
//! traffic never waits on the ledger.

use super::*;

/// Keys waiting for a prefetch; beyond it, requests are dropped (and counted).
pub(super) const PREFETCH_QUEUE: usize = 4096;
/// Prefetches running at once per node.
pub(super) const PREFETCH_CONCURRENCY: usize = 4;
/// Keys refilled together in one batch (one ledger transaction for all of them).
pub(super) const PREFETCH_BATCH: usize = 128;
/// How long the prefetcher waits for more keys to join a batch.
pub(super) const PREFETCH_GATHER: Duration = Duration::from_millis(2);

/// A key of a prefetch batch whose lock this node holds.
struct Locked {
    key: KeyId,
    token: LockToken,
    /// `(generation, chunk)` when it needs a top-up.
    wanted: Option<(u64, u64)>,
}

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
    /// for the ledger. Keys asking for a top-up within `PREFETCH_GATHER` of each other
    /// (up to `PREFETCH_BATCH`) are refilled together: one ledger transaction for their
    /// allocations and one for their settlements (group commit), however many keys are
    /// active. Up to `PREFETCH_CONCURRENCY` batches run at once. Runs until `shutdown`;
    /// batches in progress then finish.
    pub async fn run_prefetcher(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        let Some(mut rx) = lock_map(&self.prefetch_rx).take() else {
            return;
        };
        let permits = Arc::new(tokio::sync::Semaphore::new(PREFETCH_CONCURRENCY));
        tokio::pin!(shutdown);
        loop {
            let first = tokio::select! {
                _ = &mut shutdown => break,
                next = rx.recv() => match next {
                    Some(next) => next,
                    None => break,
                },
            };
            let mut batch = vec![first];
            let gather_until = Instant::now() + PREFETCH_GATHER;
            while batch.len() < PREFETCH_BATCH {
                match tokio::time::timeout_at(gather_until, rx.recv()).await {
                    Ok(Some(next)) => batch.push(next),
                    Ok(None) | Err(_) => break,
                }
            }
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let engine = self.clone();
            tokio::spawn(async move {
                engine.prefetch_batch(&batch).await;
                let mut map = lock_map(&engine.activity);
                for (key, _) in &batch {
                    if let Some(a) = map.get_mut(key) {
                        a.prefetching = false;
                    }
                }
                drop(map);
                drop(permit);
            });
        }
        // Let batches in flight finish (bounded by the engine's own call timeouts).
        let _ = permits
            .acquire_many(u32::try_from(PREFETCH_CONCURRENCY).unwrap_or(u32::MAX))
            .await;
    }

    /// Tops up the hot balances of `batch` (key, cost): under each key's lock, the keys
    /// whose balance is below half a chunk get one allocation each, all in one ledger
    /// call, are credited in the hot store, and settled in one more ledger call.
    pub(super) async fn prefetch_batch(self: &Arc<Self>, batch: &[(KeyId, u64)]) {
        // Lock and look at every key at once (each is a hot-store round trip).
        let mut looks = tokio::task::JoinSet::new();
        for (key, cost) in batch {
            let (engine, key, cost) = (self.clone(), key.clone(), *cost);
            looks.spawn(async move {
                let look = engine.prefetch_look(&key, cost).await;
                (key, look)
            });
        }
        let mut locked: Vec<Locked> = Vec::new();
        while let Some(joined) = looks.join_next().await {
            match joined {
                Ok((key, Ok(Some((token, wanted))))) => locked.push(Locked { key, token, wanted }),
                Ok((_, Ok(None))) => {}
                Ok((key, Err(e))) => {
                    tracing::debug!(key_id = %key, error = %e, "prefetch failed");
                }
                Err(e) => tracing::warn!(error = %e, "prefetch task failed"),
            }
        }
        if let Err(e) = self.prefetch_locked(&locked).await {
            tracing::debug!(keys = locked.len(), error = %e, "prefetch failed");
        }
        for l in &locked {
            self.unlock(&l.key, &l.token).await;
        }
    }

    /// Takes `key`'s lock (not waiting) and decides whether it needs a top-up: `None` if
    /// the lock is busy; with the lock, `Some((generation, chunk))` if it does.
    async fn prefetch_look(
        &self,
        key: &KeyId,
        cost: u64,
    ) -> Result<Option<(LockToken, Option<(u64, u64)>)>, EngineError> {
        let Some(token) = self
            .hot
            .lock(key, self.config.lock_ttl, Duration::ZERO)
            .await?
        else {
            return Ok(None);
        };
        let chunk = self.chunk_for(key, cost);
        let wanted = match self.hot.peek(key).await {
            Ok(Some(entry)) if entry.unalloc.is_some() && entry.bal.saturating_mul(2) < chunk => {
                Some((entry.generation, chunk))
            }
            Ok(_) => None,
            Err(e) => {
                self.unlock(key, &token).await;
                return Err(e.into());
            }
        };
        Ok(Some((token, wanted)))
    }

    /// The ledger and credit steps of a batch, with every key's lock held.
    async fn prefetch_locked(&self, locked: &[Locked]) -> Result<(), EngineError> {
        let wanted: Vec<(&KeyId, u64, u64)> = locked
            .iter()
            .filter_map(|l| {
                l.wanted
                    .map(|(generation, chunk)| (&l.key, generation, chunk))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        let epochs: Vec<String> = if self.hot.one_epoch() {
            vec![self.hot.epoch().await?; wanted.len()]
        } else {
            futures_util::future::try_join_all(
                wanted.iter().map(|(key, _, _)| self.hot.epoch_of(key)),
            )
            .await?
        };
        let now_ms = self.clock.now_ms();
        let ids: Vec<String> = wanted
            .iter()
            .map(|_| new_id_for_transfer("prefetch"))
            .collect();
        // Hot-store addresses in `wanted`, ledger accounts in the requests.
        let accounts: Vec<KeyId> = wanted.iter().map(|(key, ..)| account_of(key)).collect();
        let reqs: Vec<AllocateRequest<'_>> = wanted
            .iter()
            .zip(&accounts)
            .zip(&ids)
            .zip(&epochs)
            .map(
                |(((&(_, generation, chunk), key), transfer_id), epoch)| AllocateRequest {
                    key,
                    transfer_id,
                    generation: Some(generation),
                    epoch,
                    need: 0,
                    chunk,
                    now_ms,
                },
            )
            .collect();
        let outcomes = self.ledger.allocate_many(&reqs).await;
        let mut settlements = Vec::new();
        for ((&(address, ..), req), outcome) in wanted.iter().zip(&reqs).zip(outcomes) {
            let Ok(AllocateOutcome::Granted {
                amount,
                remaining,
                generation,
                version,
                lost,
            }) = outcome
            else {
                continue;
            };
            self.report_lost(req.key, lost);
            metrics::counter!(m::PREFETCHES).increment(1);
            let credit = Credit {
                transfer_id: req.transfer_id,
                generation,
                amount,
                unalloc: remaining,
                version,
                epoch: req.epoch,
            };
            // A failed or ambiguous credit leaves the allocation pending: the reconciler
            // asks the hot store what became of it.
            match self.hot.credit(address, &credit).await {
                Ok(reply) => {
                    let (credited, spent) = settlement(reply);
                    if credited {
                        self.note_report(address, spent);
                    }
                    settlements.push(Settlement {
                        key: req.key,
                        transfer_id: req.transfer_id,
                        credited,
                        spent,
                    });
                }
                Err(e) => {
                    tracing::debug!(key_id = %req.key, error = %e, "prefetch credit failed");
                }
            }
        }
        for (s, result) in settlements
            .iter()
            .zip(self.ledger.settle_many(&settlements).await)
        {
            if let Err(e) = result {
                tracing::warn!(key_id = %s.key, error = %e, "settling an allocation failed; the reconciler resolves it");
            }
        }
        Ok(())
    }
}
