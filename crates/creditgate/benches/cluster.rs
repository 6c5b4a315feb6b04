//! `cargo bench -p creditgate --bench cluster`: verifications per second and p50/p99 of
//! 3 nodes on one Redis (Postgres ledger, ClickHouse analytics) at 32 connections, for one
//! hot key and for 1,000 keys, and the SQL writes per 1,000 verifications. The load
//! (the shared load generator, closed loop) runs in this process, on the same machine as
//! the nodes: the figures include that contention.

use std::time::Duration;

use creditgate_loadgen::{run, Mode, NodeChoice, Plan, Report, Stop};
use creditgate_testkit::{Cluster, Postgres, Provision};

const CONNECTIONS: usize = 32;

fn seconds() -> u64 {
    std::env::var("CREDITGATE_BENCH_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10)
}

/// Closed-loop load: `CONNECTIONS` workers, request i to node i % 3 and key i % keys.
async fn load(cluster: &Cluster, keys: &[String], secs: u64) -> Report {
    let plan = Plan {
        nodes: cluster.urls(),
        root_key: cluster.root_key.clone(),
        keys: keys.to_vec(),
        cost: 1,
        mode: Mode::Closed {
            concurrency: CONNECTIONS,
            think_time: None,
        },
        stop: Stop::After(Duration::from_secs(secs)),
        node_choice: NodeChoice::RoundRobin,
        request_timeout: Duration::from_secs(10),
        max_in_flight: CONNECTIONS,
        keep_request_ids: false,
    };
    run(&plan, None).await
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
    let cluster = Cluster::builder()
        .nodes(3)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(env!("CARGO_BIN_EXE_creditgate"))
        .start()
        .await
        .expect("cluster");
    let pg = cluster.postgres().expect("postgres");
    let db = cluster
        .databases()
        .expect("databases")
        .postgres_database
        .clone();
    let node = &cluster.nodes[0];
    let api = node.create_api(&cluster.root_key, "bench").await;
    let mut keys = Vec::new();
    for _ in 0..1000 {
        keys.push(
            node.create_key(&cluster.root_key, &api, 1_000_000_000)
                .await
                .1,
        );
    }
    println!("3 nodes on one Redis, {CONNECTIONS} connections, {secs} s each");
    println!("| keys | verifications/s | p50 ms | p99 ms | non-VALID | SQL writes per 1,000 verifications |");
    println!("|---|---|---|---|---|---|");
    for (label, set) in [("1 (hot)", &keys[..1]), ("1,000", &keys[..])] {
        // Warm every key once so the table measures steady state.
        let _ = load(&cluster, set, 1).await;
        let before = sql_writes(pg, &db);
        let r = load(&cluster, set, secs).await;
        let after = sql_writes(pg, &db);
        let bad = r.requests - r.valid;
        let per_k = (after.saturating_sub(before)) as f64 * 1000.0 / (r.requests.max(1) as f64);
        println!(
            "| {label} | {:.0} | {:.2} | {:.2} | {bad} | {per_k:.2} |",
            r.rps, r.latency_ms.p50, r.latency_ms.p99
        );
    }
}
