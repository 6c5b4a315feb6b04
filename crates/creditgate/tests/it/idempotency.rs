//! Idempotency keys on real processes: 3 nodes on Redis + Postgres. The same key sent 50
//! times at once to the three nodes spends once; then many keys, each sent several times
//! at once to random nodes, through a Redis `kill -9` + restart: no key spends twice,
//! every answer of a key is its first decision, and the books balance exactly (each
//! record lives in Postgres, decided in the transaction that spends).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use creditgate_testkit::{Cluster, Provision, Remote};
use serde_json::{json, Value};

use crate::support::BIN;

const COST: u64 = 7;

/// One idempotent verification: (status, body).
async fn verify_once(node: &Remote, root: &str, key: &str, idem: &str) -> (u16, Value) {
    node.call(
        "keys.verifyKey",
        root,
        json!({ "key": key, "credits": { "cost": COST }, "idempotencyKey": idem }),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_key_on_three_nodes_spends_once_through_a_redis_kill9() {
    let cluster = Cluster::builder()
        .nodes(3)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(BIN)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let root = cluster.root_key.clone();
    let (key_id, key) = cluster.key(1_000).await;
    // Part of the balance moves into Redis on every node.
    for n in &cluster.nodes {
        assert_eq!(n.verify(&root, &key, 0).await["code"], "VALID");
    }

    // 50 at once, one key, three nodes.
    let mut tasks = Vec::new();
    for i in 0..50usize {
        let (node, root, key) = (cluster.nodes[i % 3].remote(), root.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            verify_once(&node, &root, &key, "one-key").await
        }));
    }
    let mut answers = Vec::new();
    for t in tasks {
        let (status, body) = t.await.expect("task");
        match status {
            200 => answers.push(body["data"].clone()),
            409 => assert!(
                body["error"]["type"]
                    .as_str()
                    .is_some_and(|t| t.ends_with("idempotency/in_flight")),
                "{body}"
            ),
            other => panic!("{other}: {body}"),
        }
    }
    assert!(!answers.is_empty(), "no request was answered");
    assert!(answers.iter().all(|a| a == &answers[0]), "{answers:?}");
    assert_eq!(answers[0]["credits"], 1_000 - COST, "{}", answers[0]);
    let (status, again) = verify_once(&cluster.nodes[2].remote(), &root, &key, "one-key").await;
    assert_eq!((status, &again["data"]), (200, &answers[0]));
    cluster
        .assert_converged(&key_id, Duration::from_secs(5))
        .await;
    assert_eq!(
        cluster.sql_remaining(&key_id).expect("sql"),
        Some(i64::try_from(1_000 - COST).expect("small"))
    );

    // 60 keys, 5 copies of each at once on random nodes, Redis killed mid-run.
    let redis = cluster.redis().expect("redis");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for k in 0..60usize {
        for copy in 0..5usize {
            let node = cluster.nodes[(k + copy) % 3].remote();
            let (root, key) = (root.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                // Spread over about 2 s.
                tokio::time::sleep(Duration::from_millis(u64::try_from(k * 33).expect("small")))
                    .await;
                let idem = format!("run-{k}");
                let (status, body) = verify_once(&node, &root, &key, &idem).await;
                (idem, status, body)
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    redis.kill9().expect("kill redis");
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().expect("restart redis");
    let mut seen: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    let mut statuses: BTreeMap<u16, usize> = BTreeMap::new();
    for t in tasks {
        let (idem, status, body) = t.await.expect("task");
        *statuses.entry(status).or_default() += 1;
        match status {
            200 => seen.entry(idem).or_default().push(body["data"].clone()),
            // In flight elsewhere, or a backend was down (nothing decided, or a retry
            // with the key is safe): the retries below settle each key.
            409 | 503 => {
                seen.entry(idem).or_default();
            }
            other => panic!("{idem}: {other}: {body}"),
        }
    }
    println!(
        "statuses while Redis was killed: {statuses:?} in {:?}",
        started.elapsed()
    );
    // Every key is retried until it is answered; its answers are all one decision.
    let mut valid = 0u64;
    for (idem, answers) in &mut seen {
        let node = cluster.nodes[0].remote();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = verify_once(&node, &root, &key, idem).await;
            if status == 200 {
                answers.push(body["data"].clone());
                break;
            }
            assert!(
                Instant::now() < deadline && matches!(status, 409 | 503),
                "{idem}: {status}: {body}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let first = &answers[0];
        assert!(
            answers.iter().all(|a| a == first),
            "{idem}: more than one decision: {answers:?}"
        );
        match first["code"].as_str() {
            Some("VALID") => valid += 1,
            Some("USAGE_EXCEEDED") => {}
            other => panic!("{idem}: {other:?}: {first}"),
        }
    }
    // The books: each key spent at most once; what Redis held when killed is written
    // off and reported.
    let remaining = cluster
        .assert_converged(&key_id, Duration::from_secs(5))
        .await;
    let lost = cluster.reported_lost();
    println!("{valid} keys spent, remaining {remaining}, reported lost {lost}");
    assert_eq!(
        remaining + COST * (valid + 1) + lost,
        1_000,
        "1,000 = remaining + {COST} × {} spends + {lost} lost",
        valid + 1
    );
    assert!(valid > 0, "no key spent: the test checks nothing");
}
