//! Shared credit pools on real processes: 3 nodes on Redis + Postgres, an identity with
//! a pool of 100 and 5 keys of 50 each, 500 concurrent verifications spread over the
//! keys and the nodes: exactly 100 pass, no key passes its own 50, the pool ends at 0
//! on every node and in SQL. Then the same with increments and a `set` of the pool
//! racing the load: every credit the pool was granted is accounted for. And a daily
//! refill of the pool at midnight (the nodes' clocks skewed to reach it) racing the load:
//! applied exactly once.

use std::time::{Duration, Instant};

use creditgate_testkit::{Cluster, Provision};
use serde_json::json;

use crate::support::BIN;

async fn cluster() -> Cluster {
    Cluster::builder()
        .nodes(3)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(BIN)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"))
}

/// An identity with a pool of `pool` and 5 keys of 50; returns the identity id and
/// the keys (id, secret).
pub(crate) async fn team(
    c: &Cluster,
    external_id: &str,
    pool: u64,
) -> (String, Vec<(String, String)>) {
    let root = &c.root_key;
    let n = &c.nodes[0];
    let identity = n
        .ok(
            "identities.createIdentity",
            root,
            json!({ "externalId": external_id, "credits": { "remaining": pool } }),
        )
        .await["identityId"]
        .as_str()
        .expect("identityId")
        .to_owned();
    let api = n.create_api(root, external_id).await;
    let mut keys = Vec::new();
    for _ in 0..5 {
        let d = n
            .ok(
                "keys.createKey",
                root,
                json!({ "apiId": api, "externalId": external_id, "credits": { "remaining": 50 } }),
            )
            .await;
        keys.push((
            d["keyId"].as_str().expect("keyId").to_owned(),
            d["key"].as_str().expect("key").to_owned(),
        ));
    }
    (identity, keys)
}

/// 500 verifications at once, request `i` to key `i % 5` on node `i % 3`; returns how
/// many passed per key.
pub(crate) async fn load(c: &Cluster, keys: &[(String, String)]) -> [u64; 5] {
    let mut tasks = Vec::new();
    for i in 0..500usize {
        let node = c.nodes[i % 3].remote();
        let (root, key) = (c.root_key.clone(), keys[i % 5].1.clone());
        tasks.push(tokio::spawn(async move {
            let (status, body) = node
                .call("keys.verifyKey", &root, json!({ "key": key }))
                .await;
            assert_eq!(status, 200, "{body}");
            (i % 5, body["data"]["code"] == "VALID")
        }));
    }
    let mut per_key = [0u64; 5];
    for t in tasks {
        let (k, valid) = t.await.expect("task");
        per_key[k] += u64::from(valid);
    }
    per_key
}

/// The pool's balance as every node answers it, once they all agree with SQL.
pub(crate) async fn pool_converged(c: &Cluster, identity: &str, bound: Duration) -> i64 {
    let started = Instant::now();
    loop {
        let mut seen = Vec::new();
        for node in &c.nodes {
            let d = node
                .ok(
                    "identities.getIdentity",
                    &c.root_key,
                    json!({ "identity": identity }),
                )
                .await;
            seen.push(d["credits"]["remaining"].as_i64());
        }
        let sql = c
            .postgres_query(&format!(
                "SELECT remaining FROM pools WHERE id = '{identity}'"
            ))
            .expect("reading the pool's row");
        let sql: Option<i64> = sql.trim().parse().ok();
        if seen.iter().all(|s| *s == sql) && sql.is_some() {
            return sql.unwrap_or_default();
        }
        assert!(
            started.elapsed() < bound,
            "no convergence within {bound:?}: nodes {seen:?}, SQL {sql:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_spend_a_pool_and_its_keys_together() {
    let c = cluster().await;
    let (identity, keys) = team(&c, "acme", 100).await;
    let per_key = load(&c, &keys).await;
    println!("passed per key: {per_key:?}");
    assert_eq!(per_key.iter().sum::<u64>(), 100, "{per_key:?}");
    assert!(per_key.iter().all(|&n| n <= 50), "{per_key:?}");
    assert_eq!(
        pool_converged(&c, &identity, Duration::from_secs(5)).await,
        0
    );
    for (i, (key_id, _)) in keys.iter().enumerate() {
        let left = c.assert_converged(key_id, Duration::from_secs(5)).await;
        assert_eq!(left, 50 - per_key[i], "key {i}");
    }

    // Increments and a set of the pool race a second team's load.
    let (identity, keys) = team(&c, "globex", 60).await;
    let racer = {
        let node = c.nodes[1].remote();
        let (root, identity) = (c.root_key.clone(), identity.clone());
        tokio::spawn(async move {
            let mut after_set: u64 = 0;
            for i in 0..10 {
                let (operation, value): (&str, u64) = if i == 5 {
                    ("set", 30)
                } else {
                    ("increment", 7)
                };
                let (status, body) = node
                    .call(
                        "identities.updateCredits",
                        &root,
                        json!({ "identity": identity, "operation": operation, "value": value }),
                    )
                    .await;
                assert_eq!(status, 200, "{body}");
                if i > 5 {
                    after_set += value;
                }
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
            after_set
        })
    };
    let per_key = load(&c, &keys).await;
    let after_set = racer.await.expect("racer");
    let passed: u64 = per_key.iter().sum();
    println!("passed per key with updates racing: {per_key:?}");
    assert!(per_key.iter().all(|&n| n <= 50), "{per_key:?}");
    // Every credit is accounted for: the keys paid exactly what passed, and the pool
    // never went past what it was granted (60 + increments before the set, or 30 and
    // the increments after it).
    let pool_left = pool_converged(&c, &identity, Duration::from_secs(5)).await;
    let mut keys_paid = 0;
    for (key_id, _) in &keys {
        keys_paid += 50 - c.assert_converged(key_id, Duration::from_secs(5)).await;
    }
    assert_eq!(
        keys_paid, passed,
        "the keys paid every verification that passed"
    );
    let ceiling = i64::try_from(30 + after_set).expect("small");
    assert!(
        (0..=ceiling).contains(&pool_left),
        "pool {pool_left} after a set of 30 and {after_set} incremented"
    );
    assert!(passed <= 60 + 7 * 5 + 30 + after_set, "passed {passed}");
    c.shutdown().await.expect("shutdown");
}

fn now_ms() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("fits")
}

/// A pool with a daily refill, refilled while 3 nodes verify against it. The nodes'
/// clocks are skewed alike (`--clock-skew-ms`) so that UTC midnight comes a few
/// seconds into the test; every node sees the new day at once and races to apply the
/// refill: it must apply exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pool_refill_racing_load_on_three_nodes_applies_once() {
    const DAY_MS: i64 = 86_400_000;
    // Midnight on the nodes' clocks comes this long after now: time to start the
    // cluster and spend the pool first.
    const LEAD_MS: i64 = 30_000;
    let now = now_ms();
    let midnight_ms = now + LEAD_MS;
    let skew = (now / DAY_MS + 1) * DAY_MS - midnight_ms;
    let c = Cluster::builder()
        .nodes(3)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(BIN)
        .node_args(["--clock-skew-ms".to_owned(), skew.to_string()])
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let root = &c.root_key;
    let n = &c.nodes[0];
    let identity = n
        .ok(
            "identities.createIdentity",
            root,
            json!({ "externalId": "initech", "credits": { "remaining": 100,
                "refill": { "interval": "daily", "amount": 100 } } }),
        )
        .await["identityId"]
        .as_str()
        .expect("identityId")
        .to_owned();
    let api = n.create_api(root, "initech").await;
    let mut keys = Vec::new();
    for _ in 0..5 {
        let d = n
            .ok(
                "keys.createKey",
                root,
                json!({ "apiId": api, "externalId": "initech", "credits": { "remaining": 50 } }),
            )
            .await;
        keys.push((
            d["keyId"].as_str().expect("keyId").to_owned(),
            d["key"].as_str().expect("key").to_owned(),
        ));
    }

    // Before midnight: 500 verifications spend the pool's 100, no more.
    let before = load(&c, &keys).await;
    assert_eq!(before.iter().sum::<u64>(), 100, "{before:?}");
    assert!(
        now_ms() < midnight_ms - 2_000,
        "the set-up took too long: midnight (node time) is {} ms away",
        midnight_ms - now_ms()
    );

    // From 1 s before midnight to 2 s after it, six workers (two per node) verify
    // without pause.
    tokio::time::sleep(Duration::from_millis(
        u64::try_from(midnight_ms - 1_000 - now_ms()).unwrap_or(0),
    ))
    .await;
    let mut workers = Vec::new();
    for w in 0..6usize {
        let node = c.nodes[w % 3].remote();
        let root = c.root_key.clone();
        let keys = keys.clone();
        workers.push(tokio::spawn(async move {
            let mut passed = [0u64; 5];
            let mut early_valid = Vec::new();
            let mut i = w;
            while now_ms() < midnight_ms + 2_000 {
                let sent = now_ms();
                let (status, body) = node
                    .call("keys.verifyKey", &root, json!({ "key": keys[i % 5].1 }))
                    .await;
                assert_eq!(status, 200, "{body}");
                if body["data"]["code"] == "VALID" {
                    passed[i % 5] += 1;
                    if now_ms() < midnight_ms - 50 {
                        early_valid.push((sent, body["data"].clone()));
                    }
                }
                i += 1;
            }
            (passed, early_valid)
        }));
    }
    let mut after = [0u64; 5];
    for w in workers {
        let (passed, early_valid) = w.await.expect("worker");
        assert!(
            early_valid.is_empty(),
            "VALID answered before midnight with the pool spent: {early_valid:?}"
        );
        for k in 0..5 {
            after[k] += passed[k];
        }
    }
    println!("passed per key: {before:?} before midnight, {after:?} across it");
    assert_eq!(
        after.iter().sum::<u64>(),
        100,
        "the refill of 100 applied exactly once: {after:?}"
    );
    assert_eq!(
        pool_converged(&c, &identity, Duration::from_secs(5)).await,
        0
    );
    for (i, (key_id, _)) in keys.iter().enumerate() {
        let left = c.assert_converged(key_id, Duration::from_secs(5)).await;
        assert_eq!(left, 50 - before[i] - after[i], "key {i}");
    }
    c.shutdown().await.expect("shutdown");
}
