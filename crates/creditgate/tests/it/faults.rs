//! The fault matrix: 3 process nodes on Redis + Postgres + ClickHouse, each node's link
//! to each service through a chaos proxy of its own, a hot-key workload (1 key) and a
//! many-key workload (1,000 keys) driven through a fault and 5 s past it. Every answer
//! is recorded (node, sent, answered, outcome, `credits`) and the whole history is
//! checked (`creditgate_testkit::history`): no over-spend, a linearizable balance,
//! exact convergence of SQL and every node's `getKey` once traffic stops, and every
//! missing credit explained by an ambiguous answer or a reported loss.
//!
//! `scripts/test --faults` runs every cell (one test each) and prints the table; the
//! default run has a few cells and a short randomized run (`CREDITGATE_CHAOS_SEED`
//! picks its faults; the seed is printed). `CREDITGATE_CHAOS_SECS` makes the
//! randomized run longer.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use creditgate_testkit::history::{check, Answer, KeyBook, Op, SetBook, Summary};
use creditgate_testkit::{Cluster, Provision, ProxyMode, Service};
use serde_json::{json, Value};

use crate::support::BIN;

/// Load keeps running this long after the fault heals.
const AFTER: Duration = Duration::from_secs(5);
/// Load runs this long before the fault.
const BEFORE: Duration = Duration::from_secs(1);
/// Before ClickHouse goes down, load runs longer: the latencies of these last seconds
/// (every key's first refill done) are what the ones during the fault are held to.
const WARM_BEFORE_CLICKHOUSE: Duration = Duration::from_secs(3);

/// How long load runs before the first fault.
fn lead(faults: &[Fault]) -> Duration {
    if faults.contains(&Fault::ClickHouseDown) {
        BEFORE + WARM_BEFORE_CLICKHOUSE
    } else {
        BEFORE
    }
}
/// A client gives up on an answer after this long (the answer is then ambiguous).
const CLIENT_TIMEOUT: Duration = Duration::from_secs(3);
/// Once traffic stops, SQL and every node agree on every balance within this (a node
/// returns an idle key's hot balance after 2 s, its reconciler runs every 500 ms).
const CONVERGED_WITHIN: Duration = Duration::from_secs(5);
/// Workers sending verifications, each one at a time.
const WORKERS: usize = 24;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    NodeKill9,
    NodeStop,
    RedisKill9,
    RedisRestartAof,
    RedisFlushall,
    RedisPaused,
    OneNodeCutFromRedis,
    AllNodesCutFromRedis,
    RedisSlow,
    OneNodeCutFromPostgres,
    PostgresStopped,
    PostgresSlow,
    ClickHouseDown,
    BalanceChanges,
    ClockAhead,
}

/// The faults a randomized run draws from: node, Redis and Postgres faults (the clock
/// is set when the cluster starts, and the balance changes and ClickHouse have cells of
/// their own).
const RANDOM_FAULTS: [Fault; 11] = [
    Fault::NodeKill9,
    Fault::NodeStop,
    Fault::RedisKill9,
    Fault::RedisFlushall,
    Fault::RedisPaused,
    Fault::OneNodeCutFromRedis,
    Fault::AllNodesCutFromRedis,
    Fault::RedisSlow,
    Fault::OneNodeCutFromPostgres,
    Fault::PostgresStopped,
    Fault::PostgresSlow,
];

impl Fault {
    /// How long the fault lasts.
    fn duration(self) -> Duration {
        match self {
            Fault::ClickHouseDown => Duration::from_secs(10),
            Fault::NodeKill9 | Fault::RedisKill9 | Fault::RedisRestartAof => Duration::from_secs(2),
            Fault::RedisFlushall => Duration::ZERO,
            _ => Duration::from_secs(3),
        }
    }

    /// The services this cell needs of its own (it stops or kills them).
    fn own(self) -> [Provision; 3] {
        use Provision::{Own, Shared};
        match self {
            Fault::RedisKill9
            | Fault::RedisRestartAof
            | Fault::RedisFlushall
            | Fault::RedisPaused => [Own, Shared, Shared],
            Fault::PostgresStopped => [Shared, Own, Shared],
            Fault::ClickHouseDown => [Shared, Shared, Own],
            _ => [Shared, Shared, Shared],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Workload {
    HotKey,
    ManyKeys,
}

impl Workload {
    /// (keys, credits per key)
    fn shape(self) -> (usize, u64) {
        match self {
            Workload::HotKey => (1, 20_000),
            Workload::ManyKeys => (1_000, 10),
        }
    }
}

/// One cell's figures, a row of the summary table.
#[derive(Debug, Clone)]
struct Row {
    fault: String,
    workload: Workload,
    summary: Summary,
    lost_reported: u64,
    converged_ms: u128,
}

/// A tiny deterministic generator (xorshift64*), so a seed replays a run's choices.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n.max(1) as u64).unwrap_or(0)
    }
}

/// The node URLs the workers send to; a restarted node gets a new port.
type Urls = Arc<RwLock<Vec<String>>>;

fn urls_of(c: &Cluster) -> Vec<String> {
    c.nodes.iter().map(|n| n.url.clone()).collect()
}

/// What a worker saw: its ops and how many answers were 500s.
struct Recorded {
    ops: Vec<Op>,
    internal_errors: Vec<String>,
}

/// One verification, classified as the history needs it.
async fn verify(
    http: &reqwest::Client,
    url: &str,
    root: &str,
    secret: &str,
) -> Result<Answer, String> {
    let sent = http
        .post(format!("{url}/v2/keys.verifyKey"))
        .bearer_auth(root)
        .json(&json!({ "key": secret }))
        .send()
        .await;
    let response = match sent {
        Ok(r) => r,
        // Refused before anything was sent: nothing spent.
        Err(e) if e.is_connect() => return Ok(Answer::Refused),
        Err(_) => return Ok(Answer::Ambiguous),
    };
    let status = response.status().as_u16();
    let Ok(body) = response.json::<Value>().await else {
        return Ok(Answer::Ambiguous);
    };
    match status {
        200 => {
            let d = &body["data"];
            let credits = d["credits"]
                .as_u64()
                .ok_or_else(|| format!("no credits in {body}"))?;
            match d["code"].as_str() {
                // A node cut off from the hot store states only the ledger's part.
                Some("VALID") if d["creditsExact"] == json!(false) => {
                    Ok(Answer::ValidOnLedger { credits })
                }
                Some("VALID") => Ok(Answer::Valid { credits }),
                Some("USAGE_EXCEEDED") => Ok(Answer::Exceeded { credits }),
                _ => Err(format!("unexpected answer {body}")),
            }
        }
        503 => {
            let kind = body["error"]["type"].as_str().unwrap_or_default();
            Ok(if kind.ends_with("#outcome-unknown") {
                Answer::Ambiguous
            } else {
                Answer::Refused
            })
        }
        500 => Err(format!("500: {body}")),
        _ => Err(format!("unexpected status {status}: {body}")),
    }
}

#[allow(clippy::too_many_arguments)]
async fn worker(
    w: usize,
    urls: Urls,
    root: String,
    secrets: Arc<Vec<String>>,
    started: Instant,
    until: Instant,
    seed: u64,
) -> Recorded {
    let http = reqwest::Client::builder()
        .timeout(CLIENT_TIMEOUT)
        .pool_max_idle_per_host(4)
        .build()
        .expect("client");
    let mut rng = Rng(seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut out = Recorded {
        ops: Vec::new(),
        internal_errors: Vec::new(),
    };
    let mut i = w;
    while Instant::now() < until {
        let (node, url) = {
            let urls = urls.read().unwrap_or_else(|e| e.into_inner());
            let node = i % urls.len();
            (node, urls[node].clone())
        };
        i += 1;
        let key = rng.below(secrets.len());
        let sent_us = micros(started);
        let answer = match verify(&http, &url, &root, &secrets[key]).await {
            Ok(a) => a,
            Err(e) => {
                out.internal_errors.push(e);
                Answer::Ambiguous
            }
        };
        out.ops.push(Op {
            node,
            key,
            cost: 1,
            sent_us,
            answered_us: micros(started),
            answer,
        });
        if answer == Answer::Refused {
            // A node that refuses at once (down, overloaded) is not hammered.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    out
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// `kill -STOP` / `kill -CONT` of a process.
fn signal(pid: u32, sig: &str) {
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {pid}");
}

fn node_pid(c: &Cluster, i: usize) -> u32 {
    c.nodes[i]
        .child()
        .and_then(|p| p.pid())
        .expect("a running process node")
}

fn set_proxies(c: &Cluster, nodes: &[usize], service: Service, mode: ProxyMode) {
    for &i in nodes {
        c.proxy(i, service).set(mode);
    }
}

/// `n` keys of `credits` each (with a daily refill of `credits` when `refills`), made
/// on node 1; returns (api id, key ids, secrets).
async fn make_keys(
    c: &Cluster,
    n: usize,
    credits: u64,
    refills: bool,
) -> (String, Vec<String>, Vec<String>) {
    let node = c.nodes[1].remote();
    let (status, body) = node
        .call("apis.createApi", &c.root_key, json!({ "name": "faults" }))
        .await;
    assert_eq!(status, 200, "{body}");
    let api = body["data"]["apiId"].as_str().expect("apiId").to_owned();
    let mut credits_body = json!({ "remaining": credits });
    if refills {
        credits_body["refill"] = json!({ "interval": "daily", "amount": credits });
    }
    let mut tasks = Vec::new();
    for w in 0..8 {
        let (node, root) = (node.clone(), c.root_key.clone());
        let body = json!({ "apiId": api, "credits": credits_body });
        tasks.push(tokio::spawn(async move {
            let mut made = Vec::new();
            for i in (w..n).step_by(8) {
                let (status, d) = node.call("keys.createKey", &root, body.clone()).await;
                assert_eq!(status, 200, "{d}");
                let d = &d["data"];
                made.push((
                    i,
                    d["keyId"].as_str().expect("keyId").to_owned(),
                    d["key"].as_str().expect("key").to_owned(),
                ));
            }
            made
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("key task"));
    }
    all.sort_by_key(|(i, ..)| *i);
    let (ids, secrets) = all.into_iter().map(|(_, id, s)| (id, s)).unzip();
    (api, ids, secrets)
}

/// SQL's balance of every key of `api` whose hot credits are all back in the ledger
/// (`hot_allocated` 0), by key id.
fn sql_settled(c: &Cluster, api: &str) -> std::collections::HashMap<String, u64> {
    let out = c
        .postgres_query(&format!(
            "SELECT id || ' ' || remaining FROM keys WHERE api_id = '{api}' AND hot_allocated = 0"
        ))
        .unwrap_or_else(|e| panic!("reading the ledger: {e:#}"));
    out.lines()
        .filter_map(|l| {
            let (id, r) = l.split_once(' ')?;
            Some((id.to_owned(), r.trim().parse().ok()?))
        })
        .collect()
}

/// Waits until every key's hot credits are back in SQL, which must happen within
/// `bound` of `stopped`, then (bounded too) until every node's `getKey` agrees with SQL
/// on every key's balance. Returns the balances and when SQL had them all. (`getKey`
/// reads the ledger and the hot store afresh on every call, so agreeing then says the
/// nodes agreed from the moment SQL had every balance.)
async fn converge(
    c: &Cluster,
    api: &str,
    ids: &[String],
    stopped: Instant,
    bound: Duration,
) -> (Vec<u64>, Duration) {
    let settled = loop {
        let at = stopped.elapsed();
        if sql_settled(c, api).len() >= ids.len() {
            break at;
        }
        if at >= bound {
            break at;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("client");
    let urls = urls_of(c);
    let mut finals: Vec<Option<u64>> = vec![None; ids.len()];
    loop {
        let sql = sql_settled(c, api);
        let mut tasks = tokio::task::JoinSet::new();
        for (k, id) in ids.iter().enumerate() {
            let Some(&want) = sql.get(id) else { continue };
            if finals[k] == Some(want) {
                continue;
            }
            let (http, urls, root, id) =
                (http.clone(), urls.clone(), c.root_key.clone(), id.clone());
            tasks.spawn(async move {
                for url in &urls {
                    let got = async {
                        let body: Value = http
                            .post(format!("{url}/v2/keys.getKey"))
                            .bearer_auth(&root)
                            .json(&json!({ "keyId": id }))
                            .send()
                            .await
                            .ok()?
                            .json()
                            .await
                            .ok()?;
                        body["data"]["credits"]["remaining"].as_u64()
                    }
                    .await;
                    if got != Some(want) {
                        return (k, None);
                    }
                }
                (k, Some(want))
            });
            if tasks.len() >= 64 {
                if let Some(Ok((k, v))) = tasks.join_next().await {
                    finals[k] = v;
                }
            }
        }
        while let Some(done) = tasks.join_next().await {
            if let Ok((k, v)) = done {
                finals[k] = v;
            }
        }
        // Settled in SQL and agreed everywhere; SQL re-read so a later change shows.
        let sql = sql_settled(c, api);
        if ids
            .iter()
            .enumerate()
            .all(|(k, id)| finals[k].is_some() && sql.get(id).copied() == finals[k])
        {
            let finals = finals.into_iter().map(|f| f.unwrap_or_default()).collect();
            return (finals, settled);
        }
        let pending = (0..ids.len())
            .filter(|&k| finals[k].is_none() || sql.get(&ids[k]).copied() != finals[k])
            .collect::<Vec<_>>();
        // SQL late, or the nodes still disagreeing well after it (checking 1,000 keys
        // on 3 nodes takes a while itself).
        if settled >= bound || stopped.elapsed() >= bound + Duration::from_secs(10) {
            let first = &ids[pending[0]];
            let row = c
                .postgres_query(&format!(
                    "SELECT remaining || ' allocated ' || hot_allocated FROM keys WHERE id = '{first}'"
                ))
                .unwrap_or_default();
            panic!(
                "{} keys did not converge within {bound:?}: e.g. {first}, SQL remaining {row}, \
                 getKey on the nodes {:?}",
                pending.len(),
                c.remaining_on_every_node(first).await
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// What the `BalanceChanges` cell did to the first key.
#[derive(Debug, Default)]
struct Changes {
    increments: u64,
    set: Option<SetBook>,
}

/// Runs the fault while the load runs; heals it. Returns the changes it made to
/// `changed_key` (the `BalanceChanges` cell).
async fn inject(
    c: &mut Cluster,
    fault: Fault,
    urls: &Urls,
    changed_key: &str,
    started: Instant,
) -> Changes {
    let d = fault.duration();
    let mut changes = Changes::default();
    match fault {
        Fault::NodeKill9 => {
            c.nodes[1].kill9().await;
            tokio::time::sleep(d).await;
            c.restart_node(1).await.expect("restart node 1");
            *urls.write().unwrap_or_else(|e| e.into_inner()) = urls_of(c);
        }
        Fault::NodeStop => {
            let pid = node_pid(c, 1);
            signal(pid, "-STOP");
            tokio::time::sleep(d).await;
            signal(pid, "-CONT");
        }
        Fault::RedisKill9 => {
            let redis = c.redis().expect("own redis");
            redis.kill9().expect("kill -9 redis");
            tokio::time::sleep(d).await;
            redis.start_again().expect("start redis");
        }
        Fault::RedisRestartAof => {
            // Started with an append-only file synced on every write: a graceful
            // restart keeps the data.
            let redis = c.redis().expect("own redis");
            redis.stop().expect("stop redis");
            tokio::time::sleep(d).await;
            redis.start_again().expect("start redis");
        }
        Fault::RedisFlushall => {
            c.redis().expect("own redis").flushall().expect("flushall");
        }
        Fault::RedisPaused => {
            let redis = c.redis().expect("own redis");
            redis.pause().expect("pause");
            tokio::time::sleep(d).await;
            redis.resume().expect("resume");
        }
        Fault::OneNodeCutFromRedis => {
            set_proxies(c, &[0], Service::Redis, ProxyMode::BlackHole);
            tokio::time::sleep(d).await;
            set_proxies(c, &[0], Service::Redis, ProxyMode::Pass);
        }
        Fault::AllNodesCutFromRedis => {
            set_proxies(c, &[0, 1, 2], Service::Redis, ProxyMode::BlackHole);
            tokio::time::sleep(d).await;
            set_proxies(c, &[0, 1, 2], Service::Redis, ProxyMode::Pass);
        }
        Fault::RedisSlow => {
            let slow = ProxyMode::Delay {
                ms: 50,
                jitter_ms: 20,
            };
            set_proxies(c, &[0, 1, 2], Service::Redis, slow);
            tokio::time::sleep(d).await;
            set_proxies(c, &[0, 1, 2], Service::Redis, ProxyMode::Pass);
        }
        Fault::OneNodeCutFromPostgres => {
            set_proxies(c, &[0], Service::Postgres, ProxyMode::BlackHole);
            tokio::time::sleep(d).await;
            set_proxies(c, &[0], Service::Postgres, ProxyMode::Pass);
        }
        Fault::PostgresStopped => {
            let pg = c.postgres().expect("own postgres");
            pg.stop().expect("stop postgres");
            tokio::time::sleep(d).await;
            pg.start_again().expect("start postgres");
        }
        Fault::PostgresSlow => {
            let slow = ProxyMode::Delay {
                ms: 100,
                jitter_ms: 0,
            };
            set_proxies(c, &[0, 1, 2], Service::Postgres, slow);
            tokio::time::sleep(d).await;
            set_proxies(c, &[0, 1, 2], Service::Postgres, ProxyMode::Pass);
        }
        Fault::ClickHouseDown => {
            set_proxies(c, &[0, 1, 2], Service::ClickHouse, ProxyMode::Reset);
            tokio::time::sleep(d).await;
            set_proxies(c, &[0, 1, 2], Service::ClickHouse, ProxyMode::Pass);
        }
        Fault::BalanceChanges => {
            // Increments race the load (the books know them exactly), then one
            // decrement, then a set: the key's last change, checked on its own.
            let node = c.nodes[2].remote();
            let update = |operation: &'static str, value: u64| {
                let node = node.clone();
                let root = c.root_key.clone();
                let key = changed_key.to_owned();
                async move {
                    let (status, body) = node
                        .call(
                            "keys.updateCredits",
                            &root,
                            json!({ "keyId": key, "operation": operation, "value": value }),
                        )
                        .await;
                    assert_eq!(status, 200, "{operation} {value}: {body}");
                }
            };
            let began = Instant::now();
            while began.elapsed() < d / 2 {
                update("increment", INCREMENT).await;
                changes.increments += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            update("decrement", 10).await;
            tokio::time::sleep(d / 2).await;
            let sent_us = micros(started);
            update("set", SET_TO).await;
            changes.set = Some(SetBook {
                value: SET_TO,
                sent_us,
                answered_us: micros(started),
            });
        }
        // The clocks were set when the cluster started (see `run_cell`).
        Fault::ClockAhead => tokio::time::sleep(d).await,
    }
    changes
}

/// What the `BalanceChanges` cell adds to the first key, every 100 ms of the fault's
/// first half, and what it sets the balance to at its end.
const INCREMENT: u64 = 25;
const SET_TO: u64 = 300;

/// Node 0's clock runs this far ahead of the others' in the `ClockAhead` cell.
const CLOCK_AHEAD_MS: i64 = 10_000;
/// UTC midnight comes this long after the cluster starts on node 0's clock (the
/// others reach it `CLOCK_AHEAD_MS` later, after the run), so node 0 applies the
/// keys' daily refill while the others still see the day before.
const MIDNIGHT_ON_NODE_0_MS: i64 = 5_500;

/// Starts a cluster for `faults` (own services where one of them stops or kills one),
/// drives the workload through each fault in turn and checks the whole history.
async fn run_cell(faults: &[Fault], workload: Workload, seed: u64) -> Row {
    let mut own = [Provision::Shared; 3];
    for f in faults {
        for (o, want) in own.iter_mut().zip(f.own()) {
            if want == Provision::Own {
                *o = Provision::Own;
            }
        }
    }
    let mut builder = Cluster::builder()
        .nodes(3)
        .services(own[0], own[1], own[2])
        .chaos_proxies()
        .process_nodes(BIN);
    if faults.contains(&Fault::RedisRestartAof) {
        builder = builder.redis_args(["--appendonly", "yes", "--appendfsync", "always"]);
    }
    let refills = faults.contains(&Fault::ClockAhead);
    let midnight_on_node_0 = Instant::now() + Duration::from_millis(MIDNIGHT_ON_NODE_0_MS as u64);
    if refills {
        // Node 0's clock 10 s ahead of the others', and UTC midnight a few seconds away
        // on it: the keys' daily refill falls due on node 0 during the load while the
        // other nodes still see the day before; it must apply exactly once.
        const DAY_MS: i64 = 86_400_000;
        let now = i64::try_from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        )
        .unwrap_or(0);
        let ahead = (now / DAY_MS + 1) * DAY_MS - (now + MIDNIGHT_ON_NODE_0_MS);
        let others = ahead - CLOCK_AHEAD_MS;
        for (i, skew) in [(0, ahead), (1, others), (2, others)] {
            builder = builder.node_args_for(i, ["--clock-skew-ms".to_owned(), skew.to_string()]);
        }
    }
    let mut c = builder
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let (n, credits) = workload.shape();
    // A long (randomized) run gets credits in proportion, so the keys last through it.
    let planned = lead(faults)
        + faults
            .iter()
            .map(|f| f.duration() + AFTER)
            .sum::<Duration>();
    let credits = credits * (planned.as_secs() / 20).max(1);
    // Keys made on node 1, whose day is the one before node 0's midnight.
    let (api, ids, secrets) = make_keys(&c, n, credits, refills).await;

    let urls: Urls = Arc::new(RwLock::new(urls_of(&c)));
    let secrets = Arc::new(secrets);
    let started = Instant::now();
    if refills {
        println!(
            "  node 0's midnight comes {:?} after the load starts",
            midnight_on_node_0.saturating_duration_since(started)
        );
    }
    let total: Duration = faults
        .iter()
        .map(|f| f.duration() + AFTER)
        .sum::<Duration>()
        + lead(faults);
    let until = started + total;
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            tokio::spawn(worker(
                w,
                urls.clone(),
                c.root_key.clone(),
                secrets.clone(),
                started,
                until,
                seed,
            ))
        })
        .collect();
    tokio::time::sleep(lead(faults)).await;
    let mut changes = Changes::default();
    // When each fault was in force (µs since the load started).
    let mut windows = Vec::new();
    for &fault in faults {
        println!("  fault {fault:?} at {:?}", started.elapsed());
        let from = micros(started);
        let made = inject(&mut c, fault, &urls, &ids[0], started).await;
        windows.push((fault, from, micros(started)));
        changes.increments += made.increments;
        changes.set = made.set.or(changes.set);
        tokio::time::sleep(AFTER).await;
    }
    let mut ops = Vec::new();
    let mut internal = Vec::new();
    for w in workers {
        let r = w.await.expect("worker");
        ops.extend(r.ops);
        internal.extend(r.internal_errors);
    }
    let stopped = Instant::now();
    assert!(
        internal.is_empty(),
        "{} answers were errors, e.g. {:?}",
        internal.len(),
        &internal[..internal.len().min(3)]
    );

    // Convergence: every node and SQL agree on every key once traffic stopped.
    let (finals, converged) = converge(&c, &api, &ids, stopped, CONVERGED_WITHIN).await;
    let converged_ms = converged.as_millis();

    let books: Vec<KeyBook> = finals
        .iter()
        .enumerate()
        .map(|(k, &left)| {
            let added = if k == 0 {
                changes.increments * INCREMENT
            } else {
                0
            };
            let mut book = KeyBook::exact(credits + added, left);
            if k == 0 && changes.increments > 0 {
                book.changed = true;
            }
            if let (0, Some(set)) = (k, changes.set) {
                book.granted = None;
                book.at_most = Some(credits + added + set.value);
                book.set = Some(set);
            }
            if refills {
                // A refill tops the balance up to `credits`: at most once.
                book.granted = None;
                book.changed = true;
                book.at_most = Some(2 * credits);
            }
            book
        })
        .collect();
    let lost = c.reported_lost();
    let summary = match check(&ops, &books, lost) {
        Ok(s) => s,
        Err(v) => {
            panic!("seed {seed}, faults {faults:?}, {workload:?}: the history breaks a rule:\n{v}")
        }
    };
    if refills {
        // The refill applied (and the books allow it once): more was there than the
        // keys were made with.
        let had: u64 = summary.spent + finals.iter().sum::<u64>();
        assert!(
            had > credits * n as u64,
            "no refill applied: {} spent + {} left of {} made",
            summary.spent,
            finals.iter().sum::<u64>(),
            credits * n as u64
        );
    }
    for &(fault, from, to) in &windows {
        if fault == Fault::ClickHouseDown {
            analytics_never_in_the_way(&ops, from, to);
        }
    }
    if faults.contains(&Fault::ClickHouseDown) {
        clickhouse_rows_complete(&c, &api, &ops).await;
    }
    c.shutdown().await.expect("shutdown");
    Row {
        fault: faults
            .iter()
            .map(|f| format!("{f:?}"))
            .collect::<Vec<_>>()
            .join(" + "),
        workload,
        summary,
        lost_reported: lost,
        converged_ms,
    }
}

/// ClickHouse down from `from` to `to` (µs): no verification failed, and they were
/// about as fast as in the seconds before (p99 within 2× + 20 ms: analytics rows are
/// written in the background, never on the request path).
fn analytics_never_in_the_way(ops: &[Op], from: u64, to: u64) {
    let failed = ops
        .iter()
        .filter(|o| matches!(o.answer, Answer::Refused | Answer::Ambiguous))
        .count();
    assert_eq!(
        failed, 0,
        "{failed} verifications failed while ClickHouse was down"
    );
    let p99 = |pick: &dyn Fn(&Op) -> bool| {
        let mut l: Vec<u64> = ops
            .iter()
            .filter(|o| pick(o))
            .map(|o| o.answered_us - o.sent_us)
            .collect();
        l.sort_unstable();
        l.get(l.len().saturating_sub(1) * 99 / 100)
            .copied()
            .unwrap_or(0)
    };
    // The seconds just before the fault, the keys warm by then (see `lead`).
    let warm = u64::try_from(WARM_BEFORE_CLICKHOUSE.as_micros()).unwrap_or(u64::MAX);
    let warm_from = from.saturating_sub(warm);
    let before = p99(&|o| o.sent_us >= warm_from && o.answered_us <= from);
    let during = p99(&|o| o.sent_us >= from && o.answered_us <= to);
    println!("  p99 before ClickHouse went down {before} µs, while it was down {during} µs");
    assert!(
        during <= 2 * before + 20_000,
        "verifications slowed while ClickHouse was down: p99 {during} µs, {before} µs before"
    );
}

/// After ClickHouse came back: every decided verification has its row (written after
/// it returned), or the nodes counted the drops.
async fn clickhouse_rows_complete(c: &Cluster, api: &str, ops: &[Op]) {
    let decided = ops
        .iter()
        .filter(|o| {
            matches!(
                o.answer,
                Answer::Valid { .. } | Answer::ValidOnLedger { .. } | Answer::Exceeded { .. }
            )
        })
        .count() as u64;
    let started = Instant::now();
    loop {
        let rows: u64 = c
            .clickhouse_query(&format!(
                "SELECT count() FROM key_verifications WHERE api_id = '{api}'"
            ))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        let mut dropped = 0;
        for node in &c.nodes {
            dropped +=
                crate::multinode::node_metric(&node.url, "creditgate_analytics_dropped_total")
                    .await;
        }
        if rows + dropped >= decided {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{rows} rows + {dropped} counted drops < {decided} decided verifications"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The summary table's header (`scripts/test --faults` prints it above the rows).
const TABLE_HEADER: &str = "| fault | workload | ops | VALID | of them on the ledger | USAGE_EXCEEDED | refused | ambiguous | unaccounted | lost reported | converged |\n|---|---|---|---|---|---|---|---|---|---|---|";

fn table_row(r: &Row) -> String {
    let s = &r.summary;
    format!(
        "| {} | {:?} | {} | {} | {} | {} | {} | {} | {} | {} | {} ms |",
        r.fault,
        r.workload,
        s.ops,
        s.valid,
        s.on_ledger,
        s.exceeded,
        s.refused,
        s.ambiguous,
        s.unaccounted,
        r.lost_reported,
        r.converged_ms
    )
}

fn print_table(rows: &[Row]) {
    println!("{TABLE_HEADER}");
    for r in rows {
        println!("{}", table_row(r));
    }
}

/// The run's seed: `CREDITGATE_CHAOS_SEED` (a number, or `random` for one from the
/// clock), else a fixed one, so that the default run draws the same faults every time
/// and a red run can be replayed as it was.
fn seed() -> u64 {
    const DEFAULT_SEED: u64 = 20_261_206;
    match std::env::var("CREDITGATE_CHAOS_SEED").ok().as_deref() {
        Some("random") => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| {
                u64::try_from(d.as_nanos() % u128::from(u64::MAX)).unwrap_or(1)
            }),
        Some(s) => s.parse().unwrap_or_else(|_| {
            panic!("CREDITGATE_CHAOS_SEED must be a number or `random`, not {s:?}")
        }),
        None => DEFAULT_SEED,
    }
}

/// One test per cell (`faults::<fault>_<workload>`), so that each runs alone and within
/// the per-test bound. The default run has the cells whose faults no other test covers
/// under load; `scripts/test --faults` runs them all (the rest are ignored otherwise).
/// Each appends its row to `target/fault-matrix.md`, which `--faults` prints.
macro_rules! cells {
    ($($(#[$attr:meta])* $name:ident: $fault:ident, $workload:ident;)*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        $(#[$attr])*
        async fn $name() {
            cell(Fault::$fault, Workload::$workload).await;
        }
    )*};
}

cells! {
    one_node_cut_from_redis_hot_key: OneNodeCutFromRedis, HotKey;
    one_node_cut_from_redis_many_keys: OneNodeCutFromRedis, ManyKeys;
    redis_slow_hot_key: RedisSlow, HotKey;
    redis_slow_many_keys: RedisSlow, ManyKeys;
    #[ignore = "scripts/test --faults"] node_kill9_hot_key: NodeKill9, HotKey;
    #[ignore = "scripts/test --faults"] node_kill9_many_keys: NodeKill9, ManyKeys;
    #[ignore = "scripts/test --faults"] node_stop_hot_key: NodeStop, HotKey;
    #[ignore = "scripts/test --faults"] node_stop_many_keys: NodeStop, ManyKeys;
    #[ignore = "scripts/test --faults"] redis_kill9_hot_key: RedisKill9, HotKey;
    #[ignore = "scripts/test --faults"] redis_kill9_many_keys: RedisKill9, ManyKeys;
    #[ignore = "scripts/test --faults"] redis_restart_aof_hot_key: RedisRestartAof, HotKey;
    #[ignore = "scripts/test --faults"] redis_restart_aof_many_keys: RedisRestartAof, ManyKeys;
    #[ignore = "scripts/test --faults"] redis_flushall_hot_key: RedisFlushall, HotKey;
    #[ignore = "scripts/test --faults"] redis_flushall_many_keys: RedisFlushall, ManyKeys;
    #[ignore = "scripts/test --faults"] redis_paused_hot_key: RedisPaused, HotKey;
    #[ignore = "scripts/test --faults"] redis_paused_many_keys: RedisPaused, ManyKeys;
    #[ignore = "scripts/test --faults"] all_nodes_cut_from_redis_hot_key: AllNodesCutFromRedis, HotKey;
    #[ignore = "scripts/test --faults"] all_nodes_cut_from_redis_many_keys: AllNodesCutFromRedis, ManyKeys;
    #[ignore = "scripts/test --faults"] one_node_cut_from_postgres_hot_key: OneNodeCutFromPostgres, HotKey;
    #[ignore = "scripts/test --faults"] one_node_cut_from_postgres_many_keys: OneNodeCutFromPostgres, ManyKeys;
    #[ignore = "scripts/test --faults"] postgres_stopped_hot_key: PostgresStopped, HotKey;
    #[ignore = "scripts/test --faults"] postgres_stopped_many_keys: PostgresStopped, ManyKeys;
    #[ignore = "scripts/test --faults"] postgres_slow_hot_key: PostgresSlow, HotKey;
    #[ignore = "scripts/test --faults"] postgres_slow_many_keys: PostgresSlow, ManyKeys;
    #[ignore = "scripts/test --faults"] clickhouse_down_hot_key: ClickHouseDown, HotKey;
    #[ignore = "scripts/test --faults"] clickhouse_down_many_keys: ClickHouseDown, ManyKeys;
    #[ignore = "scripts/test --faults"] balance_changes_hot_key: BalanceChanges, HotKey;
    #[ignore = "scripts/test --faults"] balance_changes_many_keys: BalanceChanges, ManyKeys;
    #[ignore = "scripts/test --faults"] clock_ahead_hot_key: ClockAhead, HotKey;
    #[ignore = "scripts/test --faults"] clock_ahead_many_keys: ClockAhead, ManyKeys;
}

async fn cell(fault: Fault, workload: Workload) {
    let seed = seed();
    println!("CREDITGATE_CHAOS_SEED={seed}: {fault:?} × {workload:?}");
    let row = run_cell(&[fault], workload, seed).await;
    print_table(std::slice::from_ref(&row));
    record(&row);
}

/// Appends a cell's row to `target/fault-matrix.md` (the table of a `--faults` run).
fn record(row: &Row) {
    use std::io::Write;
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fault-matrix.md");
    let new = !path.exists();
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
    {
        if new {
            let _ = writeln!(f, "{TABLE_HEADER}");
        }
        let _ = writeln!(f, "{}", table_row(row));
    }
}

/// Faults drawn at random (seeded, printed) one after another under load, the whole
/// history checked at the end. `CREDITGATE_CHAOS_SECS` bounds how long (default 15 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn randomized_faults() {
    let seed = seed();
    println!("CREDITGATE_CHAOS_SEED={seed}");
    let secs: u64 = std::env::var("CREDITGATE_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(15);
    let mut rng = Rng(seed);
    let mut faults = Vec::new();
    let mut planned = Duration::ZERO;
    while planned < Duration::from_secs(secs) {
        let f = RANDOM_FAULTS[rng.below(RANDOM_FAULTS.len())];
        planned += f.duration() + AFTER;
        faults.push(f);
    }
    let workload = if rng.below(2) == 0 {
        Workload::HotKey
    } else {
        Workload::ManyKeys
    };
    println!("faults {faults:?} on {workload:?}");
    let row = run_cell(&faults, workload, seed).await;
    print_table(&[row]);
}
