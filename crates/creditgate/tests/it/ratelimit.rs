//! Rate limits on real processes: 3 and 9 nodes on one Redis, a limit of 10 per second,
//! 200 requests a second for 5 s, each to a random node — standalone (`ratelimit.limit`)
//! or an identity's auto-applied limit that `verifyKey` checks for two keys of the
//! identity. Every answer names its window (`reset`, the window's end on Redis's clock),
//! so the test checks each window: never more than 10 successes, and exactly 10 in every
//! window that saw at least 10 requests (the fixed window's promise). Through a Redis
//! `kill -9` and restart that loses the counters, still never more than 10 in a window.
//! Verifications refused by the limit spend no credits: the keys' balances are what the
//! successes spent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use creditgate_testkit::{Cluster, Provision};
use serde_json::json;

use crate::support::BIN;

const LIMIT: u64 = 10;
const WINDOW_MS: u64 = 1_000;
const RATE_PER_S: u64 = 200;
const RUN: Duration = Duration::from_secs(5);

fn epoch_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_millis(),
    )
    .expect("in range")
}

/// What the load calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    /// `ratelimit.limit` on one identifier.
    Standalone,
    /// `verifyKey` (cost 1) of two keys sharing their identity's auto-applied limit.
    IdentityLimit,
}

const CREDITS: u64 = 10_000;

/// With `redis_fault`, Redis is killed (`kill -9`) that far into the run and restarted
/// 500 ms later, without persistence: its counters are lost.
async fn exact_per_window(nodes: usize, redis_fault: Option<Duration>, workload: Workload) {
    let cluster = Cluster::builder()
        .nodes(nodes)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(BIN)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let root = cluster.root_key.clone();
    let seed = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("after 1970")
            .as_nanos()
            % 1_000_000_007,
    )
    .expect("small")
        | 1;
    println!("rate limit run: {nodes} nodes, {workload:?}, seed {seed}");
    let keys: Vec<(String, String)> = match workload {
        Workload::Standalone => Vec::new(),
        Workload::IdentityLimit => {
            let n = &cluster.nodes[0];
            n.ok(
                "identities.createIdentity",
                &root,
                json!({ "externalId": "team_1", "ratelimits": [{ "name": "requests",
                        "limit": LIMIT, "duration": WINDOW_MS, "autoApply": true }] }),
            )
            .await;
            let api = n.create_api(&root, "rl-api").await;
            let mut keys = Vec::new();
            for _ in 0..2 {
                let d = n
                    .ok(
                        "keys.createKey",
                        &root,
                        json!({ "apiId": api, "externalId": "team_1",
                                "credits": { "remaining": CREDITS } }),
                    )
                    .await;
                keys.push((
                    d["keyId"].as_str().expect("keyId").to_owned(),
                    d["key"].as_str().expect("key").to_owned(),
                ));
            }
            keys
        }
    };
    let mut x = seed;
    let started = Instant::now();
    let load = async {
        let mut tasks = Vec::new();
        let mut tick = tokio::time::interval(Duration::from_millis(1_000 / RATE_PER_S));
        while started.elapsed() < RUN {
            tick.tick().await;
            // xorshift: a random node for each request, repeatable with the seed.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let i = usize::try_from(x % u64::try_from(nodes).expect("small")).expect("small");
            let node = cluster.nodes[i].remote();
            let root = root.clone();
            let (route, body) = match workload {
                Workload::Standalone => (
                    "ratelimit.limit",
                    json!({ "namespace": "api", "identifier": "user_1",
                            "limit": LIMIT, "duration": WINDOW_MS }),
                ),
                Workload::IdentityLimit => {
                    let key = &keys[usize::from(x & 2 == 2)].1;
                    ("keys.verifyKey", json!({ "key": key }))
                }
            };
            tasks.push(tokio::spawn(
                async move { node.call(route, &root, body).await },
            ));
        }
        tasks
    };
    let fault = async {
        let at = redis_fault?;
        tokio::time::sleep(at).await;
        let redis = cluster.redis().expect("redis");
        let killed = epoch_ms();
        tokio::task::block_in_place(|| redis.kill9().expect("kill redis"));
        tokio::time::sleep(Duration::from_millis(500)).await;
        tokio::task::block_in_place(|| redis.restart().expect("restart redis"));
        Some((killed, epoch_ms()))
    };
    let (tasks, outage) = tokio::join!(load, fault);
    // Window end → (requests answered in it, successes).
    let mut windows: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut unavailable = 0;
    for t in tasks {
        let (status, body) = t.await.expect("task");
        if status == 503 && outage.is_some() {
            // Redis was down: nothing passed (some may have been counted).
            unavailable += 1;
            continue;
        }
        assert_eq!(status, 200, "{body}");
        let d = &body["data"];
        let (state, success) = match workload {
            Workload::Standalone => (d, d["success"] == json!(true)),
            Workload::IdentityLimit => {
                assert!(
                    d["code"] == "VALID" || d["code"] == "RATE_LIMITED",
                    "{body}"
                );
                (&d["ratelimits"][0], d["code"] == "VALID")
            }
        };
        let reset = state["reset"]
            .as_u64()
            .unwrap_or_else(|| panic!("no reset: {body}"));
        assert_eq!(reset % WINDOW_MS, 0, "{body}");
        let w = windows.entry(reset).or_default();
        w.0 += 1;
        w.1 += u64::from(success);
    }
    println!(
        "windows (end → requests, successes): {windows:?}; outage {outage:?}, \
         {unavailable} answered 503"
    );
    assert!(windows.len() >= 4, "{windows:?}");
    for (end, (requests, successes)) in &windows {
        assert!(
            *successes <= LIMIT,
            "seed {seed}: window ending {end} passed {successes} > {LIMIT}"
        );
        // Around a Redis loss, windows that began before it count as full: the promise
        // of exactly `LIMIT` holds for windows wholly before the kill or after the restart.
        let clear = outage.is_none_or(|(killed, restarted)| {
            *end <= killed || end.saturating_sub(WINDOW_MS) >= restarted
        });
        if *requests >= LIMIT && clear {
            assert_eq!(
                *successes, LIMIT,
                "seed {seed}: window ending {end} saw {requests} requests"
            );
        }
    }
    if workload == Workload::IdentityLimit {
        // Only verifications that passed the limit spent (cost 1 each); a 503 during the
        // outage spent nothing either, as the limit is checked before credits.
        let passed: u64 = windows.values().map(|w| w.1).sum();
        let mut left = 0;
        for (key_id, _) in &keys {
            left += cluster.nodes[0]
                .remaining(&root, key_id)
                .await
                .expect("limited");
        }
        assert_eq!(
            2 * CREDITS - left,
            passed,
            "seed {seed}: credits spent by the two keys vs verifications that passed"
        );
    }
    cluster.shutdown().await.expect("shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_are_exact_per_window_on_three_nodes() {
    exact_per_window(3, None, Workload::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_limit_is_exact_per_window_for_its_keys_on_three_nodes() {
    exact_per_window(3, None, Workload::IdentityLimit).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rate_limits_stay_within_the_limit_through_a_redis_kill9_and_restart() {
    exact_per_window(3, Some(Duration::from_millis(2_300)), Workload::Standalone).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_identity_limit_is_exact_per_window_for_its_keys_on_nine_nodes() {
    exact_per_window(9, None, Workload::IdentityLimit).await;
}

/// An override set on one node applies on the others at once: they cached the
/// namespace's overrides (none) before it was set, and forget them on the cache bus —
/// well before the cache's own 10 s would.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_override_set_on_one_node_applies_on_the_others_at_once() {
    let cluster = Cluster::builder()
        .nodes(3)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(BIN)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let root = cluster.root_key.clone();
    let check =
        json!({ "namespace": "api", "identifier": "vip_1", "limit": 100, "duration": 60_000 });
    for node in &cluster.nodes[1..] {
        let d = node.ok("ratelimit.limit", &root, check.clone()).await;
        assert_eq!(d["limit"], 100, "{d}");
    }
    let set = cluster.nodes[0]
        .ok(
            "ratelimit.setOverride",
            &root,
            json!({ "namespace": "api", "identifier": "vip_*", "limit": 7, "duration": 60_000 }),
        )
        .await;
    let id = set["overrideId"].clone();
    let started = Instant::now();
    for node in &cluster.nodes[1..] {
        loop {
            let d = node.ok("ratelimit.limit", &root, check.clone()).await;
            if d["overrideId"] == id {
                assert_eq!(d["limit"], 7, "{d}");
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "the override did not reach a node within 2 s: {d}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    println!(
        "override applied on every node after {:?}",
        started.elapsed()
    );
    cluster.shutdown().await.expect("shutdown");
}
