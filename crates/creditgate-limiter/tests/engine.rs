//! Engine tests: the ledger conformance suite on `MemoryLedger`, and the model test —
//! random sequences of spend / set / increment / decrement / refill / drain / hot-store
//! crash / reserve / settle / release / expiry / a retried reserve, with injected ledger
//! faults, checked against a plain reference model.
//! Re-run one failing seed with `CREDITGATE_MODEL_SEED=<seed>`; set the number of
//! sequences with `CREDITGATE_MODEL_CASES` (default 2000).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use creditgate_domain::{Clock, Cost, Credits, KeyId, ManualClock, Refill, RefillInterval};
use creditgate_limiter::conformance::{self, LedgerFixture};
use creditgate_limiter::ports::*;
use creditgate_limiter::{
    CreditOp, Decision, Engine, EngineConfig, EngineError, HoldAnswer, MemoryHotStore,
    MemoryLedger, SharedOutcome,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn credits(n: u64) -> Credits {
    Credits::new(n).expect("a test amount within bounds")
}

struct MemFixture {
    ledger: Arc<MemoryLedger>,
    next: AtomicU64,
}

#[async_trait]
impl LedgerFixture for MemFixture {
    fn ledger(&self) -> Arc<dyn Ledger> {
        self.ledger.clone()
    }
    async fn create_key(&self, remaining: Option<u64>) -> KeyId {
        let id = KeyId::from(format!("key_{}", self.next.fetch_add(1, Ordering::SeqCst)));
        self.ledger.create_key(id.clone(), remaining, 0);
        id
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_ledger_conforms() {
    let f = MemFixture {
        ledger: Arc::new(MemoryLedger::new()),
        next: AtomicU64::new(0),
    };
    conformance::run_all(&f).await;
}

/// Which ledger call of the next operation fails, and how.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// The call fails before touching anything.
    Before(u32),
    /// The call commits, then reports failure (a lost reply).
    After(u32),
}

/// A ledger that fails one chosen call.
struct FaultyLedger {
    inner: MemoryLedger,
    fault: Mutex<Option<Fault>>,
    calls: AtomicU64,
    fired: AtomicU64,
    /// Every return of drained credits fails while set (the ledger down for them).
    fail_returns: AtomicBool,
}

impl FaultyLedger {
    fn new() -> Self {
        Self {
            inner: MemoryLedger::new(),
            fault: Mutex::new(None),
            calls: AtomicU64::new(0),
            fired: AtomicU64::new(0),
            fail_returns: AtomicBool::new(false),
        }
    }

    fn arm(&self, fault: Option<Fault>) {
        *self.fault.lock().unwrap() = fault;
        self.calls.store(0, Ordering::SeqCst);
    }

    /// `Some(after)` when this call is the one to fail.
    fn check(&self) -> Option<bool> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let mut f = self.fault.lock().unwrap();
        let hit = match *f {
            Some(Fault::Before(k)) if u64::from(k) == n => Some(false),
            Some(Fault::After(k)) if u64::from(k) == n => Some(true),
            _ => None,
        };
        if hit.is_some() {
            *f = None;
            self.fired.fetch_add(1, Ordering::SeqCst);
        }
        hit
    }
}

macro_rules! faulty {
    ($self:ident, $call:expr) => {{
        match $self.check() {
            Some(false) => Err(LedgerError::Unavailable("injected (before)".into())),
            Some(true) => {
                let _ = $call;
                Err(LedgerError::Unavailable("injected (after commit)".into()))
            }
            None => $call,
        }
    }};
}

#[async_trait]
impl Ledger for FaultyLedger {
    async fn state(&self, key: &KeyId) -> Result<Option<LedgerState>, LedgerError> {
        self.inner.state(key).await
    }
    async fn allocate(&self, req: &AllocateRequest<'_>) -> Result<AllocateOutcome, LedgerError> {
        faulty!(self, self.inner.allocate(req).await)
    }
    async fn settle_allocation(
        &self,
        key: &KeyId,
        t: &str,
        credited: bool,
        spent: u64,
    ) -> Result<(), LedgerError> {
        faulty!(
            self,
            self.inner.settle_allocation(key, t, credited, spent).await
        )
    }
    async fn return_drained(
        &self,
        key: &KeyId,
        t: &str,
        d: Drained,
    ) -> Result<LedgerState, LedgerError> {
        if self.fail_returns.load(Ordering::SeqCst) {
            return Err(LedgerError::Unavailable("injected (returns fail)".into()));
        }
        faulty!(self, self.inner.return_drained(key, t, d).await)
    }
    async fn increment(
        &self,
        key: &KeyId,
        amount: Credits,
        max: u64,
        mark: Option<&IdemMark<'_>>,
        actor: Option<&str>,
    ) -> Result<IncrementOutcome, LedgerError> {
        faulty!(
            self,
            self.inner.increment(key, amount, max, mark, actor).await
        )
    }
    async fn begin_fence(
        &self,
        key: &KeyId,
        op_id: &str,
        op: FenceOp,
        now: i64,
        mark: Option<&IdemMark<'_>>,
        actor: Option<&str>,
    ) -> Result<BeginFence, LedgerError> {
        faulty!(
            self,
            self.inner
                .begin_fence(key, op_id, op, now, mark, actor)
                .await
        )
    }
    async fn finish_fence(&self, f: &PendingFence, d: Drained) -> Result<LedgerState, LedgerError> {
        faulty!(self, self.inner.finish_fence(f, d).await)
    }
    async fn spend_direct(
        &self,
        key: &KeyId,
        cost: Cost,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<DirectSpend, LedgerError> {
        faulty!(self, self.inner.spend_direct(key, cost, mark).await)
    }
    async fn spend_direct_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<(bool, Vec<DirectSpend>), LedgerError> {
        faulty!(
            self,
            self.inner.spend_direct_all(accounts, cost, mark).await
        )
    }
    async fn pending_allocations(
        &self,
        key: Option<&KeyId>,
        older: i64,
        limit: u32,
    ) -> Result<Vec<PendingAllocation>, LedgerError> {
        self.inner.pending_allocations(key, older, limit).await
    }
    async fn pending_fences(
        &self,
        key: Option<&KeyId>,
        older: i64,
        limit: u32,
    ) -> Result<Vec<PendingFence>, LedgerError> {
        self.inner.pending_fences(key, older, limit).await
    }
    async fn write_off_other_epochs(&self, epoch: &str) -> Result<Vec<(KeyId, u64)>, LedgerError> {
        self.inner.write_off_other_epochs(epoch).await
    }
    async fn hot_epoch(&self, key: &KeyId) -> Result<Option<String>, LedgerError> {
        faulty!(self, self.inner.hot_epoch(key).await)
    }
    async fn write_off_key(&self, key: &KeyId, epoch: &str) -> Result<u64, LedgerError> {
        faulty!(self, self.inner.write_off_key(key, epoch).await)
    }
    async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<HoldOutcome, LedgerError> {
        faulty!(self, self.inner.reserve(req).await)
    }
    async fn close_hold(
        &self,
        key: &KeyId,
        hold_id: &str,
        close: HoldClose,
        now: i64,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<HoldOutcome, LedgerError> {
        faulty!(
            self,
            self.inner.close_hold(key, hold_id, close, now, mark).await
        )
    }
    async fn reserve_pair(
        &self,
        req: &ReserveRequest<'_>,
        pool: &KeyId,
    ) -> Result<PairHoldOutcome, LedgerError> {
        faulty!(self, self.inner.reserve_pair(req, pool).await)
    }
    async fn close_hold_pair(
        &self,
        key: &KeyId,
        pool: &KeyId,
        hold_id: &str,
        close: HoldClose,
        now: i64,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<PairHoldOutcome, LedgerError> {
        faulty!(
            self,
            self.inner
                .close_hold_pair(key, pool, hold_id, close, now, mark)
                .await
        )
    }
    async fn expire_holds(
        &self,
        key: &KeyId,
        now: i64,
        limit: u32,
    ) -> Result<(Vec<Hold>, Option<LedgerState>), LedgerError> {
        faulty!(self, self.inner.expire_holds(key, now, limit).await)
    }
    async fn hold(&self, hold_id: &str) -> Result<Option<Hold>, LedgerError> {
        self.inner.hold(hold_id).await
    }
    async fn keys_with_due_holds(&self, now: i64, limit: u32) -> Result<Vec<KeyId>, LedgerError> {
        self.inner.keys_with_due_holds(now, limit).await
    }
    async fn claim_idempotency(&self, c: &IdemClaim<'_>) -> Result<ClaimOutcome, LedgerError> {
        faulty!(self, self.inner.claim_idempotency(c).await)
    }
    async fn answer_idempotency(&self, m: &IdemMark<'_>, a: &str) -> Result<bool, LedgerError> {
        faulty!(self, self.inner.answer_idempotency(m, a).await)
    }
    async fn abandon_idempotency(&self, m: &IdemMark<'_>) -> Result<(), LedgerError> {
        faulty!(self, self.inner.abandon_idempotency(m).await)
    }
    async fn idempotency(&self, s: &str, k: &str) -> Result<Option<IdemRecord>, LedgerError> {
        self.inner.idempotency(s, k).await
    }
    async fn purge_idempotency(&self, before: i64, limit: u32) -> Result<u64, LedgerError> {
        self.inner.purge_idempotency(before, limit).await
    }
    async fn credit_history(
        &self,
        account: &KeyId,
        before_seq: Option<u64>,
        limit: u32,
    ) -> Result<Vec<CreditEntry>, LedgerError> {
        self.inner.credit_history(account, before_seq, limit).await
    }
}

/// A hold as the model sees it.
#[derive(Debug, Clone)]
struct ModelHold {
    id: String,
    amount: u64,
    funded: bool,
    expires_at_ms: i64,
    /// `None` while open, else how it was closed.
    closed: Option<HoldState>,
}

#[derive(Debug, Clone, Copy)]
enum Op {
    Spend(u64),
    Set(Option<u64>),
    Increment(u64),
    Decrement(u64),
    Refill(u64),
    Drain,
    Crash,
    /// Reserve `amount`, with a ttl of a few seconds (`short`) or a month.
    Reserve {
        amount: u64,
        short: bool,
    },
    /// Settle the `pick`-th hold (modulo their number) at `cost`.
    Settle {
        pick: usize,
        cost: u64,
    },
    Release {
        pick: usize,
    },
    /// Reserve again with the `pick`-th hold's id: nothing moves.
    RetryReserve {
        pick: usize,
    },
    /// A verification with idempotency key `idem` (of a few, so retries and reuse with
    /// another cost happen), as the service runs it: claim, spend on the ledger with the
    /// mark, store the answer; after a failure, the record says whether it spent.
    Once {
        idem: usize,
        cost: u64,
    },
    /// A verification of the key with its identity's shared pool: both pay, or neither.
    Shared(u64),
    /// An increment of the pool.
    PoolIncrement(u64),
}

fn random_op(rng: &mut StdRng) -> Op {
    // A quarter of spends go through the shared pool.
    if rng.random_range(0..4) == 0 {
        return Op::Shared(rng.random_range(0..5));
    }
    match rng.random_range(0..100) {
        0..=51 => Op::Spend(match rng.random_range(0..10) {
            0 => 0,
            1 => rng.random_range(10..60),
            _ => rng.random_range(1..4),
        }),
        55..=61 => Op::Set(if rng.random_range(0..8) == 0 {
            None
        } else {
            Some(rng.random_range(0..80))
        }),
        62..=71 => Op::Increment(rng.random_range(0..40)),
        72..=79 => Op::Decrement(rng.random_range(0..40)),
        80..=82 => Op::Refill(rng.random_range(0..60)),
        83..=86 => Op::Drain,
        87..=88 => Op::Crash,
        89..=92 => Op::Reserve {
            amount: rng.random_range(0..40),
            short: rng.random_range(0..3) == 0,
        },
        93..=96 => Op::Settle {
            pick: rng.random_range(0..8),
            cost: rng.random_range(0..50),
        },
        97 => Op::Release {
            pick: rng.random_range(0..8),
        },
        99 => Op::PoolIncrement(rng.random_range(0..30)),
        52..=54 | 98 => Op::Once {
            idem: rng.random_range(0..4),
            cost: rng.random_range(1..4),
        },
        _ => Op::RetryReserve {
            pick: rng.random_range(0..8),
        },
    }
}

struct Sim {
    engine: Engine,
    hot: Arc<MemoryHotStore>,
    ledger: Arc<FaultyLedger>,
    clock: Arc<ManualClock>,
    key: KeyId,
    /// The reference model: `None` = unlimited.
    balance: Option<u64>,
    granted: u64,
    spent: u64,
    lost: u64,
    /// Credits a refill added.
    refilled: u64,
    /// A set, decrement, unlimited phase or uncertain op happened (books not comparable).
    overwritten: bool,
    holds: Vec<ModelHold>,
    next_hold: u64,
    /// Credits expired holds gave back during the current step.
    step_back: u64,
    /// Idempotency keys used: the cost they were used with, whether their request spent,
    /// and the answer stored ("VALID" / "EXCEEDED").
    idem: std::collections::HashMap<usize, ModelIdem>,
    next_token: u64,
    /// The identity's shared pool: its account and the model's balance, what it was
    /// granted, what shared spends took from it and what a crash lost of it.
    pool: KeyId,
    pool_balance: u64,
    pool_granted: u64,
    pool_spent: u64,
    pool_lost: u64,
}

#[derive(Debug, Clone, Default)]
struct ModelIdem {
    cost: u64,
    spent: bool,
    /// Answered VALID on an unlimited key: no spend.
    free: bool,
    /// When its record was made: after a day the key is free again.
    created_at_ms: i64,
}

const SCOPE: &str = "ws_model";

const DAY_MS: i64 = 86_400_000;

impl Sim {
    fn new(initial: Option<u64>) -> Self {
        let clock = Arc::new(ManualClock::new(DAY_MS * 20_000 + 5));
        let hot = Arc::new(MemoryHotStore::new());
        let ledger = Arc::new(FaultyLedger::new());
        let key = KeyId::from("key_model");
        ledger
            .inner
            .create_key(key.clone(), initial, clock.now_ms());
        let config = EngineConfig {
            idle_return: Duration::ZERO,
            lock_wait: Duration::from_millis(1),
            spend_deadline: Duration::from_millis(500),
            ..EngineConfig::default()
        };
        let pool = KeyId::from("id_model");
        let pool_initial = 60;
        ledger
            .inner
            .create_key(pool.clone(), Some(pool_initial), clock.now_ms());
        let engine = Engine::new(hot.clone(), ledger.clone(), clock.clone(), config);
        Self {
            pool,
            pool_balance: pool_initial,
            pool_granted: pool_initial,
            pool_spent: 0,
            pool_lost: 0,
            engine,
            hot,
            ledger,
            clock,
            key,
            balance: initial,
            granted: initial.unwrap_or(0),
            spent: 0,
            lost: 0,
            refilled: 0,
            overwritten: initial.is_none(),
            holds: Vec::new(),
            next_hold: 0,
            step_back: 0,
            idem: std::collections::HashMap::new(),
            next_token: 0,
        }
    }

    /// Credits in the model's open funded holds.
    fn model_held(&self) -> u64 {
        self.holds
            .iter()
            .filter(|h| h.closed.is_none() && h.funded)
            .map(|h| h.amount)
            .sum()
    }

    /// The model's side of a reconciler pass: open holds whose time is up expire, their
    /// credits back on the balance. Returns the credits returned.
    fn expire_model(&mut self) -> u64 {
        let now = self.clock.now_ms();
        let mut back = 0;
        for h in &mut self.holds {
            if h.closed.is_none() && h.expires_at_ms <= now {
                h.closed = Some(HoldState::Expired);
                if h.funded {
                    back += h.amount;
                }
            }
        }
        if let Some(b) = self.balance.as_mut() {
            *b += back;
        }
        self.step_back += back;
        back
    }

    /// Ledger remaining + hot balance: what the stores hold between operations.
    async fn stored(&self) -> Option<u64> {
        self.stored_of(&self.key).await
    }

    /// An account's balance as the ledger and the hot store hold it.
    async fn stored_of(&self, account: &KeyId) -> Option<u64> {
        let state = self.ledger.inner.state(account).await.unwrap().unwrap();
        let hot = self.hot.peek(account).await.unwrap();
        let bal = match hot {
            Some(e) if e.generation == state.generation => e.bal,
            _ => 0,
        };
        state.remaining.map(|r| r + bal)
    }

    /// Heals faults: lets the reconciler finish half-done work (and expire holds whose
    /// time is up; the model follows with [`Sim::expire_model`]).
    async fn heal(&self) {
        self.ledger.arm(None);
        self.clock.advance(60_000);
        let report = self
            .engine
            .reconcile_once()
            .await
            .expect("reconcile after healing");
        assert_eq!(report.key_errors, 0, "no key fails once faults are healed");
    }

    /// What the model's open holds whose time is up would give back.
    fn due_back(&self) -> u64 {
        let now = self.clock.now_ms();
        self.holds
            .iter()
            .filter(|h| h.closed.is_none() && h.funded && h.expires_at_ms <= now)
            .map(|h| h.amount)
            .sum()
    }

    /// Checks the engine, the stores and the open holds against the model.
    async fn check(&self, ctx: &str, op: Op) {
        assert_eq!(
            self.engine.balance(&self.key).await.unwrap(),
            self.balance,
            "{ctx}: engine balance after {op:?}"
        );
        assert_eq!(
            self.stored().await,
            self.balance,
            "{ctx}: ledger + hot after {op:?}"
        );
        let state = self.ledger.inner.state(&self.key).await.unwrap().unwrap();
        assert_eq!(state.held, self.model_held(), "{ctx}: held after {op:?}");
        assert_eq!(
            self.engine.balance(&self.pool).await.unwrap(),
            Some(self.pool_balance),
            "{ctx}: the pool's balance after {op:?}"
        );
    }

    /// An increment of the pool; after a fault, whether it applied is what the ledger
    /// says once healed.
    async fn pool_step(&mut self, v: u64, fault: Option<Fault>, ctx: &str) {
        self.step_back = 0;
        self.ledger.arm(fault);
        let before = self.pool_balance;
        let result = self
            .engine
            .update(&self.pool, CreditOp::Increment(credits(v)))
            .await;
        self.heal().await;
        let now = self.engine.balance(&self.pool).await.unwrap().unwrap();
        match &result {
            Ok(_) => assert_eq!(now, before + v, "{ctx}: increment of the pool"),
            Err(e) => assert!(
                now == before || now == before + v,
                "{ctx}: after {e:?} the pool holds {now}, expected {before} or {}",
                before + v
            ),
        }
        if now == before + v {
            self.pool_granted += v;
        }
        self.pool_balance = now;
        let back = self.due_back();
        self.balance = self.balance.map(|b| b + back);
        self.expire_model();
        self.balance = self.balance.map(|b| b - back);
        self.check(ctx, Op::PoolIncrement(v)).await;
    }

    /// A hold operation: answers checked against the model; after a fault, the hold's
    /// record in the ledger says whether it applied, and the model follows it.
    async fn hold_step(&mut self, op: Op, fault: Option<Fault>, ctx: &str) {
        let now = self.clock.now_ms();
        // The hold the op is about: a new one for a reserve, else one that was made.
        let (hold, index) = match op {
            Op::Reserve { amount, short } => {
                self.next_hold += 1;
                let ttl = if short { 3_000 } else { 30 * DAY_MS };
                let hold = ModelHold {
                    id: format!("hold_{}", self.next_hold),
                    amount,
                    funded: self.balance.is_some(),
                    expires_at_ms: now + ttl,
                    closed: None,
                };
                (hold, None)
            }
            Op::Settle { pick, .. } | Op::Release { pick } | Op::RetryReserve { pick } => {
                if self.holds.is_empty() {
                    return;
                }
                let i = pick % self.holds.len();
                (self.holds[i].clone(), Some(i))
            }
            _ => unreachable!("not a hold op"),
        };
        self.ledger.arm(fault);
        let fired_before = self.ledger.fired.load(Ordering::SeqCst);
        let result = match op {
            Op::Settle { cost, .. } => {
                self.engine
                    .close_hold(&self.key, &hold.id, HoldClose::Settle(cost), None)
                    .await
            }
            Op::Release { .. } => {
                self.engine
                    .close_hold(&self.key, &hold.id, HoldClose::Release, None)
                    .await
            }
            _ => {
                let req = ReserveRequest {
                    key: &self.key,
                    hold_id: &hold.id,
                    amount: hold.amount,
                    now_ms: now,
                    expires_at_ms: hold.expires_at_ms,
                    mark: None,
                };
                self.engine.reserve(&req).await
            }
        };
        let faulted = self.ledger.fired.load(Ordering::SeqCst) > fired_before;
        if faulted || result.is_err() {
            self.heal().await;
            // What the ledger recorded decides whether the op applied.
            let record = self.ledger.inner.hold(&hold.id).await.unwrap();
            match (op, record, index) {
                (Op::Reserve { .. }, Some(r), _) => {
                    assert_eq!(
                        r.funded, hold.funded,
                        "{ctx}: funded as the key was limited"
                    );
                    if let Some(b) = self.balance.as_mut() {
                        *b -= hold.amount;
                    }
                    self.holds.push(hold);
                }
                (Op::Settle { cost, .. }, Some(r), Some(i))
                    if r.state == HoldState::Settled && self.holds[i].closed.is_none() =>
                {
                    self.settle_model(i, cost);
                }
                (Op::Release { .. }, Some(r), Some(i))
                    if r.state == HoldState::Released && self.holds[i].closed.is_none() =>
                {
                    self.return_model(i, HoldState::Released);
                }
                _ => {}
            }
            self.expire_model();
            self.check(ctx, op).await;
            return;
        }
        let answer = result.expect("no fault");
        match index {
            None => self.expect_reserve(hold, &answer, ctx),
            Some(i) => self.expect_close(op, i, now, &answer, ctx),
        }
        self.check(ctx, op).await;
    }

    /// A new record of idempotency key `idem`, claimed for a request of `cost`.
    fn remember(&mut self, idem: usize, cost: u64, now: i64) {
        let record = ModelIdem {
            cost,
            created_at_ms: now,
            ..ModelIdem::default()
        };
        self.idem.insert(idem, record);
    }

    /// An idempotent verification: spends at most once per key, exactly when the ledger
    /// recorded the decision, and a retry answers the first decision.
    async fn once_step(&mut self, idem: usize, cost: u64, fault: Option<Fault>, ctx: &str) {
        self.step_back = 0;
        let key = format!("idem_{idem}");
        self.next_token += 1;
        let token = format!("tok_{}", self.next_token);
        let fingerprint = format!("cost={cost}");
        let now = self.clock.now_ms();
        let claim = IdemClaim {
            scope: SCOPE,
            key: &key,
            fingerprint: &fingerprint,
            token: &token,
            now_ms: now,
            lease_until_ms: now + 10_000,
            expired_before_ms: now - DAY_MS,
        };
        let mark = IdemMark {
            scope: SCOPE,
            key: &key,
            token: &token,
        };
        self.ledger.arm(fault);
        // A record older than the retention window counts as gone.
        self.idem.retain(|_, k| k.created_at_ms >= now - DAY_MS);
        let known = self.idem.get(&idem).cloned();
        let claimed = match self.ledger.claim_idempotency(&claim).await {
            Ok(c) => c,
            Err(_) => {
                // Nothing spends without the claim; a claim made before the lost reply
                // stays (it lapses).
                self.heal().await;
                let r = self.ledger.inner.idempotency(SCOPE, &key).await.unwrap();
                if r.is_some_and(|r| r.token == token) && known.is_none() {
                    self.remember(idem, cost, now);
                }
                self.expire_model();
                self.check(ctx, Op::Once { idem, cost }).await;
                return;
            }
        };
        match claimed {
            ClaimOutcome::Mismatch => {
                let k = known.unwrap_or_else(|| panic!("{ctx}: mismatch on an unused key"));
                assert_ne!(k.cost, cost, "{ctx}: the same request is no mismatch");
            }
            ClaimOutcome::Decided(record) => {
                let k = known.unwrap_or_else(|| panic!("{ctx}: decided on an unused key"));
                assert_eq!(k.cost, cost, "{ctx}: decided for this request");
                // A replay: nothing spends again; the stored answer is the first one.
                match record.answer.as_deref() {
                    Some("VALID") => assert!(k.spent || k.free, "{ctx}: answered VALID: spent"),
                    Some("EXCEEDED") => assert!(!k.spent, "{ctx}: answered EXCEEDED"),
                    Some(other) => panic!("{ctx}: stored answer {other}"),
                    None => assert!(k.spent, "{ctx}: decided, not answered: spent"),
                }
            }
            ClaimOutcome::InFlight => {
                let k = known.unwrap_or_else(|| panic!("{ctx}: in flight on an unused key"));
                assert!(!k.spent, "{ctx}: a spent key is decided, not in flight");
            }
            ClaimOutcome::Claimed => {
                if let Some(k) = &known {
                    assert!(!k.spent, "{ctx}: a key that spent was claimed again");
                    assert_eq!(k.cost, cost, "{ctx}: claimed for another request");
                }
                if known.is_none() {
                    self.remember(idem, cost, now);
                }
                let before = self.balance;
                let fired_before = self.ledger.fired.load(Ordering::SeqCst);
                let result = self
                    .engine
                    .spend_once(&self.key, Cost::new(cost).unwrap(), &mark)
                    .await;
                let faulted = self.ledger.fired.load(Ordering::SeqCst) > fired_before;
                let answer = match result {
                    Ok(Decision::Valid { remaining }) => {
                        if let Some(b) = before {
                            assert!(b >= cost, "{ctx}: over-spend: balance {b}, cost {cost}");
                            self.balance = Some(b - cost);
                            self.spent += cost;
                            self.idem.entry(idem).or_default().spent = true;
                        }
                        assert_eq!(remaining, self.balance, "{ctx}: remaining after spend");
                        "VALID"
                    }
                    Ok(Decision::Exceeded { remaining }) => {
                        let b = before.expect("exceeded on an unlimited key");
                        assert!(b < cost, "{ctx}: refused {cost} with {b}");
                        assert_eq!(remaining, b, "{ctx}: reported balance");
                        "EXCEEDED"
                    }
                    Ok(Decision::NotFound) => panic!("{ctx}: key vanished"),
                    Ok(d @ Decision::ValidOnLedger { .. }) => {
                        panic!("{ctx}: {d:?}, but the memory hot store is always reachable")
                    }
                    Err(_) => {
                        // The record says whether the spend was made.
                        self.heal().await;
                        let r = self.ledger.inner.idempotency(SCOPE, &key).await.unwrap();
                        let decided = r.is_some_and(|r| r.state == IdemState::Decided);
                        if decided {
                            if let Some(b) = self.balance.as_mut() {
                                *b -= cost;
                                self.spent += cost;
                            }
                            self.idem.entry(idem).or_default().spent = true;
                        } else {
                            self.ledger.inner.abandon_idempotency(&mark).await.unwrap();
                            if self
                                .ledger
                                .inner
                                .idempotency(SCOPE, &key)
                                .await
                                .unwrap()
                                .is_none()
                            {
                                self.idem.remove(&idem);
                            }
                        }
                        self.expire_model();
                        self.check(ctx, Op::Once { idem, cost }).await;
                        return;
                    }
                };
                // On an unlimited key nothing spends: the answer alone is the record.
                let free = before.is_none();
                let stored = self.ledger.answer_idempotency(&mark, answer).await;
                if faulted || stored.is_err() {
                    self.heal().await;
                    self.expire_model();
                }
                let r = self
                    .ledger
                    .inner
                    .idempotency(SCOPE, &key)
                    .await
                    .unwrap()
                    .expect("the record stays");
                let spent = self.idem[&idem].spent;
                match r.state {
                    IdemState::Answered => {
                        assert_eq!(r.answer.as_deref(), Some(answer), "{ctx}: stored answer")
                    }
                    IdemState::Decided => assert!(spent, "{ctx}: decided means spent"),
                    IdemState::Claimed => assert!(!spent, "{ctx}: a spend is recorded"),
                }
                if free && r.state == IdemState::Answered {
                    self.idem.entry(idem).or_default().free = true;
                }
            }
        }
        self.check(ctx, Op::Once { idem, cost }).await;
    }

    fn settle_model(&mut self, index: usize, cost: u64) {
        let h = &mut self.holds[index];
        h.closed = Some(HoldState::Settled);
        if let (true, Some(b)) = (h.funded, self.balance.as_mut()) {
            *b = *b + h.amount - cost;
            self.spent += cost;
        }
    }

    fn return_model(&mut self, index: usize, state: HoldState) {
        let h = &mut self.holds[index];
        h.closed = Some(state);
        if let (true, Some(b)) = (h.funded, self.balance.as_mut()) {
            *b += h.amount;
        }
    }

    /// Checks the answer to a new reserve, made without a fault, and applies it.
    fn expect_reserve(&mut self, hold: ModelHold, answer: &HoldAnswer, ctx: &str) {
        let amount = hold.amount;
        match answer {
            HoldAnswer::Hold {
                hold: made,
                changed,
                remaining,
            } => {
                assert!(changed, "{ctx}: a new hold");
                assert_eq!(
                    made.funded, hold.funded,
                    "{ctx}: funded as the key was limited"
                );
                if let Some(b) = self.balance {
                    assert!(b >= amount, "{ctx}: reserved {amount} of {b}");
                    self.balance = Some(b - amount);
                }
                assert_eq!(*remaining, self.balance, "{ctx}: balance after the reserve");
                self.holds.push(hold);
            }
            HoldAnswer::Exceeded { remaining } => {
                let b = self.balance.expect("exceeded on an unlimited key");
                assert!(b < amount, "{ctx}: refused {amount} with {b}");
                assert_eq!(*remaining, b, "{ctx}: reported balance");
            }
            HoldAnswer::NotFound => panic!("{ctx}: the key vanished"),
        }
    }

    /// Checks the answer to an op on a made hold, given without a fault, and applies it.
    fn expect_close(&mut self, op: Op, i: usize, now: i64, answer: &HoldAnswer, ctx: &str) {
        let h = self.holds[i].clone();
        let due = now >= h.expires_at_ms;
        let (hold, changed, remaining) = match answer {
            HoldAnswer::Hold {
                hold,
                changed,
                remaining,
            } => (hold, *changed, *remaining),
            HoldAnswer::Exceeded { remaining } => {
                let Op::Settle { cost, .. } = op else {
                    panic!("{ctx}: {op:?} refused")
                };
                let b = self.balance.expect("exceeded on an unlimited key");
                assert!(h.closed.is_none() && !due && h.funded, "{ctx}: {h:?}");
                assert!(
                    cost > h.amount + b,
                    "{ctx}: refused {cost} with {} + {b}",
                    h.amount
                );
                assert_eq!(*remaining, b, "{ctx}: reported balance");
                return;
            }
            HoldAnswer::NotFound => panic!("{ctx}: a made hold was not found"),
        };
        match (op, h.closed) {
            (Op::RetryReserve { .. }, _) | (_, Some(_)) => {
                assert!(!changed, "{ctx}: a hold is made and closed once");
                let state = h.closed.unwrap_or(HoldState::Open);
                assert_eq!(hold.state, state, "{ctx}: its state as it was");
            }
            (_, None) if due => {
                assert_eq!(hold.state, HoldState::Expired, "{ctx}: its time was up");
                self.return_model(i, HoldState::Expired);
            }
            (Op::Settle { cost, .. }, None) => {
                assert!(changed, "{ctx}: settled now");
                assert_eq!(
                    (hold.state, hold.cost),
                    (HoldState::Settled, Some(cost)),
                    "{ctx}"
                );
                if let (true, Some(b)) = (h.funded, self.balance) {
                    assert!(
                        cost <= h.amount + b,
                        "{ctx}: settled {cost} with {} held and {b} outside",
                        h.amount
                    );
                }
                self.settle_model(i, cost);
            }
            (_, None) => {
                assert!(changed, "{ctx}: released now");
                assert_eq!(hold.state, HoldState::Released, "{ctx}");
                self.return_model(i, HoldState::Released);
            }
        }
        assert_eq!(remaining, self.balance, "{ctx}: balance after {op:?}");
    }

    async fn step(&mut self, op: Op, fault: Option<Fault>, ctx: &str) {
        if matches!(
            op,
            Op::Reserve { .. } | Op::Settle { .. } | Op::Release { .. } | Op::RetryReserve { .. }
        ) {
            return self.hold_step(op, fault, ctx).await;
        }
        if let Op::Once { idem, cost } = op {
            return self.once_step(idem, cost, fault, ctx).await;
        }
        if let Op::PoolIncrement(v) = op {
            return self.pool_step(v, fault, ctx).await;
        }
        self.step_back = 0;
        self.ledger.arm(fault);
        let fired_before = self.ledger.fired.load(Ordering::SeqCst);
        let before = self.balance;
        let expected_after: Option<u64>;
        let result: Result<(), EngineError> = match op {
            Op::Spend(cost) => match self.engine.spend(&self.key, Cost::new(cost).unwrap()).await {
                Ok(Decision::Valid { remaining }) => {
                    match self.balance {
                        None => assert_eq!(remaining, None, "{ctx}: unlimited key"),
                        Some(b) => {
                            assert!(b >= cost, "{ctx}: over-spend: balance {b}, cost {cost}");
                            self.balance = Some(b - cost);
                            self.spent += cost;
                            assert_eq!(
                                remaining, self.balance,
                                "{ctx}: reported remaining after spend"
                            );
                        }
                    }
                    expected_after = self.balance;
                    Ok(())
                }
                Ok(Decision::Exceeded { remaining }) => {
                    let b = self.balance.expect("exceeded on an unlimited key");
                    assert!(
                        b < cost,
                        "{ctx}: refused a spend of {cost} with balance {b}"
                    );
                    assert_eq!(remaining, b, "{ctx}: reported remaining when exceeded");
                    expected_after = self.balance;
                    Ok(())
                }
                Ok(Decision::NotFound) => panic!("{ctx}: key vanished"),
                Ok(d @ Decision::ValidOnLedger { .. }) => {
                    panic!("{ctx}: {d:?}, but the memory hot store is always reachable")
                }
                Err(e) => {
                    expected_after = before;
                    Err(e)
                }
            },
            Op::Shared(cost) => {
                let d = self
                    .engine
                    .spend_shared(&self.key, &self.pool, Cost::new(cost).unwrap())
                    .await;
                match d {
                    Ok(d) => {
                        let key_ok = self.balance.is_none_or(|b| b >= cost);
                        let pool_ok = self.pool_balance >= cost;
                        match d.outcome {
                            SharedOutcome::Valid => {
                                assert!(
                                    key_ok && pool_ok,
                                    "{ctx}: over-spend: key {:?}, pool {}, cost {cost}",
                                    self.balance,
                                    self.pool_balance
                                );
                                if let Some(b) = self.balance {
                                    self.balance = Some(b - cost);
                                    self.spent += cost;
                                    assert_eq!(d.key, self.balance, "{ctx}: the key after");
                                }
                                self.pool_balance -= cost;
                                self.pool_spent += cost;
                                assert_eq!(d.pool, Some(self.pool_balance), "{ctx}: the pool");
                            }
                            SharedOutcome::KeyExceeded => {
                                assert!(!key_ok, "{ctx}: refused: the key covers {cost}");
                                assert_eq!(d.key, self.balance, "{ctx}: the key's balance");
                            }
                            SharedOutcome::PoolExceeded => {
                                assert!(!pool_ok, "{ctx}: refused: the pool covers {cost}");
                                assert_eq!(d.pool, Some(self.pool_balance), "{ctx}: the pool");
                            }
                            SharedOutcome::NotFound => panic!("{ctx}: an account vanished"),
                        }
                        expected_after = self.balance;
                        Ok(())
                    }
                    Err(e) => {
                        expected_after = before;
                        Err(e)
                    }
                }
            }
            Op::Crash => {
                let pool_hot = self
                    .hot
                    .peek(&self.pool)
                    .await
                    .unwrap()
                    .map_or(0, |e| e.bal);
                let pool_before = self.stored_of(&self.pool).await.unwrap_or(0);
                let hot_bal = self.hot.peek(&self.key).await.unwrap().map_or(0, |e| e.bal);
                self.hot.wipe();
                let pool_after = self.stored_of(&self.pool).await.unwrap_or(0);
                assert!(
                    pool_after <= pool_before && pool_before - pool_after <= pool_hot,
                    "{ctx}: the crash lost {} of the pool, which held {pool_hot} hot",
                    pool_before - pool_after
                );
                self.pool_lost += pool_before - pool_after;
                self.pool_balance = pool_after;
                let after = self.stored().await;
                match (before, after) {
                    (Some(b), Some(a)) => {
                        assert!(
                            a <= b && b - a <= hot_bal,
                            "{ctx}: crash lost {} but the hot store held {hot_bal}",
                            b - a
                        );
                        self.lost += b - a;
                    }
                    (b, a) => assert_eq!(b, a, "{ctx}: unlimited survives a crash"),
                }
                self.balance = after;
                expected_after = after;
                Ok(())
            }
            Op::Drain => {
                let r = self.engine.reconcile_once().await.map(|_| ());
                // The pass expires holds whose time is up.
                self.expire_model();
                expected_after = self.balance;
                r
            }
            Op::Set(v) => {
                expected_after = v;
                self.engine
                    .update(&self.key, CreditOp::Set(v.map(credits)))
                    .await
                    .map(|_| ())
            }
            Op::Increment(v) => {
                let r = self
                    .engine
                    .update(&self.key, CreditOp::Increment(credits(v)))
                    .await;
                match (before, &r) {
                    (None, Err(EngineError::Unlimited)) => {
                        self.ledger.arm(None);
                        return;
                    }
                    (None, Err(EngineError::Unavailable(_))) if fault.is_some() => {
                        expected_after = None;
                    }
                    (None, other) => panic!("{ctx}: increment on unlimited gave {other:?}"),
                    (Some(b), _) => expected_after = Some(b + v),
                }
                r.map(|_| ())
            }
            Op::Decrement(v) => {
                expected_after = before.map(|b| b.saturating_sub(v));
                self.engine
                    .update(&self.key, CreditOp::Decrement(credits(v)))
                    .await
                    .map(|_| ())
            }
            Op::Refill(amount) => {
                self.clock.advance(DAY_MS);
                let refill =
                    Refill::new(RefillInterval::Daily, Credits::new(amount).unwrap(), None)
                        .unwrap();
                let period_start = refill.period_start(self.clock.now_ms());
                expected_after = before.map(|b| b.max(amount));
                self.engine
                    .update(
                        &self.key,
                        CreditOp::Refill {
                            amount: credits(amount),
                            period_start,
                        },
                    )
                    .await
                    .map(|_| ())
            }
            Op::Reserve { .. }
            | Op::Settle { .. }
            | Op::Release { .. }
            | Op::RetryReserve { .. }
            | Op::Once { .. }
            | Op::PoolIncrement(_) => {
                unreachable!("hold and idempotent ops run in their own steps")
            }
        };
        let faulted = self.ledger.fired.load(Ordering::SeqCst) > fired_before;
        match result {
            Ok(()) if !faulted => {
                self.balance = expected_after;
                self.check(ctx, op).await;
            }
            Ok(()) if matches!(op, Op::Spend(_) | Op::Shared(_)) => {
                // A spend's answer is definitive even if a later bookkeeping call failed.
                self.heal().await;
                self.balance = expected_after;
                self.expire_model();
                self.check(ctx, op).await;
            }
            Ok(()) | Err(_) => {
                // The op may or may not have applied; after healing it must be one of them
                // (plus what holds expiring meanwhile gave back).
                self.heal().await;
                let back = self.due_back();
                let now = self.engine.balance(&self.key).await.unwrap();
                let plus = |b: Option<u64>| b.map(|b| b + back);
                assert!(
                    now == plus(before) || now == plus(expected_after),
                    "{ctx}: after a fault in {op:?} ({result:?}) the balance is {now:?}, \
                     expected {before:?} (not applied) or {expected_after:?} (applied), \
                     plus {back} from expired holds"
                );
                if now != plus(before) && matches!(op, Op::Spend(_) | Op::Shared(_)) {
                    panic!("{ctx}: a failed spend ({result:?}) spent credits");
                }
                self.balance = now.map(|n| n.saturating_sub(back));
                self.expire_model();
                self.check(ctx, op).await;
            }
        }
        // The op's own effect, without what expiring holds gave back meanwhile.
        let after = self.balance.map(|a| a - self.step_back);
        match (op, before, after) {
            (Op::Increment(v), Some(b), Some(a)) if a == b + v => self.granted += v,
            (Op::Refill(_), Some(b), Some(a)) if a > b => self.refilled += a - b,
            (
                Op::Spend(_)
                | Op::Shared(_)
                | Op::PoolIncrement(_)
                | Op::Drain
                | Op::Crash
                | Op::Increment(_)
                | Op::Refill(_)
                | Op::Once { .. },
                _,
                _,
            ) => {}
            _ => self.overwritten = true,
        }
    }
}

async fn run_sequence(seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let initial = if rng.random_range(0..10) == 0 {
        None
    } else {
        Some(rng.random_range(0..120))
    };
    let mut sim = Sim::new(initial);
    let len = rng.random_range(10..60);
    for i in 0..len {
        let op = random_op(&mut rng);
        let fault = match rng.random_range(0..12) {
            0 => Some(Fault::Before(rng.random_range(0..4))),
            1 => Some(Fault::After(rng.random_range(0..4))),
            _ => None,
        };
        let ctx = format!("seed {seed} step {i} ({op:?}, fault {fault:?})");
        sim.step(op, fault, &ctx).await;
    }
    // Convergence: once traffic stops, the ledger alone holds the exact balance.
    sim.heal().await;
    sim.expire_model();
    sim.engine.drain_all().await.expect("drain");
    let state = sim.ledger.inner.state(&sim.key).await.unwrap().unwrap();
    assert_eq!(
        state.remaining, sim.balance,
        "seed {seed}: ledger after the final drain"
    );
    assert_eq!(
        state.hot_allocated, 0,
        "seed {seed}: nothing left allocated"
    );
    assert_eq!(state.held, sim.model_held(), "seed {seed}: held at the end");
    // The pool: exact in the ledger, and its books balance to the credit.
    let pool = sim.ledger.inner.state(&sim.pool).await.unwrap().unwrap();
    assert_eq!(
        (pool.remaining, pool.hot_allocated),
        (Some(sim.pool_balance), 0),
        "seed {seed}: the pool after the final drain"
    );
    assert_eq!(
        sim.pool_spent + sim.pool_balance + sim.pool_lost,
        sim.pool_granted,
        "seed {seed}: the pool's books"
    );
    // The credit histories of the key and the pool: seqs without gaps, the chain over
    // the spends counted between entries, and the replay ends at the ledger's balance.
    for account in [&sim.key, &sim.pool] {
        let mut entries = sim
            .ledger
            .inner
            .credit_history(account, None, u32::MAX)
            .await
            .unwrap();
        entries.reverse();
        conformance::check_history_chain(&entries);
        let state = sim.ledger.inner.state(account).await.unwrap().unwrap();
        let newest = entries.last().expect("at least the create entry");
        assert_eq!(
            newest
                .balance_after
                .map(|b| b - (state.spent - newest.spent_total)),
            state.remaining,
            "seed {seed}: {account}'s history replays to its balance: {entries:#?}"
        );
    }
    // Conservation: what was granted is outside holds, held, spent, or reported lost
    // (with no set or decrement in the sequence the books must balance exactly).
    if let (Some(b), Some(_)) = (sim.balance, initial) {
        if !sim.overwritten {
            let held = sim.model_held();
            assert!(
                sim.spent + b + held <= sim.granted + sim.refilled,
                "seed {seed}: credits created"
            );
            assert_eq!(
                sim.spent + b + held + sim.lost,
                sim.granted + sim.refilled,
                "seed {seed}: books"
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn model_random_sequences() {
    let cases: u64 = std::env::var("CREDITGATE_MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000);
    let (first, count) = match std::env::var("CREDITGATE_MODEL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        Some(seed) => (seed, 1),
        None => (rand::rng().random::<u64>() >> 1, cases),
    };
    println!(
        "model test: seeds {first}..{} (re-run one with CREDITGATE_MODEL_SEED=<seed>)",
        first + count
    );
    for seed in first..first + count {
        run_sequence(seed).await;
    }
}

/// Many tasks spending concurrently while balances change: never over-spend, and the
/// final ledger balance is exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_spends_with_updates_conserve_credits() {
    let seed = rand::rng().random::<u64>();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let ledger = Arc::new(MemoryLedger::new());
    ledger.create_key("k", Some(500), 0);
    let engine = Arc::new(Engine::new(
        Arc::new(MemoryHotStore::new()),
        ledger.clone(),
        Arc::new(ManualClock::new(0)),
        EngineConfig {
            idle_return: Duration::ZERO,
            ..EngineConfig::default()
        },
    ));
    tokio::spawn(engine.clone().run_prefetcher(std::future::pending::<()>()));
    let spent = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..16u64 {
        let (engine, spent) = (engine.clone(), spent.clone());
        let cost = 1 + t % 3;
        tasks.push(tokio::spawn(async move {
            for _ in 0..200 {
                if let Decision::Valid { .. } = engine
                    .spend(&"k".into(), Cost::new(cost).unwrap())
                    .await
                    .expect("spend")
                {
                    spent.fetch_add(cost, Ordering::SeqCst);
                }
            }
        }));
    }
    let mut increments = 0;
    for _ in 0..30 {
        let v = rng.random_range(0..50);
        engine
            .update(&"k".into(), CreditOp::Increment(credits(v)))
            .await
            .expect("increment");
        increments += v;
        engine.reconcile_once().await.expect("reconcile");
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    engine.drain_all().await.unwrap();
    let s = ledger.state(&"k".into()).await.unwrap().unwrap();
    let spent = spent.load(Ordering::SeqCst);
    assert!(
        spent <= 500 + increments,
        "over-spend: {spent} of {}",
        500 + increments
    );
    assert_eq!(s.remaining, Some(500 + increments - spent), "seed {seed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hot_store_conforms() {
    creditgate_limiter::hot_conformance::run_all(Arc::new(MemoryHotStore::new())).await;
}

/// A hot store whose drains of one key fail (that key's Redis calls time out, say).
struct DrainFailsFor {
    inner: MemoryHotStore,
    key: KeyId,
}

#[async_trait]
impl HotStore for DrainFailsFor {
    async fn epoch(&self) -> Result<String, HotError> {
        self.inner.epoch().await
    }
    async fn spend(&self, key: &KeyId, cost: Cost) -> Result<SpendReply, HotError> {
        self.inner.spend(key, cost).await
    }
    async fn spend_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
        probe: bool,
    ) -> Result<(bool, Vec<SpendReply>), HotError> {
        self.inner.spend_all(accounts, cost, probe).await
    }
    async fn credit(&self, key: &KeyId, c: &Credit<'_>) -> Result<CreditReply, HotError> {
        self.inner.credit(key, c).await
    }
    async fn sync_unalloc(&self, key: &KeyId, u: Option<u64>, v: u64) -> Result<(), HotError> {
        self.inner.sync_unalloc(key, u, v).await
    }
    async fn drain(&self, key: &KeyId, t: &str, idle: u64) -> Result<Drained, HotError> {
        if *key == self.key {
            return Err(HotError::Unreachable("injected".into()));
        }
        self.inner.drain(key, t, idle).await
    }
    async fn fence(&self, key: &KeyId, g: u64) -> Result<Drained, HotError> {
        self.inner.fence(key, g).await
    }
    async fn pending_return(&self, key: &KeyId) -> Result<Option<(String, Drained)>, HotError> {
        self.inner.pending_return(key).await
    }
    async fn returned(&self, key: &KeyId, t: &str) -> Result<(), HotError> {
        self.inner.returned(key, t).await
    }
    async fn resolve_transfer(
        &self,
        key: &KeyId,
        t: &str,
        g: u64,
    ) -> Result<TransferFate, HotError> {
        self.inner.resolve_transfer(key, t, g).await
    }
    async fn lock(
        &self,
        key: &KeyId,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<LockToken>, HotError> {
        self.inner.lock(key, ttl, wait).await
    }
    async fn unlock(&self, key: &KeyId, token: &LockToken) -> Result<(), HotError> {
        self.inner.unlock(key, token).await
    }
    async fn peek(&self, key: &KeyId) -> Result<Option<HotEntry>, HotError> {
        self.inner.peek(key).await
    }
    async fn expire_idle(&self, min_idle_ms: u64) -> Result<usize, HotError> {
        self.inner.expire_idle(min_idle_ms).await
    }
}

/// One key whose hot-store calls fail does not strand the others: the reconciler and
/// the shutdown drain log it, count it and go on.
#[tokio::test]
async fn a_failing_key_does_not_stop_the_reconciler_or_the_shutdown_drain() {
    let (a, b) = (KeyId::from("key_a"), KeyId::from("key_b"));
    let ledger = Arc::new(MemoryLedger::new());
    ledger.create_key(a.clone(), Some(100), 0);
    ledger.create_key(b.clone(), Some(100), 0);
    let hot = Arc::new(DrainFailsFor {
        inner: MemoryHotStore::new(),
        key: a.clone(),
    });
    let engine = Engine::new(
        hot,
        ledger.clone(),
        Arc::new(ManualClock::new(0)),
        EngineConfig {
            idle_return: Duration::ZERO,
            ..EngineConfig::default()
        },
    );
    let one = Cost::new(1).unwrap();
    for key in [&a, &b] {
        assert!(matches!(
            engine.spend(key, one).await.unwrap(),
            Decision::Valid { .. }
        ));
    }
    let report = engine.reconcile_once().await.expect("the pass completes");
    assert_eq!(report.key_errors, 1, "{report:?}");
    assert_eq!(report.drained_keys, 1, "{report:?}");
    let remaining = |k: KeyId| {
        let ledger = ledger.clone();
        async move { ledger.state(&k).await.unwrap().unwrap().remaining }
    };
    assert_eq!(
        remaining(b.clone()).await,
        Some(99),
        "b was returned exactly"
    );
    assert_eq!(
        engine.balance(&a).await.unwrap(),
        Some(99),
        "a is still exact"
    );

    engine.spend(&b, one).await.unwrap();
    let err = engine.drain_all().await.expect_err("a's drain fails");
    assert!(err.to_string().contains("1 keys"), "{err}");
    assert_eq!(remaining(b).await, Some(98), "b was drained despite a");
}

/// A pool and its keys: concurrent joint spends take from a key and the pool together,
/// both or neither. With 5 keys of 50 and a pool of 100, exactly 100 spends pass, no key
/// passes its own 50, and the pool ends at 0; with the pool at 1,000, the keys decide
/// (250). Then the same with increments and a `set` of the pool racing the spends:
/// every credit granted to the pool is accounted for, to the credit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_pools_spend_with_their_keys_both_or_neither() {
    use creditgate_limiter::SharedOutcome;
    for (pool_credits, want) in [(100u64, 100u64), (1_000, 250)] {
        let ledger = Arc::new(MemoryLedger::new());
        let keys: Vec<KeyId> = (0..5).map(|i| KeyId::from(format!("key_{i}"))).collect();
        for k in &keys {
            ledger.create_key(k.clone(), Some(50), 0);
        }
        let pool = KeyId::from("id_pool");
        ledger.create_key(pool.clone(), Some(pool_credits), 0);
        let engine = Arc::new(Engine::new(
            Arc::new(MemoryHotStore::new()),
            ledger.clone(),
            Arc::new(ManualClock::new(0)),
            EngineConfig::default(),
        ));
        let mut tasks = Vec::new();
        for i in 0..500usize {
            let (engine, key, pool) = (engine.clone(), keys[i % 5].clone(), pool.clone());
            tasks.push(tokio::spawn(async move {
                let d = engine
                    .spend_shared(&key, &pool, Cost::new(1).unwrap())
                    .await
                    .expect("spend");
                (i % 5, d)
            }));
        }
        let mut per_key = [0u64; 5];
        let mut valid = 0;
        for t in tasks {
            let (k, d) = t.await.unwrap();
            match d.outcome {
                SharedOutcome::Valid => {
                    valid += 1;
                    per_key[k] += 1;
                }
                SharedOutcome::KeyExceeded => assert_eq!(d.key, Some(0), "{d:?}"),
                SharedOutcome::PoolExceeded => assert_eq!(d.pool, Some(0), "{d:?}"),
                SharedOutcome::NotFound => panic!("{d:?}"),
            }
        }
        assert_eq!(valid, want, "pool {pool_credits}");
        assert!(per_key.iter().all(|&n| n <= 50), "{per_key:?}");
        engine.drain_all().await.unwrap();
        let remaining = |k: KeyId| {
            let ledger = ledger.clone();
            async move { ledger.state(&k).await.unwrap().unwrap().remaining.unwrap() }
        };
        assert_eq!(remaining(pool.clone()).await, pool_credits - want);
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(remaining(k.clone()).await, 50 - per_key[i], "key {i}");
        }
    }

    // Increments and a set of the pool race the spends.
    let seed = rand::rng().random::<u64>();
    println!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let ledger = Arc::new(MemoryLedger::new());
    let key = KeyId::from("key_racing");
    let pool = KeyId::from("id_racing");
    ledger.create_key(key.clone(), Some(1_000_000), 0);
    ledger.create_key(pool.clone(), Some(300), 0);
    let engine = Arc::new(Engine::new(
        Arc::new(MemoryHotStore::new()),
        ledger.clone(),
        Arc::new(ManualClock::new(0)),
        EngineConfig {
            idle_return: Duration::ZERO,
            ..EngineConfig::default()
        },
    ));
    tokio::spawn(engine.clone().run_prefetcher(std::future::pending::<()>()));
    let spent = Arc::new(AtomicU64::new(0));
    let spent_after_set = Arc::new(AtomicU64::new(0));
    let set_done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for t in 0..8u64 {
        let (engine, key, pool) = (engine.clone(), key.clone(), pool.clone());
        let (spent, spent_after_set, set_done) =
            (spent.clone(), spent_after_set.clone(), set_done.clone());
        let cost = 1 + t % 3;
        tasks.push(tokio::spawn(async move {
            for _ in 0..150 {
                let after = set_done.load(Ordering::SeqCst);
                let d = engine
                    .spend_shared(&key, &pool, Cost::new(cost).unwrap())
                    .await
                    .expect("spend");
                if d.outcome == SharedOutcome::Valid {
                    spent.fetch_add(cost, Ordering::SeqCst);
                    if after {
                        spent_after_set.fetch_add(cost, Ordering::SeqCst);
                    }
                }
            }
        }));
    }
    let mut increments = 0;
    for i in 0..20 {
        let v = rng.random_range(0..40);
        engine
            .update(&pool, CreditOp::Increment(credits(v)))
            .await
            .expect("increment");
        increments += v;
        if i == 10 {
            engine
                .update(&pool, CreditOp::Set(Some(credits(200))))
                .await
                .expect("set");
            set_done.store(true, Ordering::SeqCst);
            increments = 0;
        }
        engine.reconcile_once().await.expect("reconcile");
        tokio::task::yield_now().await;
    }
    for t in tasks {
        t.await.unwrap();
    }
    engine.drain_all().await.unwrap();
    let spent = spent.load(Ordering::SeqCst);
    let key_left = ledger
        .state(&key)
        .await
        .unwrap()
        .unwrap()
        .remaining
        .unwrap();
    assert_eq!(
        key_left,
        1_000_000 - spent,
        "seed {seed}: the key paid every spend"
    );
    // After the set, the pool had 200 plus the later increments; spends that began
    // before the set may land after it, so the pool is bounded by what it was granted.
    let pool_left = ledger
        .state(&pool)
        .await
        .unwrap()
        .unwrap()
        .remaining
        .unwrap();
    let after = spent_after_set.load(Ordering::SeqCst);
    assert!(
        pool_left <= 200 + increments - after,
        "seed {seed}: pool {pool_left} > 200 + {increments} - {after}"
    );
}

/// An idempotent verification of a pooled key: the ledger spends from both in the
/// transaction that decides the claim; nothing from either when one cannot pay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotent_shared_spend_decides_with_both_balances() {
    use creditgate_limiter::SharedOutcome;
    let ledger = Arc::new(MemoryLedger::new());
    let (key, pool) = (KeyId::from("key_i"), KeyId::from("id_i"));
    ledger.create_key(key.clone(), Some(10), 0);
    ledger.create_key(pool.clone(), Some(4), 0);
    let engine = Engine::new(
        Arc::new(MemoryHotStore::new()),
        ledger.clone(),
        Arc::new(ManualClock::new(0)),
        EngineConfig::default(),
    );
    // Credits in the hot store first: the idempotent spend drains them back.
    let d = engine
        .spend_shared(&key, &pool, Cost::new(1).unwrap())
        .await
        .unwrap();
    assert_eq!(
        (d.outcome, d.key, d.pool),
        (SharedOutcome::Valid, Some(9), Some(3))
    );
    for (n, (idem, cost, want, key_left, pool_left)) in [
        ("a", 2, SharedOutcome::Valid, 7, 1),
        ("b", 2, SharedOutcome::PoolExceeded, 7, 1),
    ]
    .into_iter()
    .enumerate()
    {
        let claim = IdemClaim {
            scope: "ws",
            key: idem,
            fingerprint: "f",
            token: idem,
            now_ms: 0,
            lease_until_ms: 10_000,
            expired_before_ms: -1,
        };
        assert_eq!(
            ledger.claim_idempotency(&claim).await.unwrap(),
            ClaimOutcome::Claimed
        );
        let mark = IdemMark {
            scope: "ws",
            key: idem,
            token: idem,
        };
        let d = engine
            .spend_shared_once(&key, &pool, Cost::new(cost).unwrap(), &mark)
            .await
            .unwrap();
        assert_eq!(
            (d.outcome, d.key, d.pool),
            (want, Some(key_left), Some(pool_left)),
            "call {n}"
        );
        let record = ledger.idempotency("ws", idem).await.unwrap().unwrap();
        let decided = want == SharedOutcome::Valid;
        assert_eq!(
            record.state == IdemState::Decided,
            decided,
            "call {n}: decided only with the spend"
        );
    }
}

/// A drain whose ledger step failed on one node (its return queued there) is completed
/// by another node before that one reads the ledger's balance: the credits on their way
/// back are spendable at once, never refused, and the first node's retry adds nothing.
#[tokio::test]
async fn a_return_that_failed_on_one_node_is_completed_by_another() {
    let ledger = Arc::new(FaultyLedger::new());
    let k = KeyId::from("key_returning");
    ledger.inner.create_key(k.clone(), Some(10), 0);
    let hot = Arc::new(MemoryHotStore::new());
    let clock = Arc::new(ManualClock::new(0));
    let config = || EngineConfig {
        idle_return: Duration::ZERO,
        ..EngineConfig::default()
    };
    let a = Engine::new(hot.clone(), ledger.clone(), clock.clone(), config());
    let b = Engine::new(hot.clone(), ledger.clone(), clock, config());
    let one = Cost::new(1).unwrap();
    for _ in 0..3 {
        assert!(matches!(
            a.spend(&k, one).await.unwrap(),
            Decision::Valid { .. }
        ));
    }
    let ledger_remaining = || async { ledger.inner.state(&k).await.unwrap().unwrap().remaining };
    let before = ledger_remaining().await;
    // Node a returns the key's idle hot balance; the ledger step fails and the return
    // waits in a's queue.
    ledger.fail_returns.store(true, Ordering::SeqCst);
    a.reconcile_once().await.expect("the pass completes");
    ledger.fail_returns.store(false, Ordering::SeqCst);
    assert_eq!(
        ledger_remaining().await,
        before,
        "the ledger does not have them"
    );
    assert!(
        hot.pending_return(&k).await.unwrap().is_some(),
        "the drain is recorded in the hot store"
    );
    // Node b needs a refill: it completes the return first, and spends.
    assert_eq!(
        b.spend(&k, one).await.unwrap(),
        Decision::Valid { remaining: Some(6) }
    );
    // Node a's queued retry finds the transfer applied: nothing is added twice.
    a.reconcile_once().await.expect("the pass completes");
    b.drain_all().await.expect("drain");
    a.drain_all().await.expect("drain");
    assert_eq!(ledger_remaining().await, Some(6));
    assert_eq!(a.balance(&k).await.unwrap(), Some(6));
}

/// A hot key's first second: once it has spent 100 requests' worth, its chunks follow
/// what it spent so far, rather than staying at the minimum (a ledger transaction every
/// ten requests) until its first one-second window closes.
#[tokio::test(start_paused = true)]
async fn a_new_hot_key_gets_chunks_of_its_rate_within_its_first_second() {
    const START: u64 = 1_000_000_000;
    let ledger = Arc::new(MemoryLedger::new());
    ledger.create_key("k", Some(START), 0);
    let engine = Arc::new(Engine::new(
        Arc::new(MemoryHotStore::new()),
        ledger.clone(),
        Arc::new(ManualClock::new(0)),
        EngineConfig::default(),
    ));
    // 1,000 spends a second for 900 ms, one at a time, nothing prefetched in between.
    for _ in 0..900 {
        let d = engine
            .spend(&"k".into(), Cost::new(1).unwrap())
            .await
            .expect("spend");
        assert!(matches!(d, Decision::Valid { .. }), "{d:?}");
        tokio::time::advance(Duration::from_millis(1)).await;
    }
    let s = ledger.state(&"k".into()).await.unwrap().unwrap();
    // At the minimum chunk (10 requests) that is 90 refills moving 900 credits; here 10
    // of 10, then chunks of 5 s of what it spent so far (500, then 3,000): 3,600.
    let moved = START - s.remaining.unwrap();
    assert!(moved >= 2_000, "the hot store got {moved} credits");
}

/// A key spent every 5 s, on a node with other traffic, keeps its hot balance across its
/// gaps: after its first gap (which it cannot know yet) the reconciler leaves it alone,
/// so its spends are answered by the hot store, not by a return and a refill each. Once
/// the node's traffic stops, every balance goes back after `idle_return` as before.
#[tokio::test(start_paused = true)]
async fn a_key_spent_every_few_seconds_keeps_its_balance_between_spends() {
    const START: u64 = 1_000;
    let ledger = Arc::new(MemoryLedger::new());
    ledger.create_key("k", Some(START), 0);
    ledger.create_key("busy", Some(START), 0);
    let engine = Arc::new(Engine::new(
        Arc::new(MemoryHotStore::new()),
        ledger.clone(),
        Arc::new(ManualClock::new(0)),
        EngineConfig::default(),
    ));
    let key: KeyId = "k".into();
    let spend = |engine: Arc<Engine>, key: &'static str| async move {
        let d = engine
            .spend(&key.into(), Cost::new(1).unwrap())
            .await
            .expect("spend");
        assert!(matches!(d, Decision::Valid { .. }), "{d:?}");
    };
    // `k` once, then 5 s of the other key's traffic (a spend every 500 ms) with a
    // reconciler pass every second.
    let spend_then_wait = |engine: Arc<Engine>| async move {
        spend(engine.clone(), "k").await;
        for i in 0..10 {
            spend(engine.clone(), "busy").await;
            tokio::time::advance(Duration::from_millis(500)).await;
            if i % 2 == 1 {
                engine.reconcile_once().await.expect("reconcile");
            }
        }
    };
    // The first gap: returned after `idle_return` (2 s), as before.
    spend_then_wait(engine.clone()).await;
    let s = ledger.state(&key).await.unwrap().unwrap();
    assert_eq!(s.hot_allocated, 0, "returned during the first gap");
    spend_then_wait(engine.clone()).await;
    let before = ledger.state(&key).await.unwrap().unwrap();
    assert!(before.hot_allocated > 0, "kept over the second gap");
    for _ in 0..6 {
        spend_then_wait(engine.clone()).await;
    }
    let after = ledger.state(&key).await.unwrap().unwrap();
    assert_eq!(
        after.version, before.version,
        "six spends 5 s apart changed the ledger"
    );
    // Traffic stops: both keys go back within `idle_return` and a pass.
    for _ in 0..3 {
        tokio::time::advance(Duration::from_secs(1)).await;
        engine.reconcile_once().await.expect("reconcile");
    }
    for (name, spent) in [("k", 8), ("busy", 80)] {
        let end = ledger.state(&name.into()).await.unwrap().unwrap();
        assert_eq!(end.hot_allocated, 0, "{name} returned once traffic stopped");
        assert_eq!(end.remaining, Some(START - spent), "{name}");
    }
}
