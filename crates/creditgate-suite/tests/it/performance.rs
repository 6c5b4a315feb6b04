//! Performance tests: latency percentiles, sustained throughput, concurrency scaling.
//! The bounds asserted here are sanity bounds; the real targets live in the benchmarks
//! (`cargo bench -p creditgate-suite --bench usage_limit_performance`).

use std::time::Duration;

use creditgate_loadgen::{run, Mode, Report, Stop};
use creditgate_suite::{print_metrics, setup, Target};

const BIG: u64 = 1_000_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_percentiles() {
    let s = setup(3, Target::Cluster, BIG).await.expect("setup");
    let plan = s.plan(
        1,
        Mode::Open {
            rate_per_sec: 200.0,
        },
        Stop::After(Duration::from_secs(5)),
    );
    let r = run(&plan, None).await;
    print_metrics(
        "latency (3 nodes, 200 rps open loop, 5 s)",
        &r,
        r.requests,
        BIG,
        1,
    );
    println!(
        "P50 {:.2} ms, P95 {:.2} ms, P99 {:.2} ms",
        r.latency_ms.p50, r.latency_ms.p95, r.latency_ms.p99
    );
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.latency_ms.p95 < 200.0, "P95 {} ms", r.latency_ms.p95);
    assert!(r.latency_ms.p99 < 500.0, "P99 {} ms", r.latency_ms.p99);
    s.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throughput_sustained() {
    let s = setup(3, Target::Cluster, BIG).await.expect("setup");
    let plan = s.plan(
        1,
        Mode::Closed {
            concurrency: 100,
            think_time: None,
        },
        Stop::After(Duration::from_secs(10)),
    );
    let r = run(&plan, None).await;
    print_metrics(
        "throughput (3 nodes, 100 workers, 10 s)",
        &r,
        r.requests,
        BIG,
        1,
    );
    println!(
        "throughput {:.0} RPS, error rate {:.3} %",
        r.rps,
        r.error_rate() * 100.0
    );
    assert!(r.rps > 100.0, "{} RPS", r.rps);
    assert!(r.error_rate() < 0.01, "error rate {}", r.error_rate());
    s.teardown().await;
}

/// Closed-loop throughput at 1, 10, 50 and 100 workers on one key of 3 nodes. What a user
/// checks: every credit spent is accounted for exactly (the VALID answers of all runs are
/// what the ledger lost, nothing else), and adding workers never collapses throughput:
/// each step keeps at least a third of the previous step's rate (a loose bound, because
/// the nodes, the backends and the load share one small machine with other work).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_scaling() {
    let s = setup(3, Target::Cluster, BIG).await.expect("setup");
    let mut rows: Vec<(usize, Report)> = Vec::new();
    for workers in [1, 10, 50, 100] {
        let plan = s.plan(
            1,
            Mode::Closed {
                concurrency: workers,
                think_time: None,
            },
            Stop::After(Duration::from_secs(3)),
        );
        let r = run(&plan, None).await;
        assert!(r.errors.is_empty(), "{workers} workers: {:?}", r.errors);
        assert_eq!(r.valid, r.requests, "{workers} workers: every answer VALID");
        rows.push((workers, r));
    }
    println!("| workers | RPS | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    for (w, r) in &rows {
        println!(
            "| {w} | {:.0} | {:.2} | {:.2} |",
            r.rps, r.latency_ms.p50, r.latency_ms.p99
        );
    }
    for pair in rows.windows(2) {
        let ((w0, r0), (w1, r1)) = (&pair[0], &pair[1]);
        assert!(
            r1.rps >= r0.rps / 3.0,
            "throughput collapsed from {:.0} RPS at {w0} workers to {:.0} RPS at {w1}",
            r0.rps,
            r1.rps
        );
    }
    let spent: u64 = rows.iter().map(|(_, r)| r.valid).sum();
    s.assert_sql_balance(BIG - spent, Duration::from_secs(10))
        .await;
    s.teardown().await;
}
