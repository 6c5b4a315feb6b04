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

use creditgate_domain::{new_id_for_transfer, Clock, Cost, Credits, KeyId};
use tokio::sync::mpsc;
use tokio::time::Instant;

mod drains;
mod fences;
mod holds;
mod prefetch;
mod reconciler;
mod shared;
mod spend;

pub use holds::HoldAnswer;
use prefetch::PREFETCH_QUEUE;
pub use reconciler::ReconcileReport;
pub use shared::{SharedDecision, SharedHoldAnswer, SharedOutcome};

use crate::metrics as m;
use crate::ports::{
    drain_transfer_id, AllocateOutcome, AllocateRequest, BeginFence, Credit, CreditReply,
    DirectSpend, Drained, FenceOp, Hold, HoldClose, HoldOutcome, HotError, HotStore, IdemMark,
    IncrementOutcome, Ledger, LedgerError, LedgerState, LockToken, PendingFence, ReserveRequest,
    Settlement, SpendReply, TransferFate,
};
use crate::rules;

/// The ledger account of a hot-store address ([`crate::ports::hot_address`]).
pub(super) fn account_of(address: &KeyId) -> KeyId {
    crate::ports::split_address(address).0
}

/// How long an idempotency key's record (and so its first answer) is kept.
pub const IDEMPOTENCY_RETENTION_MS: i64 = 24 * 3_600_000;

/// Tuning of the engine. Every wait has a bound.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// How long a refill lock lives if its holder never releases it.
    pub lock_ttl: Duration,
    /// How long one verification waits for another's refill before retrying.
    pub lock_wait: Duration,
    /// Upper bound on one verification's time in the engine.
    pub spend_deadline: Duration,
    /// This many hot-store timeouts in a row open the breaker: spends go to the ledger
    /// (`spend_direct`) without asking the hot store.
    pub breaker_threshold: u32,
    /// How long the breaker stays open before one spend probes the hot store again.
    pub breaker_cooldown: Duration,
    /// A key idle this long has its hot balance returned to the ledger.
    pub idle_return: Duration,
    /// Drained entries idle this long are removed from the hot store.
    pub hot_expiry: Duration,
    /// Smallest allocation, in requests of the current cost.
    pub min_chunk_requests: u64,
    /// An allocation covers at least this many seconds of the key's recent spend rate,
    /// so a key at a modest rate is refilled from the ledger every few seconds, not
    /// every second.
    pub chunk_seconds: u64,
    /// The ledger's budget of refills per second on this node. Past
    /// `refill_budget_per_sec × chunk_seconds` active keys, chunks grow by the load
    /// factor `active keys / (refill_budget_per_sec × chunk_seconds)` (at most
    /// `max_chunk_seconds / chunk_seconds`), in seconds and in minimum requests, so the
    /// refills of all keys together stay near the budget.
    pub refill_budget_per_sec: u64,
    /// Most seconds of spend one chunk covers. This is the bound on what a lost hot
    /// store can lose per key: about one chunk, i.e. at most `max(min_chunk_requests ×
    /// cost, chunk_seconds × its spend rate) × max_chunk_seconds / chunk_seconds`, and
    /// never more than `max_chunk`.
    pub max_chunk_seconds: u64,
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
            breaker_threshold: 3,
            breaker_cooldown: Duration::from_secs(1),
            idle_return: Duration::from_secs(2),
            hot_expiry: Duration::from_secs(60),
            min_chunk_requests: 10,
            chunk_seconds: 5,
            refill_budget_per_sec: 20,
            max_chunk_seconds: 30,
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
    /// Spent on the ledger alone while the hot store was unreachable (DESIGN §3.5):
    /// `at_least` is the ledger's part of the balance after it. The hot store, which
    /// this node cannot read, may hold more, so the balance is at least this.
    ValidOnLedger { at_least: u64 },
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
    /// The idempotency claim the call carried was taken over by a retry: nothing changed.
    #[error("another request with this idempotency key took over")]
    Superseded,
}

impl From<LedgerError> for EngineError {
    fn from(e: LedgerError) -> Self {
        match e {
            LedgerError::Unavailable(s) => EngineError::Unavailable(s),
            LedgerError::Other(s) => EngineError::Internal(s),
            LedgerError::Superseded => EngineError::Superseded,
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
    /// New balance; `None` = unlimited.
    Set(Option<Credits>),
    Increment(Credits),
    /// Subtract, clamped at zero.
    Decrement(Credits),
    /// Periodic refill: the balance becomes `amount` if below it, once per period
    /// (`period_start` is the period's first millisecond).
    Refill {
        amount: Credits,
        period_start: i64,
    },
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
    /// Credits this node spent from the key since its last credit of the key's hot
    /// balance…
    own_since_report: u64,
    /// …and how many times that the whole hot store spent in the same window, as the
    /// last credit reported (1 on a node of its own; about N where N nodes share the
    /// key evenly). Chunks cover the key's rate on every node, not only this one's.
    share: u64,
    /// The last spend, and the gap between spends this key has shown lately (a maximum
    /// that decays by 1/16 per spend): a key spent every few seconds keeps its hot
    /// balance across its gaps instead of being returned and refilled each time.
    last_spent: Option<Instant>,
    gap: Duration,
}

/// What a key's activity leaves behind when its balance is returned: when it was last
/// spent and its gap, so that the key's next spend knows its pace.
#[derive(Debug, Clone, Copy)]
struct Returned {
    last_spent: Instant,
    gap: Duration,
}

/// An idle key keeps its hot balance for this many of its gaps…
pub(super) const IDLE_GAPS: u32 = 4;
/// …but at most this many `idle_return`s (60 s at the default 2 s).
pub(super) const MAX_IDLE_RETURNS: u32 = 30;

pub struct Engine {
    hot: Arc<dyn HotStore>,
    ledger: Arc<dyn Ledger>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    activity: Mutex<HashMap<KeyId, Activity>>,
    /// Keys returned for idleness within `idle_return × MAX_IDLE_RETURNS`, with their
    /// pace (lock order: `activity`, then this).
    returned: Mutex<HashMap<KeyId, Returned>>,
    failed_returns: Mutex<VecDeque<(KeyId, String, Drained)>>,
    epoch_seen: Mutex<Option<String>>,
    prefetch_tx: mpsc::Sender<(KeyId, u64)>,
    prefetch_rx: Mutex<Option<mpsc::Receiver<(KeyId, u64)>>>,
    breaker: Breaker,
    /// Told of the holds each reconciler pass expired (analytics, once set).
    on_expired: std::sync::OnceLock<ExpiryObserver>,
}

/// Receives the holds a reconciler pass expired.
pub type ExpiryObserver = Box<dyn Fn(Vec<Hold>) + Send + Sync>;

/// Opens after `threshold` hot-store timeouts in a row; while open, spends skip the hot
/// store (a node cut off from it keeps answering from the ledger instead of waiting out
/// a timeout per request). After `cooldown` one spend probes; a success closes it.
#[derive(Debug, Default)]
struct Breaker {
    timeouts_in_a_row: std::sync::atomic::AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    /// Whether a spend should skip the hot store. Once the cooldown has passed, one
    /// caller is let through to probe (and the cooldown starts again for the others).
    fn skip(&self, cooldown: Duration) -> bool {
        let mut open = lock_map(&self.open_until);
        match *open {
            None => false,
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                *open = Some(Instant::now() + cooldown);
                false
            }
        }
    }

    fn success(&self) {
        use std::sync::atomic::Ordering;
        if self.timeouts_in_a_row.swap(0, Ordering::Relaxed) > 0 {
            let mut open = lock_map(&self.open_until);
            if open.take().is_some() {
                metrics::gauge!(m::BREAKER_OPEN).set(0.0);
                tracing::info!("the hot store answers again; breaker closed");
            }
        }
    }

    fn timeout(&self, config: &EngineConfig) {
        use std::sync::atomic::Ordering;
        let n = self.timeouts_in_a_row.fetch_add(1, Ordering::Relaxed) + 1;
        if n < config.breaker_threshold.max(1) {
            return;
        }
        let mut open = lock_map(&self.open_until);
        let was_open = open.is_some();
        *open = Some(Instant::now() + config.breaker_cooldown);
        if !was_open {
            metrics::counter!(m::BREAKER_OPENED).increment(1);
            metrics::gauge!(m::BREAKER_OPEN).set(1.0);
            tracing::warn!(
                timeouts = n,
                cooldown_ms =
                    u64::try_from(config.breaker_cooldown.as_millis()).unwrap_or(u64::MAX),
                "the hot store keeps timing out; breaker open: spending on the ledger"
            );
        }
    }
}

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
            returned: Mutex::new(HashMap::new()),
            failed_returns: Mutex::new(VecDeque::new()),
            epoch_seen: Mutex::new(None),
            breaker: Breaker::default(),
            on_expired: std::sync::OnceLock::new(),
        }
    }

    /// Sets who is told of expired holds (once; later calls are ignored).
    pub fn observe_expiries(&self, observer: ExpiryObserver) {
        let _ = self.on_expired.set(observer);
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

    /// Where `account`'s hot credits are held: its own address, or, on a hot store that
    /// colocates a pooled key with its pool, the home its ledger row names (credits are
    /// at one home at a time; see [`rules::held_elsewhere`]).
    pub(super) async fn home(&self, account: &KeyId) -> Result<KeyId, EngineError> {
        if !self.hot.colocates() {
            return Ok(account.clone());
        }
        let epoch = self.ledger.hot_epoch(account).await?;
        Ok(crate::ports::hot_address(
            account,
            epoch.as_deref().map_or("", rules::home_of),
        ))
    }

    /// Brings `account`'s hot credits back to the ledger from the home they are held at
    /// (another than the caller's, who wants to allocate at its own): what was left
    /// pending there is settled and the entry drained, under that home's lock. `false`
    /// when another holder has that lock (the caller tries again).
    pub(super) async fn evacuate(&self, account: &KeyId) -> Result<bool, EngineError> {
        let from = self.home(account).await?;
        let Some(token) = self
            .hot
            .lock(&from, self.config.lock_ttl, self.config.lock_wait)
            .await?
        else {
            return Ok(false);
        };
        let result = async {
            self.settle_pending(&from).await?;
            let transfer_id = drain_transfer_id();
            let drained = self.hot.drain(&from, &transfer_id, 0).await?;
            if drained.amount > 0 || drained.spent > 0 {
                self.return_to_ledger(&from, &transfer_id, drained).await;
            }
            metrics::counter!(m::EVACUATIONS).increment(1);
            Ok(true)
        }
        .await;
        self.unlock(&from, &token).await;
        result
    }

    /// Takes the key's lock, waiting for other holders up to the spend deadline.
    pub(super) async fn lock_waiting(&self, key: &KeyId) -> Result<LockToken, EngineError> {
        let deadline = Instant::now() + self.config.spend_deadline;
        loop {
            if let Some(t) = self
                .hot
                .lock(key, self.config.lock_ttl, self.config.lock_wait)
                .await?
            {
                return Ok(t);
            }
            if Instant::now() >= deadline {
                return Err(EngineError::Busy("the key's lock stayed held".into()));
            }
        }
    }

    pub(super) async fn unlock(&self, key: &KeyId, token: &LockToken) {
        if let Err(e) = self.hot.unlock(key, token).await {
            tracing::warn!(key_id = %key, error = %e, "unlock failed; the lock will expire");
        }
    }

    /// Step 2 and 3 of a refill: credits a granted allocation to the hot store, then
    /// marks it settled in the ledger. A failed settle leaves it pending for the
    /// reconciler (logged); a failed credit is the caller's error.
    async fn credit_allocation(&self, key: &KeyId, credit: &Credit<'_>) -> Result<(), EngineError> {
        let (credited, spent) = settlement(self.hot.credit(key, credit).await?);
        if credited {
            self.note_report(key, spent);
        }
        if let Err(e) = self
            .ledger
            .settle_allocation(&account_of(key), credit.transfer_id, credited, spent)
            .await
        {
            tracing::warn!(key_id = %key, error = %e, "settling an allocation failed; the reconciler resolves it");
        }
        Ok(())
    }

    fn report_lost(&self, key: &KeyId, lost: u64) {
        if lost > 0 {
            metrics::counter!(m::LOST_CREDITS).increment(lost);
            tracing::error!(
                key_id = %key,
                lost,
                "hot store lost its data: up to this many credits it held are written off, not re-issued"
            );
        }
    }

    async fn sync(&self, key: &KeyId, state: &LedgerState) {
        if let Some(r) = state.remaining {
            if let Err(e) = self.hot.sync_unalloc(key, Some(r), state.version).await {
                tracing::warn!(key_id = %key, error = %e, "could not refresh the hot snapshot");
            }
        }
    }

    /// The exact balance outside holds now (`None`: unlimited).
    pub async fn balance(&self, key: &KeyId) -> Result<Option<u64>, EngineError> {
        Ok(self.books(key).await?.0)
    }

    /// The exact balance outside holds now (`None`: unlimited) and the credits in open
    /// holds, for `keys.getKey`.
    pub async fn books(&self, key: &KeyId) -> Result<(Option<u64>, u64), EngineError> {
        let Some(state) = self.ledger.state(key).await? else {
            return Err(EngineError::NotFound);
        };
        let Some(remaining) = state.remaining else {
            return Ok((None, state.held));
        };
        // Nothing handed out to the hot store: the ledger's balance is the whole of it
        // (the hot snapshot may be older, e.g. after a spend on the ledger alone).
        if state.hot_allocated == 0 {
            return Ok((Some(remaining), state.held));
        }
        let outside = match self.hot.peek(&self.home(key).await?).await {
            Ok(Some(e)) => match e.unalloc {
                Some(u) if e.generation == state.generation => e.bal.saturating_add(u),
                _ if e.generation == state.generation => e.bal.saturating_add(remaining),
                _ => remaining,
            },
            _ => remaining,
        };
        Ok((Some(outside), state.held))
    }
}
