//! The two ports of the escrow engine.
//!
//! * [`Ledger`]: the durable truth (SQL). Per key: `remaining` (credits not handed out),
//!   `hot_allocated` (handed to the hot store, not yet returned or reported spent), a
//!   `generation` bumped by every fencing operation (set / decrement / refill), a
//!   `version` bumped by every change of `remaining`, and a log of transfers whose unique
//!   ids make every movement idempotent.
//! * [`HotStore`]: the fast store every spend goes through (process memory or Redis). Per
//!   key: the balance `bal` it may spend, the ledger snapshot `unalloc` (with the ledger
//!   `version` it came from), the `generation` it serves, and a short per-key lock.
//!
//! Every hot-store method is one atomic step on one key.

use std::time::Duration;

use async_trait::async_trait;
use creditgate_domain::{Cost, Credits, KeyId};

/// Failure of a hot-store call.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HotError {
    /// The store could not be reached; the call certainly did not run.
    #[error("hot store unreachable: {0}")]
    Unreachable(String),
    /// The call may or may not have run (e.g. a timeout after sending).
    #[error("hot store outcome unknown: {0}")]
    Ambiguous(String),
    #[error("hot store error: {0}")]
    Other(String),
}

/// Failure of a ledger call. On error the ledger transaction did not commit.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    #[error("ledger error: {0}")]
    Other(String),
    /// The call carried an [`IdemMark`] whose claim another request took over (its
    /// lease ran out): nothing changed.
    #[error("another request with this idempotency key took over")]
    Superseded,
}

/// Reply of [`HotStore::spend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpendReply {
    /// Spent; `remaining = bal + unalloc` after the spend, `bal` what the hot store
    /// still holds (the engine prefetches when it runs low).
    Valid { remaining: u64, bal: u64 },
    /// Not spent: the hot store knows the whole balance (`bal + unalloc`, with a valid
    /// snapshot) and it is below the cost.
    Exceeded { remaining: u64 },
    /// Not spent: the hot balance is too low and the snapshot does not settle it.
    Low { bal: u64, generation: u64 },
    /// No entry for this key.
    Miss,
}

/// Reply of [`HotStore::credit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditReply {
    /// Credited. `spent`: credits spent from the hot store since the last report (drain,
    /// fence or credit), now reported to the ledger so `hot_allocated` stays bounded.
    Credited { spent: u64 },
    /// This transfer id was already credited: nothing changed.
    Duplicate,
    /// Refused: the hot store serves a newer generation, or the transfer was cancelled.
    Refused,
}

/// What one drain or fence took out of the hot store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Drained {
    /// Balance moved out (to be returned to the ledger).
    pub amount: u64,
    /// Credits spent from the hot store since the previous drain or fence.
    pub spent: u64,
    /// Generation the drained balance belonged to.
    pub generation: u64,
}

/// How an orphaned allocation was resolved in the hot store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferFate {
    /// The hot store had credited it, reporting `spent` with the credit.
    Credited { spent: u64 },
    /// It had not, and now never will (the id is marked refused).
    Refused,
}

/// A snapshot of one hot entry, for tests, `getKey` and the reconciler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HotEntry {
    pub bal: u64,
    pub unalloc: Option<u64>,
    pub generation: u64,
    pub spent: u64,
    pub idle_ms: u64,
}

/// One credit of the hot store: a transfer from the ledger (or, with `amount` 0, a
/// snapshot refresh) and the ledger state it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit<'a> {
    /// The transfer's id: crediting it twice changes nothing.
    pub transfer_id: &'a str,
    /// The ledger generation the credits belong to.
    pub generation: u64,
    /// Credits added to `bal`.
    pub amount: u64,
    /// The ledger's `remaining` after the transfer (the snapshot).
    pub unalloc: u64,
    /// The ledger `version` of that snapshot.
    pub version: u64,
    /// The hot-store epoch the ledger recorded the allocation under
    /// ([`HotStore::epoch_of`]). The store credits only under this epoch: credits
    /// landing in a newer one would be live while the ledger counts them with the old
    /// one, written off when it notices the change.
    pub epoch: &'a str,
}

/// Proof of holding a key's refill lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockToken(pub String);

#[async_trait]
pub trait HotStore: Send + Sync {
    /// Identifies the store's data: changes when the data was lost (restart, flush,
    /// failover). Balances credited under another epoch are never spent again.
    async fn epoch(&self) -> Result<String, HotError>;

    /// The epoch `key`'s entry lives under. A store whose data is split into shards
    /// that lose data independently (Redis Cluster) has one epoch per shard; the others
    /// have one for all keys.
    async fn epoch_of(&self, key: &KeyId) -> Result<String, HotError> {
        let _ = key;
        self.epoch().await
    }

    /// Whether [`HotStore::epoch`] names the epoch of every key. `false` (per-shard
    /// epochs): the reconciler does not write off by [`HotStore::epoch`]; what a lost
    /// shard held is written off per key, by the key's next allocation.
    fn one_epoch(&self) -> bool {
        true
    }

    /// Whether [`HotStore::spend_all`] can spend from any set of accounts in one atomic
    /// step. `false`: only from accounts at one home ([`HotStore::colocates`]).
    fn joint_spends(&self) -> bool {
        !self.colocates()
    }

    /// Whether accounts spent together must be held at one home (a Redis Cluster: one
    /// hash slot). The engine then addresses a pooled key's entries at its pool's home
    /// ([`hot_address`]: `<key>@<pool>`), and the store gives epochs of such addresses
    /// as `<home>#<epoch>` so the ledger keeps each account's hot credits at one home
    /// at a time ([`rules::held_elsewhere`](crate::rules::held_elsewhere)).
    fn colocates(&self) -> bool {
        false
    }

    /// Whether a `spend` that was polled once is applied whole or not at all even when
    /// its caller stops waiting (drops the future): it never suspends (an in-process
    /// store), or it hands the call to a task of its own. Then the engine runs a spend
    /// the hot store decides in the caller's task, without a task of its own.
    fn spend_survives_cancellation(&self) -> bool {
        false
    }

    /// `bal >= cost` (and a valid snapshot) → `bal -= cost`, `Valid`. Otherwise
    /// `Exceeded` (valid snapshot, `bal + unalloc < cost`), `Low` or `Miss`.
    async fn spend(&self, key: &KeyId, cost: Cost) -> Result<SpendReply, HotError>;

    /// Spends `cost` from every one of `accounts` (distinct) in one atomic step, or from
    /// none: each account's reply is what [`HotStore::spend`] would answer for it alone,
    /// and the spend happens only if every one is `Valid` (the replies are then after
    /// it). Otherwise, or with `probe`, nothing is spent and a `Valid` reply says the
    /// account could pay, with its balance as it is. Answers whether it spent. (Shared
    /// pools: a key and its identity's pool pay together.)
    async fn spend_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
        probe: bool,
    ) -> Result<(bool, Vec<SpendReply>), HotError>;

    /// Adds `credit.amount` to `bal` (creating the entry), idempotent on its transfer id;
    /// refused when the entry serves a newer generation, the transfer was refused, or
    /// the store's epoch is no longer `credit.epoch` (nothing is credited). Also
    /// records the ledger snapshot `unalloc` if `version` is newer than the one held.
    async fn credit(&self, key: &KeyId, credit: &Credit<'_>) -> Result<CreditReply, HotError>;

    /// Records the ledger snapshot if `version` is newer than the one held; `None`
    /// marks the snapshot unknown (before a ledger change that adds credits).
    async fn sync_unalloc(
        &self,
        key: &KeyId,
        unalloc: Option<u64>,
        version: u64,
    ) -> Result<(), HotError>;

    /// Moves the whole balance out (`bal → 0`), if the key has been idle for at least
    /// `min_idle_ms`, recording `transfer_id`; idempotent on it. The drained amount is
    /// added to the snapshot so `bal + unalloc` stays the exact balance meanwhile.
    async fn drain(
        &self,
        key: &KeyId,
        transfer_id: &str,
        min_idle_ms: u64,
    ) -> Result<Drained, HotError>;

    /// Atomically drains the balance and adopts `generation` (creating the entry if
    /// needed). Idempotent: fencing again to the same generation returns the amount the
    /// first fence drained. Older generations are ignored.
    async fn fence(&self, key: &KeyId, generation: u64) -> Result<Drained, HotError>;

    /// Resolves an allocation whose credit step may not have happened.
    async fn resolve_transfer(
        &self,
        key: &KeyId,
        transfer_id: &str,
        generation: u64,
    ) -> Result<TransferFate, HotError>;

    /// Takes the key's refill lock if free. If it is held, waits (up to `wait`) for its
    /// release and returns `None`, so the caller retries its spend before locking again.
    async fn lock(
        &self,
        key: &KeyId,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<LockToken>, HotError>;
    async fn unlock(&self, key: &KeyId, token: &LockToken) -> Result<(), HotError>;

    async fn peek(&self, key: &KeyId) -> Result<Option<HotEntry>, HotError>;

    /// The drain of `key` whose ledger step is not confirmed yet (see
    /// [`HotStore::returned`]): its transfer id and what it moved out. A drain with a
    /// transfer id made by [`drain_transfer_id`] records one; while it is there, further
    /// drains of the key move nothing. Any node holding the key's lock may complete it
    /// (the ledger applies a transfer id once), so credits drained by a node whose
    /// ledger step failed are not stranded with that node.
    async fn pending_return(&self, key: &KeyId) -> Result<Option<(String, Drained)>, HotError>;

    /// The ledger has the drain `transfer_id` of `key`: forget its record.
    async fn returned(&self, key: &KeyId, transfer_id: &str) -> Result<(), HotError>;

    /// Removes entries that hold nothing and have been idle for `min_idle_ms`.
    async fn expire_idle(&self, min_idle_ms: u64) -> Result<usize, HotError>;
}

/// A drain's transfer id that the hot store records until the ledger has it
/// ([`HotStore::pending_return`]): `drain-<nonce>`, the nonce below 2^53 (a number a
/// Redis script keeps exactly).
pub fn drain_transfer_id() -> String {
    format!("drain-{}", rand::random::<u64>() >> 11)
}

/// The hot-store address of `account` held at `home`'s place: `<account>@<home>`, or
/// the account itself when it is its own home.
pub fn hot_address(account: &KeyId, home: &str) -> KeyId {
    if home.is_empty() || home == account.as_str() {
        account.clone()
    } else {
        KeyId::from(format!("{account}@{home}"))
    }
}

/// The ledger account a hot-store address belongs to, and its home (`""`: its own).
pub fn split_address(address: &KeyId) -> (KeyId, &str) {
    match address.as_str().split_once('@') {
        Some((account, home)) => (KeyId::from(account), home),
        None => (address.clone(), ""),
    }
}

/// The ledger state of one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LedgerState {
    /// `None` = unlimited.
    pub remaining: Option<u64>,
    pub hot_allocated: u64,
    pub generation: u64,
    pub version: u64,
    /// Credits in open holds (outside `remaining`, not spent).
    pub held: u64,
    /// Credits of single spends the ledger has counted (the credit history's
    /// `spent_total` now).
    pub spent: u64,
}

/// Where a hold stands. It leaves `Open` exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldState {
    Open,
    Settled,
    Released,
    Expired,
}

/// Credits moved out of a key's balance before the work, to be settled (spent up to a
/// cost, the rest returned), released or expired exactly once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hold {
    pub id: String,
    pub key: KeyId,
    pub amount: u64,
    /// Whether `amount` left the balance (`false`: the key was unlimited at the reserve,
    /// and the hold only records the cost).
    pub funded: bool,
    pub state: HoldState,
    /// What the settle spent.
    pub cost: Option<u64>,
    pub created_at_ms: i64,
    pub expires_at_ms: i64,
    pub closed_at_ms: Option<i64>,
}

/// Request to move `amount` of a key's balance into a new hold.
#[derive(Debug, Clone)]
pub struct ReserveRequest<'a> {
    pub key: &'a KeyId,
    /// The hold's id: a reserve with an id that exists changes nothing.
    pub hold_id: &'a str,
    pub amount: u64,
    pub now_ms: i64,
    pub expires_at_ms: i64,
    /// The idempotency claim the reserve decides, if any.
    pub mark: Option<&'a IdemMark<'a>>,
}

/// Where an idempotency key's record stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdemState {
    /// A request holds the claim and has not decided.
    Claimed,
    /// The request's change is made (in the transaction that made it); its answer is
    /// not stored.
    Decided,
    /// The answer is stored.
    Answered,
}

impl IdemState {
    pub fn as_str(self) -> &'static str {
        match self {
            IdemState::Claimed => "claimed",
            IdemState::Decided => "decided",
            IdemState::Answered => "answered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "claimed" => IdemState::Claimed,
            "decided" => IdemState::Decided,
            "answered" => IdemState::Answered,
            _ => return None,
        })
    }
}

/// One idempotency key's record: one per scope (workspace) and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemRecord {
    pub fingerprint: String,
    /// The request holding (or last holding) the claim.
    pub token: String,
    pub state: IdemState,
    /// The answer as sent, once `Answered`.
    pub answer: Option<String>,
    pub created_at_ms: i64,
    pub lease_until_ms: i64,
}

/// A request's claim on an idempotency key.
#[derive(Debug, Clone)]
pub struct IdemClaim<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    /// Digest of the request (route and body): the same key with another request is
    /// refused.
    pub fingerprint: &'a str,
    /// Unique to this request.
    pub token: &'a str,
    pub now_ms: i64,
    /// Until when the claim is this request's; after it, a retry may take it over if
    /// nothing was decided.
    pub lease_until_ms: i64,
    /// A record created before this is gone (the retention window).
    pub expired_before_ms: i64,
}

/// Result of [`Ledger::claim_idempotency`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// The claim is this token's (new, or taken over from a lapsed one that decided
    /// nothing).
    Claimed,
    /// The key was used with another request.
    Mismatch,
    /// Another request holds a live claim.
    InFlight,
    /// A request decided and its record stands (`answer` set once answered).
    Decided(IdemRecord),
}

/// Written by the transaction that makes a change, so the change and the record of the
/// decision commit together or not at all. A mark whose token no longer holds the claim
/// fails the call with [`LedgerError::Superseded`] and changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemMark<'a> {
    pub scope: &'a str,
    pub key: &'a str,
    pub token: &'a str,
}

/// How an open hold is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldClose {
    /// Spend `cost` (more than the hold only if the balance covers the difference) and
    /// return the rest.
    Settle(u64),
    /// Return it all.
    Release,
    /// Return it all, once its time is up.
    Expire,
}

/// Result of a hold call on the ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HoldOutcome {
    /// The hold as it is after the call, and the key's ledger state (`None`: the key was
    /// deleted). `changed`: this call made or closed it (else it was made or closed
    /// before, and nothing changed).
    Hold {
        hold: Hold,
        changed: bool,
        state: Option<LedgerState>,
    },
    /// The ledger's `remaining` cannot cover what the call needs, and the hot store holds
    /// `hot_allocated` more of the key's credits. Nothing changed.
    Short { remaining: u64, hot_allocated: u64 },
    /// No such key (reserve) or hold (close) for this key.
    NotFound,
}

/// Result of a hold call on a pooled key (its hold and its pool's hold together).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairHoldOutcome {
    /// The key's hold after the call, and both accounts' states (`None`: deleted).
    Hold {
        hold: Hold,
        changed: bool,
        key_state: Option<LedgerState>,
        pool_state: Option<LedgerState>,
    },
    /// Account `account` (0 the key, 1 the pool) cannot cover what the call needs;
    /// the hot store holds `hot_allocated` more of it. Nothing changed.
    Short {
        account: usize,
        remaining: u64,
        hot_allocated: u64,
    },
    /// No such key or pool (reserve), or no such pooled hold of this key (close).
    NotFound,
}

/// Request to move credits from the ledger to the hot store.
#[derive(Debug, Clone)]
pub struct AllocateRequest<'a> {
    pub key: &'a KeyId,
    pub transfer_id: &'a str,
    /// The generation the hot store serves (`None` if it has no entry).
    pub generation: Option<u64>,
    /// The hot store's epoch.
    pub epoch: &'a str,
    /// The allocation must cover at least this much (`cost - bal`), else nothing moves.
    pub need: u64,
    /// Preferred size; the grant is `max(need, min(chunk, remaining))`.
    pub chunk: u64,
    /// Recorded as the transfer's creation time (for the reconciler).
    pub now_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AllocateOutcome {
    Granted {
        amount: u64,
        /// Ledger `remaining` after the allocation.
        remaining: u64,
        generation: u64,
        version: u64,
        /// Credits found allocated to a previous epoch of the hot store, written off
        /// by this call (reported as lost, never re-issued).
        lost: u64,
    },
    /// `remaining < need`: nothing moved.
    Insufficient {
        remaining: u64,
        generation: u64,
        version: u64,
        lost: u64,
    },
    /// The ledger is at a newer generation than the hot store: a fence is pending.
    GenerationMoved {
        generation: u64,
    },
    /// The key's hot credits are held at another home of the hot store
    /// ([`Ledger::hot_epoch`] says which): they must come back first. Nothing moved.
    Elsewhere,
    Unlimited,
    NotFound,
}

/// A fencing operation: bump the generation, drain the hot store, write a new balance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceOp {
    /// New balance; `None` = unlimited.
    Set(Option<u64>),
    /// Subtract, clamped at zero.
    Decrement(u64),
    /// Periodic refill: balance becomes `amount` if below it; applied only if the key's
    /// last refill is before `period_start`.
    Refill { amount: u64, period_start: i64 },
}

/// A fence the ledger has begun (generation bumped) and not finished.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingFence {
    pub key: KeyId,
    pub op_id: String,
    pub op: FenceOp,
    pub generation: u64,
    /// Who asked for it (a root key id; `None`: a system change such as a refill),
    /// recorded by its history entry when it finishes, wherever that happens.
    pub actor: Option<String>,
}

/// What a credit history entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// The account was opened with its balance.
    Create,
    Increment,
    Decrement,
    Set,
    /// A periodic refill applied.
    Refill,
    HoldReserve,
    HoldSettle,
    HoldRelease,
    HoldExpire,
    /// Credits a hot store that lost its data held, written off.
    WriteOff,
    /// Credits of an older generation given back after the fence that replaced it
    /// finished (a drain or cancelled allocation whose ledger step came late): that fence
    /// counted them spent.
    LateReturn,
}

/// One entry of an account's credit history: a change of its credits other than a single
/// spend, written in the transaction that made it.
///
/// The balances are the account's books outside holds (`None`: unlimited). Single spends
/// are not entries: `spent_total` counts them as the ledger learns of them, so for two
/// consecutive entries `balance_before(n) == balance_after(n-1) - (spent_total(n) -
/// spent_total(n-1))`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditEntry {
    /// 1, 2, ... per account, without gaps.
    pub seq: u64,
    pub at_ms: i64,
    pub kind: EntryKind,
    /// The amount the change names: the balance created or set, the amount added, taken,
    /// refilled to, held, released, expired, written off or returned; a settle's cost.
    pub value: Option<u64>,
    /// The root key that asked for it; `None` for system changes.
    pub actor: Option<String>,
    pub hold_id: Option<String>,
    pub balance_before: Option<u64>,
    pub balance_after: Option<u64>,
    pub held_before: u64,
    pub held_after: u64,
    /// Credits of single spends the ledger had counted when the entry was written.
    pub spent_total: u64,
    /// Whether both balances were the exact balance then (else upper bounds: the hot
    /// store held credits and may have spent some it had not reported yet).
    pub exact: bool,
}

/// Result of [`Ledger::begin_fence`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BeginFence {
    Begun(PendingFence),
    /// A refill already applied in this period: nothing to do.
    NotDue,
    NotFound,
}

/// An allocation recorded in the ledger whose credit step has not been confirmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingAllocation {
    pub key: KeyId,
    pub transfer_id: String,
    pub amount: u64,
    pub generation: u64,
    pub created_at_ms: i64,
}

/// One settlement of an allocation, for [`Ledger::settle_many`].
#[derive(Debug, Clone)]
pub struct Settlement<'a> {
    pub key: &'a KeyId,
    pub transfer_id: &'a str,
    pub credited: bool,
    pub spent: u64,
}

/// Result of a direct spend on the ledger (hot store unreachable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirectSpend {
    Valid {
        remaining: u64,
    },
    /// The whole balance cannot cover the cost (nothing is held by the hot store).
    Exceeded {
        remaining: u64,
    },
    /// The ledger's part cannot cover the cost, but the hot store holds
    /// `hot_allocated` more of the key's credits: whether the balance covers it is not
    /// known while the hot store cannot be asked. Nothing was spent.
    Undecided {
        remaining: u64,
        hot_allocated: u64,
    },
    Unlimited,
    NotFound,
}

#[async_trait]
pub trait Ledger: Send + Sync {
    async fn state(&self, key: &KeyId) -> Result<Option<LedgerState>, LedgerError>;

    /// One transaction: writes off allocations to another epoch (`lost`), checks the
    /// generation, and moves `max(need, min(chunk, remaining))` from `remaining` to
    /// `hot_allocated` if `remaining >= need`, logging the transfer as pending.
    async fn allocate(&self, req: &AllocateRequest<'_>) -> Result<AllocateOutcome, LedgerError>;

    /// Group commit: the allocations of several keys, each exactly as [`Ledger::allocate`]
    /// would do it, in as few transactions as the ledger can (a SQL ledger: one). One
    /// result per request, in order. The default runs them one by one.
    async fn allocate_many(
        &self,
        reqs: &[AllocateRequest<'_>],
    ) -> Vec<Result<AllocateOutcome, LedgerError>> {
        allocate_each(self, reqs).await
    }

    /// Group commit of [`Ledger::settle_allocation`]s, as [`Ledger::allocate_many`].
    async fn settle_many(&self, items: &[Settlement<'_>]) -> Vec<Result<(), LedgerError>> {
        settle_each(self, items).await
    }

    /// Marks an allocation credited (`true`; `hot_allocated -= spent`, the spends the
    /// hot store reported with the credit) or cancels it (`false`: the amount goes back to
    /// `remaining` unless a `Set` fenced the key since). Idempotent.
    async fn settle_allocation(
        &self,
        key: &KeyId,
        transfer_id: &str,
        credited: bool,
        spent: u64,
    ) -> Result<(), LedgerError>;

    /// Returns a drained hot balance, idempotent on `transfer_id`: `remaining += amount`
    /// (unless a `Set` fenced the key after `drained.generation`) and
    /// `hot_allocated -= amount + spent`. Returns the new state.
    async fn return_drained(
        &self,
        key: &KeyId,
        transfer_id: &str,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError>;

    /// Group commit of [`Ledger::return_drained`]s, as [`Ledger::allocate_many`].
    async fn return_many(
        &self,
        items: &[(&KeyId, &str, Drained)],
    ) -> Vec<Result<LedgerState, LedgerError>> {
        return_each(self, items).await
    }

    /// `remaining += amount` (fails on unlimited or overflow past `max`), with its
    /// history entry (`actor`: the root key that asked).
    async fn increment(
        &self,
        key: &KeyId,
        amount: Credits,
        max: u64,
        mark: Option<&IdemMark<'_>>,
        actor: Option<&str>,
    ) -> Result<IncrementOutcome, LedgerError>;

    /// Step 1 of a fence: bump the generation and log the operation as pending (with
    /// `actor`, for the history entry its finish writes).
    /// Idempotent on `op_id`. Refused (`NotDue`) for a refill already applied in the
    /// period or on an unlimited key; a refill records `now_ms` as the last refill time.
    async fn begin_fence(
        &self,
        key: &KeyId,
        op_id: &str,
        op: FenceOp,
        now_ms: i64,
        mark: Option<&IdemMark<'_>>,
        actor: Option<&str>,
    ) -> Result<BeginFence, LedgerError>;

    /// Step 3: with what the hot store drained at the new generation, write the new
    /// balance (`hot_allocated` becomes 0). Idempotent on `op_id`.
    async fn finish_fence(
        &self,
        fence: &PendingFence,
        drained: Drained,
    ) -> Result<LedgerState, LedgerError>;

    /// Atomic conditional spend on `remaining` (`remaining >= cost`), used when the hot
    /// store cannot be reached. Never touches credits held by the hot store.
    /// With a mark, a spend that happens records the decision in the same transaction.
    async fn spend_direct(
        &self,
        key: &KeyId,
        cost: Cost,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<DirectSpend, LedgerError>;

    /// [`Ledger::spend_direct`] on several accounts (a key and its pool) in one
    /// transaction: the cost leaves every one or none (see
    /// [`rules::spend_direct_all`](crate::rules::spend_direct_all)). A missing account
    /// stops it: nothing is spent, that account answers `NotFound` and the others are
    /// left undecided (answered `Unlimited`).
    /// With a mark, a spend that happens records the decision in the same transaction.
    async fn spend_direct_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<(bool, Vec<DirectSpend>), LedgerError>;

    /// Pending allocations created before `older_than_ms`, of one key or of all.
    async fn pending_allocations(
        &self,
        key: Option<&KeyId>,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingAllocation>, LedgerError>;
    /// Begun, unfinished fences created before `older_than_ms`, of one key or of all.
    async fn pending_fences(
        &self,
        key: Option<&KeyId>,
        older_than_ms: i64,
        limit: u32,
    ) -> Result<Vec<PendingFence>, LedgerError>;

    /// Writes off every allocation held by a hot-store epoch other than `epoch`;
    /// returns (key, credits lost) for each key.
    async fn write_off_other_epochs(&self, epoch: &str) -> Result<Vec<(KeyId, u64)>, LedgerError>;

    /// The hot-store epoch the key's hot credits belong to (`None`: never allocated);
    /// its home ([`rules::home_of`](crate::rules::home_of)) is where they are held.
    async fn hot_epoch(&self, key: &KeyId) -> Result<Option<String>, LedgerError>;

    /// Writes off what `key` had allocated to a hot-store epoch other than `epoch` (a
    /// store with one epoch per shard: that key's shard lost its data); returns the
    /// credits written off (0: same epoch, or nothing allocated).
    async fn write_off_key(&self, key: &KeyId, epoch: &str) -> Result<u64, LedgerError>;

    /// One transaction: moves `amount` from `remaining` into a new open hold (on an
    /// unlimited key: an unfunded hold). Idempotent on the hold id.
    async fn reserve(&self, req: &ReserveRequest<'_>) -> Result<HoldOutcome, LedgerError>;

    /// One transaction: closes an open hold of `key` as `close` says. A hold whose time
    /// is up is expired instead of settled or released; a closed hold stays as it is.
    async fn close_hold(
        &self,
        key: &KeyId,
        hold_id: &str,
        close: HoldClose,
        now_ms: i64,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<HoldOutcome, LedgerError>;

    /// [`Ledger::reserve`] from a key and its identity's pool together: one transaction
    /// makes the key's hold and the pool's ([`rules::pool_hold_id`](crate::rules::pool_hold_id)),
    /// both or neither. Idempotent on the hold id.
    async fn reserve_pair(
        &self,
        req: &ReserveRequest<'_>,
        pool: &KeyId,
    ) -> Result<PairHoldOutcome, LedgerError>;

    /// [`Ledger::close_hold`] on a pooled key's hold and its pool's hold, in one
    /// transaction (see [`rules::close_pair`](crate::rules::close_pair)).
    async fn close_hold_pair(
        &self,
        key: &KeyId,
        pool: &KeyId,
        hold_id: &str,
        close: HoldClose,
        now_ms: i64,
        mark: Option<&IdemMark<'_>>,
    ) -> Result<PairHoldOutcome, LedgerError>;

    /// One transaction: expires up to `limit` open holds of `key` whose time is up;
    /// returns them and the key's state after.
    async fn expire_holds(
        &self,
        key: &KeyId,
        now_ms: i64,
        limit: u32,
    ) -> Result<(Vec<Hold>, Option<LedgerState>), LedgerError>;

    async fn hold(&self, hold_id: &str) -> Result<Option<Hold>, LedgerError>;

    /// Keys with open holds whose time was up at `now_ms` (at most `limit`, soonest
    /// first, each key once).
    async fn keys_with_due_holds(&self, now_ms: i64, limit: u32)
        -> Result<Vec<KeyId>, LedgerError>;

    /// One transaction: claims an idempotency key for `claim.token` — unless the key was
    /// used with another request (`Mismatch`), another request holds a live claim
    /// (`InFlight`) or one decided (`Decided`). A record created before
    /// `claim.expired_before_ms` counts as absent.
    async fn claim_idempotency(&self, claim: &IdemClaim<'_>) -> Result<ClaimOutcome, LedgerError>;

    /// Stores the answer of the request holding the mark (claimed or decided). `false`:
    /// the token no longer holds the record.
    async fn answer_idempotency(
        &self,
        mark: &IdemMark<'_>,
        answer: &str,
    ) -> Result<bool, LedgerError>;

    /// Drops a claim that decided nothing, so a retry need not wait for the lease.
    async fn abandon_idempotency(&self, mark: &IdemMark<'_>) -> Result<(), LedgerError>;

    async fn idempotency(&self, scope: &str, key: &str) -> Result<Option<IdemRecord>, LedgerError>;

    /// Deletes up to `limit` records created before `before_ms`; returns how many.
    async fn purge_idempotency(&self, before_ms: i64, limit: u32) -> Result<u64, LedgerError>;

    /// Up to `limit` entries of `account`'s credit history with a seq below `before_seq`
    /// (all when `None`), newest first.
    async fn credit_history(
        &self,
        account: &KeyId,
        before_seq: Option<u64>,
        limit: u32,
    ) -> Result<Vec<CreditEntry>, LedgerError>;
}

/// [`Ledger::allocate_many`] one transaction per item (the default, and a SQL batch's
/// fallback when one item failed).
pub async fn allocate_each<L: Ledger + ?Sized>(
    ledger: &L,
    reqs: &[AllocateRequest<'_>],
) -> Vec<Result<AllocateOutcome, LedgerError>> {
    let mut out = Vec::with_capacity(reqs.len());
    for req in reqs {
        out.push(ledger.allocate(req).await);
    }
    out
}

/// [`Ledger::settle_many`] one transaction per item.
pub async fn settle_each<L: Ledger + ?Sized>(
    ledger: &L,
    items: &[Settlement<'_>],
) -> Vec<Result<(), LedgerError>> {
    let mut out = Vec::with_capacity(items.len());
    for s in items {
        out.push(
            ledger
                .settle_allocation(s.key, s.transfer_id, s.credited, s.spent)
                .await,
        );
    }
    out
}

/// [`Ledger::return_many`] one transaction per item.
pub async fn return_each<L: Ledger + ?Sized>(
    ledger: &L,
    items: &[(&KeyId, &str, Drained)],
) -> Vec<Result<LedgerState, LedgerError>> {
    let mut out = Vec::with_capacity(items.len());
    for (key, transfer_id, drained) in items {
        out.push(ledger.return_drained(key, transfer_id, *drained).await);
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncrementOutcome {
    Done(LedgerState),
    Unlimited,
    Overflow,
    NotFound,
}
