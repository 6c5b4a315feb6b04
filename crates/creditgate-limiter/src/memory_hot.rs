//! `MemoryHotStore`: the hot store of the embedded default, in process memory.
//! Every method takes the one mutex for one short, non-async critical section, so each
//! is atomic like a Redis script. Its data dies with the process: a new instance is a
//! new epoch, and whatever the old one held is written off by the ledger.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use creditgate_domain::{Cost, KeyId};
use rand::Rng;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::ports::{
    Credit, CreditReply, Drained, HotEntry, HotError, HotStore, LockToken, SpendReply, TransferFate,
};

/// Transfer ids remembered per key for idempotency.
const MARKS_PER_KEY: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Credited; the spends it reported.
    Credited(u64),
    Refused,
    Drained(Drained),
}

#[derive(Debug)]
struct Entry {
    bal: u64,
    unalloc: u64,
    /// `false` while a ledger change that may add credits is in flight.
    unalloc_valid: bool,
    version: u64,
    generation: u64,
    fenced_generation: u64,
    fence_drained: Drained,
    spent: u64,
    last_used: Instant,
    marks: VecDeque<(String, Mark)>,
    /// A drain whose ledger step is not confirmed ([`HotStore::pending_return`]).
    returning: Option<(String, Drained)>,
}

impl Entry {
    fn new(generation: u64) -> Self {
        Self {
            bal: 0,
            unalloc: 0,
            unalloc_valid: false,
            version: 0,
            generation,
            fenced_generation: 0,
            fence_drained: Drained::default(),
            spent: 0,
            last_used: Instant::now(),
            marks: VecDeque::new(),
            returning: None,
        }
    }

    fn mark(&self, id: &str) -> Option<Mark> {
        self.marks.iter().find(|(m, _)| m == id).map(|(_, m)| *m)
    }

    fn set_mark(&mut self, id: &str, mark: Mark) {
        if self.marks.len() >= MARKS_PER_KEY {
            self.marks.pop_front();
        }
        self.marks.push_back((id.to_owned(), mark));
    }

    fn take_balance(&mut self) -> Drained {
        let d = Drained {
            amount: self.bal,
            spent: self.spent,
            generation: self.generation,
        };
        self.unalloc = self.unalloc.saturating_add(self.bal);
        self.bal = 0;
        self.spent = 0;
        d
    }
}

#[derive(Debug)]
struct HeldLock {
    token: String,
    until: Instant,
}

#[derive(Debug)]
struct Inner {
    epoch: String,
    entries: HashMap<KeyId, Entry>,
    locks: HashMap<KeyId, HeldLock>,
}

/// The in-process hot store.
#[derive(Debug)]
pub struct MemoryHotStore {
    inner: Mutex<Inner>,
    unlocked: Notify,
}

impl Default for MemoryHotStore {
    fn default() -> Self {
        Self::new()
    }
}

fn new_epoch() -> String {
    format!("mem-{:016x}", rand::rng().random::<u64>())
}

impl MemoryHotStore {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner {
                epoch: new_epoch(),
                entries: HashMap::new(),
                locks: HashMap::new(),
            }),
            unlocked: Notify::new(),
        }
    }

    /// Loses every balance and starts a new epoch, as a crashed process would (tests).
    #[cfg(feature = "testing")]
    pub fn wipe(&self) {
        let mut inner = self.lock_inner();
        inner.epoch = new_epoch();
        inner.entries.clear();
        inner.locks.clear();
        drop(inner);
        self.unlocked.notify_waiters();
    }

    fn lock_inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl HotStore for MemoryHotStore {
    async fn epoch(&self) -> Result<String, HotError> {
        Ok(self.lock_inner().epoch.clone())
    }

    fn spend_survives_cancellation(&self) -> bool {
        true
    }

    async fn spend(&self, key: &KeyId, cost: Cost) -> Result<SpendReply, HotError> {
        let cost = cost.get();
        let mut inner = self.lock_inner();
        let Some(e) = inner.entries.get_mut(key) else {
            return Ok(SpendReply::Miss);
        };
        // Only a valid snapshot lets the hot store state the exact remaining balance.
        if e.bal >= cost && e.unalloc_valid {
            e.bal -= cost;
            e.spent = e.spent.saturating_add(cost);
            e.last_used = Instant::now();
            return Ok(SpendReply::Valid {
                remaining: e.bal.saturating_add(e.unalloc),
                bal: e.bal,
            });
        }
        let total = e.bal.saturating_add(e.unalloc);
        if e.unalloc_valid && total < cost {
            return Ok(SpendReply::Exceeded { remaining: total });
        }
        Ok(SpendReply::Low {
            bal: e.bal,
            generation: e.generation,
        })
    }

    async fn spend_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
        probe: bool,
    ) -> Result<(bool, Vec<SpendReply>), HotError> {
        let cost = cost.get();
        let mut inner = self.lock_inner();
        let mut replies: Vec<SpendReply> = accounts
            .iter()
            .map(|a| match inner.entries.get(a) {
                None => SpendReply::Miss,
                Some(e) if e.bal >= cost && e.unalloc_valid => SpendReply::Valid {
                    remaining: e.bal.saturating_add(e.unalloc),
                    bal: e.bal,
                },
                Some(e) => {
                    let total = e.bal.saturating_add(e.unalloc);
                    if e.unalloc_valid && total < cost {
                        SpendReply::Exceeded { remaining: total }
                    } else {
                        SpendReply::Low {
                            bal: e.bal,
                            generation: e.generation,
                        }
                    }
                }
            })
            .collect();
        let all = replies
            .iter()
            .all(|r| matches!(r, SpendReply::Valid { .. }));
        if !all || probe {
            return Ok((false, replies));
        }
        for (a, reply) in accounts.iter().zip(replies.iter_mut()) {
            if let Some(e) = inner.entries.get_mut(a) {
                e.bal -= cost;
                e.spent = e.spent.saturating_add(cost);
                e.last_used = Instant::now();
                *reply = SpendReply::Valid {
                    remaining: e.bal.saturating_add(e.unalloc),
                    bal: e.bal,
                };
            }
        }
        Ok((true, replies))
    }

    async fn credit(&self, key: &KeyId, credit: &Credit<'_>) -> Result<CreditReply, HotError> {
        let &Credit {
            transfer_id,
            generation,
            amount,
            unalloc,
            version,
            epoch,
        } = credit;
        let mut inner = self.lock_inner();
        if inner.epoch != epoch {
            // Allocated to an epoch this store has lost: crediting it here would make
            // credits the ledger writes off live again.
            return Ok(CreditReply::Refused);
        }
        let e = inner
            .entries
            .entry(key.to_owned())
            .or_insert_with(|| Entry::new(generation));
        match e.mark(transfer_id) {
            Some(Mark::Credited(_)) => return Ok(CreditReply::Duplicate),
            Some(_) => return Ok(CreditReply::Refused),
            None => {}
        }
        if e.generation != generation {
            e.set_mark(transfer_id, Mark::Refused);
            return Ok(CreditReply::Refused);
        }
        e.bal = e.bal.saturating_add(amount);
        if version > e.version {
            e.unalloc = unalloc;
            e.version = version;
            e.unalloc_valid = true;
        }
        e.last_used = Instant::now();
        let spent = std::mem::take(&mut e.spent);
        e.set_mark(transfer_id, Mark::Credited(spent));
        Ok(CreditReply::Credited { spent })
    }

    async fn sync_unalloc(
        &self,
        key: &KeyId,
        unalloc: Option<u64>,
        version: u64,
    ) -> Result<(), HotError> {
        let mut inner = self.lock_inner();
        if let Some(e) = inner.entries.get_mut(key) {
            match unalloc {
                None => e.unalloc_valid = false,
                Some(u) if version >= e.version => {
                    e.unalloc = u;
                    e.version = version;
                    e.unalloc_valid = true;
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    async fn drain(
        &self,
        key: &KeyId,
        transfer_id: &str,
        min_idle_ms: u64,
    ) -> Result<Drained, HotError> {
        let mut inner = self.lock_inner();
        let Some(e) = inner.entries.get_mut(key) else {
            return Ok(Drained::default());
        };
        if let Some(Mark::Drained(d)) = e.mark(transfer_id) {
            return Ok(d);
        }
        let idle = e.last_used.elapsed() >= Duration::from_millis(min_idle_ms);
        if !idle || (e.bal == 0 && e.spent == 0) || e.returning.is_some() {
            return Ok(Drained {
                generation: e.generation,
                ..Drained::default()
            });
        }
        let d = e.take_balance();
        e.set_mark(transfer_id, Mark::Drained(d));
        if transfer_id.starts_with("drain-") {
            e.returning = Some((transfer_id.to_owned(), d));
        }
        Ok(d)
    }

    async fn fence(&self, key: &KeyId, generation: u64) -> Result<Drained, HotError> {
        let mut inner = self.lock_inner();
        let e = inner
            .entries
            .entry(key.to_owned())
            .or_insert_with(|| Entry::new(0));
        if e.fenced_generation == generation {
            return Ok(e.fence_drained);
        }
        if e.fenced_generation > generation || e.generation > generation {
            return Ok(Drained {
                generation: e.generation,
                ..Drained::default()
            });
        }
        let d = e.take_balance();
        e.generation = generation;
        e.fenced_generation = generation;
        e.fence_drained = d;
        e.unalloc_valid = false;
        Ok(d)
    }

    async fn resolve_transfer(
        &self,
        key: &KeyId,
        transfer_id: &str,
        generation: u64,
    ) -> Result<TransferFate, HotError> {
        let mut inner = self.lock_inner();
        let e = inner
            .entries
            .entry(key.to_owned())
            .or_insert_with(|| Entry::new(generation));
        if let Some(Mark::Credited(spent)) = e.mark(transfer_id) {
            return Ok(TransferFate::Credited { spent });
        }
        e.set_mark(transfer_id, Mark::Refused);
        Ok(TransferFate::Refused)
    }

    async fn lock(
        &self,
        key: &KeyId,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<LockToken>, HotError> {
        let notified = self.unlocked.notified();
        let held_until = {
            let mut inner = self.lock_inner();
            let now = Instant::now();
            match inner.locks.get(key) {
                Some(held) if held.until > now => held.until,
                _ => {
                    let token = format!("{:016x}", rand::rng().random::<u64>());
                    inner.locks.insert(
                        key.to_owned(),
                        HeldLock {
                            token: token.clone(),
                            until: now + ttl,
                        },
                    );
                    return Ok(Some(LockToken(token)));
                }
            }
        };
        // Held: wait for a release (or the holder's expiry), then let the caller retry
        // its spend first; whoever held the lock has probably refilled.
        let until = held_until.min(Instant::now() + wait);
        let _ = tokio::time::timeout_at(until, notified).await;
        Ok(None)
    }

    async fn unlock(&self, key: &KeyId, token: &LockToken) -> Result<(), HotError> {
        let mut inner = self.lock_inner();
        if inner.locks.get(key).is_some_and(|h| h.token == token.0) {
            inner.locks.remove(key);
        }
        drop(inner);
        self.unlocked.notify_waiters();
        Ok(())
    }

    async fn peek(&self, key: &KeyId) -> Result<Option<HotEntry>, HotError> {
        Ok(self.lock_inner().entries.get(key).map(|e| HotEntry {
            bal: e.bal,
            unalloc: e.unalloc_valid.then_some(e.unalloc),
            generation: e.generation,
            spent: e.spent,
            idle_ms: u64::try_from(e.last_used.elapsed().as_millis()).unwrap_or(u64::MAX),
        }))
    }

    async fn pending_return(&self, key: &KeyId) -> Result<Option<(String, Drained)>, HotError> {
        Ok(self
            .lock_inner()
            .entries
            .get(key)
            .and_then(|e| e.returning.clone()))
    }

    async fn returned(&self, key: &KeyId, transfer_id: &str) -> Result<(), HotError> {
        if let Some(e) = self.lock_inner().entries.get_mut(key) {
            if e.returning.as_ref().is_some_and(|(t, _)| t == transfer_id) {
                e.returning = None;
            }
        }
        Ok(())
    }

    async fn expire_idle(&self, min_idle_ms: u64) -> Result<usize, HotError> {
        let mut inner = self.lock_inner();
        let before = inner.entries.len();
        let min_idle = Duration::from_millis(min_idle_ms);
        inner.entries.retain(|_, e| {
            e.bal > 0 || e.spent > 0 || e.returning.is_some() || e.last_used.elapsed() < min_idle
        });
        Ok(before - inner.entries.len())
    }
}
