//! The load generator against real creditgate nodes started in-process.

use std::time::{Duration, Instant};

use creditgate_loadgen::{run, Admin, Mode, NodeChoice, Plan, Progress, Report, Stop};
use creditgate_testkit::Cluster;
use tokio::net::TcpListener;
use tokio::sync::watch;

const ROOT_KEY: &str = "cg_root_loadgen_test_secret";

/// One creditgate node in this process on the embedded default (the testkit's
/// cluster of one); stops on drop.
struct TestNode {
    cluster: Cluster,
}

impl TestNode {
    async fn start() -> TestNode {
        let cluster = Cluster::builder()
            .embedded()
            .root_key(ROOT_KEY)
            .start()
            .await
            .unwrap_or_else(|e| panic!("starting a node: {e:#}"));
        TestNode { cluster }
    }

    fn url(&self) -> String {
        self.cluster.nodes[0].url.clone()
    }

    fn admin(&self) -> Admin {
        Admin::new(&self.url(), ROOT_KEY)
    }

    /// A fresh API with one key holding `credits` (`None`: unlimited): (key id, secret).
    async fn key(&self, credits: Option<u64>) -> (String, String) {
        let admin = self.admin();
        let api = admin.create_api("loadgen_test").await.expect("createApi");
        admin.create_key(&api, credits).await.expect("createKey")
    }
}

fn plan(nodes: Vec<String>, key: String, mode: Mode, stop: Stop) -> Plan {
    Plan {
        nodes,
        root_key: ROOT_KEY.into(),
        keys: vec![key],
        cost: 1,
        mode,
        stop,
        node_choice: NodeChoice::Random { seed: 42 },
        request_timeout: Duration::from_secs(5),
        max_in_flight: 256,
        keep_request_ids: false,
    }
}

fn closed(concurrency: usize) -> Mode {
    Mode::Closed {
        concurrency,
        think_time: None,
    }
}

fn open(rate_per_sec: f64) -> Mode {
    Mode::Open { rate_per_sec }
}

fn summary(r: &Report) -> String {
    format!(
        "requests={} valid={} usage_exceeded={} other={:?} errors={:?} duration_s={:.3} \
         rps={:.1} latency_ms={:?} nodes={:?} seconds={}",
        r.requests,
        r.valid,
        r.usage_exceeded,
        r.other_outcomes,
        r.errors,
        r.duration_s,
        r.rps,
        r.latency_ms,
        r.nodes,
        r.timeline.len()
    )
}

/// A port nothing listens on (bound, then released).
async fn dead_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr").port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_loop_spends_exactly_the_credits() {
    let node = TestNode::start().await;
    let (key_id, secret) = node.key(Some(100)).await;
    let mut plan = plan(vec![node.url()], secret, closed(50), Stop::Requests(200));
    plan.keep_request_ids = true;
    let r = run(&plan, None).await;
    eprintln!("{}", summary(&r));

    assert_eq!(r.requests, 200);
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!(r.valid, 100);
    assert_eq!(r.usage_exceeded, 100);
    assert!(r.other_outcomes.is_empty());
    let mut remaining = r.valid_remaining.clone();
    remaining.sort_unstable();
    assert_eq!(remaining, (0..100).collect::<Vec<u64>>());
    assert_eq!(r.min_remaining, Some(0));
    assert_eq!(r.nodes.values().sum::<u64>(), 200);
    assert_eq!(r.request_ids.len(), 200);
    let mut ids = r.request_ids.clone();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 200, "request ids are unique");
    assert!(r.latency_ms.p50 > 0.0 && r.latency_ms.p50 <= r.latency_ms.p99);
    assert!(r.latency_ms.p99 <= r.latency_ms.max);
    assert_eq!(r.histogram_ms.iter().map(|b| b.1).sum::<u64>(), 200);
    assert_eq!(r.timeline.iter().map(|s| s.requests).sum::<u64>(), 200);
    assert_eq!(r.timeline.iter().map(|s| s.valid).sum::<u64>(), 100);

    assert_eq!(
        node.admin().remaining(&key_id).await.expect("getKey"),
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_keeps_its_schedule() {
    let node = TestNode::start().await;
    let (_, secret) = node.key(Some(1_000_000)).await;
    let plan = plan(
        vec![node.url()],
        secret,
        open(200.0),
        Stop::After(Duration::from_secs(2)),
    );
    let (tx, mut rx) = watch::channel(Progress::default());
    let updates = tokio::spawn(async move {
        let mut seen = 0_u32;
        // Live RPS once a full one-second window lies behind the run.
        let mut live_rps = Vec::new();
        while rx.changed().await.is_ok() {
            seen += 1;
            let p = rx.borrow().clone();
            if (1.2..1.9).contains(&p.elapsed_s) {
                live_rps.push(p.rps);
            }
        }
        (seen, rx.borrow().clone(), live_rps)
    });
    let began = Instant::now();
    let r = run(&plan, Some(tx)).await;
    let wall = began.elapsed();
    let (updates, last, mut live_rps) = updates.await.expect("progress task");
    live_rps.sort_by(f64::total_cmp);
    let live = live_rps.get(live_rps.len() / 2).copied().unwrap_or(0.0);
    assert!(
        (190.0..=210.0).contains(&live),
        "live RPS at a steady 200/s reads {live} ({live_rps:?})"
    );
    eprintln!("{} wall={wall:?} progress_updates={updates}", summary(&r));

    assert!((399..=401).contains(&r.requests), "requests {}", r.requests);
    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!(r.valid, r.requests);
    assert!(
        (1.9..2.5).contains(&r.duration_s),
        "duration {} s",
        r.duration_s
    );
    assert!(wall < Duration::from_secs(4), "wall {wall:?}");
    assert!(
        (2..=3).contains(&r.timeline.len()),
        "timeline {:?}",
        r.timeline
    );
    assert!(r.latency_ms.p50 > 0.0);
    assert!(r.rps > 150.0 && r.rps < 220.0, "rps {}", r.rps);
    let per_second: Vec<u64> = r.timeline.iter().map(|s| s.requests).collect();
    assert!(per_second[0] >= 190, "first second: {per_second:?}");
    // A million-credit key spent 400 times: the lowest balance seen is 999 600.
    assert_eq!(r.min_remaining, Some(1_000_000 - r.valid));
    assert!(
        updates >= 10,
        "about 10 progress updates a second, got {updates}"
    );
    assert_eq!(
        last.requests, r.requests,
        "the last progress has the totals"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_splits_exactly() {
    let node = TestNode::start().await;
    let (_, secret) = node.key(None).await;
    // One node under two names.
    let a = node.url();
    let b = a.replace("127.0.0.1", "localhost");
    let mut plan = plan(
        vec![a.clone(), b.clone()],
        secret,
        closed(8),
        Stop::Requests(101),
    );
    plan.node_choice = NodeChoice::RoundRobin;
    let r = run(&plan, None).await;
    eprintln!("{}", summary(&r));

    assert!(r.errors.is_empty(), "errors: {:?}", r.errors);
    assert_eq!(r.valid, 101);
    assert!(
        r.valid_remaining.is_empty(),
        "unlimited keys report no credits"
    );
    assert_eq!(r.min_remaining, None);
    assert_eq!(r.nodes.get(&a), Some(&51));
    assert_eq!(r.nodes.get(&b), Some(&50));
}

#[test]
fn rate_for_follows_the_suite_formula() {
    // ceil(ceil(100 / 30) × 0.9) = ceil(4 × 0.9) = 4
    assert_eq!(Plan::rate_for(100, 1, 30, 0.9), 4);
    // ceil(ceil(100 / 20) × 0.9) = ceil(4.5) = 5
    assert_eq!(Plan::rate_for(1000, 10, 20, 0.9), 5);
    // ceil(ceil(1000 / 15) × 3) = 67 × 3
    assert_eq!(Plan::rate_for(1000, 1, 15, 3.0), 201);
    // The suite never goes below 1 request per second.
    assert_eq!(Plan::rate_for(10, 20, 10, 0.8), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_gives_connect_errors_and_the_run_ends_on_time() {
    let node = TestNode::start().await;
    let (_, secret) = node.key(None).await;
    let dead = format!("http://127.0.0.1:{}", dead_port().await);
    let mut plan = plan(
        vec![node.url(), dead.clone()],
        secret,
        open(100.0),
        Stop::After(Duration::from_secs(1)),
    );
    plan.node_choice = NodeChoice::RoundRobin;
    let began = Instant::now();
    let r = run(&plan, None).await;
    let wall = began.elapsed();
    eprintln!("{} wall={wall:?}", summary(&r));

    assert_eq!(r.requests, 100);
    assert_eq!(r.errors.get("connect"), Some(&50));
    assert_eq!(r.errors.len(), 1, "errors: {:?}", r.errors);
    assert_eq!(r.ambiguous_count(), 0, "a refused connection spent nothing");
    assert_eq!(r.valid, 50);
    assert_eq!(r.nodes.get(&dead), Some(&50));
    assert!((r.error_rate() - 0.5).abs() < 1e-9);
    assert!(wall < Duration::from_secs(2), "wall {wall:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_never_answers_times_out_within_the_bound() {
    // Accepted by the kernel (backlog) but never served: every request hangs.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("addr"));
    let mut plan = plan(vec![url], "key".into(), closed(4), Stop::Requests(20));
    plan.request_timeout = Duration::from_millis(300);
    let began = Instant::now();
    let r = run(&plan, None).await;
    let wall = began.elapsed();
    eprintln!("{} wall={wall:?}", summary(&r));

    assert_eq!(r.requests, 20);
    assert_eq!(r.errors.get("timeout"), Some(&20), "errors: {:?}", r.errors);
    assert_eq!(r.valid, 0);
    assert_eq!(r.latency_ms.p50, 0.0, "timeouts have no latency");
    // 5 rounds of 4 workers × 300 ms.
    assert!(wall >= Duration::from_millis(1_400), "wall {wall:?}");
    assert!(wall < Duration::from_secs(3), "wall {wall:?}");
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_drops_beyond_max_in_flight() {
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", silent.local_addr().expect("addr"));
    let mut plan = plan(vec![url], "key".into(), open(200.0), Stop::Requests(100));
    plan.request_timeout = Duration::from_millis(400);
    plan.max_in_flight = 10;
    let r = run(&plan, None).await;
    eprintln!("{}", summary(&r));

    assert_eq!(r.requests, 100);
    let dropped = r.errors.get("dropped_by_client").copied().unwrap_or(0);
    let timeouts = r.errors.get("timeout").copied().unwrap_or(0);
    assert_eq!(dropped + timeouts, 100, "errors: {:?}", r.errors);
    // 100 arrivals over 0.5 s with 10 slots held 400 ms each: most are dropped.
    assert!(dropped >= 50, "dropped {dropped}");
    assert!(timeouts >= 10, "timeouts {timeouts}");
    assert_eq!(
        r.nodes.values().sum::<u64>(),
        timeouts,
        "dropped requests never reach a node"
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_remaining_and_route_errors() {
    let node = TestNode::start().await;
    let admin = node.admin();
    let api = admin.create_api("loadgen_admin").await.expect("createApi");
    let (limited, _) = admin.create_key(&api, Some(7)).await.expect("createKey");
    let (unlimited, _) = admin.create_key(&api, None).await.expect("createKey");
    assert_eq!(admin.remaining(&limited).await.expect("getKey"), Some(7));
    assert_eq!(admin.remaining(&unlimited).await.expect("getKey"), None);
    admin.delete_api(&api).await.expect("deleteApi");

    let err = admin.remaining("key_doesnotexist").await.expect_err("404");
    let text = err.to_string();
    assert!(
        text.contains("keys.getKey") && text.contains("404"),
        "{text}"
    );
    let wrong = Admin::new(&node.url(), "not-the-root-key");
    let err = wrong.create_api("nope_api").await.expect_err("401");
    assert!(err.to_string().contains("401"), "{err}");
}
