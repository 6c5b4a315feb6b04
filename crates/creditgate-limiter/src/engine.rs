//! The escrow engine (DESIGN.md §3): spends on the hot store, refills it from the ledger
//! under a per-key lock, fences it for set / decrement / periodic refill, returns idle
//! balances, and repairs what a crash left half-done.
//!
//! Over-spend is impossible by construction: each credit is held either by the ledger
//! (`remaining`) or by the hot store (`bal`), credits move between the two only by
//! idempotent transfers, and each owner spends only what it holds.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use creditgate_domain::{new_id_for_transfer, Clock, Credits};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::metrics as m;
use crate::ports::{
    AllocateOutcome, AllocateRequest, BeginFence, CreditReply, DirectSpend, Drained, FenceOp,
    HotError, HotStore, IncrementOutcome, Ledger, LedgerError, LedgerState, LockToken,
    PendingFence, SpendReply, TransferFate,
};

/// Tuning of the engine. Every wait has a bound.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How long a refill lock lives if its holder never releases it.
    pub lock_ttl: Duration,
    /// How long one verification waits for another's refill before retrying.
    pub lock_wait: Duration,
    /// Upper bound on one verification's time in the engine.
    pub spend_deadline: Duration,
    /// A key idle this long has its hot balance returned to the ledger.
    pub idle_return: Duration,
    /// Drained entries idle this long are removed from the hot store.
    pub hot_expiry: Duration,
    /// Smallest allocation, in requests of the current cost.
    pub min_chunk_requests: u64,
    /// Largest allocation in credits (the bound on what a lost hot store can lose).
    pub max_chunk: u64,
    /// Drained amounts whose ledger step failed, kept for retry (beyond: counted, logged).
    pub max_failed_returns: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            lock_ttl: Duration::from_secs(5),
            lock_wait: Duration::from_millis(50),
            spend_deadline: Duration::from_secs(5),
            idle_return: Duration::from_secs(2),
            hot_expiry: Duration::from_secs(60),
            min_chunk_requests: 10,
            max_chunk: 1_000_000_000,
            max_failed_returns: 100_000,
        }
    }
}

/// The decision on one spend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Spent. `remaining` is the exact balance after it (`None`: unlimited).
    Valid { remaining: Option<u64> },
    /// Not spent; `remaining` is the exact, unchanged balance.
    Exceeded { remaining: u64 },
    /// No ledger row for this key.
    NotFound,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum EngineError {
    /// Neither the hot store nor the ledger could decide (fail closed).
    #[error("backends unavailable: {0}")]
    Unavailable(String),
    /// The hot store may have applied the call: never retried as a second spend.
    #[error("hot store outcome unknown: {0}")]
    Ambiguous(String),
    #[error("key is busy: {0}")]
    Busy(String),
    #[error("no ledger row for key")]
    NotFound,
    #[error("increment would exceed the maximum balance of {max}")]
    Overflow { max: u64 },
    #[error("the key has unlimited credits")]
    Unlimited,
    #[error("engine error: {0}")]
    Internal(String),
}

impl From<LedgerError> for EngineError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Unavailable(s) => EngineError::Unavailable(s),
            LedgerError::Other(s) => EngineError::Internal(s),
        }
    }
}

impl From<HotError> for EngineError {
    fn from(e: HotError) -> Self {
        match e {
            HotError::Unreachable(s) => EngineError::Unavailable(s),
            HotError::Ambiguous(s) => EngineError::Ambiguous(s),
            HotError::Other(s) => EngineError::Internal(s),
        }
    }
}

/// A change of a key's balance through `keys.updateCredits`, `updateKey` or a refill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditOp {
    Set(Option<u64>),
    Increment(u64),
    Decrement(u64),
    Refill { amount: u64, period_start: i64 },
}

/// Per-key activity seen by this node: spend rate (for chunk sizing) and last use
/// (for the idle return).
#[derive(Debug)]
struct Activity {
    window_start: Instant,
    window_credits: u64,
    rate_per_sec: u64,
    last_used: Instant,
    /// A prefetch for this key is queued or running.
    prefetching: bool,
}

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
}

pub struct Engine {
    hot: Arc<dyn HotStore>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    activity: Mutex<HashMap<String, Activity>>,
    failed_returns: Mutex<VecDeque<(String, String, Drained)>>,
    epoch_seen: Mutex<Option<String>>,
    prefetch_tx: mpsc::Sender<(String, u64)>,
    prefetch_rx: Mutex<Option<mpsc::Receiver<(String, u64)>>>,
}

/// Keys waiting for a prefetch; beyond it, requests are dropped (and counted).
const PREFETCH_QUEUE: usize = 4096;
/// Prefetches running at once per node.
const PREFETCH_CONCURRENCY: usize = 32;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish()
    }
}

/// (credited, spends reported with the credit) for `settle_allocation`.
fn settlement(reply: CreditReply) -> (bool, u64) {
    match reply {
        CreditReply::Credited { spent } => (true, spent),
        CreditReply::Duplicate => (true, 0),
        CreditReply::Refused => (false, 0),
    }
}

fn lock_map<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    pub fn new(
        hot: Arc<dyn HotStore>,
        ledger: Arc<dyn Ledger>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> Self {
        let (prefetch_tx, prefetch_rx) = mpsc::channel(PREFETCH_QUEUE);
        Self {
            prefetch_tx,
            prefetch_rx: Mutex::new(Some(prefetch_rx)),
            hot,
            ledger,
            clock,
            config,
            activity: Mutex::new(HashMap::new()),
            failed_returns: Mutex::new(VecDeque::new()),
            epoch_seen: Mutex::new(None),
        }
    }

    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    pub fn hot(&self) -> &Arc<dyn HotStore> {
        &self.hot
    }

    /// Spends `cost` from `key`'s balance, or says exactly why not.
    #[tracing::instrument(level = "debug", skip(self), fields(key_id = key))]
    pub async fn spend(&self, key: &str, cost: u64) -> Result<Decision, EngineError> {
        let deadline = Instant::now() + self.config.spend_deadline;
        loop {
            match self.hot.spend(key, cost).await {
                Ok(SpendReply::Valid { remaining, bal }) => {
                    let chunk = self.note_spend(key, cost);
                    if bal.saturating_mul(2) < chunk && remaining > bal {
                        self.request_prefetch(key, cost);
                    }
                    return Ok(Decision::Valid {
                        remaining: Some(remaining),
                    });
                }
                Ok(SpendReply::Exceeded { remaining }) => {
                    return Ok(Decision::Exceeded { remaining });
                }
                Ok(SpendReply::Low { .. } | SpendReply::Miss) => {}
                Err(HotError::Unreachable(e)) => return self.spend_direct(key, cost, &e).await,
                Err(e) => return Err(e.into()),
            }
            if let Some(decision) = self.refill_and_spend(key, cost).await? {
                if matches!(decision, Decision::Valid { remaining: Some(_) }) {
                    self.note_spend(key, cost);
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

    /// The hot store is unreachable: one atomic conditional update on the ledger, which
    /// never touches credits the hot store holds.
    async fn spend_direct(&self, key: &str, cost: u64, why: &str) -> Result<Decision, EngineError> {
        metrics::counter!(m::DIRECT_SPENDS).increment(1);
        tracing::warn!(
            key_id = key,
            error = why,
            "hot store unreachable, spending on the ledger"
        );
        Ok(match self.ledger.spend_direct(key, cost).await? {
            DirectSpend::Valid { remaining } => Decision::Valid {
                remaining: Some(remaining),
            },
            DirectSpend::Exceeded { remaining } => Decision::Exceeded { remaining },
            DirectSpend::Unlimited => Decision::Valid { remaining: None },
            DirectSpend::NotFound => Decision::NotFound,
        })
    }

    /// Under the key's lock: spend again, else move credits from the ledger and spend.
    /// `None` when another holder had the lock (the caller retries its spend).
    async fn refill_and_spend(
        &self,
        key: &str,
        cost: u64,
    ) -> Result<Option<Decision>, EngineError> {
        let Some(token) = self
            .hot
            .lock(key, self.config.lock_ttl, self.config.lock_wait)
            .await?
        else {
            return Ok(None);
        };
        let result = self.refill_locked(key, cost).await;
        self.unlock(key, &token).await;
        result.map(Some)
    }

    async fn unlock(&self, key: &str, token: &LockToken) {
        if let Err(e) = self.hot.unlock(key, token).await {
            tracing::warn!(key_id = key, error = %e, "unlock failed; the lock will expire");
        }
    }

    async fn refill_locked(&self, key: &str, cost: u64) -> Result<Decision, EngineError> {
        let started = Instant::now();
        self.settle_pending(key).await?;
        // Spenders on other nodes may take a fresh chunk before our own spend does (they
        // need no lock): keep moving chunks, doubling them, until ours succeeds, the ledger
        // runs dry, or the lock's lifetime is near.
        let mut boost = 1u64;
        while started.elapsed() < self.config.lock_ttl / 2 {
            let (generation, bal) = match self.hot.spend(key, cost).await? {
                SpendReply::Valid { remaining, .. } => {
                    return Ok(Decision::Valid {
                        remaining: Some(remaining),
                    })
                }
                SpendReply::Exceeded { remaining } => return Ok(Decision::Exceeded { remaining }),
                SpendReply::Low { bal, generation } => (Some(generation), bal),
                SpendReply::Miss => (None, 0),
            };
            let need = cost.saturating_sub(bal);
            let epoch = self.hot.epoch().await?;
            let transfer_id = new_id_for_transfer("alloc");
            let req = AllocateRequest {
                key,
                transfer_id: &transfer_id,
                generation,
                epoch: &epoch,
                need,
                chunk: self.chunk_for(key, cost).saturating_mul(boost),
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
                    self.report_lost(key, lost);
                    metrics::counter!(m::ALLOCATIONS).increment(1);
                    if started.elapsed() >= self.config.lock_ttl {
                        // Our lock may have expired: leave the allocation to the reconciler.
                        return Err(EngineError::Busy("refill took longer than the lock".into()));
                    }
                    let reply = self
                        .hot
                        .credit(key, &transfer_id, generation, amount, remaining, version)
                        .await?;
                    let (credited, spent) = settlement(reply);
                    if let Err(e) = self
                        .ledger
                        .settle_allocation(key, &transfer_id, credited, spent)
                        .await
                    {
                        // Left pending: the reconciler resolves it.
                        tracing::warn!(key_id = key, error = %e, "settling an allocation failed");
                    }
                }
                AllocateOutcome::Insufficient {
                    remaining,
                    generation,
                    version,
                    lost,
                } => {
                    self.report_lost(key, lost);
                    // Seed or refresh the snapshot so the next requests are answered by
                    // the hot store alone.
                    let seed = new_id_for_transfer("seed");
                    self.hot
                        .credit(key, &seed, generation, 0, remaining, version)
                        .await?;
                    return Ok(Decision::Exceeded {
                        remaining: bal.saturating_add(remaining),
                    });
                }
                AllocateOutcome::GenerationMoved { generation } => {
                    self.align_generation(key, generation).await?;
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

    /// Allocation size: about one second of this key's spend on this node, at least
    /// `min_chunk_requests` requests, at most `max_chunk` (and never more than the ledger
    /// holds, which the ledger enforces).
    fn chunk_for(&self, key: &str, cost: u64) -> u64 {
        let rate = lock_map(&self.activity)
            .get(key)
            .map_or(0, |a| a.rate_per_sec);
        self.chunk_from_rate(rate, cost)
    }

    fn chunk_from_rate(&self, rate: u64, cost: u64) -> u64 {
        rate.max(cost.saturating_mul(self.config.min_chunk_requests))
            .min(self.config.max_chunk)
            .max(cost)
    }

    /// Records a spend; returns the chunk size this key's refills now use.
    fn note_spend(&self, key: &str, cost: u64) -> u64 {
        let now = Instant::now();
        let mut map = lock_map(&self.activity);
        let a = map.entry(key.to_owned()).or_insert_with(|| Activity {
            window_start: now,
            window_credits: 0,
            rate_per_sec: 0,
            last_used: now,
            prefetching: false,
        });
        a.last_used = now;
        a.window_credits = a.window_credits.saturating_add(cost);
        let elapsed = now.duration_since(a.window_start);
        if elapsed >= Duration::from_secs(1) {
            let ms = u64::try_from(elapsed.as_millis())
                .unwrap_or(u64::MAX)
                .max(1);
            a.rate_per_sec = a.window_credits.saturating_mul(1000) / ms;
            a.window_start = now;
            a.window_credits = 0;
        }
        let rate = a.rate_per_sec;
        drop(map);
        self.chunk_from_rate(rate, cost)
    }

    /// Asks the prefetcher to top up `key`'s hot balance (never blocks; at most one
    /// request per key in flight; dropped when the queue is full).
    fn request_prefetch(&self, key: &str, cost: u64) {
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

    async fn prefetch(&self, key: &str, cost: u64) -> Result<(), EngineError> {
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
                let reply = self
                    .hot
                    .credit(key, &transfer_id, generation, amount, remaining, version)
                    .await?;
                let (credited, spent) = settlement(reply);
                self.ledger
                    .settle_allocation(key, &transfer_id, credited, spent)
                    .await?;
            }
            Ok(())
        }
        .await;
        self.unlock(key, &token).await;
        result
    }

    fn report_lost(&self, key: &str, lost: u64) {
        if lost > 0 {
            metrics::counter!(m::LOST_CREDITS).increment(lost);
            tracing::error!(
                key_id = key,
                lost,
                "hot store lost its data: up to this many credits it held are written off, not re-issued"
            );
        }
    }

    /// The ledger is at a newer generation than the hot entry and no fence is pending
    /// (it was completed elsewhere): adopt the generation, returning what the entry held.
    async fn align_generation(&self, key: &str, generation: u64) -> Result<(), EngineError> {
        if !self
            .ledger
            .pending_fences(Some(key), i64::MAX, 16)
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
    async fn settle_pending(&self, key: &str) -> Result<(), EngineError> {
        for fence in self.ledger.pending_fences(Some(key), i64::MAX, 16).await? {
            self.complete_fence(&fence).await?;
        }
        self.resolve_orphans(key).await?;
        Ok(())
    }

    async fn resolve_orphans(&self, key: &str) -> Result<usize, EngineError> {
        let orphans = self
            .ledger
            .pending_allocations(Some(key), i64::MAX, 64)
            .await?;
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
                .settle_allocation(key, &a.transfer_id, credited, spent)
                .await?;
            metrics::counter!(m::ORPHANS_RESOLVED).increment(1);
        }
        if cancelled {
            if let Some(state) = self.ledger.state(key).await? {
                self.sync(key, &state).await;
            }
        }
        Ok(orphans.len())
    }

    async fn complete_fence(&self, fence: &PendingFence) -> Result<LedgerState, EngineError> {
        let drained = self.hot.fence(&fence.key, fence.generation).await?;
        self.resolve_orphans(&fence.key).await?;
        let state = self.ledger.finish_fence(fence, drained).await?;
        self.sync(&fence.key, &state).await;
        Ok(state)
    }

    async fn sync(&self, key: &str, state: &LedgerState) {
        if let Some(r) = state.remaining {
            if let Err(e) = self.hot.sync_unalloc(key, Some(r), state.version).await {
                tracing::warn!(key_id = key, error = %e, "could not refresh the hot snapshot");
            }
        }
    }

    /// Applies a balance change exactly: a spend in flight is counted either before or
    /// after it. Returns the ledger state after the change (`NotDue` refills: unchanged).
    #[tracing::instrument(level = "debug", skip(self), fields(key_id = key))]
    pub async fn update(&self, key: &str, op: CreditOp) -> Result<LedgerState, EngineError> {
        let deadline = Instant::now() + self.config.spend_deadline;
        let token = loop {
            if let Some(t) = self
                .hot
                .lock(key, self.config.lock_ttl, self.config.lock_wait)
                .await?
            {
                break t;
            }
            if Instant::now() >= deadline {
                return Err(EngineError::Busy("the key's lock stayed held".into()));
            }
        };
        let result = self.update_locked(key, op).await;
        self.unlock(key, &token).await;
        result
    }

    async fn update_locked(&self, key: &str, op: CreditOp) -> Result<LedgerState, EngineError> {
        self.settle_pending(key).await?;
        let fence_op = match op {
            CreditOp::Increment(v) => {
                // Mark the snapshot unknown first, so no node answers USAGE_EXCEEDED from a
                // snapshot older than the increment.
                self.hot.sync_unalloc(key, None, 0).await?;
                let state = match self.ledger.increment(key, v, Credits::MAX).await? {
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
            CreditOp::Set(v) => FenceOp::Set(v),
            CreditOp::Decrement(v) => FenceOp::Decrement(v),
            CreditOp::Refill {
                amount,
                period_start,
            } => FenceOp::Refill {
                amount,
                period_start,
            },
        };
        let op_id = new_id_for_transfer("fence");
        match self
            .ledger
            .begin_fence(key, &op_id, fence_op, self.clock.now_ms())
            .await?
        {
            BeginFence::Begun(fence) => {
                metrics::counter!(m::FENCES).increment(1);
                self.complete_fence(&fence).await
            }
            BeginFence::NotDue => self.ledger.state(key).await?.ok_or(EngineError::NotFound),
            BeginFence::NotFound => Err(EngineError::NotFound),
        }
    }

    /// The exact balance now (`None`: unlimited), for `keys.getKey`.
    pub async fn balance(&self, key: &str) -> Result<Option<u64>, EngineError> {
        let Some(state) = self.ledger.state(key).await? else {
            return Err(EngineError::NotFound);
        };
        let Some(remaining) = state.remaining else {
            return Ok(None);
        };
        Ok(Some(match self.hot.peek(key).await {
            Ok(Some(e)) => match e.unalloc {
                Some(u) if e.generation == state.generation => e.bal.saturating_add(u),
                _ if e.generation == state.generation => e.bal.saturating_add(remaining),
                _ => remaining,
            },
            _ => remaining,
        }))
    }

    /// Returns one key's hot balance to the ledger if it has been idle `min_idle`.
    async fn drain_key(&self, key: &str, min_idle: Duration) -> Result<u64, EngineError> {
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
    async fn return_to_ledger(&self, key: &str, transfer_id: &str, d: Drained) {
        match self.ledger.return_drained(key, transfer_id, d).await {
            Ok(state) => {
                metrics::counter!(m::RETURNED_CREDITS).increment(d.amount);
                self.sync(key, &state).await;
            }
            Err(e) => {
                tracing::warn!(key_id = key, amount = d.amount, error = %e, "return failed; will retry");
                let mut q = lock_map(&self.failed_returns);
                if q.len() >= self.config.max_failed_returns {
                    metrics::counter!(m::RETURNS_DROPPED).increment(1);
                    tracing::error!(
                        key_id = key,
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

    /// Returns every hot balance this node touched (shutdown).
    pub async fn drain_all(&self) -> Result<u64, EngineError> {
        let keys: Vec<String> = lock_map(&self.activity).keys().cloned().collect();
        let mut total = 0;
        for key in keys {
            total += self.drain_key(&key, Duration::ZERO).await?;
            lock_map(&self.activity).remove(&key);
        }
        self.retry_failed_returns().await;
        Ok(total)
    }

    async fn retry_failed_returns(&self) -> usize {
        let batch: Vec<_> = lock_map(&self.failed_returns).drain(..).collect();
        let n = batch.len();
        metrics::counter!(m::RETURNS_RETRIED).increment(n as u64);
        for (key, transfer_id, d) in batch {
            self.return_to_ledger(&key, &transfer_id, d).await;
        }
        n
    }

    /// One pass of the reconciler (DESIGN.md §3.6). Cheap when there is nothing to do.
    pub async fn reconcile_once(&self) -> Result<ReconcileReport, EngineError> {
        let mut report = ReconcileReport::default();

        // 1. A hot store that lost its data: write off what it held, once.
        let epoch = self.hot.epoch().await?;
        let changed = lock_map(&self.epoch_seen).as_deref() != Some(epoch.as_str());
        if changed {
            for (key, lost) in self.ledger.write_off_other_epochs(&epoch).await? {
                self.report_lost(&key, lost);
                report.lost_credits += lost;
            }
            *lock_map(&self.epoch_seen) = Some(epoch);
        }

        // 2. Idle balances go back to the ledger.
        let idle: Vec<String> = {
            let map = lock_map(&self.activity);
            map.iter()
                .filter(|(_, a)| a.last_used.elapsed() >= self.config.idle_return)
                .map(|(k, _)| k.clone())
                .collect()
        };
        for key in idle {
            let amount = self.drain_key(&key, self.config.idle_return).await?;
            report.returned_credits += amount;
            report.drained_keys += 1;
            let mut map = lock_map(&self.activity);
            if map
                .get(&key)
                .is_some_and(|a| a.last_used.elapsed() >= self.config.idle_return)
            {
                map.remove(&key);
            }
        }

        // 3. Returns whose ledger step failed.
        report.retried_returns = self.retry_failed_returns().await;

        // 4. Fences and allocations left half-done by a holder that lost its lock.
        let ttl_ms = i64::try_from(self.config.lock_ttl.as_millis()).unwrap_or(i64::MAX);
        let stale = self.clock.now_ms().saturating_sub(ttl_ms.saturating_mul(2));
        let mut keys: Vec<String> = self
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
            let Some(token) = self
                .hot
                .lock(&key, self.config.lock_ttl, Duration::ZERO)
                .await?
            else {
                continue;
            };
            let fences = self.ledger.pending_fences(Some(&key), i64::MAX, 16).await;
            let result = async {
                for f in fences? {
                    self.complete_fence(&f).await?;
                    report.fences_completed += 1;
                }
                report.orphans_resolved += self.resolve_orphans(&key).await?;
                Ok::<(), EngineError>(())
            }
            .await;
            self.unlock(&key, &token).await;
            result?;
        }

        // 5. Entries that hold nothing and have been idle a long while.
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
