//! The ledger's rules, written once (no I/O): how an allocation is sized and granted, how
//! a transfer is settled, cancelled, returned or written off, how a fence changes the
//! balance, what an increment and a direct spend may do, and the states a transfer and a
//! fence move through.
//!
//! Every [`Ledger`](crate::ports::Ledger) adapter does the same four things per method:
//! lock the key's row, load what the rule needs ([`Account`], the transfer, whether a
//! fence is pending or a `Set` overwrote an older generation), call the rule here, and
//! store what it changed. The in-memory reference and the SQL ledger therefore run the
//! same arithmetic, and the model test and the conformance suite exercise the code that
//! production runs.

use creditgate_domain::KeyId;

use crate::ports::{
    AllocateOutcome, AllocateRequest, ClaimOutcome, CreditEntry, DirectSpend, Drained, EntryKind,
    FenceOp, Hold, HoldClose, HoldOutcome, HoldState, IdemClaim, IdemRecord, IdemState,
    IncrementOutcome, LedgerState, PairHoldOutcome, ReserveRequest,
};

/// The ledger columns of one key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Account {
    /// Credits not handed out; `None` = unlimited.
    pub remaining: Option<u64>,
    /// Credits handed to the hot store and not yet returned or reported spent.
    pub hot_allocated: u64,
    /// Bumped by every fence (set / decrement / refill).
    pub generation: u64,
    /// Bumped by every change of `remaining`.
    pub version: u64,
    /// The hot-store epoch `hot_allocated` belongs to.
    pub hot_epoch: Option<String>,
    /// When the last periodic refill was applied (or the key was created).
    pub last_refill_at: Option<i64>,
    /// Credits in open holds: out of `remaining`, not spent.
    pub held: u64,
    /// Credits the history booked: `booked - spent` are the account's books, which are
    /// `remaining + hot_allocated + held` (outside a pending fence). Only a history entry
    /// moves it.
    pub booked: u64,
    /// Credits of single spends the ledger has counted: reported by the hot store (with a
    /// credit, a drain or a fence) or spent directly. Never decreases.
    pub spent: u64,
    /// The seq of the newest history entry.
    pub history_seq: u64,
    /// History entries the last rule calls wrote, for the adapter to store with the
    /// account (not a column).
    pub entries: Vec<CreditEntry>,
}

/// What a history entry is about, besides the balances the rules take from the account.
#[derive(Debug, Clone, Copy)]
struct Change<'a> {
    kind: EntryKind,
    value: Option<u64>,
    actor: Option<&'a str>,
    hold_id: Option<&'a str>,
    at_ms: i64,
}

impl<'a> Change<'a> {
    fn new(kind: EntryKind, value: Option<u64>, at_ms: i64) -> Self {
        Self {
            kind,
            value,
            actor: None,
            hold_id: None,
            at_ms,
        }
    }
}

impl Account {
    /// A new key's (or pool's) account: its balance, refilled "now" (the first refill is
    /// due in the next period), and its `create` history entry.
    pub fn new(remaining: Option<u64>, now_ms: i64) -> Self {
        let mut a = Self {
            remaining,
            last_refill_at: Some(now_ms),
            ..Self::default()
        };
        a.booked = remaining.unwrap_or(0);
        a.record(
            Change::new(EntryKind::Create, remaining, now_ms),
            (None, 0),
            true,
        );
        a
    }

    /// The books (`booked - spent`); `None`: unlimited.
    fn books(&self) -> Option<u64> {
        self.remaining
            .map(|_| self.booked.saturating_sub(self.spent))
    }

    /// (balance outside holds, held) as the books say.
    fn figures(&self) -> (Option<u64>, u64) {
        (self.books().map(|b| b.saturating_sub(self.held)), self.held)
    }

    /// Whether the books are the exact balance: no credits in the hot store, so none
    /// spent there unreported.
    fn books_exact(&self) -> bool {
        self.hot_allocated == 0
    }

    /// Counts single spends the ledger learnt of: the books go down with no entry.
    fn count_spent(&mut self, credits: u64) {
        self.spent = self.spent.saturating_add(credits);
    }

    /// Appends the history entry of `change`, made from the figures `before` to the
    /// account's figures now.
    fn record(&mut self, change: Change<'_>, before: (Option<u64>, u64), exact: bool) {
        self.history_seq += 1;
        let (balance_after, held_after) = self.figures();
        self.entries.push(CreditEntry {
            seq: self.history_seq,
            at_ms: change.at_ms,
            kind: change.kind,
            value: change.value,
            actor: change.actor.map(str::to_owned),
            hold_id: change.hold_id.map(str::to_owned),
            balance_before: before.0,
            balance_after,
            held_before: before.1,
            held_after,
            spent_total: self.spent,
            exact,
        });
    }

    /// Credits of an older generation come back (`remaining += amount`): with a fence
    /// pending, its finish takes them in (they are in what it drains from); else the
    /// fence that replaced their generation counted them spent, and a `late_return`
    /// entry books them back.
    fn give_back_late(&mut self, amount: u64, fence_pending: bool, at_ms: i64) {
        if self.remaining.is_none() || amount == 0 {
            self.give_back(amount);
            return;
        }
        let before = self.figures();
        self.give_back(amount);
        if !fence_pending {
            self.booked = self.booked.saturating_add(amount);
            let exact = self.books_exact();
            self.record(
                Change::new(EntryKind::LateReturn, Some(amount), at_ms),
                before,
                exact,
            );
        }
    }

    pub fn state(&self) -> LedgerState {
        LedgerState {
            remaining: self.remaining,
            hot_allocated: self.hot_allocated,
            generation: self.generation,
            version: self.version,
            held: self.held,
            spent: self.spent,
        }
    }

    /// Adds `amount` back to `remaining` (a cancelled allocation or a returned balance).
    fn give_back(&mut self, amount: u64) {
        if let Some(r) = self.remaining.as_mut() {
            *r = r.saturating_add(amount);
        }
        self.version += 1;
    }
}

/// What a logged transfer did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferKind {
    /// Ledger → hot store.
    Alloc,
    /// Hot store → ledger (a drain, fence alignment or shutdown).
    Return,
}

/// Where a logged transfer stands. Allocations start `Pending` and end `Credited`,
/// `Cancelled` or `Lost`; returns are logged `Applied`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferState {
    Pending,
    Credited,
    Cancelled,
    Applied,
    /// Allocated to a hot-store epoch that lost its data: written off.
    Lost,
}

/// Where a logged fence stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceState {
    Pending,
    Done,
}

macro_rules! text_enum {
    ($ty:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        impl $ty {
            /// The value stored in the ledger's tables.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),+ }
            }

            /// Parses a stored value.
            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some($ty::$variant),)+ _ => None }
            }
        }
    };
}

text_enum!(TransferKind { Alloc => "alloc", Return => "return" });
text_enum!(TransferState {
    Pending => "pending",
    Credited => "credited",
    Cancelled => "cancelled",
    Applied => "applied",
    Lost => "lost",
});
text_enum!(FenceState { Pending => "pending", Done => "done" });
text_enum!(EntryKind {
    Create => "create",
    Increment => "increment",
    Decrement => "decrement",
    Set => "set",
    Refill => "refill",
    HoldReserve => "hold.reserve",
    HoldSettle => "hold.settle",
    HoldRelease => "hold.release",
    HoldExpire => "hold.expire",
    WriteOff => "write_off",
    LateReturn => "late_return",
});
text_enum!(HoldState {
    Open => "open",
    Settled => "settled",
    Released => "released",
    Expired => "expired",
});

/// A transfer as the ledger logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transfer {
    pub key: KeyId,
    pub kind: TransferKind,
    pub amount: u64,
    pub generation: u64,
    pub state: TransferState,
    pub created_at_ms: i64,
}

/// The size of a grant: at least what the spend needs, else the preferred chunk, never
/// more than the ledger holds (so at exhaustion nothing is stranded in the hot store).
pub fn grant_size(need: u64, chunk: u64, remaining: u64) -> u64 {
    need.max(chunk.min(remaining))
}

/// The home of an epoch: the place in the hot store an account's credits are held
/// at. A store with one place per account (memory, one Redis) has epochs without a
/// home (`""`); on a Redis Cluster a pooled key's entries sit in its pool's slot, and
/// the epochs of such places read `<home>#<epoch of the slot>` (see
/// [`crate::ports::HotStore::colocates`]).
pub fn home_of(epoch: &str) -> &str {
    epoch.split_once('#').map_or("", |(home, _)| home)
}

/// Whether `account`'s hot credits are held at another home than `epoch`'s: credits
/// allocated or in flight there, which are neither lost nor spendable here. An
/// allocation for `epoch` must wait until they are back ([`AllocateOutcome::Elsewhere`]),
/// so an account's hot credits are at one home at a time.
pub fn held_elsewhere(account: &Account, epoch: &str) -> bool {
    account.hot_allocated > 0
        && account
            .hot_epoch
            .as_deref()
            .is_some_and(|held| home_of(held) != home_of(epoch))
}

/// Writes off what `account` had allocated to a hot-store epoch other than `epoch`.
/// `None`: same epoch (or credits held at another home, which are not lost), nothing
/// to do. `Some(lost)`: the account now belongs to `epoch`, and the adapter marks the
/// key's pending allocations [`TransferState::Lost`]. Credits lost are a `write_off`
/// entry, whose balance before is an upper bound (the lost store may have spent some
/// of them without reporting it).
pub fn write_off(account: &mut Account, epoch: &str, now_ms: i64) -> Option<u64> {
    if account.hot_epoch.as_deref() == Some(epoch) || held_elsewhere(account, epoch) {
        return None;
    }
    let lost = account.hot_allocated;
    let before = account.figures();
    account.hot_allocated = 0;
    account.hot_epoch = Some(epoch.to_owned());
    if lost > 0 {
        account.booked = account.booked.saturating_sub(lost);
        account.record(
            Change::new(EntryKind::WriteOff, Some(lost), now_ms),
            before,
            false,
        );
    }
    Some(lost)
}

/// The answer to an allocation whose transfer id is already logged: what the first
/// call granted (a retry never moves credits twice).
pub fn retried_allocation(account: Option<&Account>, first: &Transfer) -> AllocateOutcome {
    let (remaining, version) = account.map_or((0, 0), |a| (a.remaining.unwrap_or(0), a.version));
    AllocateOutcome::Granted {
        amount: first.amount,
        remaining,
        generation: first.generation,
        version,
        lost: 0,
    }
}

/// What [`allocate`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub outcome: AllocateOutcome,
    /// `Some`: the epoch changed; pending allocations of the key become `Lost`.
    pub written_off: Option<u64>,
    /// The transfer to log as `Pending` (only when credits moved).
    pub transfer: Option<Transfer>,
}

/// Moves credits from `remaining` to `hot_allocated` for a live key whose transfer id is
/// new. `fence_pending`: a fence of the key is begun and unfinished. The write-off of
/// another epoch stands whatever the outcome.
pub fn allocate(
    account: &mut Account,
    req: &AllocateRequest<'_>,
    fence_pending: bool,
) -> Allocation {
    let Some(remaining) = account.remaining else {
        return Allocation {
            outcome: AllocateOutcome::Unlimited,
            written_off: None,
            transfer: None,
        };
    };
    if held_elsewhere(account, req.epoch) {
        return Allocation {
            outcome: AllocateOutcome::Elsewhere,
            written_off: None,
            transfer: None,
        };
    }
    let written_off = write_off(account, req.epoch, req.now_ms);
    let lost = written_off.unwrap_or(0);
    let mut transfer = None;
    let outcome = if fence_pending || req.generation.is_some_and(|g| g != account.generation) {
        AllocateOutcome::GenerationMoved {
            generation: account.generation,
        }
    } else if remaining < req.need {
        AllocateOutcome::Insufficient {
            remaining,
            generation: account.generation,
            version: account.version,
            lost,
        }
    } else {
        let amount = grant_size(req.need, req.chunk, remaining);
        let remaining = remaining - amount;
        account.remaining = Some(remaining);
        account.hot_allocated = account.hot_allocated.saturating_add(amount);
        account.version += 1;
        transfer = Some(Transfer {
            key: req.key.to_owned(),
            kind: TransferKind::Alloc,
            amount,
            generation: account.generation,
            state: TransferState::Pending,
            created_at_ms: req.now_ms,
        });
        AllocateOutcome::Granted {
            amount,
            remaining,
            generation: account.generation,
            version: account.version,
            lost,
        }
    };
    Allocation {
        outcome,
        written_off,
        transfer,
    }
}

/// How a transfer reaches the ledger: whether a `Set` fenced the key after the
/// transfer's generation (`overwritten`: its credits must not come back), whether a fence
/// of the key is begun and unfinished, and the time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Arrival {
    pub overwritten: bool,
    pub fence_pending: bool,
    pub now_ms: i64,
}

/// Settles a pending allocation of `key`: credited (the spends reported with the credit
/// leave `hot_allocated` and count as spent) or cancelled (the amount goes back to
/// `remaining` unless a `Set` fenced the key since). Returns the transfer's new state, or
/// `None` when there is nothing to do (already settled, or another key's id).
pub fn settle(
    account: Option<&mut Account>,
    key: &KeyId,
    transfer: &Transfer,
    credited: bool,
    spent: u64,
    arrival: Arrival,
) -> Option<TransferState> {
    if transfer.state != TransferState::Pending || transfer.key != *key {
        return None;
    }
    if credited {
        if let Some(a) = account {
            if transfer.generation == a.generation {
                let reported = spent.min(a.hot_allocated);
                a.hot_allocated -= reported;
                a.count_spent(reported);
            }
        }
        return Some(TransferState::Credited);
    }
    if let Some(a) = account {
        if transfer.generation == a.generation {
            a.hot_allocated = a.hot_allocated.saturating_sub(transfer.amount);
            if !arrival.overwritten {
                a.give_back(transfer.amount);
            }
        } else if !arrival.overwritten {
            a.give_back_late(transfer.amount, arrival.fence_pending, arrival.now_ms);
        }
    }
    Some(TransferState::Cancelled)
}

/// Returns a drained hot balance whose transfer id is new: `remaining += amount` (unless
/// a `Set` fenced the key after the drained generation — `overwritten`) and
/// `hot_allocated -= amount + spent` (the spends count as spent). Returns the transfer
/// to log as `Applied`.
pub fn return_drained(
    account: &mut Account,
    key: &KeyId,
    drained: Drained,
    arrival: Arrival,
) -> Transfer {
    let back = !arrival.overwritten && drained.amount > 0;
    if drained.generation == account.generation {
        let out = drained
            .amount
            .saturating_add(drained.spent)
            .min(account.hot_allocated);
        account.hot_allocated -= out;
        if back {
            account.give_back(drained.amount);
        }
        account.count_spent(out.saturating_sub(drained.amount));
    } else if back {
        account.give_back_late(drained.amount, arrival.fence_pending, arrival.now_ms);
    }
    Transfer {
        key: key.to_owned(),
        kind: TransferKind::Return,
        amount: drained.amount,
        generation: drained.generation,
        state: TransferState::Applied,
        created_at_ms: arrival.now_ms,
    }
}

/// `remaining += amount`, refused on an unlimited key or when the key's whole balance
/// (`remaining + hot_allocated + held`) would pass `max`. `actor` asked for it (its
/// history entry says so).
pub fn increment(
    account: &mut Account,
    amount: u64,
    max: u64,
    now_ms: i64,
    actor: Option<&str>,
) -> IncrementOutcome {
    let Some(remaining) = account.remaining else {
        return IncrementOutcome::Unlimited;
    };
    let total = remaining
        .checked_add(account.hot_allocated)
        .and_then(|t| t.checked_add(account.held))
        .and_then(|t| t.checked_add(amount));
    if total.is_none_or(|t| t > max) {
        return IncrementOutcome::Overflow;
    }
    let before = account.figures();
    account.remaining = Some(remaining.saturating_add(amount));
    account.booked = account.booked.saturating_add(amount);
    account.version += 1;
    let exact = account.books_exact();
    account.record(
        Change {
            actor,
            ..Change::new(EntryKind::Increment, Some(amount), now_ms)
        },
        before,
        exact,
    );
    IncrementOutcome::Done(account.state())
}

/// Step 1 of a fence on a key whose op id is new: bumps the generation and returns it.
/// `None` (nothing changes): a refill already applied in its period, or a refill of an
/// unlimited key. A refill records `now_ms` as the last refill time.
pub fn begin_fence(account: &mut Account, op: FenceOp, now_ms: i64) -> Option<u64> {
    if let FenceOp::Refill { period_start, .. } = op {
        let done = account.last_refill_at.is_some_and(|t| t >= period_start);
        if done || account.remaining.is_none() {
            return None;
        }
        account.last_refill_at = Some(now_ms);
    }
    account.generation += 1;
    Some(account.generation)
}

/// Step 3 of a pending fence: with what the hot store drained at the new generation,
/// writes the new balance. Nothing is allocated to the hot store afterwards.
///
/// Its history entry is exact: the balance before is `remaining + drained + held`
/// (the hot store is fenced, nothing is in flight), and what the books held above it are
/// the old generation's spends the hot store had not reported, counted spent now.
/// `actor`: who asked for it (`None`: a refill).
pub fn finish_fence(
    account: &mut Account,
    op: FenceOp,
    drained: Drained,
    now_ms: i64,
    actor: Option<&str>,
) {
    let base = account.remaining.map(|r| r.saturating_add(drained.amount));
    let mut exact = true;
    if let (Some(books), Some(total)) = (
        account.books(),
        base.map(|b| b.saturating_add(account.held)),
    ) {
        match books.checked_sub(total) {
            Some(unreported) => account.count_spent(unreported),
            // Credits came back that the books had let go of (a late return of a
            // generation before an earlier fence): the books are the lower figure.
            None => exact = false,
        }
    }
    let before = account.figures();
    account.remaining = match op {
        FenceOp::Set(v) => v,
        FenceOp::Decrement(v) => base.map(|b| b.saturating_sub(v)),
        FenceOp::Refill { amount, .. } => base.map(|b| b.max(amount)),
    };
    account.hot_allocated = 0;
    account.version += 1;
    account.booked = account.spent.saturating_add(
        account
            .remaining
            .map_or(0, |r| r.saturating_add(account.held)),
    );
    let (kind, value) = match op {
        FenceOp::Set(v) => (EntryKind::Set, v),
        FenceOp::Decrement(v) => (EntryKind::Decrement, Some(v)),
        FenceOp::Refill { amount, .. } => (EntryKind::Refill, Some(amount)),
    };
    account.record(
        Change {
            actor,
            ..Change::new(kind, value, now_ms)
        },
        before,
        exact,
    );
}

/// A spend on `remaining` alone (the hot store is unreachable): never touches credits
/// the hot store holds.
pub fn spend_direct(account: &mut Account, cost: u64) -> DirectSpend {
    let Some(remaining) = account.remaining else {
        return DirectSpend::Unlimited;
    };
    if remaining < cost {
        if account.hot_allocated > 0 {
            return DirectSpend::Undecided {
                remaining,
                hot_allocated: account.hot_allocated,
            };
        }
        return DirectSpend::Exceeded { remaining };
    }
    account.remaining = Some(remaining - cost);
    account.version += 1;
    account.count_spent(cost);
    DirectSpend::Valid {
        remaining: remaining - cost,
    }
}

/// [`spend_direct`] on several accounts at once (a key and its pool): each decides as
/// alone, and the cost leaves them only if every one is `Valid` or `Unlimited`; else
/// none changes. Answers whether it spent, and each decision.
pub fn spend_direct_all(accounts: &mut [Account], cost: u64) -> (bool, Vec<DirectSpend>) {
    let mut after: Vec<Account> = accounts.to_vec();
    let outcomes: Vec<DirectSpend> = after.iter_mut().map(|a| spend_direct(a, cost)).collect();
    let all = outcomes
        .iter()
        .all(|o| matches!(o, DirectSpend::Valid { .. } | DirectSpend::Unlimited));
    if all {
        accounts.clone_from_slice(&after);
    }
    (all, outcomes)
}

/// The ledger's `remaining` cannot cover what a hold call needs (the hot store holds
/// `hot_allocated` more); nothing changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Short {
    pub remaining: u64,
    pub hot_allocated: u64,
}

impl Short {
    fn of(account: &Account, remaining: u64) -> Self {
        Self {
            remaining,
            hot_allocated: account.hot_allocated,
        }
    }
}

/// The account (0 the key, 1 the pool) that cannot cover a pooled hold call.
impl From<(usize, Short)> for PairHoldOutcome {
    fn from((account, s): (usize, Short)) -> Self {
        PairHoldOutcome::Short {
            account,
            remaining: s.remaining,
            hot_allocated: s.hot_allocated,
        }
    }
}

impl From<Short> for HoldOutcome {
    fn from(s: Short) -> Self {
        HoldOutcome::Short {
            remaining: s.remaining,
            hot_allocated: s.hot_allocated,
        }
    }
}

/// A new hold of `req.amount` on a live key whose hold id is new: moved out of
/// `remaining` if it covers it (`Short` otherwise, nothing changes); on an unlimited key
/// an unfunded hold that moves nothing.
pub fn reserve(account: &mut Account, req: &ReserveRequest<'_>) -> Result<Hold, Short> {
    let before = account.figures();
    let funded = match account.remaining {
        None => false,
        Some(r) if r >= req.amount => {
            account.remaining = Some(r - req.amount);
            account.held = account.held.saturating_add(req.amount);
            account.version += 1;
            true
        }
        Some(r) => return Err(Short::of(account, r)),
    };
    let exact = account.books_exact();
    account.record(
        Change {
            hold_id: Some(req.hold_id),
            ..Change::new(EntryKind::HoldReserve, Some(req.amount), req.now_ms)
        },
        before,
        exact,
    );
    Ok(Hold {
        id: req.hold_id.to_owned(),
        key: req.key.to_owned(),
        amount: req.amount,
        funded,
        state: HoldState::Open,
        cost: None,
        created_at_ms: req.now_ms,
        expires_at_ms: req.expires_at_ms,
        closed_at_ms: None,
    })
}

/// Closes an open hold (`account`: its key's, `None` once the key is deleted).
/// `Ok(true)`: closed now. `Ok(false)`: nothing to do — closed before, or an expiry
/// before its time. A settle or release once the time is up expires the hold instead.
/// A settle above a funded hold spends the difference from `remaining` only if it covers
/// it (`Short` otherwise: the hold stays open); every other close returns what was not
/// spent to `remaining` as it is then. Unfunded holds (reserved while the key was
/// unlimited) only record the cost.
pub fn close_hold(
    mut account: Option<&mut Account>,
    hold: &mut Hold,
    close: HoldClose,
    now_ms: i64,
) -> Result<bool, Short> {
    if hold.state != HoldState::Open {
        return Ok(false);
    }
    let due = now_ms >= hold.expires_at_ms;
    let close = match close {
        HoldClose::Expire if !due => return Ok(false),
        _ if due => HoldClose::Expire,
        c => c,
    };
    let before = account.as_deref().map(Account::figures);
    if let (true, Some(a)) = (hold.funded, account.as_deref_mut()) {
        let back = match close {
            HoldClose::Settle(cost) if cost > hold.amount => {
                let extra = cost - hold.amount;
                if let Some(r) = a.remaining {
                    if r < extra {
                        return Err(Short::of(a, r));
                    }
                    a.remaining = Some(r - extra);
                }
                0
            }
            HoldClose::Settle(cost) => hold.amount - cost,
            HoldClose::Release | HoldClose::Expire => hold.amount,
        };
        a.held = a.held.saturating_sub(hold.amount);
        a.give_back(back);
        if let HoldClose::Settle(cost) = close {
            a.booked = a.booked.saturating_sub(cost);
        }
    }
    (hold.state, hold.cost) = match close {
        HoldClose::Settle(cost) => (HoldState::Settled, Some(cost)),
        HoldClose::Release => (HoldState::Released, None),
        HoldClose::Expire => (HoldState::Expired, None),
    };
    hold.closed_at_ms = Some(now_ms);
    if let (Some(a), Some(before)) = (account, before) {
        let (kind, value) = match close {
            HoldClose::Settle(cost) => (EntryKind::HoldSettle, cost),
            HoldClose::Release => (EntryKind::HoldRelease, hold.amount),
            HoldClose::Expire => (EntryKind::HoldExpire, hold.amount),
        };
        let exact = a.books_exact();
        a.record(
            Change {
                hold_id: Some(&hold.id),
                ..Change::new(kind, Some(value), now_ms)
            },
            before,
            exact,
        );
    }
    Ok(true)
}

/// The id of the hold a pooled key's hold `hold_id` has on its identity's pool.
pub fn pool_hold_id(hold_id: &str) -> String {
    format!("{hold_id}.pool")
}

/// [`reserve`] on a key and on its identity's pool (`pool`), both or neither: the key's
/// hold (`req.hold_id`) and the pool's ([`pool_hold_id`]), or the index (0 key, 1 pool)
/// of the account that cannot cover it, nothing changed.
pub fn reserve_pair(
    key: &mut Account,
    pool: &mut Account,
    pool_id: &KeyId,
    req: &ReserveRequest<'_>,
) -> Result<(Hold, Hold), (usize, Short)> {
    let (mut k, mut p) = (key.clone(), pool.clone());
    let key_hold = reserve(&mut k, req).map_err(|s| (0, s))?;
    let pool_hold_id = pool_hold_id(req.hold_id);
    let pool_req = ReserveRequest {
        key: pool_id,
        hold_id: &pool_hold_id,
        ..req.clone()
    };
    let pool_hold = reserve(&mut p, &pool_req).map_err(|s| (1, s))?;
    (*key, *pool) = (k, p);
    Ok((key_hold, pool_hold))
}

/// [`close_hold`] on both holds of a pooled key's hold, both or neither (`Err`: the
/// index of the account that cannot cover a settle above the hold, nothing changed).
/// The reconciler expires each account's holds on its own, so one of the two may have
/// expired alone: the other then expires too (at its own time, the same), whatever
/// `close` asked. `Ok(true)`: something closed now.
pub fn close_pair(
    key: Option<&mut Account>,
    pool: Option<&mut Account>,
    key_hold: &mut Hold,
    pool_hold: &mut Hold,
    close: HoldClose,
    now_ms: i64,
) -> Result<bool, (usize, Short)> {
    let expired = |h: &Hold| h.state == HoldState::Expired;
    let open = |h: &Hold| h.state == HoldState::Open;
    if expired(key_hold) && open(pool_hold) {
        let at = now_ms.max(pool_hold.expires_at_ms);
        return close_hold(pool, pool_hold, HoldClose::Expire, at).map_err(|s| (1, s));
    }
    if expired(pool_hold) && open(key_hold) {
        let at = now_ms.max(key_hold.expires_at_ms);
        return close_hold(key, key_hold, HoldClose::Expire, at).map_err(|s| (0, s));
    }
    let (mut ka, mut pa) = (key.as_deref().cloned(), pool.as_deref().cloned());
    let (mut kh, mut ph) = (key_hold.clone(), pool_hold.clone());
    let key_closed = close_hold(ka.as_mut(), &mut kh, close, now_ms).map_err(|s| (0, s))?;
    let pool_closed = close_hold(pa.as_mut(), &mut ph, close, now_ms).map_err(|s| (1, s))?;
    if let (Some(k), Some(a)) = (key, ka) {
        *k = a;
    }
    if let (Some(p), Some(a)) = (pool, pa) {
        *p = a;
    }
    (*key_hold, *pool_hold) = (kh, ph);
    Ok(key_closed || pool_closed)
}

/// A claim on an idempotency key, given the key's record (if any): the outcome, and the
/// record to store (`None`: leave it as it is). The same key with another request is a
/// mismatch whatever its state; a lapsed claim that decided nothing is taken over.
pub fn claim(
    existing: Option<&IdemRecord>,
    c: &IdemClaim<'_>,
) -> (ClaimOutcome, Option<IdemRecord>) {
    let fresh = || IdemRecord {
        fingerprint: c.fingerprint.to_owned(),
        token: c.token.to_owned(),
        state: IdemState::Claimed,
        answer: None,
        created_at_ms: c.now_ms,
        lease_until_ms: c.lease_until_ms,
    };
    let Some(r) = existing.filter(|r| r.created_at_ms >= c.expired_before_ms) else {
        return (ClaimOutcome::Claimed, Some(fresh()));
    };
    if r.fingerprint != c.fingerprint {
        return (ClaimOutcome::Mismatch, None);
    }
    match r.state {
        IdemState::Decided | IdemState::Answered => (ClaimOutcome::Decided(r.clone()), None),
        IdemState::Claimed if r.token == c.token => (ClaimOutcome::Claimed, None),
        IdemState::Claimed if r.lease_until_ms > c.now_ms => (ClaimOutcome::InFlight, None),
        IdemState::Claimed => {
            let taken = IdemRecord {
                token: c.token.to_owned(),
                lease_until_ms: c.lease_until_ms,
                ..r.clone()
            };
            (ClaimOutcome::Claimed, Some(taken))
        }
    }
}

/// Whether the request with `token` holds the record's claim and may decide.
pub fn holds_claim(record: Option<&IdemRecord>, token: &str) -> bool {
    record.is_some_and(|r| r.token == token && r.state == IdemState::Claimed)
}

#[cfg(test)]
mod tests {
    use super::*;

    static K: std::sync::LazyLock<KeyId> = std::sync::LazyLock::new(|| KeyId::from("k"));

    fn at(now_ms: i64) -> Arrival {
        Arrival {
            now_ms,
            ..Arrival::default()
        }
    }

    fn overwritten() -> Arrival {
        Arrival {
            overwritten: true,
            ..Arrival::default()
        }
    }

    fn req(need: u64, chunk: u64, generation: Option<u64>) -> AllocateRequest<'static> {
        AllocateRequest {
            key: &K,
            transfer_id: "t",
            generation,
            epoch: "e",
            need,
            chunk,
            now_ms: 5,
        }
    }

    #[test]
    fn grants_are_sized_by_need_chunk_and_balance() {
        assert_eq!(grant_size(3, 10, 100), 10);
        assert_eq!(grant_size(30, 10, 100), 30);
        assert_eq!(grant_size(0, 10, 4), 4);
    }

    #[test]
    fn allocate_moves_credits_and_logs_a_pending_transfer() {
        let mut a = Account::new(Some(100), 0);
        let out = allocate(&mut a, &req(1, 10, None), false);
        assert_eq!(
            out.written_off,
            Some(0),
            "first allocation adopts the epoch"
        );
        assert_eq!(a.remaining, Some(90));
        assert_eq!(a.hot_allocated, 10);
        let t = out.transfer.expect("transfer");
        assert_eq!(
            (t.amount, t.state, t.kind),
            (10, TransferState::Pending, TransferKind::Alloc)
        );
        assert_eq!(t.created_at_ms, 5);
        // Insufficient and moved generations move nothing.
        let before = a.clone();
        let out = allocate(&mut a, &req(91, 10, None), false);
        assert!(matches!(
            out.outcome,
            AllocateOutcome::Insufficient { remaining: 90, .. }
        ));
        assert_eq!(a, before);
        let out = allocate(&mut a, &req(1, 10, Some(7)), false);
        assert_eq!(
            out.outcome,
            AllocateOutcome::GenerationMoved { generation: 0 }
        );
        let out = allocate(&mut a, &req(1, 10, None), true);
        assert_eq!(
            out.outcome,
            AllocateOutcome::GenerationMoved { generation: 0 }
        );
        assert_eq!(a, before);
    }

    #[test]
    fn a_new_epoch_writes_off_what_the_old_one_held() {
        let mut a = Account::new(Some(100), 0);
        allocate(&mut a, &req(1, 10, None), false);
        let mut r = req(1, 10, None);
        r.epoch = "e2";
        let out = allocate(&mut a, &r, false);
        assert_eq!(out.written_off, Some(10));
        assert!(matches!(
            out.outcome,
            AllocateOutcome::Granted {
                lost: 10,
                amount: 10,
                ..
            }
        ));
        assert_eq!((a.remaining, a.hot_allocated), (Some(80), 10));
    }

    #[test]
    fn settle_and_return_keep_the_partition() {
        let mut a = Account::new(Some(100), 0);
        let t = allocate(&mut a, &req(1, 10, None), false).transfer.unwrap();
        // Cancel: back to remaining.
        let mut c = a.clone();
        assert_eq!(
            settle(Some(&mut c), &K, &t, false, 0, Arrival::default()),
            Some(TransferState::Cancelled)
        );
        assert_eq!((c.remaining, c.hot_allocated), (Some(100), 0));
        // Cancel after a Set overwrote the generation: nothing comes back.
        let mut o = a.clone();
        settle(Some(&mut o), &K, &t, false, 0, overwritten());
        assert_eq!(o.remaining, Some(90));
        // Credit with 4 spends reported; then a return of the 6 left.
        assert_eq!(
            settle(Some(&mut a), &K, &t, true, 4, Arrival::default()),
            Some(TransferState::Credited)
        );
        assert_eq!(a.hot_allocated, 6);
        let drained = Drained {
            amount: 6,
            spent: 0,
            generation: 0,
        };
        let r = return_drained(&mut a, &K, drained, at(9));
        assert_eq!((a.remaining, a.hot_allocated), (Some(96), 0));
        assert_eq!((r.state, r.created_at_ms), (TransferState::Applied, 9));
        // Settled transfers and other keys' ids are left alone.
        let mut done = t.clone();
        done.state = TransferState::Credited;
        assert_eq!(
            settle(Some(&mut a), &K, &done, false, 0, Arrival::default()),
            None
        );
        assert_eq!(
            settle(
                Some(&mut a),
                &"other".into(),
                &t,
                false,
                0,
                Arrival::default()
            ),
            None
        );
    }

    #[test]
    fn fences_refills_increments_and_direct_spends() {
        let mut a = Account::new(Some(10), 1_000);
        let refill = FenceOp::Refill {
            amount: 50,
            period_start: 500,
        };
        assert_eq!(
            begin_fence(&mut a, refill, 2_000),
            None,
            "already refilled this period"
        );
        let refill = FenceOp::Refill {
            amount: 50,
            period_start: 1_500,
        };
        assert_eq!(begin_fence(&mut a, refill, 2_000), Some(1));
        finish_fence(
            &mut a,
            refill,
            Drained {
                amount: 5,
                spent: 0,
                generation: 1,
            },
            0,
            None,
        );
        assert_eq!(a.remaining, Some(50));
        finish_fence(&mut a, FenceOp::Decrement(70), Drained::default(), 0, None);
        assert_eq!(a.remaining, Some(0), "a decrement clamps at zero");
        assert_eq!(
            increment(&mut a, 5, 10, 0, None),
            IncrementOutcome::Done(a.state())
        );
        assert_eq!(a.remaining, Some(5));
        assert_eq!(
            increment(&mut a, 6, 10, 0, None),
            IncrementOutcome::Overflow
        );
        assert_eq!(
            spend_direct(&mut a, 6),
            DirectSpend::Exceeded { remaining: 5 }
        );
        assert_eq!(spend_direct(&mut a, 5), DirectSpend::Valid { remaining: 0 });
        a.hot_allocated = 4;
        assert_eq!(
            spend_direct(&mut a, 1),
            DirectSpend::Undecided {
                remaining: 0,
                hot_allocated: 4
            },
            "with credits in the hot store, the ledger alone cannot refuse"
        );
        assert_eq!(a.remaining, Some(0), "nothing was spent");
        a.hot_allocated = 0;
        finish_fence(&mut a, FenceOp::Set(None), Drained::default(), 0, None);
        assert_eq!(
            increment(&mut a, 1, 10, 0, None),
            IncrementOutcome::Unlimited
        );
        assert_eq!(spend_direct(&mut a, 1), DirectSpend::Unlimited);
    }

    #[test]
    fn holds_move_credits_out_and_back_once() {
        let mut a = Account::new(Some(100), 0);
        let req = ReserveRequest {
            key: &K,
            hold_id: "h",
            amount: 30,
            now_ms: 0,
            expires_at_ms: 1_000,
            mark: None,
        };
        let h = reserve(&mut a, &req).expect("covered");
        assert_eq!((a.remaining, a.held, h.funded), (Some(70), 30, true));
        let close = |cost: HoldClose, at: i64| {
            let (mut hold, mut account) = (h.clone(), a.clone());
            let r = close_hold(Some(&mut account), &mut hold, cost, at);
            (r, hold, account)
        };
        let (r, s, b) = close(HoldClose::Settle(10), 5);
        assert_eq!(r, Ok(true));
        assert_eq!(
            (b.remaining, b.held, s.state, s.cost),
            (Some(90), 0, HoldState::Settled, Some(10)),
            "the 20 not spent come back"
        );
        let (mut s2, mut b2) = (s.clone(), b.clone());
        assert_eq!(
            close_hold(Some(&mut b2), &mut s2, HoldClose::Release, 6),
            Ok(false),
            "closed once"
        );
        assert_eq!((s2, b2), (s, b));
        let (r, _, b) = close(HoldClose::Settle(100), 5);
        assert_eq!(
            (r, b.remaining),
            (Ok(true), Some(0)),
            "70 more from the balance"
        );
        let (r, s, b) = close(HoldClose::Settle(101), 5);
        assert!(matches!(r, Err(Short { remaining: 70, .. })));
        assert_eq!((s.state, b), (HoldState::Open, a.clone()), "nothing moved");
        let (r, s, _) = close(HoldClose::Expire, 999);
        assert_eq!(
            (r, s.state),
            (Ok(false), HoldState::Open),
            "not before its time"
        );
        let (r, s, b) = close(HoldClose::Settle(1), 1_000);
        assert_eq!(
            (r, s.state, s.cost, b.remaining, b.held),
            (Ok(true), HoldState::Expired, None, Some(100), 0),
            "a settle once the time is up finds it expired"
        );
        let mut hold = h.clone();
        assert_eq!(
            close_hold(None, &mut hold, HoldClose::Release, 5),
            Ok(true),
            "the hold of a deleted key still closes"
        );
        assert_eq!(hold.state, HoldState::Released);
        let big = ReserveRequest {
            amount: 71,
            ..req.clone()
        };
        assert_eq!(
            reserve(&mut a.clone(), &big),
            Err(Short {
                remaining: 70,
                hot_allocated: 0
            })
        );
        let mut unlimited = Account::new(None, 0);
        let u = reserve(&mut unlimited, &big).expect("unlimited");
        assert!(!u.funded);
        assert_eq!((unlimited.remaining, unlimited.held), (None, 0));
        assert_eq!(
            HoldState::parse(HoldState::Expired.as_str()),
            Some(HoldState::Expired)
        );
    }

    #[test]
    fn history_books_every_change_and_chains_over_spends() {
        let mut a = Account::new(Some(100), 0);
        let t = allocate(&mut a, &req(1, 10, None), false).transfer.unwrap();
        assert_eq!(a.entries.len(), 1, "an allocation is no entry");
        // 4 spends reported with the credit: counted, no entry.
        settle(Some(&mut a), &K, &t, true, 4, Arrival::default());
        assert_eq!((a.spent, a.books()), (4, Some(96)));
        increment(&mut a, 5, 1_000, 7, Some("rk_1"));
        let inc = a.entries.last().unwrap().clone();
        assert_eq!(
            (inc.kind, inc.balance_before, inc.balance_after, inc.exact),
            (EntryKind::Increment, Some(96), Some(101), false),
            "the hot store holds credits: upper bounds"
        );
        assert_eq!(
            (inc.actor.as_deref(), inc.at_ms, inc.spent_total),
            (Some("rk_1"), 7, 4)
        );
        // A fence drains 3 and 3 more spends were unreported: counted at its finish,
        // and its balance before is the exact one.
        let op = FenceOp::Decrement(10);
        begin_fence(&mut a, op, 8).unwrap();
        let drained = Drained {
            amount: 3,
            spent: 3,
            generation: 1,
        };
        finish_fence(&mut a, op, drained, 9, Some("rk_2"));
        let dec = a.entries.last().unwrap().clone();
        assert_eq!(
            (
                dec.balance_before,
                dec.balance_after,
                dec.exact,
                dec.spent_total
            ),
            (Some(98), Some(88), true, 7)
        );
        assert_eq!(a.remaining, Some(88));
        // An allocation of the old generation cancelled after the fence: a late return.
        let mut old = t.clone();
        old.amount = 2;
        settle(Some(&mut a), &K, &old, false, 0, at(10));
        let late = a.entries.last().unwrap().clone();
        assert_eq!(
            (late.kind, late.balance_before, late.balance_after),
            (EntryKind::LateReturn, Some(88), Some(90))
        );
        // The same during a pending fence: taken in by that fence, no entry.
        let mut b = a.clone();
        begin_fence(&mut b, FenceOp::Set(Some(1)), 11).unwrap();
        let n = b.entries.len();
        settle(
            Some(&mut b),
            &K,
            &old,
            false,
            0,
            Arrival {
                fence_pending: true,
                ..at(11)
            },
        );
        assert_eq!(b.entries.len(), n);
        // Holds and a write-off.
        let h = reserve(
            &mut a,
            &ReserveRequest {
                key: &K,
                hold_id: "hold_x",
                amount: 30,
                now_ms: 12,
                expires_at_ms: 100,
                mark: None,
            },
        )
        .unwrap();
        let mut h2 = h.clone();
        close_hold(Some(&mut a), &mut h2, HoldClose::Settle(40), 13).unwrap();
        let settled = a.entries.last().unwrap().clone();
        assert_eq!(
            (
                settled.kind,
                settled.value,
                settled.balance_before,
                settled.balance_after
            ),
            (EntryKind::HoldSettle, Some(40), Some(60), Some(50))
        );
        assert_eq!((settled.held_before, settled.held_after), (30, 0));
        let g = a.generation;
        let out = allocate(&mut a, &req(6, 6, Some(g)), false);
        assert!(matches!(
            out.outcome,
            AllocateOutcome::Granted { amount: 6, .. }
        ));
        write_off(&mut a, "e2", 14);
        let w = a.entries.last().unwrap().clone();
        assert_eq!(
            (w.kind, w.value, w.balance_before, w.balance_after, w.exact),
            (EntryKind::WriteOff, Some(6), Some(50), Some(44), false)
        );
        // Seqs without gaps, and the chain over the spends counted between entries.
        for (i, e) in a.entries.iter().enumerate() {
            assert_eq!(e.seq, u64::try_from(i + 1).unwrap());
        }
        for w in a.entries.windows(2) {
            assert_eq!(
                w[1].balance_before.unwrap(),
                w[0].balance_after.unwrap() - (w[1].spent_total - w[0].spent_total),
                "{w:?}"
            );
        }
        assert_eq!(a.books().map(|b| b - a.held), a.remaining);
    }

    #[test]
    fn states_round_trip_through_text() {
        for s in [
            TransferState::Pending,
            TransferState::Credited,
            TransferState::Cancelled,
            TransferState::Applied,
            TransferState::Lost,
        ] {
            assert_eq!(TransferState::parse(s.as_str()), Some(s));
        }
        assert_eq!(TransferKind::parse("alloc"), Some(TransferKind::Alloc));
        assert_eq!(FenceState::parse("done"), Some(FenceState::Done));
        assert_eq!(TransferState::parse("bogus"), None);
    }
}
