//! Multi-node tests (issue: exact across nodes and through faults): real `creditgate
//! serve` processes on a real Redis hot store, Postgres ledger and ClickHouse analytics,
//! all started by the testkit on free loopback ports.

#[path = "process/node.rs"]
#[allow(dead_code)]
mod node;

#[path = "multinode/cluster.rs"]
mod cluster;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use cluster::{burst, reported_lost, sustained, Backends, Cluster, Seen, ROOT};
use creditgate_testkit::{Postgres, RedisServer};
use serde_json::json;

fn assert_credits_exactly(seen: &Seen, granted: u64) {
    let got: BTreeSet<u64> = seen.valid_credits.iter().copied().collect();
    assert_eq!(
        got.len(),
        seen.valid_credits.len(),
        "a remaining value was reported twice"
    );
    assert_eq!(
        got,
        (0..granted).collect::<BTreeSet<u64>>(),
        "remaining values seen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_spend_exactly_and_analytics_count_every_request() {
    let redis = RedisServer::start().expect("redis");
    let cluster = Cluster::start(3, Backends::on(&redis, Postgres::shared())).await;
    let (key_id, key) = cluster.key(100).await;

    let seen = burst(&cluster.urls(), &key, 1, 300, 300).await;
    println!(
        "3 nodes, 100 credits, 300 concurrent: {seen:?}",
        seen = (seen.valid, seen.exceeded, &seen.errors, &seen.per_node)
    );
    assert_eq!(seen.error_count(), 0, "errors: {:?}", seen.errors);
    assert_eq!((seen.valid, seen.exceeded), (100, 200));
    assert_credits_exactly(&seen, 100);
    assert!(
        seen.per_node.values().all(|&n| n == 100),
        "{:?}",
        seen.per_node
    );

    // The hot balance returns to Postgres once traffic stops.
    let took = cluster
        .wait_sql_remaining(Postgres::shared(), &key_id, 0, Duration::from_secs(5))
        .await;
    println!("Postgres remaining = 0 after {took:?}");

    // ClickHouse: one row per verification, flushed within a second or two.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let n: u64 = cluster
            .clickhouse(&format!(
                "SELECT count() FROM key_verifications WHERE key_id = '{key_id}'"
            ))
            .trim()
            .parse()
            .unwrap_or(0);
        if n >= 300 || Instant::now() > deadline {
            assert_eq!(n, 300, "verification rows in ClickHouse");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let valid: u64 = cluster
        .clickhouse(&format!(
            "SELECT count() FROM key_verifications WHERE key_id = '{key_id}' AND outcome = 'VALID'"
        ))
        .trim()
        .parse()
        .expect("count");
    assert_eq!(valid, 100, "VALID rows in ClickHouse");
    let ids: BTreeSet<String> = cluster
        .clickhouse(&format!(
            "SELECT request_id FROM key_verifications WHERE key_id = '{key_id}'"
        ))
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 300, "distinct request ids");
    assert_eq!(ids, seen.request_ids, "the request ids the clients saw");
    let spent: u64 = cluster
        .clickhouse(&format!(
            "SELECT sum(spent_credits) FROM key_verifications WHERE key_id = '{key_id}'"
        ))
        .trim()
        .parse()
        .expect("sum");
    assert_eq!(spent, 100);
    let nodes = cluster.clickhouse(&format!(
        "SELECT count(DISTINCT node_id) FROM key_verifications WHERE key_id = '{key_id}'"
    ));
    assert_eq!(nodes.trim(), "3");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_one_credit_thousand_requests() {
    let redis = RedisServer::start().expect("redis");
    let cluster = Cluster::start(3, Backends::on(&redis, Postgres::shared())).await;
    let (key_id, key) = cluster.key(1).await;
    let seen = burst(&cluster.urls(), &key, 1, 1000, 1000).await;
    println!(
        "1 credit, 1000 concurrent: valid {} exceeded {} errors {:?}",
        seen.valid, seen.exceeded, seen.errors
    );
    assert_eq!(seen.error_count(), 0, "{:?}", seen.errors);
    assert_eq!(seen.valid, 1, "exactly one VALID");
    assert_eq!(seen.valid_credits, vec![0]);
    cluster
        .wait_sql_remaining(Postgres::shared(), &key_id, 0, Duration::from_secs(5))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_on_one_node_take_effect_on_every_node_within_100ms() {
    let redis = RedisServer::start().expect("redis");
    let cluster = Cluster::start(3, Backends::on(&redis, Postgres::shared())).await;
    let client = reqwest::Client::new();
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[2]);
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let (key_id, key) = cluster.key(1_000).await;
        // Warm node B's cache.
        assert_eq!(b.verify(ROOT, &key, 1).await["code"], "VALID");
        let (change, expect) = match round % 3 {
            0 => ("keys.deleteKey", "NOT_FOUND"),
            1 => ("keys.updateKey", "DISABLED"),
            _ => ("keys.updateCredits", "USAGE_EXCEEDED"),
        };
        let body = match change {
            "keys.deleteKey" => json!({"keyId": key_id}),
            "keys.updateKey" => json!({"keyId": key_id, "enabled": false}),
            _ => json!({"keyId": key_id, "operation": "set", "value": 0}),
        };
        a.ok(change, ROOT, body).await;
        let done = Instant::now();
        loop {
            let v: serde_json::Value = client
                .post(format!("{}/v2/keys.verifyKey", b.url))
                .bearer_auth(ROOT)
                .json(&json!({"key": key, "credits": {"cost": 1}}))
                .send()
                .await
                .expect("verify")
                .json()
                .await
                .expect("json");
            if v["data"]["code"] == expect {
                break;
            }
            assert!(
                done.elapsed() < Duration::from_secs(2),
                "{change} on node A not seen by node B: {v}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        worst = worst.max(done.elapsed());
    }
    println!("worst propagation to another node: {worst:?}");
    assert!(
        worst < Duration::from_millis(100),
        "propagation took {worst:?}"
    );
}

/// 24 workers spread over the nodes for `secs` seconds (cost 1, 2 ms between requests).
fn start_load(cluster: &Cluster, key: &str, secs: u64) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(sustained(
        cluster.urls(),
        key.to_owned(),
        1,
        Duration::from_secs(secs),
        24,
        Duration::from_millis(2),
    ))
}

/// Checks after a fault: never an over-spend, and once healed the balance is exact up
/// to what can legitimately be unaccounted: credits spent by requests whose answer was
/// lost (errors) and what the engine reported as written off.
async fn check_after_fault(
    cluster: &Cluster,
    pg: &Postgres,
    key_id: &str,
    granted: u64,
    seen: &Seen,
    what: &str,
) {
    assert!(
        seen.valid <= granted,
        "{what}: over-spend: {} VALID of {granted}",
        seen.valid
    );
    // Heal: wait for idle returns, orphan resolution (2 × lock TTL) and the reconciler.
    let deadline = Instant::now() + Duration::from_secs(30);
    let remaining = loop {
        let r = cluster.nodes[0].remaining(ROOT, key_id).await;
        let sql = cluster.sql_remaining(pg, key_id);
        if let (Some(r), Some(sql)) = (r, sql) {
            if i64::try_from(r).ok() == Some(sql) || Instant::now() > deadline {
                break r;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the balance did not converge"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let lost = reported_lost(&cluster.logs());
    let unanswered = seen.error_count();
    println!(
        "{what}: granted {granted}, VALID {}, exceeded {}, errors {:?}, remaining {remaining}, reported lost {lost}",
        seen.valid, seen.exceeded, seen.errors
    );
    assert!(
        remaining + seen.valid <= granted,
        "{what}: credits created: remaining {remaining} + VALID {} > {granted}",
        seen.valid
    );
    let missing = granted - seen.valid - remaining;
    assert!(
        missing <= unanswered + lost,
        "{what}: {missing} credits unaccounted, but only {unanswered} requests went unanswered and {lost} were reported lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_of_a_node_mid_load() {
    let redis = RedisServer::start().expect("redis");
    let mut cluster = Cluster::start(3, Backends::on(&redis, Postgres::shared())).await;
    let (key_id, key) = cluster.key(2_000).await;
    let load = start_load(&cluster, &key, 3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.nodes[1].kill9().await;
    let seen = load.await.expect("load");
    cluster.restart_node(1).await;
    check_after_fault(
        &cluster,
        Postgres::shared(),
        &key_id,
        2_000,
        &seen,
        "node kill -9",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_kill9_and_restart_mid_load() {
    let redis = RedisServer::start().expect("redis");
    let cluster = Cluster::start(3, Backends::on(&redis, Postgres::shared())).await;
    let (key_id, key) = cluster.key(2_000).await;
    let load = start_load(&cluster, &key, 4);
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.kill9().expect("kill redis");
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.restart().expect("restart redis");
    let seen = load.await.expect("load");
    check_after_fault(
        &cluster,
        Postgres::shared(),
        &key_id,
        2_000,
        &seen,
        "redis kill -9 + restart",
    )
    .await;
    // Redis came back: nodes use it again without a restart.
    let v = cluster.nodes[2].verify(ROOT, &key, 0).await;
    assert_eq!(v["code"], "VALID", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_paused_three_seconds() {
    let redis = RedisServer::start().expect("redis");
    let cluster = Cluster::start(3, Backends::on(&redis, Postgres::shared())).await;
    let (key_id, key) = cluster.key(2_000).await;
    let load = start_load(&cluster, &key, 5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.pause().expect("pause redis");
    tokio::time::sleep(Duration::from_secs(3)).await;
    redis.resume().expect("resume redis");
    let seen = load.await.expect("load");
    check_after_fault(
        &cluster,
        Postgres::shared(),
        &key_id,
        2_000,
        &seen,
        "redis paused 3 s",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_three_seconds() {
    let redis = RedisServer::start().expect("redis");
    let pg = Postgres::start().expect("own postgres");
    let backends = Backends::on(&redis, &pg);
    let cluster = Cluster::start(3, backends).await;
    let (key_id, key) = cluster.key(2_000).await;
    let load = start_load(&cluster, &key, 5);
    tokio::time::sleep(Duration::from_secs(1)).await;
    pg.stop().expect("stop postgres");
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_again().expect("start postgres");
    let seen = load.await.expect("load");
    check_after_fault(&cluster, &pg, &key_id, 2_000, &seen, "postgres stopped 3 s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn update_credits_set_racing_a_load_on_three_nodes() {
    let redis = RedisServer::start().expect("redis");
    let cluster = Cluster::start(3, Backends::on(&redis, Postgres::shared())).await;
    let (key_id, key) = cluster.key(100_000).await;
    let load = start_load(&cluster, &key, 3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let set = cluster.nodes[1]
        .ok(
            "keys.updateCredits",
            ROOT,
            json!({"keyId": key_id, "operation": "set", "value": 50}),
        )
        .await;
    assert_eq!(
        set["remaining"].as_u64().map(|r| r <= 50),
        Some(true),
        "{set}"
    );
    let seen = load.await.expect("load");
    assert_eq!(seen.error_count(), 0, "{:?}", seen.errors);
    // After the set, at most 50 more could be spent: the final balance is 50 minus the
    // spends that came after it, never more than 50, and the ledger agrees exactly.
    let deadline = Instant::now() + Duration::from_secs(10);
    let remaining = loop {
        let r = cluster.nodes[0]
            .remaining(ROOT, &key_id)
            .await
            .expect("limited");
        if cluster.sql_remaining(Postgres::shared(), &key_id) == i64::try_from(r).ok() {
            break r;
        }
        assert!(Instant::now() < deadline, "did not converge");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let after_set: Vec<u64> = seen
        .valid_credits
        .iter()
        .copied()
        .filter(|&c| c < 50)
        .collect();
    println!(
        "set racing load: VALID {}, remaining {remaining}, VALID below 50 after the set {}",
        seen.valid,
        after_set.len()
    );
    assert!(remaining <= 50);
    assert_eq!(
        u64::try_from(after_set.len()).unwrap_or(0),
        50 - remaining,
        "spends after the set"
    );
}
