//! Tests of the Redis hot store and the cache bus against real `redis-server` processes,
//! each test with its own server on a free loopback port: the hot-store conformance
//! suite, the escrow engine end to end (one and two nodes), epochs (flush, lost marker,
//! failover), an unreachable Redis, the cache bus, and the spend latency; then the same
//! store on a Redis Cluster (conformance, exactness over every shard, a killed master,
//! a promoted replica that missed writes, the cache bus losing a node).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate_domain::{Clock, Cost, Credits, KeyId, SystemClock};
use creditgate_limiter::hot_conformance;
use creditgate_limiter::ports::{
    Credit, CreditReply, Drained, HotError, HotStore, Ledger, SpendReply,
};
use creditgate_limiter::{CreditOp, Decision, Engine, EngineConfig, MemoryLedger};
use creditgate_local::{RedisCluster, RedisServer};
use creditgate_redis::{CacheBus, RedisHotStore, RedisOptions, Target};
use tokio::sync::mpsc;

/// A `redis-server` of this test (creditgate-local's launcher: free port, killed on drop).
fn redis() -> RedisServer {
    redis_with(Vec::new())
}

fn redis_with(args: Vec<String>) -> RedisServer {
    RedisServer::start_with(args).unwrap_or_else(|e| panic!("starting redis-server: {e:#}"))
}

/// A plain connection for commands the store does not offer.
async fn raw(server: &RedisServer) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("raw connection")
}

async fn store(server: &RedisServer) -> Arc<RedisHotStore> {
    Arc::new(
        RedisHotStore::connect(&server.url(), RedisOptions::default())
            .await
            .expect("connect"),
    )
}

fn engine(hot: Arc<dyn HotStore>, ledger: Arc<MemoryLedger>) -> Arc<Engine> {
    Arc::new(Engine::new(
        hot,
        ledger,
        Arc::new(SystemClock),
        EngineConfig::default(),
    ))
}

fn new_key(ledger: &MemoryLedger, name: &str, credits: u64) -> KeyId {
    ledger.create_key(name, Some(credits), SystemClock.now_ms());
    KeyId::from(name)
}

fn kid(name: &str) -> KeyId {
    KeyId::from(name)
}

fn c(cost: u64) -> Cost {
    Cost::new(cost).expect("a test cost within bounds")
}

/// Credits `key` under the store's current epoch, as the engine does after an
/// allocation.
async fn credit_at(
    hot: &RedisHotStore,
    key: &KeyId,
    transfer_id: &str,
    generation: u64,
    amount: u64,
    unalloc: u64,
    version: u64,
) -> Result<CreditReply, HotError> {
    let epoch = hot.epoch_of(key).await?;
    let credit = Credit {
        transfer_id,
        generation,
        amount,
        unalloc,
        version,
        epoch: &epoch,
    };
    hot.credit(key, &credit).await
}

/// Runs `n` concurrent spends of 1 spread round-robin over `engines`; returns the
/// `remaining` of every VALID decision and the number of USAGE_EXCEEDED ones.
async fn concurrent_spends(engines: &[Arc<Engine>], key: &KeyId, n: usize) -> (Vec<u64>, usize) {
    let mut tasks = Vec::new();
    for i in 0..n {
        let e = engines[i % engines.len()].clone();
        let key = key.to_owned();
        tasks.push(tokio::spawn(async move { e.spend(&key, c(1)).await }));
    }
    let mut valid = Vec::new();
    let mut exceeded = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(Decision::Valid { remaining }) => valid.push(remaining.expect("limited key")),
            Ok(Decision::Exceeded { remaining }) => {
                assert_eq!(remaining, 0, "exceeded only once the balance is gone");
                exceeded += 1;
            }
            other => panic!("unexpected decision {other:?}"),
        }
    }
    (valid, exceeded)
}

fn assert_exact(valid: &[u64], credits: u64) {
    assert_eq!(
        u64::try_from(valid.len()).expect("fits"),
        credits,
        "exactly as many VALID as credits"
    );
    let seen: BTreeSet<u64> = valid.iter().copied().collect();
    assert_eq!(
        seen,
        (0..credits).collect::<BTreeSet<u64>>(),
        "every remaining value answered exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms() {
    let server = redis();
    let hot = store(&server).await;
    hot_conformance::run_all(hot.clone()).await;
    // Twice on the same store: key names are unique per run.
    hot_conformance::run_all(hot).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spend_script_checks_its_cost() {
    let server = redis();
    let hot = store(&server).await;
    credit_at(&hot, &kid("k"), "t", 0, 10, 0, 1)
        .await
        .expect("credit");
    for bad in ["-1", "1.5", "abc", "", "inf", "nan", "9007199254740992"] {
        let r = hot.spend_raw_cost("k", bad).await;
        assert!(
            matches!(r, Err(HotError::Other(ref m)) if m.contains("cost")),
            "cost {bad:?}: {r:?}"
        );
    }
    assert_eq!(
        hot.spend_raw_cost("k", "3").await.expect("spend"),
        SpendReply::Valid {
            remaining: 7,
            bal: 7
        }
    );
    assert!(matches!(
        hot.spend(&kid("a{b"), c(1)).await,
        Err(HotError::Other(_))
    ));

    // Numbers are exact up to Credits::MAX = 2^53 - 1 (past the largest `Cost`, so the
    // script is driven with the raw argument).
    let max = creditgate_domain::Credits::MAX;
    credit_at(&hot, &kid("big"), "t", 0, max, 0, 1)
        .await
        .expect("credit");
    assert_eq!(
        hot.spend_raw_cost("big", &(max - 1).to_string())
            .await
            .expect("spend"),
        SpendReply::Valid {
            remaining: 1,
            bal: 1
        }
    );
    assert_eq!(
        hot.spend(&kid("big"), c(2)).await.expect("spend"),
        SpendReply::Exceeded { remaining: 1 }
    );
    assert!(matches!(
        credit_at(&hot, &kid("big"), "t2", 0, max + 1, 0, 2).await,
        Err(HotError::Other(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_evicting_memory_policy_is_reported() {
    let safe = redis();
    assert_eq!(store(&safe).await.risky_eviction_policy(), None);
    let volatile = redis_with(vec!["--maxmemory-policy".into(), "volatile-lru".into()]);
    assert_eq!(store(&volatile).await.risky_eviction_policy(), None);
    let risky = redis_with(vec!["--maxmemory-policy".into(), "allkeys-lru".into()]);
    assert_eq!(
        store(&risky).await.risky_eviction_policy(),
        Some("allkeys-lru")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_holding_credits_never_expire_and_empty_ones_do() {
    let server = redis();
    let options = RedisOptions {
        empty_entry_ttl: Duration::from_millis(300),
        ..RedisOptions::default()
    };
    let hot = RedisHotStore::connect(&server.url(), options)
        .await
        .expect("connect");
    let mut raw = raw(&server).await;
    let pttl = |k: &'static str| redis::cmd("PTTL").arg(k).to_owned();

    credit_at(&hot, &kid("full"), "t", 0, 5, 0, 1)
        .await
        .expect("credit");
    hot.fence(&kid("empty"), 1).await.expect("fence");
    let full: i64 = pttl("cg:{full}:e")
        .query_async(&mut raw)
        .await
        .expect("pttl");
    let empty: i64 = pttl("cg:{empty}:e")
        .query_async(&mut raw)
        .await
        .expect("pttl");
    assert_eq!(full, -1, "an entry holding credits has no TTL");
    assert!(
        (1..=300).contains(&empty),
        "an empty entry has a TTL: {empty}"
    );
    let mark: i64 = pttl("cg:{full}:m:t")
        .query_async(&mut raw)
        .await
        .expect("pttl");
    assert!(mark > 3_000_000, "marks live about an hour: {mark}");

    // Spent down to nothing, the entry still holds the unreported spends: no TTL, even
    // past the empty entry's TTL.
    for _ in 0..5 {
        hot.spend(&kid("full"), c(1)).await.expect("spend");
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let spent: i64 = pttl("cg:{full}:e")
        .query_async(&mut raw)
        .await
        .expect("pttl");
    assert_eq!(spent, -1, "an entry holding unreported spends has no TTL");

    // Draining empties the entry: it gets a TTL, and goes.
    hot.drain(&kid("full"), "d", 0).await.expect("drain");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(hot.peek(&kid("full")).await.expect("peek").is_none());
    assert!(hot.peek(&kid("empty")).await.expect("peek").is_none());
    assert_eq!(hot.expire_idle(0).await.expect("expire_idle"), 0);
}

/// Concurrent spends of one node go to Redis in batches, and each still gets the answer
/// it would get alone: per key, one VALID per credit with every balance answered once,
/// the rest EXCEEDED; a key with no entry misses; balances end exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_spends_answer_each_as_alone() {
    let server = redis();
    let hot = store(&server).await;
    let keys: Vec<KeyId> = (0..10).map(|i| kid(&format!("batch_{i}"))).collect();
    for (i, k) in keys.iter().enumerate() {
        let t = format!("t{i}");
        credit_at(&hot, k, &t, 0, 50, 0, 1).await.expect("credit");
    }
    let mut tasks = Vec::new();
    for i in 0..400 {
        let hot = hot.clone();
        let key = keys[i % keys.len()].clone();
        tasks.push(tokio::spawn(async move {
            (key.clone(), hot.spend(&key, c(2)).await)
        }));
    }
    let missing = {
        let hot = hot.clone();
        tokio::spawn(async move { hot.spend(&kid("batch_none"), c(1)).await })
    };
    let mut valid: std::collections::BTreeMap<KeyId, Vec<u64>> = Default::default();
    let mut exceeded = 0;
    for t in tasks {
        match t.await.expect("task") {
            (k, Ok(SpendReply::Valid { remaining, bal })) => {
                assert_eq!(remaining, bal, "no snapshot beyond the hot balance");
                valid.entry(k).or_default().push(remaining);
            }
            // The credit carried the whole balance (nothing unallocated): past it the
            // spend is refused with the exact balance.
            (_, Ok(SpendReply::Exceeded { remaining: 0 })) => exceeded += 1,
            other => panic!("unexpected reply {other:?}"),
        }
    }
    assert!(matches!(missing.await.expect("task"), Ok(SpendReply::Miss)));
    assert_eq!(exceeded, 400 - 250);
    for k in &keys {
        let seen: BTreeSet<u64> = valid[k].iter().copied().collect();
        assert_eq!(
            seen,
            (0..25).map(|i| i * 2).collect::<BTreeSet<u64>>(),
            "{k}"
        );
        let entry = hot.peek(k).await.expect("peek").expect("entry");
        assert_eq!((entry.bal, entry.spent), (0, 50));
    }
    let (calls, spends) = hot.spend_batches();
    assert_eq!(spends, 401);
    assert!(
        calls < spends,
        "concurrent spends share calls: {calls} calls for {spends}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_on_redis_is_exact_under_concurrency() {
    let server = redis();
    let ledger = Arc::new(MemoryLedger::new());
    let e = engine(store(&server).await, ledger.clone());
    tokio::spawn(e.clone().run_prefetcher(std::future::pending()));
    let key = new_key(&ledger, "key_exact", 100);

    let (valid, exceeded) = concurrent_spends(std::slice::from_ref(&e), &key, 200).await;
    assert_exact(&valid, 100);
    assert_eq!(exceeded, 100);

    e.drain_all().await.expect("drain_all");
    let state = ledger.state(&key).await.expect("state").expect("row");
    assert_eq!(state.remaining, Some(0));
    assert_eq!(e.balance(&key).await.expect("balance"), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn engine_on_redis_returns_the_exact_rest_to_the_ledger() {
    let server = redis();
    let ledger = Arc::new(MemoryLedger::new());
    let e = engine(store(&server).await, ledger.clone());
    let key = new_key(&ledger, "key_rest", 100);

    let (valid, _) = concurrent_spends(std::slice::from_ref(&e), &key, 37).await;
    assert_eq!(valid.len(), 37);
    assert_eq!(e.balance(&key).await.expect("balance"), Some(63));
    e.drain_all().await.expect("drain_all");
    let state = ledger.state(&key).await.expect("state").expect("row");
    assert_eq!(
        state.remaining,
        Some(63),
        "the ledger holds the exact balance"
    );
    assert_eq!(
        state.hot_allocated, 0,
        "nothing left allocated to the hot store"
    );
    let entry = e.hot().peek(&key).await.expect("peek").expect("entry");
    assert_eq!((entry.bal, entry.spent), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_sharing_redis_are_exact() {
    let server = redis();
    let ledger = Arc::new(MemoryLedger::new());
    let a = engine(store(&server).await, ledger.clone());
    let b = engine(store(&server).await, ledger.clone());
    for e in [&a, &b] {
        tokio::spawn(e.clone().run_prefetcher(std::future::pending()));
    }
    let key = new_key(&ledger, "key_two_nodes", 100);

    let (valid, exceeded) = concurrent_spends(&[a.clone(), b.clone()], &key, 300).await;
    assert_exact(&valid, 100);
    assert_eq!(exceeded, 200);
    a.drain_all().await.expect("drain_all");
    b.drain_all().await.expect("drain_all");
    let state = ledger.state(&key).await.expect("state").expect("row");
    assert_eq!(state.remaining, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flushed_store_is_a_new_epoch_and_its_credits_are_written_off() {
    let server = redis();
    let ledger = Arc::new(MemoryLedger::new());
    let hot = store(&server).await;
    let e = engine(hot.clone(), ledger.clone());
    let key = new_key(&ledger, "key_flush", 100);

    for _ in 0..5 {
        assert!(matches!(
            e.spend(&key, c(1)).await.expect("spend"),
            Decision::Valid { .. }
        ));
    }
    assert_eq!(e.reconcile_once().await.expect("reconcile").lost_credits, 0);
    let before = hot.peek(&key).await.expect("peek").expect("entry");
    assert!(before.bal > 0, "the hot store holds credits: {before:?}");
    let allocated = ledger
        .state(&key)
        .await
        .expect("state")
        .expect("row")
        .hot_allocated;
    assert_eq!(allocated, before.bal + before.spent);
    let old_epoch = hot.epoch().await.expect("epoch");

    let mut raw = raw(&server).await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut raw)
        .await
        .expect("flushall");

    let new_epoch = hot.epoch().await.expect("epoch");
    assert_ne!(new_epoch, old_epoch, "a flush starts a new epoch");
    assert_eq!(
        hot.spend(&key, c(1)).await.expect("spend"),
        SpendReply::Miss
    );

    let report = e.reconcile_once().await.expect("reconcile");
    assert_eq!(
        report.lost_credits, allocated,
        "the ledger reports what the lost store held"
    );
    // Spend until exhausted: the lost balance is never spent again.
    let mut valid = 5;
    loop {
        match e.spend(&key, c(1)).await.expect("spend") {
            Decision::Valid { .. } | Decision::ValidOnLedger { .. } => valid += 1,
            Decision::Exceeded { remaining } => {
                assert_eq!(remaining, 0);
                break;
            }
            Decision::NotFound => panic!("key vanished"),
        }
        assert!(valid <= 100, "over-spend");
    }
    assert_eq!(
        valid,
        100 - before.bal,
        "everything but the lost hot balance is spent"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_an_old_epoch_are_never_spent_even_when_the_data_survives() {
    let server = redis();
    let hot = store(&server).await;
    assert_eq!(
        credit_at(&hot, &kid("k"), "t1", 0, 50, 10, 1)
            .await
            .expect("credit"),
        CreditReply::Credited { spent: 0 }
    );
    let old_epoch = hot.epoch().await.expect("epoch");

    // The marker disappears (e.g. evicted) while the entry survives.
    let mut raw = raw(&server).await;
    let _: i64 = redis::cmd("DEL")
        .arg("cg:epoch")
        .query_async(&mut raw)
        .await
        .expect("del");
    let new_epoch = hot.epoch().await.expect("epoch");
    assert_ne!(new_epoch, old_epoch);
    assert_eq!(*hot.cached_epoch("k"), *new_epoch);

    assert_eq!(
        hot.spend(&kid("k"), c(1)).await.expect("spend"),
        SpendReply::Miss
    );
    assert!(hot.peek(&kid("k")).await.expect("peek").is_none());
    assert_eq!(
        hot.drain(&kid("k"), "d", 0).await.expect("drain"),
        Default::default()
    );
    assert_eq!(
        credit_at(&hot, &kid("k"), "t2", 0, 7, 3, 1)
            .await
            .expect("credit"),
        CreditReply::Credited { spent: 0 }
    );
    let e = hot.peek(&kid("k")).await.expect("peek").expect("entry");
    assert_eq!(
        (e.bal, e.unalloc),
        (7, Some(3)),
        "the stale balance is not carried over"
    );
}

/// The data is lost between the ledger's allocation (recorded under the epoch read
/// before it) and the credit: the credit is refused rather than landing in the new
/// epoch, where its credits would be live while the ledger writes them off with the old
/// one (a randomized fault run saw a key refused at 0 and later valid at 38 this way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_allocated_before_a_flush_is_refused_not_moved_to_the_new_epoch() {
    let server = redis();
    let hot = store(&server).await;
    let k = kid("k");
    let allocated_under = hot.epoch_of(&k).await.expect("epoch");
    let mut raw = raw(&server).await;
    let () = redis::cmd("FLUSHALL")
        .query_async(&mut raw)
        .await
        .expect("flushall");
    let credit = Credit {
        transfer_id: "t",
        generation: 0,
        amount: 50,
        unalloc: 0,
        version: 1,
        epoch: &allocated_under,
    };
    assert_eq!(
        hot.credit(&k, &credit).await.expect("credit"),
        CreditReply::Refused
    );
    assert!(
        hot.peek(&k).await.expect("peek").is_none(),
        "nothing was credited under the new epoch"
    );
    let now = hot.epoch_of(&k).await.expect("epoch");
    assert_ne!(now, allocated_under);
    assert_eq!(
        *hot.cached_epoch("k"),
        *now,
        "the node has re-read the epoch"
    );
    assert_eq!(
        credit_at(&hot, &k, "t2", 0, 5, 0, 2).await.expect("credit"),
        CreditReply::Credited { spent: 0 }
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_stale_epoch_never_replaces_an_entry_of_the_new_one() {
    let server = redis();
    let a = store(&server).await;
    let b = store(&server).await;
    credit_at(&a, &kid("k"), "t1", 0, 50, 0, 1)
        .await
        .expect("credit");
    let old_epoch = a.cached_epoch("k");

    let mut raw = raw(&server).await;
    let _: i64 = redis::cmd("DEL")
        .arg("cg:epoch")
        .query_async(&mut raw)
        .await
        .expect("del");
    // Node b notices first and credits under the new epoch (the old balance is gone).
    let new_epoch = b.epoch().await.expect("epoch");
    assert_ne!(*old_epoch, *new_epoch);
    assert_eq!(
        credit_at(&b, &kid("k"), "t2", 0, 7, 0, 1)
            .await
            .expect("credit"),
        CreditReply::Credited { spent: 0 }
    );
    assert_eq!(
        *a.cached_epoch("k"),
        *old_epoch,
        "node a has not refreshed yet"
    );
    // Node a fences with its stale epoch: the script refuses the stale epoch, node a
    // re-reads it and fences the live entry, instead of replacing it with an empty one
    // of the old epoch.
    assert_eq!(
        a.fence(&kid("k"), 1).await.expect("fence"),
        Drained {
            amount: 7,
            spent: 0,
            generation: 0
        }
    );
    assert_eq!(*a.cached_epoch("k"), *new_epoch);
    let e = b.peek(&kid("k")).await.expect("peek").expect("entry");
    assert_eq!((e.bal, e.generation), (0, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_a_stale_epoch_never_spends_an_entry_of_the_old_one() {
    let server = redis();
    let a = store(&server).await;
    let b = store(&server).await;
    credit_at(&a, &kid("k"), "t1", 0, 50, 0, 1)
        .await
        .expect("credit");
    let old_epoch = a.cached_epoch("k");
    // The marker is replaced while the entry survives (as after a flush that kept a
    // copy, or a promoted replica): node a still believes the old epoch.
    let mut raw = raw(&server).await;
    let () = redis::cmd("SET")
        .arg("cg:epoch")
        .arg("replaced")
        .query_async(&mut raw)
        .await
        .expect("set");
    assert_eq!(*a.cached_epoch("k"), *old_epoch);
    assert_eq!(
        a.spend(&kid("k"), c(1)).await.expect("spend"),
        SpendReply::Miss,
        "the script refuses the stale epoch; re-read, the old entry is absent"
    );
    assert_ne!(*a.cached_epoch("k"), *old_epoch);
    assert!(b.peek(&kid("k")).await.expect("peek").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_starts_a_new_epoch() {
    let primary = redis();
    let replica = redis_with(vec![
        "--replicaof".into(),
        "127.0.0.1".into(),
        primary.port().to_string(),
    ]);
    let p = store(&primary).await;
    credit_at(&p, &kid("k"), "t", 0, 50, 10, 1)
        .await
        .expect("credit");
    let mut raw_p = raw(&primary).await;
    let mut synced = 0;
    for _ in 0..100 {
        synced = redis::cmd("WAIT")
            .arg(1)
            .arg(100)
            .query_async(&mut raw_p)
            .await
            .expect("wait");
        if synced == 1 {
            break;
        }
    }
    assert_eq!(synced, 1, "the replica caught up");

    let r = store(&replica).await;
    assert_eq!(
        r.epoch().await.expect("epoch"),
        p.epoch().await.expect("epoch"),
        "a replica serves the primary's epoch"
    );
    assert_eq!(
        r.peek(&kid("k")).await.expect("peek").expect("entry").bal,
        50
    );
    assert!(
        matches!(
            r.spend(&kid("k"), c(1)).await,
            Err(HotError::Unreachable(_))
        ),
        "a read-only replica refuses before running"
    );

    let mut raw_r = raw(&replica).await;
    let () = redis::cmd("REPLICAOF")
        .arg("NO")
        .arg("ONE")
        .query_async(&mut raw_r)
        .await
        .expect("promote");
    let promoted = r.epoch().await.expect("epoch");
    assert_ne!(promoted, p.epoch().await.expect("epoch"));
    assert_eq!(
        r.spend(&kid("k"), c(1)).await.expect("spend"),
        SpendReply::Miss,
        "balances of the old epoch are never spent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_redis_is_unreachable_quickly_and_the_store_recovers() {
    let server = redis();
    let hot = store(&server).await;
    let ledger = Arc::new(MemoryLedger::new());
    let e = engine(hot.clone(), ledger.clone());
    let key = new_key(&ledger, "key_dead", 100);
    assert!(matches!(
        e.spend(&key, c(1)).await.expect("spend"),
        Decision::Valid { .. }
    ));
    let epoch = hot.epoch().await.expect("epoch");

    server.kill9().expect("kill redis");
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let started = Instant::now();
        let r = hot.spend(&key, c(1)).await;
        assert!(matches!(r, Err(HotError::Unreachable(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
    }
    let started = Instant::now();
    assert!(matches!(hot.epoch().await, Err(HotError::Unreachable(_))));
    assert!(matches!(
        hot.lock(&key, Duration::from_secs(1), Duration::ZERO).await,
        Err(HotError::Unreachable(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(1));
    // The engine spends on the ledger meanwhile, never touching the hot balance.
    let before = ledger
        .state(&key)
        .await
        .expect("state")
        .expect("row")
        .remaining
        .expect("limited");
    assert_eq!(
        e.spend(&key, c(1)).await.expect("direct spend"),
        Decision::ValidOnLedger {
            at_least: before - 1
        }
    );

    server.start_again().expect("start redis again");
    let r = hot.spend(&key, c(1)).await;
    assert_eq!(
        r.expect("the first call after the restart works"),
        SpendReply::Miss,
        "the restarted (empty) server has no entry"
    );
    assert_ne!(
        hot.epoch().await.expect("epoch"),
        epoch,
        "a restart is a new epoch"
    );
    assert!(matches!(
        e.spend(&key, c(1)).await.expect("spend"),
        Decision::Valid { .. }
    ));
}

/// The spend lanes keep connections of their own: a Redis restarted between two calls
/// closed them, and the next calls notice it before sending (a new connection, the
/// script loaded again, the new epoch read) instead of answering that they do not know
/// the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_between_spends_answers_every_later_spend() {
    let server = redis();
    let hot = store(&server).await;
    credit_at(&hot, &kid("k"), "t", 0, 10, 0, 1)
        .await
        .expect("credit");
    // More spends than lanes, one at a time (waiting lanes are woken in turn).
    for left in (6..10).rev() {
        assert_eq!(
            hot.spend(&kid("k"), c(1)).await.expect("spend"),
            SpendReply::Valid {
                remaining: left,
                bal: left
            }
        );
    }
    server.kill9().expect("kill redis");
    server.start_again().expect("start redis again");
    tokio::time::sleep(Duration::from_millis(100)).await;
    for i in 0..4 {
        assert_eq!(
            hot.spend(&kid("k"), c(1))
                .await
                .expect("a spend after the restart"),
            SpendReply::Miss,
            "spend {i}: the restarted (empty) server has no entry"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_is_ambiguous_after_the_response_timeout_and_the_late_spend_does_nothing() {
    let server = redis();
    let hot = store(&server).await;
    credit_at(&hot, &kid("k"), "t", 0, 10, 0, 1)
        .await
        .expect("credit");
    server.pause().expect("SIGSTOP redis");
    let started = Instant::now();
    let r = hot.spend(&kid("k"), c(1)).await;
    let waited = started.elapsed();
    server.resume().expect("SIGCONT redis");
    assert!(matches!(r, Err(HotError::Ambiguous(_))), "{r:?}");
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(1),
        "the response timeout (500 ms) bounds the call: {waited:?}"
    );
    // The request was sent and held by the stopped server; once it resumed, the
    // script ran past its deadline and did nothing: the caller that stopped waiting
    // cannot be charged later.
    let e = hot.peek(&kid("k")).await.expect("peek").expect("entry");
    assert_eq!(e.bal, 10, "the late spend did nothing");
    assert_eq!(
        hot.spend(&kid("k"), c(1)).await.expect("spend"),
        SpendReply::Valid {
            remaining: 9,
            bal: 9
        }
    );
}

async fn recv_within(rx: &mut mpsc::Receiver<String>, within: Duration) -> String {
    tokio::time::timeout(within, rx.recv())
        .await
        .expect("a message in time")
        .expect("subscription alive")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_bus_round_trip_and_star_after_restart() {
    let server = redis();
    let publisher = CacheBus::connect(&server.url()).await.expect("bus");
    let subscriber = CacheBus::connect(&server.url()).await.expect("bus");
    let mut rx = subscriber.subscribe();
    assert_eq!(recv_within(&mut rx, Duration::from_secs(5)).await, "*");

    publisher.publish("key_1").await.expect("publish");
    assert_eq!(recv_within(&mut rx, Duration::from_secs(5)).await, "key_1");
    // A second subscriber gets its own "*" and the messages too.
    let mut rx2 = publisher.subscribe();
    assert_eq!(recv_within(&mut rx2, Duration::from_secs(5)).await, "*");
    publisher.publish("key_2").await.expect("publish");
    assert_eq!(recv_within(&mut rx, Duration::from_secs(5)).await, "key_2");
    assert_eq!(recv_within(&mut rx2, Duration::from_secs(5)).await, "key_2");

    server.restart().expect("restart redis");
    assert_eq!(
        recv_within(&mut rx, Duration::from_secs(10)).await,
        "*",
        "after a reconnect the subscriber drops its whole cache"
    );
    assert_eq!(recv_within(&mut rx2, Duration::from_secs(10)).await, "*");
    // The publisher reconnects by itself (its first call may report the old failure).
    let deadline = Instant::now() + Duration::from_secs(5);
    while publisher.publish("key_3").await.is_err() {
        assert!(Instant::now() < deadline, "publisher did not reconnect");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(recv_within(&mut rx, Duration::from_secs(5)).await, "key_3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spend_latency() {
    let server = redis();
    let hot = store(&server).await;
    credit_at(&hot, &kid("k"), "t", 0, 1_000_000, 0, 1)
        .await
        .expect("credit");
    let mut us = Vec::with_capacity(2000);
    for _ in 0..2000 {
        let started = Instant::now();
        let r = hot.spend(&kid("k"), c(1)).await.expect("spend");
        us.push(started.elapsed().as_micros());
        assert!(matches!(r, SpendReply::Valid { .. }), "{r:?}");
    }
    us.sort_unstable();
    println!(
        "RedisHotStore::spend over 2000 sequential calls: median {} us, p99 {} us, max {} us",
        us[us.len() / 2],
        us[us.len() * 99 / 100],
        us[us.len() - 1]
    );
    assert_eq!(
        hot.peek(&kid("k")).await.expect("peek").expect("entry").bal,
        1_000_000 - 2000
    );
}

// ---------------------------------------------------------------------------------
// Rate limits
// ---------------------------------------------------------------------------------

fn limit_check(counter: &str, limit: u64, cost: u64) -> creditgate_limiter::LimitCheck {
    creditgate_limiter::LimitCheck {
        counter: counter.to_owned(),
        limit,
        // 30 days: no window ends during the test (they end at multiples of it).
        duration_ms: 2_592_000_000,
        cost,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_pass_exactly_the_limit_across_nodes_all_or_nothing() {
    use creditgate_limiter::RateLimiter;
    use creditgate_redis::RedisRateLimiter;

    let server = redis();
    let mut nodes = Vec::new();
    for _ in 0..2 {
        nodes.push(Arc::new(
            RedisRateLimiter::connect(&server.url(), RedisOptions::default())
                .await
                .expect("connect"),
        ));
    }
    // 200 concurrent checks of a limit of 10 from two nodes: exactly 10 pass.
    let mut tasks = Vec::new();
    for i in 0..200usize {
        let node = nodes[i % 2].clone();
        tasks.push(tokio::spawn(async move {
            node.limit(&[limit_check("ws\u{1f}ns\u{1f}user:1", 10, 1)])
                .await
                .expect("limit")
        }));
    }
    let mut passed = 0;
    let mut remaining = BTreeSet::new();
    for t in tasks {
        let (ok, states) = t.await.expect("task");
        let now = u64::try_from(SystemClock.now_ms()).expect("after 1970");
        assert!(states[0].reset_ms > now, "{states:?}");
        assert_eq!(states[0].reset_ms % 2_592_000_000, 0, "{states:?}");
        if ok {
            passed += 1;
            assert!(remaining.insert(states[0].remaining), "{states:?}");
        } else {
            assert_eq!(states[0].remaining, 0, "{states:?}");
        }
    }
    assert_eq!(passed, 10);
    assert_eq!(remaining, (0..10).collect(), "each pass saw its own count");

    // All or nothing: with "b" exhausted, "c" does not count.
    let rl = &nodes[0];
    assert!(rl.limit(&[limit_check("b", 1, 1)]).await.expect("b").0);
    let (ok, states) = rl
        .limit(&[limit_check("c", 5, 1), limit_check("b", 1, 1)])
        .await
        .expect("c and b");
    assert!(!ok);
    assert!(states[0].passed && !states[1].passed);
    assert_eq!(states[0].remaining, 5);
    // A counter named twice counts both checks, as the in-process limiter does.
    let (ok, states) = rl
        .limit(&[limit_check("c", 5, 3), limit_check("c", 5, 3)])
        .await
        .expect("c twice");
    assert!(!ok);
    assert_eq!(states[0].remaining, 5);
    let (ok, states) = nodes[1]
        .limit(&[limit_check("c", 5, 2), limit_check("c", 5, 3)])
        .await
        .expect("c twice");
    assert!(ok);
    assert_eq!((states[0].remaining, states[1].remaining), (3, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_windows_that_began_before_a_redis_data_loss_count_as_full() {
    use creditgate_limiter::{LimitCheck, RateLimiter};
    use creditgate_redis::RedisRateLimiter;

    let server = redis();
    let connect = || async {
        RedisRateLimiter::connect(&server.url(), RedisOptions::default())
            .await
            .expect("connect")
    };
    let a = connect().await;
    for _ in 0..3 {
        assert!(a.limit(&[limit_check("w", 5, 1)]).await.expect("w").0);
    }
    // Redis loses its data: the 3 counted are gone.
    let _: () = redis::cmd("FLUSHALL")
        .query_async(&mut raw(&server).await)
        .await
        .expect("flushall");
    // The window began before the loss and its count is unknown: nothing passes in it,
    // on this node or on one started after the loss, for any counter.
    let (ok, states) = a.limit(&[limit_check("w", 5, 1)]).await.expect("w");
    assert!(!ok);
    assert_eq!(states[0].remaining, 0);
    let b = connect().await;
    assert!(!b.limit(&[limit_check("w", 5, 1)]).await.expect("w").0);
    assert!(
        !b.limit(&[limit_check("other", 5, 1)])
            .await
            .expect("other")
            .0
    );
    // A window that begins after the loss counts as usual.
    let short = LimitCheck {
        counter: "short".to_owned(),
        limit: 2,
        duration_ms: 1_000,
        cost: 1,
    };
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    assert!(
        b.limit(std::slice::from_ref(&short))
            .await
            .expect("short")
            .0
    );
    assert!(
        a.limit(std::slice::from_ref(&short))
            .await
            .expect("short")
            .0
    );
    assert!(
        !a.limit(std::slice::from_ref(&short))
            .await
            .expect("short")
            .0
    );
}

// ---- Redis Cluster ----

fn cluster(masters: usize, replicas: usize) -> RedisCluster {
    RedisCluster::start(masters, replicas)
        .unwrap_or_else(|e| panic!("starting a Redis Cluster: {e:#}"))
}

async fn cluster_store(c: &RedisCluster) -> Arc<RedisHotStore> {
    let hot = RedisHotStore::connect_to(&Target::Cluster(c.seeds()), RedisOptions::default())
        .await
        .expect("connect to the cluster");
    assert!(hot.is_cluster());
    Arc::new(hot)
}

/// The Redis key of a creditgate key's entry (what the cluster places).
fn entry(key: &KeyId) -> String {
    format!("cg:{{{key}}}:e")
}

/// Spends 1 from `key` until the engine says the balance is gone; returns the VALIDs.
/// While a failover settles a spend may be refused (503): it is tried again, within a
/// bound.
async fn spend_until_exhausted(e: &Engine, key: &KeyId, credits: u64) -> u64 {
    let mut valid = 0;
    let started = Instant::now();
    loop {
        match e.spend(key, c(1)).await {
            Ok(Decision::Valid { .. } | Decision::ValidOnLedger { .. }) => valid += 1,
            Ok(Decision::Exceeded { remaining }) => {
                assert_eq!(
                    remaining, 0,
                    "{key}: exceeded only when the balance is gone"
                );
                return valid;
            }
            Ok(Decision::NotFound) => panic!("{key} vanished"),
            Err(err) => {
                assert!(
                    started.elapsed() < Duration::from_secs(30),
                    "{key}: still failing after 30 s: {err}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert!(valid <= credits, "{key}: over-spend");
    }
}

/// `n` keys of `credits` (`<prefix><i>`), 5 spent from each through `e`; returns them
/// and what the hot store holds of each.
async fn spent_five_each(
    ledger: &MemoryLedger,
    e: &Engine,
    hot: &RedisHotStore,
    prefix: &str,
    n: usize,
    credits: u64,
) -> (Vec<KeyId>, Vec<u64>) {
    let keys: Vec<KeyId> = (0..n)
        .map(|i| new_key(ledger, &format!("{prefix}{i}"), credits))
        .collect();
    let mut held = Vec::new();
    for k in &keys {
        for _ in 0..5 {
            assert!(matches!(e.spend(k, c(1)).await, Ok(Decision::Valid { .. })));
        }
        held.push(hot.peek(k).await.expect("peek").map_or(0, |h| h.bal));
    }
    (keys, held)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_store_conforms() {
    let rc = cluster(3, 0);
    hot_conformance::run_all(cluster_store(&rc).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_on_a_cluster_are_exact_over_many_keys_on_every_shard() {
    let rc = cluster(3, 0);
    let ledger = Arc::new(MemoryLedger::new());
    let nodes = [
        engine(cluster_store(&rc).await, ledger.clone()),
        engine(cluster_store(&rc).await, ledger.clone()),
    ];
    let credits = 20;
    let keys: Vec<KeyId> = (0..60)
        .map(|i| new_key(&ledger, &format!("ck{i}"), credits))
        .collect();
    let shards: BTreeSet<usize> = keys
        .iter()
        .map(|k| rc.master_of(&entry(k)).expect("master"))
        .collect();
    assert_eq!(shards.len(), 3, "the keys sit on every shard");
    let mut tasks = Vec::new();
    for k in &keys {
        let nodes = nodes.clone();
        let k = k.clone();
        tasks.push(tokio::spawn(async move {
            concurrent_spends(&nodes, &k, 30).await
        }));
    }
    for (k, t) in keys.iter().zip(tasks) {
        let (valid, exceeded) = t.await.expect("task");
        assert_exact(&valid, credits);
        assert_eq!(exceeded, 10, "{k}");
    }
    for n in &nodes {
        n.drain_all().await.expect("drain_all");
    }
    for k in &keys {
        let state = ledger.state(k).await.expect("state").expect("row");
        assert_eq!(
            (state.remaining, state.hot_allocated),
            (Some(0), 0),
            "{k}: the ledger converges"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_key_spends_with_its_pool_in_one_slot_and_moves_between_homes_exactly() {
    use creditgate_limiter::SharedOutcome;
    let rc = cluster(3, 0);
    let ledger = Arc::new(MemoryLedger::new());
    let nodes = [
        engine(cluster_store(&rc).await, ledger.clone()),
        engine(cluster_store(&rc).await, ledger.clone()),
    ];
    let key = new_key(&ledger, "pk_1", 300);
    let pool = new_key(&ledger, "pool_a", 200);
    let pool2 = new_key(&ledger, "pool_b", 1_000_000);
    let slots: BTreeSet<u16> = [&key, &pool, &pool2]
        .iter()
        .map(|k| rc.slot_of(&entry(k)).expect("slot"))
        .collect();
    assert_eq!(
        slots.len(),
        3,
        "the key and the pools sit in different slots"
    );

    // 250 joint spends from two nodes: the pool's 200 pass, exactly, in one slot.
    let mut tasks = Vec::new();
    for i in 0..250usize {
        let (e, key, pool) = (nodes[i % 2].clone(), key.clone(), pool.clone());
        tasks.push(tokio::spawn(async move {
            e.spend_shared(&key, &pool, c(1)).await
        }));
    }
    let (mut pool_left, mut key_left) = (BTreeSet::new(), BTreeSet::new());
    for t in tasks {
        let d = t.await.expect("task").expect("spend_shared");
        match d.outcome {
            SharedOutcome::Valid => {
                assert!(pool_left.insert(d.pool.expect("pool balance")), "{d:?}");
                assert!(key_left.insert(d.key.expect("key balance")), "{d:?}");
            }
            SharedOutcome::PoolExceeded => assert_eq!(d.pool, Some(0), "{d:?}"),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(pool_left, (0..200).collect::<BTreeSet<u64>>());
    assert_eq!(key_left, (100..300).collect::<BTreeSet<u64>>());
    let key_home = ledger.hot_epoch(&key).await.expect("hot epoch");
    assert!(
        key_home
            .as_deref()
            .is_some_and(|e| e.starts_with("pool_a#")),
        "the key's credits sit at its pool's home: {key_home:?}"
    );

    // The key leaves the pool for another while nodes still spend it the old ways (a
    // node that has not heard yet): alone, with the old pool, with the new one. Its
    // credits move between three homes; the key's 100 left pass exactly once each.
    let mut tasks = Vec::new();
    for i in 0..300usize {
        let e = nodes[i % 2].clone();
        let (key, pool, pool2) = (key.clone(), pool.clone(), pool2.clone());
        tasks.push(tokio::spawn(async move {
            match i % 3 {
                0 => match e.spend(&key, c(1)).await.expect("spend") {
                    Decision::Valid { remaining } => (Some(remaining.expect("limited")), false),
                    Decision::Exceeded { remaining } => {
                        assert_eq!(remaining, 0);
                        (None, false)
                    }
                    other => panic!("unexpected {other:?}"),
                },
                n => {
                    let p = if n == 1 { &pool } else { &pool2 };
                    let d = e.spend_shared(&key, p, c(1)).await.expect("spend_shared");
                    match d.outcome {
                        SharedOutcome::Valid => (d.key, n == 2),
                        SharedOutcome::KeyExceeded => {
                            assert_eq!(d.key, Some(0), "{d:?}");
                            (None, false)
                        }
                        // The old pool is spent: its own refusal, nothing moved.
                        SharedOutcome::PoolExceeded => (None, false),
                        other => panic!("unexpected {other:?}"),
                    }
                }
            }
        }));
    }
    let mut left = BTreeSet::new();
    let mut from_pool2 = 0u64;
    for t in tasks {
        let (remaining, on_pool2) = t.await.expect("task");
        if let Some(r) = remaining {
            assert!(left.insert(r), "remaining {r} answered twice");
            from_pool2 += u64::from(on_pool2);
        }
    }
    assert_eq!(
        left,
        (0..100).collect::<BTreeSet<u64>>(),
        "the key's last 100"
    );
    assert_eq!(
        ledger.written_off(),
        0,
        "credits held at another home are moved back, never written off as lost"
    );

    // A `set` while the key's credits sit at the new pool's home fences them there:
    // afterwards exactly the new balance passes.
    nodes[0]
        .update(&key, CreditOp::Increment(Credits::new(50).expect("small")))
        .await
        .expect("increment");
    for _ in 0..10 {
        let d = nodes[1]
            .spend_shared(&key, &pool2, c(1))
            .await
            .expect("spend");
        assert_eq!(d.outcome, SharedOutcome::Valid, "{d:?}");
    }
    let key_home = ledger.hot_epoch(&key).await.expect("hot epoch");
    assert!(
        key_home
            .as_deref()
            .is_some_and(|e| e.starts_with("pool_b#")),
        "{key_home:?}"
    );
    nodes[0]
        .update(&key, CreditOp::Set(Some(Credits::new(5).expect("small"))))
        .await
        .expect("set");
    let mut passed = 0;
    for i in 0..30usize {
        let d = nodes[i % 2]
            .spend_shared(&key, &pool2, c(1))
            .await
            .expect("spend");
        passed += u64::from(d.outcome == SharedOutcome::Valid);
    }
    assert_eq!(passed, 5, "the set fenced the credits at the pool's home");
    let from_pool2 = from_pool2 + 10 + 5;

    for n in &nodes {
        n.drain_all().await.expect("drain_all");
    }
    for (account, want) in [(&key, 0), (&pool, 0), (&pool2, 1_000_000 - from_pool2)] {
        let state = ledger.state(account).await.expect("state").expect("row");
        assert_eq!(
            (state.remaining, state.hot_allocated),
            (Some(want), 0),
            "{account}: the ledger converges"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_writes_off_only_what_its_shard_held() {
    let rc = cluster(3, 1);
    let ledger = Arc::new(MemoryLedger::new());
    let hot = cluster_store(&rc).await;
    let e = engine(hot.clone(), ledger.clone());
    let credits = 200;
    let (keys, held) = spent_five_each(&ledger, &e, &hot, "fk", 30, credits).await;
    let victim = rc.master_of(&entry(&keys[0])).expect("master");
    let on_victim: Vec<bool> = keys
        .iter()
        .map(|k| rc.master_of(&entry(k)).expect("master") == victim)
        .collect();
    rc.nodes()[victim].kill9().expect("kill -9");
    rc.wait_ok(Duration::from_secs(30))
        .expect("a replica took over");

    for (i, k) in keys.iter().enumerate() {
        let valid = 5 + spend_until_exhausted(&e, k, credits).await;
        let lost = credits - valid;
        if on_victim[i] {
            assert!(
                lost <= held[i],
                "{k}: lost {lost}, more than the {} its shard held",
                held[i]
            );
        } else {
            assert_eq!(lost, 0, "{k}: a key of another shard lost credits");
        }
    }
    assert!(
        on_victim.iter().any(|v| *v) && on_victim.iter().any(|v| !*v),
        "keys on the lost shard and on others"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_promoted_replica_that_missed_writes_resurrects_no_spent_credit() {
    let rc = cluster(3, 1);
    let ledger = Arc::new(MemoryLedger::new());
    let hot = cluster_store(&rc).await;
    // Chunks of 400: the hot entry holds plenty for the replica to hold stale.
    let e = Arc::new(Engine::new(
        hot.clone(),
        ledger.clone(),
        Arc::new(SystemClock),
        EngineConfig {
            min_chunk_requests: 400,
            ..EngineConfig::default()
        },
    ));
    let credits = 1_000;
    let k = new_key(&ledger, "rk", credits);
    let mut valid = 0;
    for _ in 0..10 {
        assert!(matches!(
            e.spend(&k, c(1)).await,
            Ok(Decision::Valid { .. } | Decision::ValidOnLedger { .. })
        ));
        valid += 1;
    }
    let master = rc.master_of(&entry(&k)).expect("master");
    let master_port = rc.nodes()[master].port();
    let replica = (0..rc.nodes().len())
        .find(|&i| {
            rc.cli(i, &["INFO", "replication"])
                .is_ok_and(|info| info.contains(&format!("master_port:{master_port}")))
        })
        .expect("the master's replica");
    // The replica stops receiving writes; the master takes spends it will never see.
    rc.nodes()[replica].pause().expect("SIGSTOP the replica");
    // Cut its link too (what the kernel buffered for a stopped process still arrives).
    rc.cli(master, &["CLIENT", "KILL", "TYPE", "replica"])
        .expect("CLIENT KILL");
    let seen_by_replica = hot.peek(&k).await.expect("peek").expect("entry").bal;
    for _ in 0..20 {
        assert!(matches!(
            e.spend(&k, c(1)).await,
            Ok(Decision::Valid { .. } | Decision::ValidOnLedger { .. })
        ));
        valid += 1;
    }
    let last = hot.peek(&k).await.expect("peek").expect("entry");
    rc.nodes()[master].kill9().expect("kill -9 the master");
    rc.nodes()[replica].resume().expect("SIGCONT the replica");
    let reply = rc
        .cli(replica, &["CLUSTER", "FAILOVER", "TAKEOVER"])
        .expect("takeover");
    assert_eq!(reply.trim(), "OK");
    rc.wait_ok(Duration::from_secs(30))
        .expect("the replica serves the slots");
    // The promoted replica holds the entry as it was before the last 20 spends.
    let stale: u64 = rc
        .cli(replica, &["HGET", &entry(&k), "bal"])
        .expect("HGET")
        .trim()
        .parse()
        .expect("a stale balance");
    assert!(
        stale > 0 && stale != last.bal,
        "stale {stale}, last {last:?}"
    );

    valid += spend_until_exhausted(&e, &k, credits).await;
    assert!(valid <= credits, "over-spend: {valid} of {credits}");
    assert!(
        credits - valid <= seen_by_replica.max(stale),
        "lost at most what the replica's stale entry held"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_bus_reaches_every_node_within_100ms_after_the_master_it_was_on_is_lost() {
    let mut rc = cluster(3, 1);
    let target = Target::Cluster(rc.seeds());
    let publisher = CacheBus::connect_to(&target).await.expect("bus");
    let mut subscribers = Vec::new();
    for _ in 0..3 {
        let bus = CacheBus::connect_to(&target).await.expect("bus");
        let mut rx = bus.subscribe();
        assert_eq!(recv_within(&mut rx, Duration::from_secs(5)).await, "*");
        subscribers.push(rx);
    }
    publisher.publish("before").await.expect("publish");
    for rx in &mut subscribers {
        assert_eq!(recv_within(rx, Duration::from_secs(1)).await, "before");
    }
    // The node the subscribers are on (the first one they try) is lost.
    let on = (0..rc.nodes().len())
        .find(|&i| {
            rc.cli(i, &["PUBSUB", "NUMSUB", creditgate_redis::CHANNEL])
                .is_ok_and(|r| r.lines().nth(1).is_some_and(|n| n.trim() == "3"))
        })
        .expect("the subscribers' node");
    // The node lost is a master: a replica is promoted first (subscriptions stay).
    if rc.role(on).as_deref() != Some("master") {
        let rc2 = rc;
        rc = tokio::task::spawn_blocking(move || {
            rc2.failover(on).expect("promote the subscribers' node");
            rc2
        })
        .await
        .expect("failover");
    }
    assert_eq!(rc.role(on).as_deref(), Some("master"));
    rc.nodes()[on].kill9().expect("kill -9 a master");
    let sent = Instant::now();
    publisher
        .publish("after")
        .await
        .expect("publish with a node lost");
    for rx in &mut subscribers {
        // The message itself, or "*" (drop everything) once resubscribed elsewhere.
        loop {
            let msg = recv_within(rx, Duration::from_millis(100)).await;
            if msg == "after" || msg == "*" {
                break;
            }
        }
    }
    assert!(sent.elapsed() < Duration::from_millis(300));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_moved_under_load_over_spends_nothing_and_costs_other_slots_nothing() {
    let rc = cluster(3, 0);
    let ledger = Arc::new(MemoryLedger::new());
    let hot = cluster_store(&rc).await;
    let e = engine(hot.clone(), ledger.clone());
    let credits = 300;
    let (keys, held) = spent_five_each(&ledger, &e, &hot, "mk", 12, credits).await;
    let moved_key = &keys[0];
    let slot = rc.slot_of(&entry(moved_key)).expect("slot");
    let from = rc.master_of(&entry(moved_key)).expect("master");
    let to = rc
        .masters()
        .into_iter()
        .find(|&m| m != from)
        .expect("another master");
    // Spends of every key run while the slot moves.
    let load = {
        let e = e.clone();
        let keys = keys.clone();
        tokio::spawn(async move {
            let mut valid = vec![0u64; keys.len()];
            for _ in 0..20 {
                for (i, k) in keys.iter().enumerate() {
                    if let Ok(Decision::Valid { .. } | Decision::ValidOnLedger { .. }) =
                        e.spend(k, c(1)).await
                    {
                        valid[i] += 1;
                    }
                }
            }
            valid
        })
    };
    // (The cluster goes to the blocking task and comes back.)
    let rc = tokio::task::spawn_blocking(move || {
        rc.migrate_slot(slot, from, to).expect("migrate the slot");
        rc
    })
    .await
    .expect("migration");
    let during = load.await.expect("load");
    for (i, k) in keys.iter().enumerate() {
        let valid = 5 + during[i] + spend_until_exhausted(&e, k, credits).await;
        assert!(valid <= credits, "{k}: over-spend");
        let lost = credits - valid;
        if rc.slot_of(&entry(k)).expect("slot") == slot {
            assert!(lost <= held[i] + 20, "{k}: lost {lost}");
        } else {
            assert_eq!(lost, 0, "{k}: a key of another slot lost credits");
        }
    }
}
