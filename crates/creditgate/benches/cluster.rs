//! `cargo bench -p creditgate --bench cluster`: verifications per second and p50/p99 of
//! 3 nodes on one Redis (Postgres ledger, ClickHouse analytics) at 32 connections, for one
//! hot key and for 1,000 keys, and the SQL writes per 1,000 verifications. The load runs
//! in this process, on the same machine as the nodes: the figures include that contention.

#[path = "../tests/process/node.rs"]
#[allow(dead_code)]
mod node;

#[path = "../tests/multinode/cluster.rs"]
#[allow(dead_code)]
mod cluster;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cluster::{Backends, Cluster, ROOT};
use creditgate_testkit::{Postgres, RedisServer};
use serde_json::json;

const CONNECTIONS: usize = 32;

fn seconds() -> u64 {
    std::env::var("CREDITGATE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// Closed-loop load: `CONNECTIONS` workers, request i to node i % 3 and key i % keys.
async fn run(urls: &[String], keys: &[String], secs: u64) -> (f64, f64, f64, u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let urls = Arc::new(urls.to_vec());
    let keys = Arc::new(keys.to_vec());
    let mut tasks = Vec::new();
    for w in 0..CONNECTIONS {
        let (urls, keys) = (urls.clone(), keys.clone());
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut lat = Vec::new();
            let mut bad = 0u64;
            let mut i = w;
            while Instant::now() < deadline {
                let started = Instant::now();
                let r = client
                    .post(format!("{}/v2/keys.verifyKey", urls[i % urls.len()]))
                    .bearer_auth(ROOT)
                    .json(&json!({"key": keys[i % keys.len()], "credits": {"cost": 1}}))
                    .send()
                    .await;
                let ok = match r {
                    Ok(r) => {
                        r.status().is_success()
                            && r.text().await.is_ok_and(|b| b.contains("\"VALID\""))
                    }
                    Err(_) => false,
                };
                lat.push(started.elapsed());
                bad += u64::from(!ok);
                i += CONNECTIONS;
            }
            (lat, bad)
        }));
    }
    let mut lat = Vec::new();
    let mut bad = 0;
    for t in tasks {
        let (l, b) = t.await.expect("worker");
        lat.extend(l);
        bad += b;
    }
    lat.sort();
    let pct = |permille: usize| {
        let i = lat.len().saturating_sub(1) * permille / 1000;
        lat.get(i).map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    (lat.len() as f64 / secs as f64, pct(500), pct(990), bad)
}

fn sql_writes(pg: &Postgres, db: &str) -> u64 {
    // Give the statistics collector a moment to publish.
    std::thread::sleep(Duration::from_millis(1200));
    pg.query(db, "SELECT coalesce(sum(n_tup_ins + n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables WHERE relname IN ('keys', 'transfers', 'fences')")
        .expect("stats")
        .trim()
        .parse()
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs = seconds();
    let redis = RedisServer::start().expect("redis");
    let pg = Postgres::shared();
    let cluster = Cluster::start(3, Backends::on(&redis, pg)).await;
    let urls = cluster.urls();
    let api = cluster.nodes[0].create_api(ROOT, "bench").await;
    let mut keys = Vec::new();
    for _ in 0..1000 {
        keys.push(
            cluster.nodes[0]
                .create_key(ROOT, &api, 1_000_000_000)
                .await
                .1,
        );
    }
    println!("3 nodes on one Redis, {CONNECTIONS} connections, {secs} s each");
    println!("| keys | verifications/s | p50 ms | p99 ms | non-VALID | SQL writes per 1,000 verifications |");
    println!("|---|---|---|---|---|---|");
    for (label, set) in [("1 (hot)", &keys[..1]), ("1,000", &keys[..])] {
        // Warm every key once so the table measures steady state.
        let _ = run(&urls, set, 1).await;
        let before = sql_writes(pg, &cluster.backends.pg_db);
        let (rps, p50, p99, bad) = run(&urls, set, secs).await;
        let after = sql_writes(pg, &cluster.backends.pg_db);
        let total = rps * secs as f64;
        let per_k = (after.saturating_sub(before)) as f64 * 1000.0 / total.max(1.0);
        println!("| {label} | {rps:.0} | {p50:.2} | {p99:.2} | {bad} | {per_k:.2} |");
    }
}
