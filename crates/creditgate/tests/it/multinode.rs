//! Multi-node tests (exact across nodes and through faults): real `creditgate serve`
//! processes on a real Redis hot store, Postgres ledger and ClickHouse analytics, all
//! started by the testkit on free loopback ports, driven by the load generator.
//!
//! After a fault, every node and the ledger must agree on the balance within
//! [`CONVERGENCE`], and the only credits that may be missing are those of answers whose
//! outcome is unknown (timeouts, lost answers, `503 … the outcome is unknown`) and those
//! the engine reported as written off. A plain 503 spent nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use creditgate_loadgen::{run, Mode, NodeChoice, Plan, Report, Stop};
use creditgate_testkit::{Cluster, Provision, ProxyMode};
use serde_json::json;

use crate::support::BIN;

/// Bound on every node and the ledger agreeing once the load and the fault are over.
const CONVERGENCE: Duration = Duration::from_secs(5);
/// Credits of a fault test's key: more than its load can spend (24 workers for ≤ 5 s),
/// so the balance after the fault is never 0 and every credit must be accounted for.
const FAULT_CREDITS: u64 = 200_000;

/// Three process nodes on the given Redis and Postgres and the shared ClickHouse.
async fn three_nodes(redis: Provision, postgres: Provision) -> Cluster {
    Cluster::builder()
        .nodes(3)
        .services(redis, postgres, Provision::Shared)
        .process_nodes(BIN)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"))
}

/// Request `i` to node `i % 3`, every answer's request id kept.
fn plan(cluster: &Cluster, key: &str, mode: Mode, stop: Stop) -> Plan {
    Plan {
        nodes: cluster.urls(),
        root_key: cluster.root_key.clone(),
        keys: vec![key.to_owned()],
        cost: 1,
        mode,
        stop,
        node_choice: NodeChoice::RoundRobin,
        request_timeout: Duration::from_secs(10),
        max_in_flight: 1024,
        keep_request_ids: true,
    }
}

/// `total` verifications by `concurrency` workers at once.
async fn burst(cluster: &Cluster, key: &str, total: u64, concurrency: usize) -> Report {
    let mode = Mode::Closed {
        concurrency,
        think_time: None,
    };
    run(&plan(cluster, key, mode, Stop::Requests(total)), None).await
}

/// 24 workers for `secs` seconds, 2 ms between a worker's requests.
fn start_load(cluster: &Cluster, key: &str, secs: u64) -> tokio::task::JoinHandle<Report> {
    let mode = Mode::Closed {
        concurrency: 24,
        think_time: Some((Duration::from_millis(2), Duration::from_millis(2))),
    };
    let plan = plan(cluster, key, mode, Stop::After(Duration::from_secs(secs)));
    tokio::spawn(async move { run(&plan, None).await })
}

fn summary(r: &Report) -> String {
    format!(
        "{} requests: VALID {}, exceeded {}, errors {:?} ({} ambiguous), other {:?}",
        r.requests,
        r.valid,
        r.usage_exceeded,
        r.errors,
        r.ambiguous_count(),
        r.other_outcomes
    )
}

/// Every `credits` of a VALID answer exactly once: `0..granted`.
fn assert_credits_exactly(r: &Report, granted: u64) {
    let got: BTreeSet<u64> = r.valid_remaining.iter().copied().collect();
    assert_eq!(
        got.len(),
        r.valid_remaining.len(),
        "a remaining value was reported twice"
    );
    assert_eq!(
        got,
        (0..granted).collect::<BTreeSet<u64>>(),
        "remaining values seen"
    );
}

fn count(cluster: &Cluster, sql: &str) -> u64 {
    let out = cluster.clickhouse_query(sql).expect("clickhouse query");
    out.trim()
        .parse()
        .unwrap_or_else(|e| panic!("{sql}: {out:?} ({e})"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_spend_exactly_and_analytics_count_every_request() {
    let cluster = three_nodes(Provision::Own, Provision::Shared).await;
    let (key_id, key) = cluster.key(100).await;

    let r = burst(&cluster, &key, 300, 300).await;
    println!("3 nodes, 100 credits, 300 concurrent: {}", summary(&r));
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!((r.valid, r.usage_exceeded), (100, 200));
    assert_credits_exactly(&r, 100);

    // The hot balance returns to Postgres once traffic stops; every node agrees.
    assert_eq!(cluster.assert_converged(&key_id, CONVERGENCE).await, 0);

    // ClickHouse: one row per verification, each node served its third (as the servers
    // recorded it, not as the client dispatched it).
    let per_node = cluster
        .wait_verifications_per_node(&key_id, 300, Duration::from_secs(15))
        .await;
    let expected: BTreeMap<String, u64> = (0..3).map(|i| (format!("node-{i}"), 100)).collect();
    assert_eq!(per_node, expected, "verifications per node_id");
    let valid = count(
        &cluster,
        &format!(
            "SELECT count() FROM key_verifications WHERE key_id = '{key_id}' AND outcome = 'VALID'"
        ),
    );
    assert_eq!(valid, 100, "VALID rows in ClickHouse");
    let ids: BTreeSet<String> = cluster
        .clickhouse_query(&format!(
            "SELECT request_id FROM key_verifications WHERE key_id = '{key_id}'"
        ))
        .expect("request ids")
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(ids.len(), 300, "distinct request ids");
    let seen: BTreeSet<String> = r.request_ids.iter().cloned().collect();
    assert_eq!(ids, seen, "the request ids the clients saw");
    let spent = count(
        &cluster,
        &format!("SELECT sum(spent_credits) FROM key_verifications WHERE key_id = '{key_id}'"),
    );
    assert_eq!(spent, 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_one_credit_thousand_requests() {
    let cluster = three_nodes(Provision::Own, Provision::Shared).await;
    let (key_id, key) = cluster.key(1).await;
    let r = burst(&cluster, &key, 1000, 1000).await;
    println!("1 credit, 1000 concurrent: {}", summary(&r));
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.valid, 1, "exactly one VALID");
    assert_eq!(r.valid_remaining, vec![0]);
    assert_eq!(cluster.assert_converged(&key_id, CONVERGENCE).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn changes_on_one_node_take_effect_on_every_node_within_100ms() {
    let cluster = three_nodes(Provision::Own, Provision::Shared).await;
    let root = cluster.root_key.as_str();
    let client = reqwest::Client::new();
    let (a, b) = (&cluster.nodes[0], &cluster.nodes[2]);
    let mut worst = Duration::ZERO;
    for round in 0..5 {
        let (key_id, key) = cluster.key(1_000).await;
        // Warm node B's cache.
        assert_eq!(b.verify(root, &key, 1).await["code"], "VALID");
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
        a.ok(change, root, body).await;
        let done = Instant::now();
        loop {
            let v: serde_json::Value = client
                .post(format!("{}/v2/keys.verifyKey", b.url))
                .bearer_auth(root)
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

/// Checks after a fault: never an over-spend, every node and the ledger agree within
/// [`CONVERGENCE`], no credit created, and the credits missing are at most those of
/// ambiguous answers plus what the engine reported as written off.
async fn check_after_fault(cluster: &Cluster, key_id: &str, granted: u64, r: &Report, what: &str) {
    println!("{what}: granted {granted}, {}", summary(r));
    assert!(
        r.valid <= granted,
        "{what}: over-spend: {} VALID of {granted}",
        r.valid
    );
    assert!(
        r.other_outcomes.is_empty(),
        "{what}: {:?}",
        r.other_outcomes
    );
    let remaining = cluster.assert_converged(key_id, CONVERGENCE).await;
    let lost = cluster.reported_lost();
    let ambiguous = r.ambiguous_count();
    println!("{what}: remaining {remaining}, reported lost {lost}, ambiguous answers {ambiguous}");
    assert!(
        remaining + r.valid <= granted,
        "{what}: credits created: remaining {remaining} + VALID {} > {granted}",
        r.valid
    );
    assert!(
        remaining > 0,
        "{what}: the load spent every credit; the test checks nothing"
    );
    let missing = granted - r.valid - remaining;
    assert!(
        missing <= ambiguous + lost,
        "{what}: {missing} credits unaccounted, but only {ambiguous} answers were ambiguous \
         and {lost} credits were reported lost (errors {:?})",
        r.errors
    );
}

/// A key of [`FAULT_CREDITS`] under [`start_load`] for `secs` seconds, `fault` injected
/// after 1 s; returns (key id, secret, what the load saw).
async fn under_load<F: std::future::Future<Output = ()>>(
    cluster: &Cluster,
    secs: u64,
    fault: F,
) -> (String, String, Report) {
    let (key_id, key) = cluster.key(FAULT_CREDITS).await;
    let load = start_load(cluster, &key, secs);
    tokio::time::sleep(Duration::from_secs(1)).await;
    fault.await;
    let r = load.await.expect("load");
    (key_id, key, r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_of_a_node_mid_load() {
    let mut cluster = three_nodes(Provision::Own, Provision::Shared).await;
    let (key_id, _, r) = under_load(&cluster, 3, cluster.nodes[1].kill9()).await;
    cluster.restart_node(1).await.expect("restart node 1");
    check_after_fault(&cluster, &key_id, FAULT_CREDITS, &r, "node kill -9").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_kill9_and_restart_mid_load() {
    let cluster = three_nodes(Provision::Own, Provision::Shared).await;
    let redis = cluster.redis().expect("redis");
    let fault = async {
        redis.kill9().expect("kill redis");
        tokio::time::sleep(Duration::from_millis(500)).await;
        redis.restart().expect("restart redis");
    };
    let (key_id, key, r) = under_load(&cluster, 4, fault).await;
    check_after_fault(
        &cluster,
        &key_id,
        FAULT_CREDITS,
        &r,
        "redis kill -9 + restart",
    )
    .await;
    // Redis came back: nodes use it again without a restart.
    let v = cluster.nodes[2].verify(&cluster.root_key, &key, 0).await;
    assert_eq!(v["code"], "VALID", "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_paused_three_seconds() {
    let cluster = three_nodes(Provision::Own, Provision::Shared).await;
    let redis = cluster.redis().expect("redis");
    let fault = async {
        redis.pause().expect("pause redis");
        tokio::time::sleep(Duration::from_secs(3)).await;
        redis.resume().expect("resume redis");
    };
    let (key_id, _, r) = under_load(&cluster, 5, fault).await;
    check_after_fault(&cluster, &key_id, FAULT_CREDITS, &r, "redis paused 3 s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_three_seconds() {
    let cluster = three_nodes(Provision::Own, Provision::Own).await;
    let pg = cluster.postgres().expect("postgres");
    let fault = async {
        pg.stop().expect("stop postgres");
        tokio::time::sleep(Duration::from_secs(3)).await;
        pg.start_again().expect("start postgres");
    };
    let (key_id, _, r) = under_load(&cluster, 5, fault).await;
    check_after_fault(&cluster, &key_id, FAULT_CREDITS, &r, "postgres stopped 3 s").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn update_credits_set_racing_a_load_on_three_nodes() {
    let cluster = three_nodes(Provision::Own, Provision::Shared).await;
    let (key_id, key) = cluster.key(100_000).await;
    let load = start_load(&cluster, &key, 3);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let set = cluster.nodes[1]
        .ok(
            "keys.updateCredits",
            &cluster.root_key,
            json!({"keyId": key_id, "operation": "set", "value": 50}),
        )
        .await;
    assert_eq!(
        set["remaining"].as_u64().map(|r| r <= 50),
        Some(true),
        "{set}"
    );
    let r = load.await.expect("load");
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    // After the set, at most 50 more could be spent: the final balance is 50 minus the
    // spends that came after it, never more than 50, and every node and the ledger agree.
    let remaining = cluster.assert_converged(&key_id, CONVERGENCE).await;
    let after_set = r.valid_remaining.iter().filter(|&&c| c < 50).count();
    println!(
        "set racing load: VALID {}, remaining {remaining}, VALID below 50 after the set {after_set}",
        r.valid
    );
    assert!(remaining <= 50);
    assert_eq!(
        u64::try_from(after_set).unwrap_or(u64::MAX),
        50 - remaining,
        "spends after the set"
    );
}

/// A counter summed over its label sets in a node's `/metrics` (0 when absent).
pub(crate) async fn node_metric(url: &str, name: &str) -> u64 {
    let text = reqwest::get(format!("{url}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("{url}/metrics: {e}"))
        .text()
        .await
        .expect("metrics text");
    let total: f64 = text
        .lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // Counters of whole credits and events.
    format!("{total:.0}").parse().unwrap_or(0)
}

/// Node 0 reaches Redis through a proxy that black-holes the link for 3 s — holding
/// the bytes and delivering them when the link heals, as TCP does after a partition —
/// while all three nodes take load on a 3,000-credit key at cost 3.
///
/// No spend whose caller stopped waiting may apply when the held bytes arrive (the
/// spend script's deadline), so every missing credit is one a node reported as of
/// unknown outcome; and node 0 keeps deciding from the ledger (the breaker) instead of
/// answering 503 after a timeout per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_redis_keeps_deciding_and_no_late_spend_applies() {
    const GRANTED: u64 = 3_000;
    const COST: u64 = 3;
    let cluster = Cluster::builder()
        .nodes(3)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(BIN)
        .redis_through_proxy(0)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let (key_id, key) = cluster.key(GRANTED).await;
    let urls = cluster.urls();
    // About 40 verifications/s per load: 6 s spend at most ~1,500 of the 3,000 credits,
    // so the key is never exhausted and every answer has to be decided on its merits.
    let load = |nodes: Vec<String>| {
        let mut plan = plan(
            &cluster,
            &key,
            Mode::Closed {
                concurrency: 4,
                think_time: Some((Duration::from_millis(100), Duration::from_millis(100))),
            },
            Stop::After(Duration::from_secs(6)),
        );
        plan.nodes = nodes;
        plan.cost = COST;
        tokio::spawn(async move { run(&plan, None).await })
    };
    let on_a = load(vec![urls[0].clone()]);
    let on_bc = load(vec![urls[1].clone(), urls[2].clone()]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let proxy = cluster.redis_proxy(0);
    proxy.set(ProxyMode::BlackHole);
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.set(ProxyMode::Pass);
    let a = on_a.await.expect("load on node 0");
    let bc = on_bc.await.expect("load on nodes 1, 2");
    println!("node 0 (cut off 3 s): {}", summary(&a));
    println!("nodes 1, 2: {}", summary(&bc));

    let remaining = cluster.assert_converged(&key_id, CONVERGENCE).await;
    let spent_valid = COST * (a.valid + bc.valid);
    assert!(
        spent_valid + remaining <= GRANTED,
        "over-spent: {spent_valid} spent by VALID answers + {remaining} left > {GRANTED}"
    );
    let missing = GRANTED - spent_valid - remaining;
    let mut unknown = 0;
    for url in &urls {
        unknown += node_metric(url, "creditgate_engine_outcome_unknown_credits_total").await;
    }
    let lost = cluster.reported_lost();
    println!("missing {missing}, reported of unknown outcome {unknown}, written off {lost}");
    assert!(
        missing <= unknown + lost,
        "{missing} credits are gone without a VALID answer, but only {unknown} were reported \
         of unknown outcome and {lost} written off"
    );
    assert_eq!(
        a.other_outcomes,
        BTreeMap::new(),
        "node 0 answered only VALID, USAGE_EXCEEDED or errors"
    );
    assert_eq!(
        a.usage_exceeded,
        0,
        "the key was never exhausted: {}",
        summary(&a)
    );
    // Node 0 kept deciding: after a few timeouts the breaker sent its spends to the
    // ledger, so only those few (and the probes) are not VALID.
    assert!(
        node_metric(&urls[0], "creditgate_engine_breaker_opened_total").await >= 1,
        "the breaker of node 0 never opened"
    );
    assert!(
        a.valid * 10 >= a.requests * 8,
        "node 0 answered VALID to fewer than 80 % of its requests: {}",
        summary(&a)
    );
    assert!(bc.errors.is_empty(), "nodes 1, 2: {}", summary(&bc));
}
