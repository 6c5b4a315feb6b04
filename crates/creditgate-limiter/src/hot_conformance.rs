//! The [`HotStore`] conformance suite: every hot-store backend must pass it
//! (`MemoryHotStore` here, `RedisHotStore` in `creditgate-redis`). The checks pin down
//! the contract as `MemoryHotStore` implements it. Each check uses its own key names
//! (random prefix), so the suite can run on a shared store, concurrently with other
//! tests; it needs real time (waits of tens of milliseconds for idleness and locks) and
//! takes about a second. One check calls `expire_idle(0)`, which on a shared
//! `MemoryHotStore` also removes other users' entries that hold nothing (as the
//! contract allows).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::time::Instant;

use creditgate_domain::{Cost, KeyId};

use crate::ports::{Credit, CreditReply, Drained, HotStore, LockToken, SpendReply, TransferFate};

/// Runs every check of the suite.
pub async fn run_all(hot: Arc<dyn HotStore>) {
    let p = format!("conf{:08x}", rand::rng().random::<u32>());
    let hot = &*hot;
    epoch_is_stable(hot).await;
    spend_replies(hot, &p).await;
    only_a_valid_snapshot_answers(hot, &p).await;
    spends_are_atomic(hot, &p).await;
    spend_all_pays_from_every_account_or_none(hot, &p).await;
    credit_is_idempotent_and_reports_spent(hot, &p).await;
    credit_respects_generations(hot, &p).await;
    credit_only_under_its_epoch(hot, &p).await;
    sync_unalloc_orders_versions(hot, &p).await;
    drain_only_when_idle_and_idempotent(hot, &p).await;
    a_drain_stays_recorded_until_the_ledger_has_it(hot, &p).await;
    fence_drains_and_adopts_generation(hot, &p).await;
    resolve_transfer_fates(hot, &p).await;
    locks(hot, &p).await;
    entries_holding_credits_never_expire(hot, &p).await;
}

fn key(p: &str, name: &str) -> KeyId {
    KeyId::from(format!("{p}_{name}"))
}

fn cost(n: u64) -> Cost {
    Cost::new(n).expect("a test cost within bounds")
}

async fn credit(
    hot: &dyn HotStore,
    k: &KeyId,
    tid: &str,
    g: u64,
    amount: u64,
    u: u64,
    v: u64,
) -> CreditReply {
    let epoch = hot.epoch_of(k).await.expect("epoch");
    let c = Credit {
        transfer_id: tid,
        generation: g,
        amount,
        unalloc: u,
        version: v,
        epoch: &epoch,
    };
    hot.credit(k, &c).await.expect("credit")
}

async fn spend(hot: &dyn HotStore, k: &KeyId, cost: u64) -> SpendReply {
    hot.spend(k, self::cost(cost)).await.expect("spend")
}

async fn unalloc(hot: &dyn HotStore, k: &KeyId) -> Option<u64> {
    hot.peek(k).await.expect("peek").expect("entry").unalloc
}

async fn bal(hot: &dyn HotStore, k: &KeyId) -> u64 {
    hot.peek(k).await.expect("peek").expect("entry").bal
}

pub async fn epoch_is_stable(hot: &dyn HotStore) {
    let a = hot.epoch().await.expect("epoch");
    let b = hot.epoch().await.expect("epoch");
    assert!(!a.is_empty(), "the epoch must not be empty");
    assert_eq!(
        a, b,
        "the epoch must not change while the store keeps its data"
    );
}

pub async fn spend_replies(hot: &dyn HotStore, p: &str) {
    let k = key(p, "spend");
    assert_eq!(spend(hot, &k, 1).await, SpendReply::Miss, "no entry: Miss");
    assert!(
        hot.peek(&k).await.expect("peek").is_none(),
        "spend creates no entry"
    );

    assert_eq!(
        credit(hot, &k, "t1", 0, 5, 10, 1).await,
        CreditReply::Credited { spent: 0 }
    );
    assert_eq!(
        spend(hot, &k, 2).await,
        SpendReply::Valid {
            remaining: 13,
            bal: 3
        },
        "remaining = bal + unalloc after the spend"
    );
    assert_eq!(
        spend(hot, &k, 0).await,
        SpendReply::Valid {
            remaining: 13,
            bal: 3
        },
        "cost 0 is valid and spends nothing"
    );
    assert_eq!(
        spend(hot, &k, 4).await,
        SpendReply::Low {
            bal: 3,
            generation: 0
        },
        "bal < cost <= bal + unalloc: Low"
    );
    assert_eq!(
        spend(hot, &k, 14).await,
        SpendReply::Exceeded { remaining: 13 },
        "bal + unalloc < cost with a valid snapshot: Exceeded, nothing spent"
    );
    assert_eq!(
        spend(hot, &k, 3).await,
        SpendReply::Valid {
            remaining: 10,
            bal: 0
        },
        "bal == cost is valid"
    );
    assert_eq!(
        spend(hot, &k, 1).await,
        SpendReply::Low {
            bal: 0,
            generation: 0
        }
    );
    let e = hot.peek(&k).await.expect("peek").expect("entry");
    assert_eq!(
        (e.bal, e.unalloc, e.generation, e.spent),
        (0, Some(10), 0, 5)
    );

    // Exhausted with a valid snapshot of 0: Exceeded, but cost 0 still valid.
    let k = key(p, "spend_zero");
    credit(hot, &k, "t1", 3, 1, 0, 1).await;
    assert_eq!(
        spend(hot, &k, 1).await,
        SpendReply::Valid {
            remaining: 0,
            bal: 0
        }
    );
    assert_eq!(
        spend(hot, &k, 1).await,
        SpendReply::Exceeded { remaining: 0 }
    );
    assert_eq!(
        spend(hot, &k, 0).await,
        SpendReply::Valid {
            remaining: 0,
            bal: 0
        }
    );
}

/// Only a valid snapshot lets the hot store answer Valid or Exceeded.
pub async fn only_a_valid_snapshot_answers(hot: &dyn HotStore, p: &str) {
    // Credited without a snapshot (version 0 is not newer than the entry's 0).
    let k = key(p, "nosnap");
    credit(hot, &k, "t1", 2, 5, 0, 0).await;
    assert_eq!(
        hot.peek(&k).await.expect("peek").expect("entry").unalloc,
        None
    );
    assert_eq!(
        spend(hot, &k, 1).await,
        SpendReply::Low {
            bal: 5,
            generation: 2
        },
        "bal >= cost but no snapshot: Low, not Valid"
    );
    assert_eq!(
        spend(hot, &k, 100).await,
        SpendReply::Low {
            bal: 5,
            generation: 2
        },
        "no snapshot: Low, not Exceeded"
    );
    assert_eq!(bal(hot, &k).await, 5, "nothing spent without a snapshot");

    // A snapshot marked unknown stops answers until a new one arrives.
    let k = key(p, "unknown");
    credit(hot, &k, "t1", 0, 5, 10, 1).await;
    hot.sync_unalloc(&k, None, 0).await.expect("sync");
    assert_eq!(
        spend(hot, &k, 1).await,
        SpendReply::Low {
            bal: 5,
            generation: 0
        }
    );
    assert_eq!(
        spend(hot, &k, 100).await,
        SpendReply::Low {
            bal: 5,
            generation: 0
        }
    );
    hot.sync_unalloc(&k, Some(10), 1).await.expect("sync");
    assert_eq!(
        spend(hot, &k, 1).await,
        SpendReply::Valid {
            remaining: 14,
            bal: 4
        },
        "a snapshot at the held version makes it valid again"
    );
}

pub async fn spends_are_atomic(hot: &dyn HotStore, p: &str) {
    let k = key(p, "atomic");
    credit(hot, &k, "t1", 0, 20, 0, 1).await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        tasks.push(hot.spend(&k, cost(1)));
    }
    let mut valid = BTreeSet::new();
    let mut low = 0;
    for r in futures_join(tasks).await {
        match r.expect("spend") {
            SpendReply::Valid { remaining, bal } => {
                assert_eq!(remaining, bal);
                assert!(
                    valid.insert(remaining),
                    "remaining {remaining} answered twice"
                );
            }
            SpendReply::Exceeded { remaining: 0 } => low += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        valid,
        (0..20).collect::<BTreeSet<u64>>(),
        "exactly 20 spends of 20"
    );
    assert_eq!(low, 30);
}

/// Awaits all futures concurrently (no `futures` dependency): each on its own task
/// would need `'static`; polling them together keeps them concurrent on the store.
async fn futures_join<'a, T>(
    futs: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>>,
) -> Vec<T> {
    let mut futs: Vec<_> = futs.into_iter().map(Some).collect();
    let mut out: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if let Some(fut) = f {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *o = Some(v);
                        *f = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().flatten().collect()
}

/// A key and its pool pay together: the cost leaves every account or none, each
/// account's reply is what `spend` would say of it alone, and a probe never spends.
pub async fn spend_all_pays_from_every_account_or_none(hot: &dyn HotStore, p: &str) {
    let pool = key(p, "all_pool");
    // A sharded store spends together only what sits at one home: the key's entries
    // beside its pool's.
    let k = if hot.joint_spends() {
        key(p, "all_key")
    } else {
        assert!(hot.colocates(), "a store spends together somehow");
        crate::ports::hot_address(&key(p, "all_key"), pool.as_str())
    };
    let both = [k.clone(), pool.clone()];
    let all = |c: u64, probe: bool| {
        let both = both.clone();
        async move {
            hot.spend_all(&both, cost(c), probe)
                .await
                .expect("spend_all")
        }
    };
    // No entries: nothing spent, both Miss.
    assert_eq!(
        all(1, false).await,
        (false, vec![SpendReply::Miss, SpendReply::Miss])
    );
    credit(hot, &k, "t1", 0, 5, 0, 1).await;
    credit(hot, &pool, "t1", 0, 3, 100, 1).await;
    // A probe decides and spends nothing.
    assert_eq!(
        all(2, true).await,
        (
            false,
            vec![
                SpendReply::Valid {
                    remaining: 5,
                    bal: 5
                },
                SpendReply::Valid {
                    remaining: 103,
                    bal: 3
                }
            ]
        )
    );
    assert_eq!(
        all(2, false).await,
        (
            true,
            vec![
                SpendReply::Valid {
                    remaining: 3,
                    bal: 3
                },
                SpendReply::Valid {
                    remaining: 101,
                    bal: 1
                }
            ]
        )
    );
    // The pool is low (1 < 2, more in the ledger): nothing leaves the key either.
    assert_eq!(
        all(2, false).await,
        (
            false,
            vec![
                SpendReply::Valid {
                    remaining: 3,
                    bal: 3
                },
                SpendReply::Low {
                    bal: 1,
                    generation: 0
                }
            ]
        )
    );
    assert_eq!((bal(hot, &k).await, bal(hot, &pool).await), (3, 1));
    // The key cannot cover 4 at all (3 in all, valid snapshot): Exceeded.
    assert_eq!(
        all(4, false).await.1[0],
        SpendReply::Exceeded { remaining: 3 }
    );
    // Both can pay 1: both pay.
    assert!(all(1, false).await.0);
    assert_eq!((bal(hot, &k).await, bal(hot, &pool).await), (2, 0));
    let spent = |e: Option<crate::ports::HotEntry>| e.expect("entry").spent;
    assert_eq!(spent(hot.peek(&k).await.expect("peek")), 3);
    assert_eq!(spent(hot.peek(&pool).await.expect("peek")), 3);

    // Concurrent joint spends never take more than either account holds.
    let pool = key(p, "all_race_pool");
    let k = if hot.joint_spends() {
        key(p, "all_race_key")
    } else {
        crate::ports::hot_address(&key(p, "all_race_key"), pool.as_str())
    };
    credit(hot, &k, "t1", 0, 30, 0, 1).await;
    credit(hot, &pool, "t1", 0, 20, 0, 1).await;
    let pair = [k.clone(), pool.clone()];
    let spends = (0..50)
        .map(|_| hot.spend_all(&pair, cost(1), false))
        .collect();
    let passed = futures_join(spends)
        .await
        .into_iter()
        .filter(|r| r.as_ref().expect("spend_all").0)
        .count();
    assert_eq!(passed, 20, "the pool's 20 decide");
    assert_eq!((bal(hot, &k).await, bal(hot, &pool).await), (10, 0));
}

pub async fn credit_is_idempotent_and_reports_spent(hot: &dyn HotStore, p: &str) {
    let k = key(p, "credit");
    assert_eq!(
        credit(hot, &k, "a", 0, 10, 0, 1).await,
        CreditReply::Credited { spent: 0 }
    );
    spend(hot, &k, 3).await;
    assert_eq!(
        credit(hot, &k, "a", 0, 10, 0, 1).await,
        CreditReply::Duplicate,
        "the same transfer id credits once"
    );
    assert_eq!(bal(hot, &k).await, 7);
    assert_eq!(
        credit(hot, &k, "b", 0, 5, 0, 2).await,
        CreditReply::Credited { spent: 3 },
        "a credit reports the spends since the last report"
    );
    let e = hot.peek(&k).await.expect("peek").expect("entry");
    assert_eq!((e.bal, e.spent), (12, 0), "spent resets when reported");
    assert_eq!(
        credit(hot, &k, "c", 0, 0, 0, 3).await,
        CreditReply::Credited { spent: 0 }
    );
    assert_eq!(
        credit(hot, &k, "b", 0, 5, 0, 2).await,
        CreditReply::Duplicate
    );
    assert_eq!(bal(hot, &k).await, 12);

    // The snapshot follows the newest version only.
    credit(hot, &k, "d", 0, 0, 99, 2).await;
    assert_eq!(
        hot.peek(&k).await.expect("peek").expect("entry").unalloc,
        Some(0),
        "an older version does not replace the snapshot"
    );
    credit(hot, &k, "e", 0, 1, 50, 4).await;
    let e = hot.peek(&k).await.expect("peek").expect("entry");
    assert_eq!((e.bal, e.unalloc), (13, Some(50)));
}

/// A credit allocated under an epoch the store no longer has (its data was lost between
/// the ledger's allocation and the credit) is refused and credits nothing: the ledger
/// counts those credits with the lost epoch and writes them off.
pub async fn credit_only_under_its_epoch(hot: &dyn HotStore, p: &str) {
    let k = key(p, "epochs");
    let stale = Credit {
        transfer_id: "old",
        generation: 0,
        amount: 10,
        unalloc: 5,
        version: 1,
        epoch: "an-epoch-the-store-lost",
    };
    assert_eq!(
        hot.credit(&k, &stale).await.expect("credit"),
        CreditReply::Refused,
        "a credit of a lost epoch is refused"
    );
    let held = hot.peek(&k).await.expect("peek").map_or(0, |e| e.bal);
    assert_eq!(held, 0, "nothing was credited");
    assert_eq!(
        credit(hot, &k, "new", 0, 7, 0, 2).await,
        CreditReply::Credited { spent: 0 },
        "the current epoch credits"
    );
    assert_eq!(bal(hot, &k).await, 7);
}

pub async fn credit_respects_generations(hot: &dyn HotStore, p: &str) {
    let k = key(p, "gens");
    assert_eq!(
        credit(hot, &k, "g7", 7, 4, 0, 1).await,
        CreditReply::Credited { spent: 0 }
    );
    assert_eq!(
        hot.peek(&k).await.expect("peek").expect("entry").generation,
        7,
        "a credit creates the entry at its generation"
    );
    assert_eq!(
        credit(hot, &k, "g6", 6, 4, 0, 2).await,
        CreditReply::Refused,
        "another generation is refused"
    );
    assert_eq!(
        credit(hot, &k, "g8", 8, 4, 0, 2).await,
        CreditReply::Refused,
        "a generation the entry has not adopted is refused too"
    );
    assert_eq!(
        credit(hot, &k, "g6", 7, 4, 0, 2).await,
        CreditReply::Refused,
        "a refused transfer stays refused"
    );
    assert_eq!(bal(hot, &k).await, 4);

    hot.fence(&k, 9).await.expect("fence");
    assert_eq!(
        credit(hot, &k, "old", 7, 4, 0, 3).await,
        CreditReply::Refused,
        "allocations of an older generation cannot be credited after a fence"
    );
    assert_eq!(
        credit(hot, &k, "new", 9, 4, 0, 3).await,
        CreditReply::Credited { spent: 0 }
    );
    assert_eq!(bal(hot, &k).await, 4);
}

pub async fn sync_unalloc_orders_versions(hot: &dyn HotStore, p: &str) {
    let k = key(p, "sync");
    hot.sync_unalloc(&k, Some(5), 1).await.expect("sync");
    assert!(
        hot.peek(&k).await.expect("peek").is_none(),
        "sync_unalloc creates no entry"
    );
    credit(hot, &k, "t", 0, 1, 10, 5).await;
    assert_eq!(unalloc(hot, &k).await, Some(10));
    hot.sync_unalloc(&k, None, 0).await.expect("sync");
    assert_eq!(
        unalloc(hot, &k).await,
        None,
        "None marks the snapshot unknown"
    );
    hot.sync_unalloc(&k, Some(3), 4).await.expect("sync");
    assert_eq!(
        unalloc(hot, &k).await,
        None,
        "an older version does not revalidate"
    );
    hot.sync_unalloc(&k, Some(3), 5).await.expect("sync");
    assert_eq!(
        unalloc(hot, &k).await,
        Some(3),
        "the held version revalidates"
    );
    hot.sync_unalloc(&k, Some(1), 6).await.expect("sync");
    assert_eq!(unalloc(hot, &k).await, Some(1), "a newer version replaces");
    hot.sync_unalloc(&k, Some(9), 5).await.expect("sync");
    assert_eq!(
        unalloc(hot, &k).await,
        Some(1),
        "an older version is ignored"
    );
    assert_eq!(bal(hot, &k).await, 1, "sync never touches the balance");
}

/// A `drain-<nonce>` drain stays recorded (for any node to complete) until `returned`;
/// meanwhile the key drains nothing more. Other transfer ids record nothing.
pub async fn a_drain_stays_recorded_until_the_ledger_has_it(hot: &dyn HotStore, p: &str) {
    let k = key(p, "returning");
    credit(hot, &k, "t", 0, 10, 5, 1).await;
    spend(hot, &k, 3).await;
    assert_eq!(hot.pending_return(&k).await.expect("pending"), None);
    let first = crate::ports::drain_transfer_id();
    let d = hot.drain(&k, &first, 0).await.expect("drain");
    let moved = Drained {
        amount: 7,
        spent: 3,
        generation: 0,
    };
    assert_eq!(d, moved);
    assert_eq!(
        hot.pending_return(&k).await.expect("pending"),
        Some((first.clone(), moved)),
        "the drain is recorded with what it moved"
    );
    // Credits arrive again; another drain waits for the first one's ledger step.
    credit(hot, &k, "t2", 0, 4, 12, 2).await;
    let second = crate::ports::drain_transfer_id();
    assert_eq!(
        hot.drain(&k, &second, 0).await.expect("drain").amount,
        0,
        "nothing drained while an earlier return is unconfirmed"
    );
    assert_eq!(bal(hot, &k).await, 4);
    hot.returned(&k, &second).await.expect("returned");
    assert!(
        hot.pending_return(&k).await.expect("pending").is_some(),
        "another transfer's confirmation forgets nothing"
    );
    hot.returned(&k, &first).await.expect("returned");
    assert_eq!(hot.pending_return(&k).await.expect("pending"), None);
    assert_eq!(hot.drain(&k, &second, 0).await.expect("drain").amount, 4);
    hot.returned(&k, &second).await.expect("returned");
    // A transfer id of another form records nothing.
    credit(hot, &k, "t3", 0, 2, 14, 3).await;
    assert_eq!(hot.drain(&k, "plain", 0).await.expect("drain").amount, 2);
    assert_eq!(hot.pending_return(&k).await.expect("pending"), None);
}

pub async fn drain_only_when_idle_and_idempotent(hot: &dyn HotStore, p: &str) {
    let k = key(p, "drain");
    assert_eq!(
        hot.drain(&k, "d0", 0).await.expect("drain"),
        Drained::default(),
        "no entry: nothing drained"
    );
    assert!(
        hot.peek(&k).await.expect("peek").is_none(),
        "drain creates no entry"
    );

    credit(hot, &k, "t", 0, 10, 5, 1).await;
    spend(hot, &k, 3).await;
    assert_eq!(
        hot.drain(&k, "d1", 60_000).await.expect("drain"),
        Drained::default(),
        "a key used just now is not idle"
    );
    assert_eq!(bal(hot, &k).await, 7);
    tokio::time::sleep(Duration::from_millis(60)).await;
    let idle_ms = hot.peek(&k).await.expect("peek").expect("entry").idle_ms;
    assert!(idle_ms >= 40, "idle_ms {idle_ms} after 60 ms without use");
    let d = hot.drain(&k, "d1", 30).await.expect("drain");
    assert_eq!(
        d,
        Drained {
            amount: 7,
            spent: 3,
            generation: 0
        },
        "an idle key drains its whole balance and reports its spends"
    );
    let e = hot.peek(&k).await.expect("peek").expect("entry");
    assert_eq!(
        (e.bal, e.spent, e.unalloc),
        (0, 0, Some(12)),
        "the drained amount joins the snapshot so bal + unalloc stays exact"
    );
    assert_eq!(
        spend(hot, &k, 12).await,
        SpendReply::Low {
            bal: 0,
            generation: 0
        }
    );
    assert_eq!(
        hot.drain(&k, "d1", 3_600_000).await.expect("drain"),
        d,
        "draining again under the same id answers the first drain"
    );
    assert_eq!(
        hot.drain(&k, "d2", 0).await.expect("drain"),
        Drained::default(),
        "nothing left to drain"
    );

    // A drain reports the generation it drained.
    let k = key(p, "drain_gen");
    hot.fence(&k, 4).await.expect("fence");
    credit(hot, &k, "t", 4, 6, 0, 1).await;
    assert_eq!(
        hot.drain(&k, "busy", 60_000).await.expect("drain"),
        Drained {
            amount: 0,
            spent: 0,
            generation: 4
        }
    );
    assert_eq!(
        hot.drain(&k, "d", 0).await.expect("drain"),
        Drained {
            amount: 6,
            spent: 0,
            generation: 4
        }
    );
}

pub async fn fence_drains_and_adopts_generation(hot: &dyn HotStore, p: &str) {
    let k = key(p, "fence");
    assert_eq!(
        hot.fence(&k, 1).await.expect("fence"),
        Drained::default(),
        "fencing a missing key drains nothing"
    );
    let e = hot
        .peek(&k)
        .await
        .expect("peek")
        .expect("fence creates the entry");
    assert_eq!((e.bal, e.generation, e.unalloc), (0, 1, None));

    credit(hot, &k, "t", 1, 10, 5, 1).await;
    spend(hot, &k, 4).await;
    let d = hot.fence(&k, 2).await.expect("fence");
    assert_eq!(
        d,
        Drained {
            amount: 6,
            spent: 4,
            generation: 1
        }
    );
    let e = hot.peek(&k).await.expect("peek").expect("entry");
    assert_eq!(
        (e.bal, e.spent, e.generation, e.unalloc),
        (0, 0, 2, None),
        "a fence empties the entry, adopts the generation and invalidates the snapshot"
    );
    assert_eq!(
        hot.fence(&k, 2).await.expect("fence"),
        d,
        "fencing again to the same generation answers the first fence"
    );
    assert_eq!(
        hot.fence(&k, 1).await.expect("fence"),
        Drained {
            amount: 0,
            spent: 0,
            generation: 2
        },
        "an older generation is ignored"
    );
    assert_eq!(
        hot.peek(&k).await.expect("peek").expect("entry").generation,
        2
    );

    // After the fence: credits of the new generation, spends need a new snapshot.
    credit(hot, &k, "t2", 2, 3, 0, 0).await;
    assert_eq!(
        spend(hot, &k, 1).await,
        SpendReply::Low {
            bal: 3,
            generation: 2
        }
    );
    hot.sync_unalloc(&k, Some(0), 2).await.expect("sync");
    assert_eq!(
        spend(hot, &k, 1).await,
        SpendReply::Valid {
            remaining: 2,
            bal: 2
        }
    );
    assert_eq!(
        hot.fence(&k, 3).await.expect("fence"),
        Drained {
            amount: 2,
            spent: 1,
            generation: 2
        }
    );
}

pub async fn resolve_transfer_fates(hot: &dyn HotStore, p: &str) {
    let k = key(p, "resolve");
    credit(hot, &k, "t1", 0, 10, 0, 1).await;
    spend(hot, &k, 2).await;
    credit(hot, &k, "t2", 0, 5, 0, 2).await;
    assert_eq!(
        hot.resolve_transfer(&k, "t2", 0).await.expect("resolve"),
        TransferFate::Credited { spent: 2 },
        "a credited transfer resolves as credited, with the spends it reported"
    );
    assert_eq!(
        hot.resolve_transfer(&k, "t1", 0).await.expect("resolve"),
        TransferFate::Credited { spent: 0 }
    );
    assert_eq!(
        hot.resolve_transfer(&k, "t3", 0).await.expect("resolve"),
        TransferFate::Refused
    );
    assert_eq!(
        credit(hot, &k, "t3", 0, 5, 0, 3).await,
        CreditReply::Refused,
        "a transfer resolved as refused can never be credited later"
    );
    assert_eq!(bal(hot, &k).await, 13);
    assert_eq!(
        hot.resolve_transfer(&k, "t3", 0).await.expect("resolve"),
        TransferFate::Refused
    );

    let k = key(p, "resolve_missing");
    assert_eq!(
        hot.resolve_transfer(&k, "x", 4).await.expect("resolve"),
        TransferFate::Refused
    );
    let e = hot
        .peek(&k)
        .await
        .expect("peek")
        .expect("resolve creates the entry");
    assert_eq!((e.bal, e.generation), (0, 4));
    assert_eq!(credit(hot, &k, "x", 4, 5, 0, 1).await, CreditReply::Refused);
    assert_eq!(bal(hot, &k).await, 0);
}

pub async fn locks(hot: &dyn HotStore, p: &str) {
    let k = key(p, "lock");
    let ttl = Duration::from_secs(5);
    let t = hot
        .lock(&k, ttl, Duration::ZERO)
        .await
        .expect("lock")
        .expect("a free lock is taken");

    let started = Instant::now();
    assert!(hot
        .lock(&k, ttl, Duration::ZERO)
        .await
        .expect("lock")
        .is_none());
    let wait = Duration::from_millis(150);
    assert!(
        hot.lock(&k, ttl, wait).await.expect("lock").is_none(),
        "a held lock is not taken"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(120) && waited <= wait + Duration::from_millis(400),
        "a held lock makes lock() wait about `wait`, waited {waited:?}"
    );

    hot.unlock(&k, &LockToken("not-the-token".into()))
        .await
        .expect("unlock");
    assert!(
        hot.lock(&k, ttl, Duration::ZERO)
            .await
            .expect("lock")
            .is_none(),
        "a wrong token cannot unlock"
    );

    // A waiter returns soon after the release, well before its `wait`.
    let started = Instant::now();
    let (waited, ()) = tokio::join!(
        async {
            let r = hot
                .lock(&k, ttl, Duration::from_secs(3))
                .await
                .expect("lock");
            (r, started.elapsed())
        },
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            hot.unlock(&k, &t).await.expect("unlock");
        }
    );
    assert!(
        waited.0.is_none(),
        "a waiter returns None and retries its spend"
    );
    assert!(
        waited.1 < Duration::from_millis(1500),
        "a waiter returns after the release, waited {:?}",
        waited.1
    );
    let t2 = hot
        .lock(&k, Duration::from_millis(80), Duration::ZERO)
        .await
        .expect("lock")
        .expect("a released lock is taken");
    assert_ne!(t2, t, "every lock gets its own token");

    // An expired lock can be taken; its former holder's token no longer unlocks it.
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t3 = hot
        .lock(&k, ttl, Duration::ZERO)
        .await
        .expect("lock")
        .expect("an expired lock is taken");
    hot.unlock(&k, &t2).await.expect("unlock");
    assert!(
        hot.lock(&k, ttl, Duration::ZERO)
            .await
            .expect("lock")
            .is_none(),
        "the expired holder's token cannot release the new holder's lock"
    );
    hot.unlock(&k, &t3).await.expect("unlock");

    // A waiter on a lock that expires before `wait` returns by the expiry.
    let _t4 = hot
        .lock(&k, Duration::from_millis(100), Duration::ZERO)
        .await
        .expect("lock")
        .expect("free");
    let started = Instant::now();
    assert!(hot
        .lock(&k, ttl, Duration::from_secs(3))
        .await
        .expect("lock")
        .is_none());
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "waited {:?} for a lock expiring after 100 ms",
        started.elapsed()
    );
    assert!(
        hot.lock(&k, ttl, Duration::ZERO)
            .await
            .expect("lock")
            .is_some(),
        "taken after the expiry"
    );

    // Locks of different keys are independent.
    assert!(hot
        .lock(&key(p, "lock_other"), ttl, Duration::ZERO)
        .await
        .expect("lock")
        .is_some());
}

pub async fn entries_holding_credits_never_expire(hot: &dyn HotStore, p: &str) {
    let k = key(p, "keep");
    credit(hot, &k, "t", 0, 5, 0, 1).await;
    let k2 = key(p, "keep_spent");
    credit(hot, &k2, "t", 0, 1, 0, 1).await;
    hot.sync_unalloc(&k2, Some(0), 1).await.expect("sync");
    spend(hot, &k2, 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    hot.expire_idle(0).await.expect("expire_idle");
    assert_eq!(bal(hot, &k).await, 5, "an entry holding a balance stays");
    let e = hot
        .peek(&k2)
        .await
        .expect("peek")
        .expect("entry with unreported spends stays");
    assert_eq!((e.bal, e.spent), (0, 1));
}
