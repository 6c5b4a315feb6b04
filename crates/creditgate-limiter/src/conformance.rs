//! The [`Ledger`] conformance suite: every ledger backend must pass it (the in-memory
//! reference here, SQLite and Postgres in `creditgate-sql`). Each check panics with a
//! message naming what differs; backends call [`run_all`] from their own tests.

use std::collections::BTreeSet;
use std::sync::Arc;

use async_trait::async_trait;
use creditgate_domain::{Clock, Cost, Credits, KeyId, SystemClock};

use crate::ports::{
    AllocateOutcome, AllocateRequest, BeginFence, ClaimOutcome, CreditEntry, DirectSpend, Drained,
    EntryKind, FenceOp, HoldClose, HoldOutcome, HoldState, IdemClaim, IdemMark, IdemState,
    IncrementOutcome, Ledger, LedgerError, ReserveRequest, Settlement,
};
use crate::{Decision, Engine, EngineConfig, HoldAnswer, MemoryHotStore};

/// What a backend provides to the suite.
#[async_trait]
pub trait LedgerFixture: Send + Sync {
    fn ledger(&self) -> Arc<dyn Ledger>;
    /// Creates a fresh key with this balance (`None` = unlimited) and returns its id.
    async fn create_key(&self, remaining: Option<u64>) -> KeyId;
}

fn req<'a>(
    key: &'a KeyId,
    tid: &'a str,
    generation: Option<u64>,
    need: u64,
    chunk: u64,
) -> AllocateRequest<'a> {
    AllocateRequest {
        key,
        transfer_id: tid,
        generation,
        epoch: "epoch-a",
        need,
        chunk,
        now_ms: 1_000,
    }
}

fn cost(n: u64) -> Cost {
    Cost::new(n).expect("a test cost within bounds")
}

fn credits(n: u64) -> Credits {
    Credits::new(n).expect("a test amount within bounds")
}

async fn remaining(l: &dyn Ledger, key: &KeyId) -> Option<u64> {
    l.state(key).await.expect("state").expect("row").remaining
}

/// Runs every check of the suite.
pub async fn run_all(f: &dyn LedgerFixture) {
    allocate_and_settle(f).await;
    group_commit_answers_each_item_as_alone(f).await;
    drain_returns_are_idempotent(f).await;
    fences(f).await;
    refill_once_per_period(f).await;
    direct_spend_and_increment(f).await;
    direct_spends_of_several_accounts_are_all_or_none(f).await;
    direct_spend_never_refuses_while_the_hot_store_holds_credits(f).await;
    epochs_and_orphans(f).await;
    hot_credits_are_at_one_home_at_a_time(f).await;
    engine_is_exact_under_concurrency(f).await;
    holds_close_exactly_once(f).await;
    pooled_holds_move_both_balances_or_neither(f).await;
    concurrent_reserves_and_settles_conserve_credits(f).await;
    idempotency_records_decide_with_the_change(f).await;
    concurrent_idempotent_spends_spend_once(f).await;
    credit_history_replays(f).await;
}

pub async fn allocate_and_settle(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let key = f.create_key(Some(100)).await;
    let Ok(AllocateOutcome::Granted {
        amount,
        remaining: r,
        generation,
        ..
    }) = l.allocate(&req(&key, "t1", None, 1, 30)).await
    else {
        panic!("allocation of 30 from 100 must be granted");
    };
    assert_eq!((amount, r, generation), (30, 70, 0));
    // Idempotent on the transfer id.
    let again = l
        .allocate(&req(&key, "t1", None, 1, 30))
        .await
        .expect("retry");
    assert!(
        matches!(again, AllocateOutcome::Granted { amount: 30, .. }),
        "{again:?}"
    );
    assert_eq!(remaining(&*l, &key).await, Some(70));
    // The grant covers `need` even above `chunk`, and never more than remains.
    let g = l
        .allocate(&req(&key, "t2", Some(0), 50, 10))
        .await
        .expect("alloc");
    assert!(
        matches!(
            g,
            AllocateOutcome::Granted {
                amount: 50,
                remaining: 20,
                ..
            }
        ),
        "{g:?}"
    );
    let g = l
        .allocate(&req(&key, "t3", Some(0), 1, 1000))
        .await
        .expect("alloc");
    assert!(
        matches!(
            g,
            AllocateOutcome::Granted {
                amount: 20,
                remaining: 0,
                ..
            }
        ),
        "{g:?}"
    );
    let g = l
        .allocate(&req(&key, "t4", Some(0), 1, 10))
        .await
        .expect("alloc");
    assert!(
        matches!(g, AllocateOutcome::Insufficient { remaining: 0, .. }),
        "{g:?}"
    );
    // A cancelled allocation comes back; a credited one does not; both idempotent.
    l.settle_allocation(&key, "t1", false, 0)
        .await
        .expect("settle");
    l.settle_allocation(&key, "t1", false, 0)
        .await
        .expect("settle twice");
    l.settle_allocation(&key, "t2", true, 0)
        .await
        .expect("settle");
    l.settle_allocation(&key, "t2", false, 0)
        .await
        .expect("late cancel is ignored");
    assert_eq!(remaining(&*l, &key).await, Some(30));
    let s = l.state(&key).await.expect("state").expect("row");
    assert_eq!(s.hot_allocated, 70, "t2 (50) and t3 (20) are still held");
    // Unknown and unlimited keys.
    let unl = f.create_key(None).await;
    let u = l
        .allocate(&req(&unl, "t5", None, 1, 10))
        .await
        .expect("alloc");
    assert_eq!(u, AllocateOutcome::Unlimited);
    let n = l
        .allocate(&req(&KeyId::from("key_missing"), "t6", None, 1, 10))
        .await
        .expect("alloc");
    assert_eq!(n, AllocateOutcome::NotFound);
    // A stale generation is refused.
    let g = l
        .allocate(&req(&key, "t7", Some(7), 1, 10))
        .await
        .expect("alloc");
    assert_eq!(g, AllocateOutcome::GenerationMoved { generation: 0 });
}

/// `allocate_many`, `settle_many` and `return_many` give each item the answer it would
/// get alone (retries included), and one failing item does not sink the others.
pub async fn group_commit_answers_each_item_as_alone(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let a = f.create_key(Some(100)).await;
    let b = f.create_key(Some(100)).await;
    let unl = f.create_key(None).await;
    let missing = KeyId::from("key_missing_from_batch");
    l.allocate(&req(&a, "gc-a0", None, 1, 10))
        .await
        .expect("alloc");
    let out = l
        .allocate_many(&[
            req(&a, "gc-a1", Some(0), 1, 30),
            req(&b, "gc-b1", None, 1, 200),
            req(&unl, "gc-u1", None, 1, 10),
            req(&missing, "gc-m1", None, 1, 10),
            req(&a, "gc-a0", None, 1, 10),
        ])
        .await;
    let out: Vec<AllocateOutcome> = out.into_iter().map(|o| o.expect("batch item")).collect();
    assert!(
        matches!(
            out[..],
            [
                AllocateOutcome::Granted {
                    amount: 30,
                    remaining: 60,
                    ..
                },
                AllocateOutcome::Granted {
                    amount: 100,
                    remaining: 0,
                    ..
                },
                AllocateOutcome::Unlimited,
                AllocateOutcome::NotFound,
                AllocateOutcome::Granted { amount: 10, .. },
            ]
        ),
        "batch answers: {out:?}"
    );
    let settled = l
        .settle_many(&[
            Settlement {
                key: &a,
                transfer_id: "gc-a1",
                credited: true,
                spent: 5,
            },
            Settlement {
                key: &b,
                transfer_id: "gc-b1",
                credited: false,
                spent: 0,
            },
        ])
        .await;
    assert!(settled.iter().all(Result::is_ok), "{settled:?}");
    let sa = l.state(&a).await.expect("state").expect("row");
    assert_eq!(
        (sa.remaining, sa.hot_allocated),
        (Some(60), 35),
        "a: 10 + 30 allocated, 5 reported spent"
    );
    assert_eq!(
        remaining(&*l, &b).await,
        Some(100),
        "b's cancelled allocation came back"
    );
    let back = Drained {
        amount: 20,
        spent: 5,
        generation: 0,
    };
    for round in 0..2 {
        let r = l
            .return_many(&[(&missing, "gc-r0", back), (&a, "gc-r1", back)])
            .await;
        assert!(r[0].is_err(), "a key without a row is an error: {r:?}");
        let s = r[1]
            .as_ref()
            .expect("a's return is applied despite the other");
        assert_eq!(
            (s.remaining, s.hot_allocated),
            (Some(80), 10),
            "round {round}: returned once"
        );
    }
}

pub async fn drain_returns_are_idempotent(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let key = f.create_key(Some(50)).await;
    l.allocate(&req(&key, "a1", None, 1, 20))
        .await
        .expect("alloc");
    // The credit reported 3 spends made before it: they leave hot_allocated.
    l.settle_allocation(&key, "a1", true, 3)
        .await
        .expect("settle");
    let s = l.state(&key).await.expect("state").expect("row");
    assert_eq!(s.hot_allocated, 17, "20 allocated, 3 reported spent");
    let d = Drained {
        amount: 15,
        spent: 2,
        generation: 0,
    };
    let s = l.return_drained(&key, "r1", d).await.expect("return");
    assert_eq!((s.remaining, s.hot_allocated), (Some(45), 0));
    let s = l.return_drained(&key, "r1", d).await.expect("return twice");
    assert_eq!(
        s.remaining,
        Some(45),
        "a repeated return must not add twice"
    );
}

pub async fn fences(f: &dyn LedgerFixture) {
    let l = f.ledger();
    // Decrement counts what the hot store held; clamps at zero.
    let key = f.create_key(Some(100)).await;
    l.allocate(&req(&key, "f-a1", None, 1, 40))
        .await
        .expect("alloc");
    l.settle_allocation(&key, "f-a1", true, 0)
        .await
        .expect("settle");
    let BeginFence::Begun(fence) = l
        .begin_fence(&key, "op1", FenceOp::Decrement(30), 5, None, None)
        .await
        .expect("begin")
    else {
        panic!("decrement must begin");
    };
    assert_eq!(fence.generation, 1);
    let again = l
        .begin_fence(&key, "op1", FenceOp::Decrement(30), 5, None, None)
        .await
        .expect("begin twice");
    assert_eq!(
        again,
        BeginFence::Begun(fence.clone()),
        "begin_fence is idempotent"
    );
    let pending = l
        .pending_fences(Some(&key), i64::MAX, 10)
        .await
        .expect("pending");
    assert_eq!(pending, vec![fence.clone()]);
    // While the fence is pending, no allocation.
    let g = l
        .allocate(&req(&key, "f-a2", Some(1), 1, 10))
        .await
        .expect("alloc");
    assert!(
        matches!(g, AllocateOutcome::GenerationMoved { .. }),
        "{g:?}"
    );
    // The hot store held 40 and 10 were spent: 60 + 30 = 90, minus 30 = 60.
    let drained = Drained {
        amount: 30,
        spent: 10,
        generation: 0,
    };
    let s = l.finish_fence(&fence, drained).await.expect("finish");
    assert_eq!(
        (s.remaining, s.hot_allocated, s.generation),
        (Some(60), 0, 1)
    );
    let s = l.finish_fence(&fence, drained).await.expect("finish twice");
    assert_eq!(s.remaining, Some(60), "finish_fence is idempotent");
    assert!(l
        .pending_fences(Some(&key), i64::MAX, 10)
        .await
        .expect("pending")
        .is_empty());
    // A late return from generation 0 still counts after a decrement…
    let s = l
        .return_drained(
            &key,
            "late1",
            Drained {
                amount: 5,
                spent: 0,
                generation: 0,
            },
        )
        .await
        .expect("return");
    assert_eq!(s.remaining, Some(65));
    // …but not after a set, which overwrote that generation's credits.
    let BeginFence::Begun(set) = l
        .begin_fence(&key, "op2", FenceOp::Set(Some(10)), 6, None, None)
        .await
        .expect("begin")
    else {
        panic!("set must begin");
    };
    let s = l
        .finish_fence(
            &set,
            Drained {
                generation: 1,
                ..Drained::default()
            },
        )
        .await
        .expect("finish");
    assert_eq!((s.remaining, s.generation), (Some(10), 2));
    let s = l
        .return_drained(
            &key,
            "late2",
            Drained {
                amount: 7,
                spent: 0,
                generation: 1,
            },
        )
        .await
        .expect("return");
    assert_eq!(
        s.remaining,
        Some(10),
        "credits of a generation overwritten by set"
    );
    let BeginFence::Begun(dec) = l
        .begin_fence(&key, "op3", FenceOp::Decrement(25), 7, None, None)
        .await
        .expect("begin")
    else {
        panic!("decrement must begin");
    };
    let s = l
        .finish_fence(
            &dec,
            Drained {
                generation: 2,
                ..Drained::default()
            },
        )
        .await
        .expect("finish");
    assert_eq!(s.remaining, Some(0), "decrement clamps at zero");
    // Set to unlimited and back.
    let BeginFence::Begun(unl) = l
        .begin_fence(&key, "op4", FenceOp::Set(None), 8, None, None)
        .await
        .expect("begin")
    else {
        panic!("set must begin");
    };
    let s = l
        .finish_fence(&unl, Drained::default())
        .await
        .expect("finish");
    assert_eq!(s.remaining, None);
    assert_eq!(
        l.begin_fence(
            &KeyId::from("key_missing"),
            "op5",
            FenceOp::Set(Some(1)),
            9,
            None,
            None
        )
        .await
        .expect("begin"),
        BeginFence::NotFound
    );
}

pub async fn refill_once_per_period(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let key = f.create_key(Some(3)).await;
    let op = FenceOp::Refill {
        amount: 10,
        period_start: 86_400_000,
    };
    let BeginFence::Begun(fence) = l
        .begin_fence(&key, "rf1", op, 86_400_500, None, None)
        .await
        .expect("begin")
    else {
        panic!("first refill of the period must begin");
    };
    let s = l
        .finish_fence(
            &fence,
            Drained {
                amount: 2,
                spent: 0,
                generation: 0,
            },
        )
        .await
        .expect("finish");
    assert_eq!(s.remaining, Some(10), "3 + 2 held is below 10: set to 10");
    assert_eq!(
        l.begin_fence(&key, "rf2", op, 86_400_900, None, None)
            .await
            .expect("begin"),
        BeginFence::NotDue,
        "a second refill in the same period is not applied"
    );
    // Next period, above the amount: unchanged.
    let inc = l
        .increment(&key, credits(5), u64::MAX >> 11, None, None)
        .await
        .expect("increment");
    assert!(matches!(inc, IncrementOutcome::Done(_)));
    let op2 = FenceOp::Refill {
        amount: 10,
        period_start: 2 * 86_400_000,
    };
    let BeginFence::Begun(fence) = l
        .begin_fence(&key, "rf3", op2, 2 * 86_400_000, None, None)
        .await
        .expect("begin")
    else {
        panic!("refill of the next period must begin");
    };
    let s = l
        .finish_fence(&fence, Drained::default())
        .await
        .expect("finish");
    assert_eq!(s.remaining, Some(15));
}

/// The ledger's part alone cannot refuse a spend while the hot store holds more of the
/// key's credits: the answer is undecided and nothing is spent.
pub async fn direct_spend_never_refuses_while_the_hot_store_holds_credits(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let key = f.create_key(Some(10)).await;
    let granted = l
        .allocate(&req(&key, "hot-1", None, 6, 6))
        .await
        .expect("allocate");
    assert!(
        matches!(
            granted,
            AllocateOutcome::Granted {
                amount: 6,
                remaining: 4,
                ..
            }
        ),
        "{granted:?}"
    );
    assert_eq!(
        l.spend_direct(&key, cost(5), None).await.expect("spend"),
        DirectSpend::Undecided {
            remaining: 4,
            hot_allocated: 6
        }
    );
    assert_eq!(remaining(&*l, &key).await, Some(4), "nothing was spent");
    assert_eq!(
        l.spend_direct(&key, cost(4), None).await.expect("spend"),
        DirectSpend::Valid { remaining: 0 }
    );
}

/// A key and its pool spent together on the ledger: both or neither.
pub async fn direct_spends_of_several_accounts_are_all_or_none(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let a = f.create_key(Some(10)).await;
    let b = f.create_key(Some(3)).await;
    let both = [a.clone(), b.clone()];
    assert_eq!(
        l.spend_direct_all(&both, cost(2), None)
            .await
            .expect("spend"),
        (
            true,
            vec![
                DirectSpend::Valid { remaining: 8 },
                DirectSpend::Valid { remaining: 1 }
            ]
        )
    );
    assert_eq!(
        l.spend_direct_all(&both, cost(2), None)
            .await
            .expect("spend"),
        (
            false,
            vec![
                DirectSpend::Valid { remaining: 6 },
                DirectSpend::Exceeded { remaining: 1 }
            ]
        ),
        "b cannot pay: a pays nothing either"
    );
    let remaining = |k: KeyId| {
        let l = l.clone();
        async move { l.state(&k).await.expect("state").expect("row").remaining }
    };
    assert_eq!(
        (remaining(a.clone()).await, remaining(b.clone()).await),
        (Some(8), Some(1))
    );
    // An unlimited account pays anything; a missing one stops the spend.
    let free = f.create_key(None).await;
    let (spent, _) = l
        .spend_direct_all(&[a.clone(), free], cost(8), None)
        .await
        .expect("spend");
    assert!(spent);
    let missing = KeyId::from("key_missing_account");
    let (spent, outcomes) = l
        .spend_direct_all(&[b.clone(), missing], cost(1), None)
        .await
        .expect("spend");
    assert!(!spent);
    assert_eq!(outcomes[1], DirectSpend::NotFound);
    assert_eq!((remaining(a).await, remaining(b).await), (Some(0), Some(1)));
}

pub async fn direct_spend_and_increment(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let key = f.create_key(Some(5)).await;
    assert_eq!(
        l.spend_direct(&key, cost(3), None).await.expect("spend"),
        DirectSpend::Valid { remaining: 2 }
    );
    assert_eq!(
        l.spend_direct(&key, cost(3), None).await.expect("spend"),
        DirectSpend::Exceeded { remaining: 2 }
    );
    assert_eq!(
        l.spend_direct(&key, cost(0), None).await.expect("spend"),
        DirectSpend::Valid { remaining: 2 }
    );
    let unl = f.create_key(None).await;
    assert_eq!(
        l.spend_direct(&unl, cost(3), None).await.expect("spend"),
        DirectSpend::Unlimited
    );
    assert_eq!(
        l.spend_direct(&KeyId::from("key_missing"), cost(3), None)
            .await
            .expect("spend"),
        DirectSpend::NotFound
    );
    assert_eq!(
        l.increment(&unl, credits(1), 100, None, None)
            .await
            .expect("inc"),
        IncrementOutcome::Unlimited
    );
    assert_eq!(
        l.increment(&key, credits(99), 100, None, None)
            .await
            .expect("inc"),
        IncrementOutcome::Overflow
    );
    assert!(
        matches!(l.increment(&key, credits(98), 100, None, None).await.expect("inc"), IncrementOutcome::Done(s) if s.remaining == Some(100))
    );
    assert_eq!(
        l.increment(&KeyId::from("key_missing"), credits(1), 100, None, None)
            .await
            .expect("inc"),
        IncrementOutcome::NotFound
    );
}

pub async fn epochs_and_orphans(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let key = f.create_key(Some(100)).await;
    l.allocate(&req(&key, "e1", None, 1, 30))
        .await
        .expect("alloc");
    l.settle_allocation(&key, "e1", true, 0)
        .await
        .expect("settle");
    l.allocate(&req(&key, "e2", Some(0), 1, 10))
        .await
        .expect("alloc");
    let orphans = l
        .pending_allocations(Some(&key), i64::MAX, 10)
        .await
        .expect("pending");
    assert_eq!(
        orphans
            .iter()
            .map(|o| (o.transfer_id.as_str(), o.amount))
            .collect::<Vec<_>>(),
        vec![("e2", 10)]
    );
    assert!(
        l.pending_allocations(Some(&key), 1_000, 10)
            .await
            .expect("pending")
            .is_empty(),
        "older_than is exclusive"
    );
    // The hot store restarted: epoch-b. What epoch-a held (40) is written off, once.
    let lost = l
        .write_off_other_epochs("epoch-b")
        .await
        .expect("write off");
    assert!(lost.contains(&(key.clone(), 40)), "{lost:?}");
    assert!(l
        .write_off_other_epochs("epoch-b")
        .await
        .expect("again")
        .iter()
        .all(|(k, _)| *k != key));
    assert_eq!(remaining(&*l, &key).await, Some(60));
    assert!(l
        .pending_allocations(Some(&key), i64::MAX, 10)
        .await
        .expect("pending")
        .is_empty());
    // Allocation under the new epoch works.
    let mut r = req(&key, "e3", None, 1, 10);
    r.epoch = "epoch-b";
    assert!(matches!(
        l.allocate(&r).await.expect("alloc"),
        AllocateOutcome::Granted {
            amount: 10,
            lost: 0,
            ..
        }
    ));
}

/// A store that colocates (a Redis Cluster) names an epoch's home (`<home>#<epoch>`):
/// while an account's hot credits are at one home, an allocation for another is refused
/// (`Elsewhere`, nothing moved, nothing written off) and so is a write-off by another
/// home's epoch; once they are back, the other home allocates. A new epoch of the same
/// home still writes off what the old one held.
pub async fn hot_credits_are_at_one_home_at_a_time(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let key = f.create_key(Some(100)).await;
    let at = |tid: &'static str, epoch: &'static str| {
        let mut r = req(&key, tid, None, 1, 30);
        r.epoch = epoch;
        r
    };
    let g = l.allocate(&at("h1", "own-1")).await.expect("alloc");
    assert!(
        matches!(g, AllocateOutcome::Granted { amount: 30, .. }),
        "{g:?}"
    );
    l.settle_allocation(&key, "h1", true, 0)
        .await
        .expect("settle");
    assert_eq!(
        l.hot_epoch(&key).await.expect("hot epoch").as_deref(),
        Some("own-1")
    );
    let moved = l
        .allocate(&at("h2", "id_pool#pool-1"))
        .await
        .expect("alloc elsewhere");
    assert_eq!(moved, AllocateOutcome::Elsewhere, "credits are held at own");
    assert_eq!(
        l.write_off_key(&key, "id_pool#pool-1")
            .await
            .expect("write off"),
        0,
        "credits at another home are not lost"
    );
    let state = l.state(&key).await.expect("state").expect("row");
    assert_eq!((state.remaining, state.hot_allocated), (Some(70), 30));
    // Spent 5, 25 back: nothing is held any more, so the pool's home may allocate.
    l.return_drained(
        &key,
        "h3",
        Drained {
            amount: 25,
            spent: 5,
            generation: 0,
        },
    )
    .await
    .expect("return");
    let g = l
        .allocate(&at("h4", "id_pool#pool-1"))
        .await
        .expect("alloc");
    assert!(
        matches!(
            g,
            AllocateOutcome::Granted {
                amount: 30,
                remaining: 65,
                lost: 0,
                ..
            }
        ),
        "{g:?}"
    );
    assert_eq!(
        l.hot_epoch(&key).await.expect("hot epoch").as_deref(),
        Some("id_pool#pool-1")
    );
    // The pool's shard lost its data: a new epoch of the same home writes off the 30.
    let g = l
        .allocate(&at("h5", "id_pool#pool-2"))
        .await
        .expect("alloc");
    assert!(
        matches!(
            g,
            AllocateOutcome::Granted {
                amount: 30,
                remaining: 35,
                lost: 30,
                ..
            }
        ),
        "{g:?}"
    );
}

/// The whole engine on this ledger: 200 concurrent spends on 100 credits.
pub async fn engine_is_exact_under_concurrency(f: &dyn LedgerFixture) {
    let key = f.create_key(Some(100)).await;
    let engine = Arc::new(Engine::new(
        Arc::new(MemoryHotStore::new()),
        f.ledger(),
        Arc::new(SystemClock),
        EngineConfig::default(),
    ));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let prefetcher = tokio::spawn(engine.clone().run_prefetcher(async move {
        let _ = stopped.await;
    }));
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (engine, key) = (engine.clone(), key.clone());
        tasks.push(tokio::spawn(
            async move { engine.spend(&key, cost(1)).await },
        ));
    }
    let mut seen = BTreeSet::new();
    let mut valid = 0;
    for t in tasks {
        match t.await.expect("task").expect("spend") {
            Decision::Valid { remaining: Some(r) } => {
                valid += 1;
                assert!(seen.insert(r), "remaining {r} reported twice");
            }
            Decision::Exceeded { remaining } => assert_eq!(remaining, 0),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(valid, 100);
    assert_eq!(seen, (0..100).collect::<BTreeSet<u64>>());
    let _ = stop.send(());
    prefetcher.await.expect("prefetcher");
    engine.drain_all().await.expect("drain");
    let s = f.ledger().state(&key).await.expect("state").expect("row");
    assert_eq!((s.remaining, s.hot_allocated), (Some(0), 0));
}

fn reserve_req<'a>(key: &'a KeyId, hold_id: &'a str, amount: u64) -> ReserveRequest<'a> {
    ReserveRequest {
        key,
        hold_id,
        amount,
        now_ms: 1_000,
        expires_at_ms: 61_000,
        mark: None,
    }
}

/// The hold and the key's `(remaining, held)` of a hold outcome.
fn hold_of(o: HoldOutcome) -> (crate::ports::Hold, bool, (Option<u64>, u64)) {
    match o {
        HoldOutcome::Hold {
            hold,
            changed,
            state,
        } => {
            let s = state.expect("the key's state");
            (hold, changed, (s.remaining, s.held))
        }
        other => panic!("expected a hold, got {other:?}"),
    }
}

/// A pooled key's hold: reserve, settle, release and expiry move the key's and the
/// pool's balances together, both or neither, each exactly once.
pub async fn pooled_holds_move_both_balances_or_neither(f: &dyn LedgerFixture) {
    use crate::ports::PairHoldOutcome;
    let l = f.ledger();
    let key = f.create_key(Some(50)).await;
    let pool = f.create_key(Some(30)).await;
    let books = |k: KeyId| {
        let l = l.clone();
        async move {
            let s = l.state(&k).await.unwrap().unwrap();
            (s.remaining, s.held)
        }
    };
    let hold_of = |o: PairHoldOutcome| match o {
        PairHoldOutcome::Hold { hold, changed, .. } => (hold, changed),
        other => panic!("expected a hold, got {other:?}"),
    };
    // The pool (30) cannot cover 40: nothing moves from either.
    assert_eq!(
        l.reserve_pair(&reserve_req(&key, "hold_p1", 40), &pool)
            .await
            .unwrap(),
        PairHoldOutcome::Short {
            account: 1,
            remaining: 30,
            hot_allocated: 0
        }
    );
    let (h, changed) = hold_of(
        l.reserve_pair(&reserve_req(&key, "hold_p1", 20), &pool)
            .await
            .unwrap(),
    );
    assert!(changed && h.state == HoldState::Open && h.key == key);
    assert_eq!(books(key.clone()).await, (Some(30), 20));
    assert_eq!(books(pool.clone()).await, (Some(10), 20));
    // Again with the same id: nothing moves.
    let (_, changed) = hold_of(
        l.reserve_pair(&reserve_req(&key, "hold_p1", 5), &pool)
            .await
            .unwrap(),
    );
    assert!(!changed);
    // Settling 35 needs 15 more from each: the pool has 10, nothing changes.
    let settle = |cost| {
        let (l, key, pool) = (l.clone(), key.clone(), pool.clone());
        async move {
            l.close_hold_pair(&key, &pool, "hold_p1", HoldClose::Settle(cost), 2_000, None)
                .await
                .unwrap()
        }
    };
    assert!(matches!(
        settle(35).await,
        PairHoldOutcome::Short { account: 1, .. }
    ));
    let (h, changed) = hold_of(settle(12).await);
    assert!(changed && h.state == HoldState::Settled && h.cost == Some(12));
    assert_eq!(books(key.clone()).await, (Some(38), 0));
    assert_eq!(books(pool.clone()).await, (Some(18), 0));
    let (_, changed) = hold_of(settle(1).await);
    assert!(!changed, "settled once");
    // A hold expired alone on one account (the reconciler expires per account) takes
    // the other along at the next close.
    hold_of(
        l.reserve_pair(&reserve_req(&key, "hold_p2", 8), &pool)
            .await
            .unwrap(),
    );
    let (expired, _) = l.expire_holds(&pool, 61_000, 10).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(books(pool.clone()).await, (Some(18), 0));
    assert_eq!(books(key.clone()).await, (Some(30), 8));
    let (h, changed) = hold_of(
        l.close_hold_pair(&key, &pool, "hold_p2", HoldClose::Settle(8), 3_000, None)
            .await
            .unwrap(),
    );
    assert!(changed && h.state == HoldState::Expired, "{h:?}");
    assert_eq!(books(key.clone()).await, (Some(38), 0));
    // Release returns both.
    hold_of(
        l.reserve_pair(&reserve_req(&key, "hold_p3", 5), &pool)
            .await
            .unwrap(),
    );
    hold_of(
        l.close_hold_pair(&key, &pool, "hold_p3", HoldClose::Release, 2_000, None)
            .await
            .unwrap(),
    );
    assert_eq!(books(key.clone()).await, (Some(38), 0));
    assert_eq!(books(pool.clone()).await, (Some(18), 0));
    // A plain hold of the key is not a pooled hold.
    hold_of_plain(l.reserve(&reserve_req(&key, "hold_p4", 1)).await.unwrap());
    assert_eq!(
        l.close_hold_pair(&key, &pool, "hold_p4", HoldClose::Release, 2_000, None)
            .await
            .unwrap(),
        PairHoldOutcome::NotFound
    );
}

fn hold_of_plain(o: HoldOutcome) {
    assert!(
        matches!(o, HoldOutcome::Hold { changed: true, .. }),
        "{o:?}"
    );
}

pub async fn holds_close_exactly_once(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let key = f.create_key(Some(100)).await;
    let hold_id = format!("hold_{key}");
    let (h, changed, books) = hold_of(l.reserve(&reserve_req(&key, &hold_id, 30)).await.unwrap());
    assert!(changed && h.funded && h.state == HoldState::Open);
    assert_eq!(
        (h.amount, h.created_at_ms, h.expires_at_ms),
        (30, 1_000, 61_000)
    );
    assert_eq!(
        books,
        (Some(70), 30),
        "moved out of remaining into the hold"
    );
    let (again, changed, books) =
        hold_of(l.reserve(&reserve_req(&key, &hold_id, 99)).await.unwrap());
    assert!(!changed, "a reserve with a known id changes nothing");
    assert_eq!((again.amount, books), (30, (Some(70), 30)));
    assert_eq!(
        l.hold(&hold_id).await.unwrap(),
        Some(h.clone()),
        "read back"
    );
    assert_eq!(
        l.reserve(&reserve_req(&key, "hold_big", 71)).await.unwrap(),
        HoldOutcome::Short {
            remaining: 70,
            hot_allocated: 0
        }
    );
    assert_eq!(
        l.hold("hold_big").await.unwrap(),
        None,
        "a refused reserve leaves none"
    );
    let other = f.create_key(Some(5)).await;
    assert_eq!(
        l.close_hold(&other, &hold_id, HoldClose::Release, 2_000, None)
            .await
            .unwrap(),
        HoldOutcome::NotFound,
        "another key's hold"
    );
    // Above the hold and the balance: refused, nothing moves.
    assert_eq!(
        l.close_hold(&key, &hold_id, HoldClose::Settle(101), 2_000, None)
            .await
            .unwrap(),
        HoldOutcome::Short {
            remaining: 70,
            hot_allocated: 0
        }
    );
    let (settled, changed, books) = hold_of(
        l.close_hold(&key, &hold_id, HoldClose::Settle(12), 2_000, None)
            .await
            .unwrap(),
    );
    assert!(changed);
    assert_eq!(
        (settled.state, settled.cost, settled.closed_at_ms),
        (HoldState::Settled, Some(12), Some(2_000))
    );
    assert_eq!(books, (Some(88), 0), "the 18 not spent are back");
    let (same, changed, books) = hold_of(
        l.close_hold(&key, &hold_id, HoldClose::Release, 3_000, None)
            .await
            .unwrap(),
    );
    assert!(
        !changed && same == settled && books == (Some(88), 0),
        "closed once"
    );

    // Expiry: not before its time, then each due hold once.
    let (a, b) = (format!("hold_a_{key}"), format!("hold_b_{key}"));
    l.reserve(&reserve_req(&key, &a, 10)).await.unwrap();
    l.reserve(&ReserveRequest {
        expires_at_ms: 90_000,
        ..reserve_req(&key, &b, 20)
    })
    .await
    .unwrap();
    assert_eq!(l.keys_with_due_holds(60_999, 10).await.unwrap(), vec![]);
    assert_eq!(
        l.keys_with_due_holds(61_000, 10).await.unwrap(),
        vec![key.clone()]
    );
    let (expired, state) = l.expire_holds(&key, 61_000, 10).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(
        (expired[0].id.as_str(), expired[0].state),
        (a.as_str(), HoldState::Expired)
    );
    let state = state.expect("state");
    assert_eq!((state.remaining, state.held), (Some(68), 20));
    let (again, _) = l.expire_holds(&key, 61_000, 10).await.unwrap();
    assert!(again.is_empty(), "expired once");
    // A settle once the time is up finds the hold expired.
    let (late, changed, books) = hold_of(
        l.close_hold(&key, &b, HoldClose::Settle(5), 90_000, None)
            .await
            .unwrap(),
    );
    assert!(changed);
    assert_eq!(
        (late.state, late.cost, books),
        (HoldState::Expired, None, (Some(88), 0))
    );

    // Unlimited keys get unfunded holds.
    let free = f.create_key(None).await;
    let fid = format!("hold_{free}");
    let (h, _, books) = hold_of(l.reserve(&reserve_req(&free, &fid, 50)).await.unwrap());
    assert!(!h.funded);
    assert_eq!(books, (None, 0));
    let (h, _, _) = hold_of(
        l.close_hold(&free, &fid, HoldClose::Settle(70), 2_000, None)
            .await
            .unwrap(),
    );
    assert_eq!((h.state, h.cost), (HoldState::Settled, Some(70)));
}

/// 40 concurrent reserves of 10 on a balance of 200 that the hot store partly holds:
/// exactly 20 succeed; settling at random costs and releasing leaves the balance exact.
pub async fn concurrent_reserves_and_settles_conserve_credits(f: &dyn LedgerFixture) {
    let key = f.create_key(Some(200)).await;
    let engine = Arc::new(Engine::new(
        Arc::new(MemoryHotStore::new()),
        f.ledger(),
        Arc::new(SystemClock),
        EngineConfig::default(),
    ));
    // Some of the balance moves to the hot store first.
    assert!(matches!(
        engine.spend(&key, cost(0)).await.unwrap(),
        Decision::Valid { .. }
    ));
    let mut tasks = Vec::new();
    for i in 0..40u64 {
        let (engine, key) = (engine.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let id = format!("hold_{key}_{i}");
            let now = SystemClock.now_ms();
            let req = ReserveRequest {
                key: &key,
                hold_id: &id,
                amount: 10,
                now_ms: now,
                expires_at_ms: now + 60_000,
                mark: None,
            };
            let reserved = engine.reserve(&req).await.expect("reserve");
            let HoldAnswer::Hold { .. } = reserved else {
                assert!(
                    matches!(reserved, HoldAnswer::Exceeded { .. }),
                    "{reserved:?}"
                );
                return (false, 0);
            };
            let close = if i % 3 == 0 {
                HoldClose::Release
            } else {
                HoldClose::Settle(i % 11)
            };
            match engine
                .close_hold(&key, &id, close, None)
                .await
                .expect("close")
            {
                HoldAnswer::Hold { hold, .. } => (true, hold.cost.unwrap_or(0)),
                other => panic!("closing a hold of 10 with at most 10: {other:?}"),
            }
        }));
    }
    let (mut made, mut spent) = (0, 0);
    for t in tasks {
        let (m, s) = t.await.expect("task");
        made += u64::from(m);
        spent += s;
    }
    assert!(
        made >= 20,
        "the balance covers at least 20 holds of 10: {made}"
    );
    engine.drain_all().await.expect("drain");
    let s = f.ledger().state(&key).await.expect("state").expect("row");
    assert_eq!(
        (s.remaining, s.held, s.hot_allocated),
        (Some(200 - spent), 0, 0)
    );
}

fn claim<'a>(key: &'a str, fingerprint: &'a str, token: &'a str, now_ms: i64) -> IdemClaim<'a> {
    IdemClaim {
        scope: "ws_conformance",
        key,
        fingerprint,
        token,
        now_ms,
        lease_until_ms: now_ms + 10_000,
        expired_before_ms: now_ms - 86_400_000,
    }
}

async fn idem_state(l: &dyn Ledger, key: &str) -> Option<IdemState> {
    let record = l.idempotency("ws_conformance", key).await.expect("record");
    record.map(|r| r.state)
}

fn mark<'a>(key: &'a str, token: &'a str) -> IdemMark<'a> {
    IdemMark {
        scope: "ws_conformance",
        key,
        token,
    }
}

/// An idempotency key's record: claimed once (a second request is in flight, another
/// body a mismatch), decided only in the transaction that makes a change (a call that
/// changes nothing leaves it claimed), answered once; a lapsed claim is taken over and
/// its first holder can no longer decide; records past the window are gone.
pub async fn idempotency_records_decide_with_the_change(f: &dyn LedgerFixture) {
    let l = f.ledger();
    let key = f.create_key(Some(10)).await;
    let k1 = format!("{key}-1");
    let t0 = 1_000_000;
    assert_eq!(
        l.claim_idempotency(&claim(&k1, "fp", "a", t0))
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
    assert_eq!(
        l.claim_idempotency(&claim(&k1, "fp", "b", t0 + 1))
            .await
            .unwrap(),
        ClaimOutcome::InFlight,
        "a live claim of another request"
    );
    assert_eq!(
        l.claim_idempotency(&claim(&k1, "other", "b", t0 + 1))
            .await
            .unwrap(),
        ClaimOutcome::Mismatch,
        "the same key with another body"
    );
    // A spend the balance cannot cover changes nothing: still claimed.
    assert!(matches!(
        l.spend_direct(&key, cost(11), Some(&mark(&k1, "a")))
            .await
            .unwrap(),
        DirectSpend::Exceeded { remaining: 10 }
    ));
    let r = l
        .idempotency("ws_conformance", &k1)
        .await
        .unwrap()
        .expect("record");
    assert_eq!(r.state, IdemState::Claimed, "nothing decided");
    // A spend decides it, in its transaction.
    assert!(matches!(
        l.spend_direct(&key, cost(4), Some(&mark(&k1, "a")))
            .await
            .unwrap(),
        DirectSpend::Valid { remaining: 6 }
    ));
    let ClaimOutcome::Decided(r) = l
        .claim_idempotency(&claim(&k1, "fp", "b", t0 + 2))
        .await
        .unwrap()
    else {
        panic!("a decided key answers its record");
    };
    assert_eq!(
        (r.token.as_str(), r.state, r.answer),
        ("a", IdemState::Decided, None)
    );
    assert!(l
        .answer_idempotency(&mark(&k1, "a"), "{\"valid\":true}")
        .await
        .unwrap());
    assert!(
        !l.answer_idempotency(&mark(&k1, "b"), "x").await.unwrap(),
        "only the holder answers"
    );
    let ClaimOutcome::Decided(r) = l
        .claim_idempotency(&claim(&k1, "fp", "c", t0 + 3))
        .await
        .unwrap()
    else {
        panic!("an answered key answers its record");
    };
    assert_eq!(r.answer.as_deref(), Some("{\"valid\":true}"));
    // Abandoning a decided record does nothing.
    l.abandon_idempotency(&mark(&k1, "a")).await.unwrap();
    assert!(l
        .idempotency("ws_conformance", &k1)
        .await
        .unwrap()
        .is_some());

    // A lapsed claim is taken over; its first holder's mark is refused, nothing moves.
    let k2 = format!("{key}-2");
    assert_eq!(
        l.claim_idempotency(&claim(&k2, "fp", "a", t0))
            .await
            .unwrap(),
        ClaimOutcome::Claimed
    );
    assert_eq!(
        l.claim_idempotency(&claim(&k2, "fp", "b", t0 + 20_000))
            .await
            .unwrap(),
        ClaimOutcome::Claimed,
        "the lease ran out and nothing was decided"
    );
    assert!(matches!(
        l.spend_direct(&key, cost(1), Some(&mark(&k2, "a"))).await,
        Err(LedgerError::Superseded)
    ));
    assert!(matches!(
        l.reserve(&ReserveRequest {
            mark: Some(&mark(&k2, "a")),
            ..reserve_req(&key, &format!("hold_{key}_idem"), 1)
        })
        .await,
        Err(LedgerError::Superseded)
    ));
    assert!(matches!(
        l.increment(&key, credits(1), 1_000, Some(&mark(&k2, "a")), None)
            .await,
        Err(LedgerError::Superseded)
    ));
    let s = l.state(&key).await.unwrap().expect("row");
    assert_eq!((s.remaining, s.held), (Some(6), 0), "nothing moved");
    // The new holder decides with a reserve; then its hold closes under another key.
    let hold_id = format!("hold_{key}_idem");
    let reserved = l
        .reserve(&ReserveRequest {
            mark: Some(&mark(&k2, "b")),
            ..reserve_req(&key, &hold_id, 2)
        })
        .await
        .unwrap();
    assert!(matches!(reserved, HoldOutcome::Hold { changed: true, .. }));
    let r = l
        .idempotency("ws_conformance", &k2)
        .await
        .unwrap()
        .expect("record");
    assert_eq!((r.token.as_str(), r.state), ("b", IdemState::Decided));
    let k3 = format!("{key}-3");
    l.claim_idempotency(&claim(&k3, "fp", "a", t0))
        .await
        .unwrap();
    let closed = l
        .close_hold(
            &key,
            &hold_id,
            HoldClose::Settle(1),
            2_000,
            Some(&mark(&k3, "a")),
        )
        .await
        .unwrap();
    assert!(matches!(closed, HoldOutcome::Hold { changed: true, .. }));
    assert_eq!(idem_state(&*l, &k3).await, Some(IdemState::Decided));
    // An increment and a fence decide theirs.
    let k4 = format!("{key}-4");
    l.claim_idempotency(&claim(&k4, "fp", "a", t0))
        .await
        .unwrap();
    assert!(matches!(
        l.increment(&key, credits(5), 1_000, Some(&mark(&k4, "a")), None)
            .await
            .unwrap(),
        IncrementOutcome::Done(_)
    ));
    assert_eq!(idem_state(&*l, &k4).await, Some(IdemState::Decided));
    let k5 = format!("{key}-5");
    l.claim_idempotency(&claim(&k5, "fp", "a", t0))
        .await
        .unwrap();
    let fence = l
        .begin_fence(
            &key,
            &format!("op_{key}_idem"),
            FenceOp::Set(Some(3)),
            3_000,
            Some(&mark(&k5, "a")),
            None,
        )
        .await
        .unwrap();
    assert!(matches!(fence, BeginFence::Begun(_)));
    assert_eq!(idem_state(&*l, &k5).await, Some(IdemState::Decided));
    // An undecided claim can be dropped by its holder only.
    let k6 = format!("{key}-6");
    l.claim_idempotency(&claim(&k6, "fp", "a", t0))
        .await
        .unwrap();
    l.abandon_idempotency(&mark(&k6, "b")).await.unwrap();
    assert!(l
        .idempotency("ws_conformance", &k6)
        .await
        .unwrap()
        .is_some());
    l.abandon_idempotency(&mark(&k6, "a")).await.unwrap();
    assert!(l
        .idempotency("ws_conformance", &k6)
        .await
        .unwrap()
        .is_none());
    // Past the window a key is new again, and the purge deletes old records.
    let day = 86_400_000;
    assert_eq!(
        l.claim_idempotency(&claim(&k1, "other", "z", t0 + day + 10))
            .await
            .unwrap(),
        ClaimOutcome::Claimed,
        "a record older than the window counts as gone"
    );
    let purged = l.purge_idempotency(t0 + 1, 100_000).await.unwrap();
    assert!(purged >= 4, "records made at t0 are purged: {purged}");
    assert!(l
        .idempotency("ws_conformance", &k2)
        .await
        .unwrap()
        .is_none());
    assert!(
        l.idempotency("ws_conformance", &k1)
            .await
            .unwrap()
            .is_some(),
        "the new record stays"
    );
}

/// 50 concurrent requests with one idempotency key, as the service runs them, on the
/// engine over this ledger: one claims and spends, the others are in flight or answered
/// the first decision; the key spent exactly once.
pub async fn concurrent_idempotent_spends_spend_once(f: &dyn LedgerFixture) {
    let key = f.create_key(Some(1_000)).await;
    let engine = Arc::new(Engine::new(
        Arc::new(MemoryHotStore::new()),
        f.ledger(),
        Arc::new(SystemClock),
        EngineConfig::default(),
    ));
    // Part of the balance sits in the hot store: the spend must drain it to decide.
    assert!(matches!(
        engine.spend(&key, cost(0)).await.unwrap(),
        Decision::Valid { .. }
    ));
    let idem = format!("{key}-concurrent");
    let mut tasks = Vec::new();
    for i in 0..50 {
        let (engine, key, idem) = (engine.clone(), key.clone(), idem.clone());
        tasks.push(tokio::spawn(async move {
            let token = format!("t{i}");
            let now = SystemClock.now_ms();
            match engine
                .ledger()
                .claim_idempotency(&claim(&idem, "fp", &token, now))
                .await
                .expect("claim")
            {
                ClaimOutcome::Claimed => {
                    let m = mark(&idem, &token);
                    let d = engine.spend_once(&key, cost(7), &m).await.expect("spend");
                    engine
                        .ledger()
                        .answer_idempotency(&m, "spent")
                        .await
                        .expect("answer");
                    Some(d)
                }
                ClaimOutcome::InFlight | ClaimOutcome::Decided(_) => None,
                other => panic!("{other:?}"),
            }
        }));
    }
    let mut decided = Vec::new();
    for t in tasks {
        if let Some(d) = t.await.expect("task") {
            decided.push(d);
        }
    }
    assert_eq!(
        decided,
        vec![Decision::Valid {
            remaining: Some(993)
        }]
    );
    engine.drain_all().await.expect("drain");
    assert_eq!(remaining(&*f.ledger(), &key).await, Some(993), "spent once");
}

/// Checks the chain rule of a credit history (oldest first): seqs 1..n without a gap, and
/// each entry's balance before is the previous one's after less the spends counted
/// between them.
pub fn check_history_chain(entries: &[CreditEntry]) {
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(
            e.seq,
            u64::try_from(i + 1).unwrap(),
            "seqs without gaps: {entries:#?}"
        );
    }
    for pair in entries.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        assert!(
            next.spent_total >= prev.spent_total,
            "{prev:?} then {next:?}"
        );
        if let (Some(after), Some(before)) = (prev.balance_after, next.balance_before) {
            assert_eq!(
                before,
                after - (next.spent_total - prev.spent_total),
                "the chain breaks between {prev:?} and {next:?}"
            );
        }
    }
}

/// A key's credit history through an engine: creates, balance changes by a root key,
/// a refill, holds, a hot store that loses its data, and spends in between. Every ledger
/// records the same entries; the fences' balances are the exact balance; the chain has
/// no gap and replays to the balance the ledger holds once the hot store is drained.
pub async fn credit_history_replays(f: &dyn LedgerFixture) {
    use crate::CreditOp;
    const ROOT: &str = "rk_conformance";
    let key = f.create_key(Some(100)).await;
    let hot = Arc::new(MemoryHotStore::new());
    let engine = Engine::new(
        hot.clone(),
        f.ledger(),
        Arc::new(SystemClock),
        EngineConfig::default(),
    );
    // The exact balance, as the test knows it.
    let mut balance = 100u64;
    let spend = |n: u64, balance: &mut u64| {
        let (engine, key) = (&engine, &key);
        let start = *balance;
        *balance -= n;
        async move {
            for i in 1..=n {
                let d = engine.spend(key, cost(1)).await.expect("spend");
                assert_eq!(
                    d,
                    Decision::Valid {
                        remaining: Some(start - i)
                    }
                );
            }
        }
    };
    spend(5, &mut balance).await;
    let by_root = |op| engine.update_marked(&key, op, None, Some(ROOT));
    by_root(CreditOp::Increment(credits(10)))
        .await
        .expect("increment");
    balance += 10;
    spend(3, &mut balance).await;
    let before_decrement = balance;
    by_root(CreditOp::Decrement(credits(20)))
        .await
        .expect("decrement");
    balance -= 20;
    spend(2, &mut balance).await;
    let before_set = balance;
    by_root(CreditOp::Set(Some(credits(50))))
        .await
        .expect("set");
    balance = 50;
    spend(4, &mut balance).await;
    let before_refill = balance;
    let refill = CreditOp::Refill {
        amount: credits(80),
        period_start: i64::MAX / 2,
    };
    engine.update(&key, refill).await.expect("refill");
    balance = 80;
    spend(6, &mut balance).await;
    let held = |id: &'static str, amount| ReserveRequest {
        key: &key,
        hold_id: id,
        amount,
        now_ms: 1_000,
        expires_at_ms: i64::MAX / 2,
        mark: None,
    };
    for (id, amount, close) in [
        ("hold_h1", 20, HoldClose::Settle(5)),
        ("hold_h2", 10, HoldClose::Release),
    ] {
        let r = engine.reserve(&held(id, amount)).await.expect("reserve");
        assert!(matches!(r, HoldAnswer::Hold { changed: true, .. }), "{r:?}");
        let c = engine
            .close_hold(&key, id, close, None)
            .await
            .expect("close");
        assert!(matches!(c, HoldAnswer::Hold { changed: true, .. }), "{c:?}");
    }
    balance -= 5;
    // The hot store loses its data: the next allocation writes off what it held.
    hot.wipe();
    let d = engine.spend(&key, cost(1)).await.expect("spend");
    let Decision::Valid {
        remaining: Some(after_loss),
    } = d
    else {
        panic!("a spend after the loss: {d:?}");
    };
    assert!(after_loss < balance, "the hot store held some credits");
    let mut balance = after_loss;
    spend(2, &mut balance).await;
    engine.drain_all().await.expect("drain");
    let state = f.ledger().state(&key).await.expect("state").expect("row");
    assert_eq!((state.remaining, state.hot_allocated), (Some(balance), 0));

    let mut entries = f
        .ledger()
        .credit_history(&key, None, 100)
        .await
        .expect("history");
    entries.reverse();
    check_history_chain(&entries);
    let kinds: Vec<(EntryKind, Option<u64>, Option<&str>)> = entries
        .iter()
        .map(|e| (e.kind, e.value, e.actor.as_deref()))
        .collect();
    let lost = entries.last().and_then(|e| e.value);
    assert_eq!(
        kinds,
        [
            (EntryKind::Create, Some(100), None),
            (EntryKind::Increment, Some(10), Some(ROOT)),
            (EntryKind::Decrement, Some(20), Some(ROOT)),
            (EntryKind::Set, Some(50), Some(ROOT)),
            (EntryKind::Refill, Some(80), None),
            (EntryKind::HoldReserve, Some(20), None),
            (EntryKind::HoldSettle, Some(5), None),
            (EntryKind::HoldReserve, Some(10), None),
            (EntryKind::HoldRelease, Some(10), None),
            (EntryKind::WriteOff, lost, None),
        ]
    );
    let figures = |i: usize| {
        let e = &entries[i];
        (e.balance_before, e.balance_after, e.exact)
    };
    assert_eq!(figures(0), (None, Some(100), true));
    assert_eq!(
        figures(2),
        (Some(before_decrement), Some(before_decrement - 20), true)
    );
    assert_eq!(figures(3), (Some(before_set), Some(50), true));
    assert_eq!(figures(4), (Some(before_refill), Some(80), true));
    assert_eq!(entries[5].hold_id.as_deref(), Some("hold_h1"));
    assert_eq!((entries[5].held_before, entries[5].held_after), (0, 20));
    assert_eq!((entries[6].held_before, entries[6].held_after), (20, 0));
    let write_off = &entries[9];
    assert!(!write_off.exact && lost > Some(0), "{write_off:?}");
    // What the lost store held, less what it had spent, was the balance lost.
    assert_eq!(write_off.balance_after, Some(after_loss + 1));
    // The replay: the newest entry less the spends counted since is the balance now.
    let newest = entries.last().expect("entries");
    assert_eq!(
        newest
            .balance_after
            .map(|b| b - (state.spent - newest.spent_total)),
        Some(balance)
    );
    // Pages: newest first, below a cursor.
    let page = f
        .ledger()
        .credit_history(&key, Some(4), 2)
        .await
        .expect("page");
    assert_eq!(
        page.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [3, 2],
        "{page:?}"
    );
}
