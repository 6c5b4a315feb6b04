//! Three `creditgate serve` processes on a Redis Cluster of 3 masters with 1 replica
//! each (`--redis-cluster`), Postgres and ClickHouse: exact over 1,000 keys, and through
//! a killed master, a planned failover and a slot migration under load — over-spend 0,
//! keys of the shards left alone lose nothing, every other missing credit is accounted
//! for by an ambiguous answer or a reported write-off.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate_loadgen::{run, Admin, Mode, NodeChoice, Plan, Report, Stop};
use creditgate_testkit::{Cluster, Provision};

use crate::support::BIN;

/// Bound on every node and the ledger agreeing once the load and the faults are over.
const CONVERGENCE: Duration = Duration::from_secs(10);

async fn three_nodes_on_a_redis_cluster() -> Cluster {
    Cluster::builder()
        .nodes(3)
        .services(Provision::Shared, Provision::Shared, Provision::Shared)
        .redis_cluster(3)
        .process_nodes(BIN)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"))
}

/// `n` keys of `credits` each under one API, created 8 at a time; (key id, secret).
async fn keys(cluster: &Cluster, n: usize, credits: u64) -> Vec<(String, String)> {
    let admin = Arc::new(Admin::new(&cluster.nodes[0].url, &cluster.root_key));
    let api = admin.create_api("redis-cluster").await.expect("api");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (admin, api) = (admin.clone(), api.clone());
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for _ in (w..n).step_by(8) {
                made.push(admin.create_key(&api, Some(credits)).await.expect("key"));
            }
            made
        }));
    }
    let mut all = Vec::with_capacity(n);
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    all
}

fn plan(cluster: &Cluster, secrets: Vec<String>, mode: Mode, stop: Stop) -> Plan {
    Plan {
        nodes: cluster.urls(),
        root_key: cluster.root_key.clone(),
        keys: secrets,
        cost: 1,
        mode,
        stop,
        node_choice: NodeChoice::RoundRobin,
        request_timeout: Duration::from_secs(10),
        max_in_flight: 1024,
        keep_request_ids: false,
    }
}

/// The master (node index of the Redis Cluster) serving a creditgate key's entry.
fn shard_of(cluster: &Cluster, key_id: &str) -> usize {
    cluster
        .redis_cluster()
        .expect("a Redis Cluster")
        .master_of(&format!("cg:{{{key_id}}}:e"))
        .expect("the key's master")
}

/// Credits the nodes logged as written off, per key (`key_id=… lost=…`).
fn lost_per_key(logs: &str) -> BTreeMap<String, u64> {
    let mut lost = BTreeMap::new();
    for line in logs
        .lines()
        .filter(|l| l.contains("hot store lost its data"))
    {
        let field = |name: &str| {
            let i = line.find(&format!("{name}="))? + name.len() + 1;
            Some(
                line[i..]
                    .chars()
                    .take_while(|c| !c.is_whitespace())
                    .collect::<String>(),
            )
        };
        if let (Some(key), Some(n)) = (field("key_id"), field("lost")) {
            *lost.entry(key).or_default() += n.parse::<u64>().unwrap_or(0);
        }
    }
    lost
}

/// Spent credits per key in ClickHouse, once it holds at least `rows` verification
/// rows (one per answered verification; a 503 may add its own).
async fn spent_per_key(cluster: &Cluster, rows: u64) -> BTreeMap<String, u64> {
    let started = Instant::now();
    loop {
        let out = cluster
            .clickhouse_query(
                "SELECT key_id, count(), sum(spent_credits) FROM key_verifications FINAL \
                 GROUP BY key_id FORMAT TabSeparated",
            )
            .expect("clickhouse");
        let mut total = 0;
        let mut spent = BTreeMap::new();
        for l in out.lines().filter(|l| !l.is_empty()) {
            let f: Vec<&str> = l.split('\t').collect();
            total += f[1].parse::<u64>().expect("count");
            spent.insert(f[0].to_owned(), f[2].parse::<u64>().expect("sum"));
        }
        if total >= rows || started.elapsed() > Duration::from_secs(20) {
            assert!(total >= rows, "analytics rows: {total}, answers: {rows}");
            return spent;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_on_a_three_shard_cluster_are_exact_over_1000_keys() {
    let cluster = three_nodes_on_a_redis_cluster().await;
    let credits = 20;
    let keys = keys(&cluster, 1000, credits).await;
    let shards: std::collections::BTreeSet<usize> = keys
        .iter()
        .take(30)
        .map(|(id, _)| shard_of(&cluster, id))
        .collect();
    assert_eq!(shards.len(), 3, "keys on every shard");
    let secrets = keys.iter().map(|(_, s)| s.clone()).collect();
    let mode = Mode::Closed {
        concurrency: 64,
        think_time: None,
    };
    let started = Instant::now();
    let r = run(&plan(&cluster, secrets, mode, Stop::Requests(30_000)), None).await;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "3 nodes, 3-shard Redis Cluster, 1,000 keys: {} requests in {secs:.1} s ({:.0}/s), VALID {}, exceeded {}, errors {:?}",
        r.requests,
        r.requests as f64 / secs,
        r.valid,
        r.usage_exceeded,
        r.errors
    );
    assert!(r.errors.is_empty(), "errors {:?}", r.errors);
    assert!(r.other_outcomes.is_empty(), "{:?}", r.other_outcomes);
    // 30 requests per key (request i uses key i % 1000), 20 credits each.
    assert_eq!(
        r.valid,
        1000 * credits,
        "successes = min(requests, credits) per key"
    );
    assert_eq!(r.usage_exceeded, 10_000);
    assert_eq!(r.min_remaining, Some(0));
    // The ledger converges: every key's SQL balance is 0, and every node agrees.
    let nonzero = cluster
        .postgres_query("SELECT count(*) FROM keys WHERE remaining IS NULL OR remaining <> 0")
        .expect("postgres");
    assert_eq!(nonzero.trim(), "0", "keys whose SQL balance is not 0");
    for (id, _) in keys.iter().step_by(50) {
        assert_eq!(cluster.assert_converged(id, CONVERGENCE).await, 0, "{id}");
    }
    let spent = spent_per_key(&cluster, r.requests).await;
    assert!(
        keys.iter().all(|(id, _)| spent.get(id) == Some(&credits)),
        "every key spent exactly its credits"
    );
}

/// Waits for `id` to converge (as `Cluster::assert_converged`); on failure shows its
/// ledger row and hot entry.
async fn converged(cluster: &Cluster, id: &str) -> u64 {
    let started = Instant::now();
    loop {
        let nodes = cluster.remaining_on_every_node(id).await;
        let sql = cluster.sql_remaining(id).expect("ledger");
        if let Some(r) = nodes[0] {
            if nodes.iter().all(|n| *n == Some(r)) && sql == i64::try_from(r).ok() {
                return r;
            }
        }
        if started.elapsed() > CONVERGENCE {
            let row = cluster
                .postgres_query(&format!(
                    "SELECT remaining, hot_allocated, hot_epoch, generation FROM keys WHERE id = '{id}'"
                ))
                .unwrap_or_default();
            let rc = cluster.redis_cluster().expect("rc");
            let entry = format!("cg:{{{id}}}:e");
            let hot = rc
                .master_of(&entry)
                .and_then(|m| rc.cli(m, &["HGETALL", &entry]))
                .unwrap_or_default();
            panic!(
                "{id}: no convergence: nodes {nodes:?}, ledger {sql:?}; row {row:?}; entry {hot:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What a fault run saw.
struct FaultRun {
    keys: Vec<(String, String)>,
    report: Report,
}

/// `keys` under load for `secs` s from 24 workers; `fault` runs (blocking) after 1 s.
async fn under_load(
    cluster: &Arc<Cluster>,
    keys: Vec<(String, String)>,
    secs: u64,
    fault: impl FnOnce(&Cluster) + Send + 'static,
) -> FaultRun {
    let mode = Mode::Closed {
        concurrency: 24,
        think_time: Some((Duration::from_millis(2), Duration::from_millis(2))),
    };
    let secrets = keys.iter().map(|(_, s)| s.clone()).collect();
    let plan = plan(
        cluster,
        secrets,
        mode,
        Stop::After(Duration::from_secs(secs)),
    );
    let load = tokio::spawn(async move { run(&plan, None).await });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c = cluster.clone();
    tokio::task::spawn_blocking(move || fault(&c))
        .await
        .expect("fault");
    let report = load.await.expect("load");
    FaultRun { keys, report }
}

/// After the faults: over-spend 0 per key; keys on `untouched` shards (and outside
/// `moved_slots`) lose nothing and are exact; on the others the credits missing are at
/// most those of ambiguous answers plus what the nodes reported written off.
async fn check(
    cluster: &Cluster,
    run: &FaultRun,
    untouched: &[usize],
    moved_slots: &[u16],
    what: &str,
) {
    let r = &run.report;
    println!(
        "{what}: {} requests, VALID {}, exceeded {}, errors {:?} ({} ambiguous)",
        r.requests,
        r.valid,
        r.usage_exceeded,
        r.errors,
        r.ambiguous_count()
    );
    assert!(
        r.other_outcomes.is_empty(),
        "{what}: {:?}",
        r.other_outcomes
    );
    if r.errors.contains_key("http 500") {
        let logs = cluster.logs();
        let causes: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains("internal error"))
            .collect();
        panic!("{what}: a 500 (internal error): {causes:#?}");
    }
    assert!(r.valid > 1_000, "{what}: the load ran ({} VALID)", r.valid);
    let rc = cluster.redis_cluster().expect("a Redis Cluster");
    let spent = spent_per_key(cluster, r.valid + r.usage_exceeded).await;
    let lost = lost_per_key(&cluster.logs());
    let (mut missing_elsewhere, mut lost_elsewhere, mut untouched_keys) = (0, 0, 0);
    for (id, _) in &run.keys {
        let remaining = converged(cluster, id).await;
        let spent = spent.get(id).copied().unwrap_or(0);
        assert!(
            spent + remaining <= 100_000,
            "{what}: {id}: credits created or over-spent: spent {spent} + remaining {remaining}"
        );
        let missing = 100_000 - spent - remaining;
        let slot = rc.slot_of(&format!("cg:{{{id}}}:e")).expect("slot");
        if untouched.contains(&shard_of(cluster, id)) && !moved_slots.contains(&slot) {
            untouched_keys += 1;
            assert_eq!(
                lost.get(id),
                None,
                "{what}: {id} of an untouched shard was written off"
            );
            assert_eq!(
                missing, 0,
                "{what}: {id} of an untouched shard is missing credits"
            );
        } else {
            missing_elsewhere += missing;
            lost_elsewhere += lost.get(id).copied().unwrap_or(0);
        }
    }
    println!(
        "{what}: {untouched_keys} keys on untouched shards exact; elsewhere {missing_elsewhere} credits missing, {lost_elsewhere} reported lost"
    );
    assert!(untouched_keys > 0, "{what}: no key on an untouched shard");
    assert!(
        missing_elsewhere <= r.ambiguous_count() + lost_elsewhere,
        "{what}: {missing_elsewhere} credits unaccounted: {} ambiguous answers, {lost_elsewhere} reported lost",
        r.ambiguous_count()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_master_killed_under_load_costs_only_its_own_shard() {
    let cluster = Arc::new(three_nodes_on_a_redis_cluster().await);
    let masters = cluster.redis_cluster().expect("rc").masters();
    let victim = masters[0];
    let keys = keys(&cluster, 300, 100_000).await;
    let run = under_load(&cluster, keys, 8, move |c| {
        let rc = c.redis_cluster().expect("rc");
        rc.nodes()[victim].kill9().expect("kill -9 a master");
        rc.wait_ok(Duration::from_secs(30))
            .expect("its replica took over");
    })
    .await;
    let untouched: Vec<usize> = masters.iter().copied().filter(|m| *m != victim).collect();
    check(&cluster, &run, &untouched, &[], "master kill -9").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failover_and_a_slot_migration_under_load_over_spend_nothing() {
    let cluster = Arc::new(three_nodes_on_a_redis_cluster().await);
    let rc = cluster.redis_cluster().expect("rc");
    let masters = rc.masters();
    let (failed_over, source, target) = (masters[0], masters[1], masters[2]);
    let keys = keys(&cluster, 300, 100_000).await;
    // The slot to move: that of a key on `source`, so the move happens under load.
    let moved = keys
        .iter()
        .find(|(id, _)| shard_of(&cluster, id) == source)
        .map(|(id, _)| rc.slot_of(&format!("cg:{{{id}}}:e")).expect("slot"))
        .expect("a key on the source shard");
    let replica = (0..rc.nodes().len())
        .find(|&i| {
            rc.cli(i, &["INFO", "replication"]).is_ok_and(|info| {
                info.contains(&format!("master_port:{}", rc.nodes()[failed_over].port()))
            })
        })
        .expect("a replica of the first master");
    let run = under_load(&cluster, keys, 6, move |c| {
        let rc = c.redis_cluster().expect("rc");
        rc.failover(replica).expect("CLUSTER FAILOVER");
        rc.migrate_slot(moved, source, target)
            .expect("migrate a slot");
    })
    .await;
    // The shard that only received a slot and the source's other slots stay untouched.
    check(
        &cluster,
        &run,
        &[source, target],
        &[moved],
        "failover + slot migration",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_flags_are_checked_before_anything_starts() {
    use crate::support::{run_bounded, tokio_command};
    let cases: [(&[&str], &str); 3] = [
        (
            &[
                "serve",
                "--redis-url",
                "redis://127.0.0.1:1",
                "--redis-cluster",
                "redis://127.0.0.1:2",
            ],
            "--redis-cluster",
        ),
        (
            &["serve", "--listen", "127.0.0.1:0", "--redis-cluster", " , "],
            "seed list is empty",
        ),
        (
            &["cluster", "--redis-cluster-shards", "2"],
            "between 3 and 16",
        ),
    ];
    for (args, says) in cases {
        let mut cmd = tokio_command();
        cmd.args(args);
        let out = run_bounded(cmd, Duration::from_secs(30), "creditgate").await;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

/// Shared pools on a 3-shard cluster: a pooled key's entries sit in its pool's slot, so
/// a key and its pool pay together in one hot-store step. A pool of 100 and 5 keys of 50
/// under 500 concurrent verifications pass exactly 100. Then, while 3 nodes verify 5
/// keys of 400 without pause, one key moves to another identity's pool and back: every
/// key passes exactly its 400, and each pool paid exactly the verifications that named
/// it (both or neither, across the moves).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pools_on_a_cluster_pay_with_their_keys_and_follow_a_moved_key() {
    use crate::multinode::node_metric;
    use crate::pools::{load, pool_converged, team};
    // Keys and pools of the second part: the keys run out first.
    const KEY: u64 = 400;
    const POOL: u64 = 10_000;
    let c = three_nodes_on_a_redis_cluster().await;
    let (acme, keys) = team(&c, "acme", 100).await;
    let per_key = load(&c, &keys).await;
    assert_eq!(per_key.iter().sum::<u64>(), 100, "{per_key:?}");
    assert!(per_key.iter().all(|&n| n <= 50), "{per_key:?}");
    assert_eq!(pool_converged(&c, &acme, CONVERGENCE).await, 0);
    for (i, (key_id, _)) in keys.iter().enumerate() {
        assert_eq!(
            c.assert_converged(key_id, CONVERGENCE).await,
            50 - per_key[i],
            "key {i}"
        );
    }

    let root = c.root_key.clone();
    let n = &c.nodes[0];
    let mut pools = Vec::new();
    for external_id in ["initech", "umbrella"] {
        pools.push(
            n.ok(
                "identities.createIdentity",
                &root,
                serde_json::json!({ "externalId": external_id, "credits": { "remaining": POOL } }),
            )
            .await["identityId"]
                .as_str()
                .expect("identityId")
                .to_owned(),
        );
    }
    let (initech, umbrella) = (pools[0].clone(), pools[1].clone());
    let api = n.create_api(&root, "initech").await;
    let mut keys = Vec::new();
    for _ in 0..5 {
        let d = n
            .ok(
                "keys.createKey",
                &root,
                serde_json::json!({ "apiId": api, "externalId": "initech",
                    "credits": { "remaining": KEY } }),
            )
            .await;
        keys.push((
            d["keyId"].as_str().expect("keyId").to_owned(),
            d["key"].as_str().expect("key").to_owned(),
        ));
    }
    let until = Instant::now() + Duration::from_secs(4);
    let mut workers = Vec::new();
    for w in 0..6usize {
        let node = c.nodes[w % 3].remote();
        let (root, keys) = (root.clone(), keys.clone());
        workers.push(tokio::spawn(async move {
            // Per key: VALIDs charged to initech, to umbrella.
            let mut paid = [[0u64; 2]; 5];
            let mut i = w;
            let mut out = [false; 5];
            while Instant::now() < until && !out.iter().all(|o| *o) {
                let k = i % 5;
                i += 1;
                if out[k] {
                    continue;
                }
                let (status, body) = node
                    .call(
                        "keys.verifyKey",
                        &root,
                        serde_json::json!({ "key": keys[k].1 }),
                    )
                    .await;
                assert_eq!(status, 200, "{body}");
                let d = &body["data"];
                out[k] = d["code"] == "USAGE_EXCEEDED" && d["credits"] == 0;
                if d["code"] == "VALID" {
                    match d["identity"]["externalId"].as_str() {
                        Some("initech") => paid[k][0] += 1,
                        Some("umbrella") => paid[k][1] += 1,
                        other => {
                            panic!("a VALID pooled verification without its pool: {other:?} {d}")
                        }
                    }
                }
            }
            paid
        }));
    }
    // Key 0 moves to umbrella's pool and back while the load runs.
    let moved = &keys[0].0;
    for (at_ms, external_id) in [(300, "umbrella"), (700, "initech"), (1_100, "umbrella")] {
        tokio::time::sleep_until(
            (until - Duration::from_secs(4) + Duration::from_millis(at_ms)).into(),
        )
        .await;
        c.nodes[1]
            .ok(
                "keys.updateKey",
                &root,
                serde_json::json!({ "keyId": moved, "externalId": external_id }),
            )
            .await;
    }
    let mut paid = [[0u64; 2]; 5];
    for w in workers {
        for (k, p) in w.await.expect("worker").iter().enumerate() {
            paid[k][0] += p[0];
            paid[k][1] += p[1];
        }
    }
    println!("VALID per key (initech, umbrella): {paid:?}");
    for (k, p) in paid.iter().enumerate() {
        assert_eq!(
            p[0] + p[1],
            KEY,
            "key {k} passes exactly its {KEY}: {paid:?}"
        );
        assert_eq!(c.assert_converged(&keys[k].0, CONVERGENCE).await, 0);
    }
    assert!(
        paid[0][1] > 0,
        "the moved key was spent through umbrella: {paid:?}"
    );
    // In the hot store, not on the ledger; the moved key's credits followed it.
    let (mut direct, mut moves) = (0, 0);
    for node in &c.nodes {
        direct += node_metric(&node.url, "creditgate_engine_direct_spends_total").await;
        moves += node_metric(&node.url, "creditgate_engine_evacuations_total").await;
    }
    assert_eq!(direct, 0, "no spend went to the ledger");
    assert!(moves > 0, "the moved key's credits moved between homes");
    let by_initech: u64 = paid.iter().map(|p| p[0]).sum();
    let by_umbrella: u64 = paid.iter().map(|p| p[1]).sum();
    assert_eq!(
        pool_converged(&c, &initech, CONVERGENCE).await,
        i64::try_from(POOL - by_initech).expect("small")
    );
    assert_eq!(
        pool_converged(&c, &umbrella, CONVERGENCE).await,
        i64::try_from(POOL - by_umbrella).expect("small")
    );
    c.shutdown().await.expect("shutdown");
}
