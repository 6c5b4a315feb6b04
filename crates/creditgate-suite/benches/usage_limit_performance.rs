//! `cargo bench -p creditgate-suite --bench usage_limit_performance`: the cost of one
//! spend in the engine (memory and Redis hot stores) and of one HTTP verification (one
//! embedded node, and 3 nodes on Redis + Postgres + ClickHouse).

use std::sync::Arc;
use std::time::Duration;

use creditgate_domain::{Cost, KeyId, SystemClock};
use creditgate_limiter::ports::HotStore;
use creditgate_limiter::{Engine, EngineConfig, MemoryHotStore, MemoryLedger};
use creditgate_loadgen::Admin;
use creditgate_redis::{RedisHotStore, RedisOptions};
use creditgate_testkit::{Cluster, RedisServer};
use criterion::{criterion_group, criterion_main, Criterion};
use serde_json::json;

fn engine_on(hot: Arc<dyn HotStore>) -> Arc<Engine> {
    let ledger = Arc::new(MemoryLedger::new());
    ledger.create_key("bench", Some(1_000_000_000_000), 0);
    Arc::new(Engine::new(
        hot,
        ledger,
        Arc::new(SystemClock),
        EngineConfig::default(),
    ))
}

fn engine_spend(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let memory = engine_on(Arc::new(MemoryHotStore::new()));
    c.bench_function("engine spend / memory hot store", |b| {
        b.to_async(&rt).iter(|| async {
            memory
                .spend(&KeyId::from("bench"), Cost::DEFAULT)
                .await
                .expect("spend")
        })
    });
    let redis = RedisServer::start().expect("redis-server");
    let hot = rt
        .block_on(RedisHotStore::connect(
            &redis.url(),
            RedisOptions::default(),
        ))
        .expect("redis hot store");
    let on_redis = engine_on(Arc::new(hot));
    c.bench_function("engine spend / redis hot store", |b| {
        b.to_async(&rt).iter(|| async {
            on_redis
                .spend(&KeyId::from("bench"), Cost::DEFAULT)
                .await
                .expect("spend")
        })
    });
}

fn http_verify(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    for (label, builder) in [
        ("1 embedded node", Cluster::builder().embedded()),
        ("3 nodes", Cluster::builder().nodes(3)),
    ] {
        let (cluster, secret) = rt.block_on(async {
            let cluster = builder.start().await.expect("cluster");
            let admin = Admin::new(&cluster.nodes[0].url, &cluster.root_key);
            let api = admin.create_api("bench").await.expect("api");
            let (_, secret) = admin
                .create_key(&api, Some(1_000_000_000_000))
                .await
                .expect("key");
            (cluster, secret)
        });
        let client = reqwest::Client::new();
        let urls = cluster.urls();
        let root = cluster.root_key.clone();
        let next = std::sync::atomic::AtomicUsize::new(0);
        c.bench_function(&format!("http verify / {label}"), |b| {
            b.to_async(&rt).iter(|| async {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let r = client
                    .post(format!("{}/v2/keys.verifyKey", urls[i % urls.len()]))
                    .bearer_auth(&root)
                    .json(&json!({"key": secret, "credits": {"cost": 1}}))
                    .send()
                    .await
                    .expect("verify");
                assert!(r.status().is_success());
                r.bytes().await.expect("body")
            })
        });
        rt.block_on(async { cluster.destroy().await.expect("stop") });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = engine_spend, http_verify
}
criterion_main!(benches);
