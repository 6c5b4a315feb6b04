//! `RedisHotStore`: the [`HotStore`] of multi-node mode. Every operation is one Lua script
//! (see [`crate::scripts`]) on the keys of one creditgate key, so each is atomic like a
//! `MemoryHotStore` critical section and runs unchanged on Redis Cluster (one slot).
//!
//! Epochs: the store's epoch is `<marker>:<master_replid>`, where the marker is a random
//! id kept in `cg:epoch` (created with `SET NX` when missing). A restart without
//! persistence, a `FLUSHALL` or a failover changes it. [`HotStore::epoch`] refreshes the
//! cached value (the engine calls it on every refill and reconciler pass); every script
//! receives the cached epoch and treats entries of another epoch as absent, so balances
//! of a lost epoch are never spent again (the ledger writes them off). Before a script
//! replaces an entry of another epoch (credit, fence, resolve), the store re-reads its
//! epoch, so a node whose cached epoch is stale never wipes an entry of the new one.
//!
//! Errors: `Unreachable` when the call certainly did not run (such a call is tried once
//! more, as the connection manager has just started a new connection), `Ambiguous`
//! after a response timeout or a connection lost with the call in flight (never
//! retried), `Other` when a script failed.
//!
//! Expiry: entries holding credits never expire; entries holding nothing expire
//! `empty_entry_ttl` after their last write, so [`HotStore::expire_idle`] has nothing to
//! scan and returns 0.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use creditgate_domain::{Cost, KeyId};
use creditgate_limiter::ports::{
    Credit, CreditReply, Drained, HotEntry, HotError, HotStore, LockToken, SpendReply, TransferFate,
};
use rand::Rng;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ProtocolVersion, ScriptInvocation};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::error::{classify, not_sent, RedisError};
use crate::metrics as m;
use crate::scripts::Scripts;

/// The key holding the epoch marker.
const EPOCH_KEY: &str = "cg:epoch";
/// Longest pause between two checks of a held lock.
const LOCK_POLL_MAX: Duration = Duration::from_millis(8);

/// Settings of the Redis hot store.
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// How long one command may wait for its reply; beyond it the outcome is unknown
    /// (`HotError::Ambiguous`).
    pub response_timeout: Duration,
    /// How long one connection attempt may take.
    pub connection_timeout: Duration,
    /// An entry holding nothing (no balance, no unreported spends) is removed this long
    /// after its last write. Match the engine's `hot_expiry`.
    pub empty_entry_ttl: Duration,
    /// How long transfer ids are remembered (credited / refused / drained), the window
    /// of idempotency and of "a refused transfer is never credited".
    pub mark_ttl: Duration,
}

impl Default for RedisOptions {
    fn default() -> Self {
        Self {
            response_timeout: Duration::from_millis(500),
            connection_timeout: Duration::from_millis(500),
            empty_entry_ttl: Duration::from_secs(60),
            mark_ttl: Duration::from_secs(3600),
        }
    }
}

/// The Redis hot store. Cheap to share behind an `Arc`; calls run concurrently over one
/// multiplexed connection that reconnects by itself.
pub struct RedisHotStore {
    conn: ConnectionManager,
    scripts: Scripts,
    epoch: Arc<RwLock<Arc<str>>>,
    /// Serializes epoch refreshes, so a slow read never overwrites a newer one.
    refresh: tokio::sync::Mutex<()>,
    risky_eviction_policy: Option<String>,
    empty_ttl_ms: u64,
    mark_ttl_ms: u64,
    clock: RedisClock,
    /// How long after it is sent a spend may still be applied: a little less than the
    /// response timeout, after which the caller no longer waits for the answer.
    spend_window: Duration,
    /// Concurrent spends, sent to Redis together.
    spends: SpendBatcher,
}

impl std::fmt::Debug for RedisHotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHotStore")
            .field("epoch", &self.cached_epoch())
            .field("empty_ttl_ms", &self.empty_ttl_ms)
            .field("mark_ttl_ms", &self.mark_ttl_ms)
            .finish_non_exhaustive()
    }
}

/// A duration as script argument: whole milliseconds in `1..=MAX_INT`.
/// Redis's clock as this node sees it, so that a spend can carry a deadline in Redis's
/// own milliseconds. Each `TIME` sample taken around a call gives `offset = redis −
/// (sent + received) / 2`, on a monotonic local clock; samples whose round trip is too
/// long to be precise are ignored.
#[derive(Debug)]
struct RedisClock {
    origin: std::time::Instant,
    /// Redis milliseconds minus local milliseconds since `origin`; `i64::MIN`: unknown.
    offset_ms: AtomicI64,
}

/// A `TIME` sample whose round trip took longer than this does not move the offset.
const MAX_SAMPLE_RTT_MS: i64 = 50;

impl RedisClock {
    fn new() -> Self {
        Self {
            origin: std::time::Instant::now(),
            offset_ms: AtomicI64::new(i64::MIN),
        }
    }

    fn local_ms(&self) -> i64 {
        i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    fn observe(&self, sent: i64, received: i64, (secs, micros): (i64, i64)) {
        if received.saturating_sub(sent) > MAX_SAMPLE_RTT_MS {
            return;
        }
        let redis_ms = secs.saturating_mul(1000).saturating_add(micros / 1000);
        let offset = redis_ms.saturating_sub(sent.saturating_add(received) / 2);
        self.offset_ms.store(offset, Ordering::Relaxed);
    }

    /// Redis's `TIME` in milliseconds `after` from now, or 0 (no deadline) while the
    /// offset is unknown.
    fn deadline(&self, after: Duration) -> u64 {
        let offset = self.offset_ms.load(Ordering::Relaxed);
        if offset == i64::MIN {
            return 0;
        }
        let after = i64::try_from(after.as_millis()).unwrap_or(i64::MAX);
        let at = self.local_ms().saturating_add(offset).saturating_add(after);
        u64::try_from(at).unwrap_or(0)
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, crate::MAX_INT)
}

fn random_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

/// Keys of one creditgate key; all share the hash tag `{key}`.
fn entry_key(key: &str) -> String {
    format!("cg:{{{key}}}:e")
}
fn mark_key(key: &str, transfer_id: &str) -> String {
    format!("cg:{{{key}}}:m:{transfer_id}")
}
fn lock_key(key: &str) -> String {
    format!("cg:{{{key}}}:lock")
}

/// Braces would change the hash tag and could make two keys' names collide.
fn check_key(key: &str) -> Result<(), HotError> {
    if key.contains(['{', '}']) {
        return Err(HotError::Other(format!(
            "key id {key:?} must not contain '{{' or '}}'"
        )));
    }
    Ok(())
}

fn unexpected(what: &str, reply: &[u64]) -> HotError {
    HotError::Other(format!("unexpected reply to {what}: {reply:?}"))
}

/// A client for `url` speaking RESP3, so the connection manager hears of a dropped
/// connection at once and reconnects before the next call.
pub(crate) fn client(url: &str) -> Result<redis::Client, RedisError> {
    let mut info: redis::ConnectionInfo = url
        .parse()
        .map_err(|e: redis::RedisError| RedisError::InvalidUrl(e.to_string()))?;
    info.redis.protocol = ProtocolVersion::RESP3;
    redis::Client::open(info).map_err(|e| RedisError::InvalidUrl(e.to_string()))
}

/// The first attempt only: a caller waits for at most one connection attempt, and the
/// next call after a failure triggers a new one.
pub(crate) fn manager_config(
    response_timeout: Duration,
    connection_timeout: Duration,
) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_number_of_retries(0)
        .set_response_timeout(response_timeout)
        .set_connection_timeout(connection_timeout)
}

/// Parses `master_replid` out of `INFO replication`.
fn master_replid(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("master_replid:"))
        .map(str::trim)
}

impl RedisHotStore {
    /// Connects, loads the scripts, reads the epoch, and warns when the server may evict
    /// keys that hold credits.
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, RedisError> {
        let client = client(url)?;
        let mut conn = ConnectionManager::new_with_config(
            client,
            manager_config(options.response_timeout, options.connection_timeout),
        )
        .await
        .map_err(|e| RedisError::Connect(e.to_string()))?;
        let scripts = Scripts::new();
        for s in scripts.all() {
            s.prepare_invoke()
                .load_async(&mut conn)
                .await
                .map_err(|e| RedisError::Connect(format!("loading a script: {e}")))?;
        }
        let risky_eviction_policy = check_eviction_policy(&mut conn).await;
        let epoch = Arc::new(RwLock::new(Arc::from("")));
        let spends = SpendBatcher::start(
            SpendCaller {
                conn: conn.clone(),
                script: scripts.spend_many.clone(),
                epoch: epoch.clone(),
                empty_ttl_ms: millis(options.empty_entry_ttl),
                mark_ttl_ms: millis(options.mark_ttl),
            },
            options.response_timeout,
        );
        let store = Self {
            spends,
            risky_eviction_policy,
            conn,
            scripts,
            epoch,
            refresh: tokio::sync::Mutex::new(()),
            empty_ttl_ms: millis(options.empty_entry_ttl),
            mark_ttl_ms: millis(options.mark_ttl),
            clock: RedisClock::new(),
            spend_window: options.response_timeout.mul_f64(0.8),
        };
        store
            .refresh_epoch()
            .await
            .map_err(|e| RedisError::Connect(format!("reading the epoch: {e}")))?;
        Ok(store)
    }

    /// The server's `maxmemory-policy` at connect if it may evict keys without a TTL
    /// (anything but `noeviction` / `volatile-*`), for health reports.
    pub fn risky_eviction_policy(&self) -> Option<&str> {
        self.risky_eviction_policy.as_deref()
    }

    /// Batched spend calls made so far and the spends they carried.
    pub fn spend_batches(&self) -> (u64, u64) {
        let q = &self.spends.queue;
        (
            q.calls.load(Ordering::Relaxed),
            q.spends.load(Ordering::Relaxed),
        )
    }

    /// The epoch the scripts currently run under (refreshed by [`HotStore::epoch`]).
    pub fn cached_epoch(&self) -> Arc<str> {
        self.epoch.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn refresh_epoch(&self) -> Result<String, HotError> {
        let _serial = self.refresh.lock().await;
        let mut conn = self.conn.clone();
        let read = || {
            let mut p = redis::pipe();
            p.cmd("GET").arg(EPOCH_KEY).cmd("INFO").arg("replication");
            p.cmd("TIME");
            p
        };
        let sent = self.clock.local_ms();
        let (mut marker, mut info, time): (Option<String>, String, (i64, i64)) =
            self.query_pipe(&mut conn, &read()).await?;
        self.clock.observe(sent, self.clock.local_ms(), time);
        if marker.is_none() {
            // Missing: a new store, or one that lost its data. Create it (first writer
            // wins) and read back whichever marker won.
            let mut p = redis::pipe();
            p.cmd("SET")
                .arg(EPOCH_KEY)
                .arg(random_id())
                .arg("NX")
                .ignore();
            p.cmd("GET").arg(EPOCH_KEY).cmd("INFO").arg("replication");
            p.cmd("TIME");
            let sent = self.clock.local_ms();
            let time;
            (marker, info, time) = self.query_pipe(&mut conn, &p).await?;
            self.clock.observe(sent, self.clock.local_ms(), time);
        }
        let marker = marker.ok_or_else(|| HotError::Other("epoch marker vanished".into()))?;
        let replid = master_replid(&info)
            .ok_or_else(|| HotError::Other("INFO replication has no master_replid".into()))?;
        let epoch = format!("{marker}:{replid}");
        let mut cached = self.epoch.write().unwrap_or_else(|e| e.into_inner());
        if **cached != *epoch {
            if !cached.is_empty() {
                metrics::counter!(m::EPOCH_CHANGES).increment(1);
                tracing::warn!(
                    old = %cached,
                    new = %epoch,
                    "the Redis hot store lost or replaced its data (new epoch): balances of the old epoch are never spent again"
                );
            }
            *cached = Arc::from(epoch.as_str());
        }
        Ok(epoch)
    }

    async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        conn: &mut ConnectionManager,
        p: &redis::Pipeline,
    ) -> Result<T, HotError> {
        match p.query_async(conn).await {
            Err(e) if not_sent(&e) => p.query_async(conn).await.map_err(|e| fail(&e)),
            r => r.map_err(|e| fail(&e)),
        }
    }

    /// Runs one script on the store's connection (see [`invoke`]).
    async fn run<T: redis::FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
    ) -> Result<T, HotError> {
        invoke(&self.conn, inv).await
    }

    /// `spend` with the cost passed to the batch script as given, for tests of the
    /// script's own argument checks (negative, fractional, non-numeric costs are errors).
    #[cfg(feature = "testing")]
    pub async fn spend_raw_cost(&self, key: &str, cost: &str) -> Result<SpendReply, HotError> {
        check_key(key)?;
        let mut inv = self.entry_call(&self.scripts.spend_many, key, None, false);
        inv.arg(cost);
        inv.arg(self.clock.deadline(self.spend_window));
        let r: Vec<u64> = self.run(&inv).await?;
        spend_reply(&r)
    }

    /// An entry-script invocation with the common arguments (cached epoch, TTLs,
    /// `overwrite`); `mark` is `KEYS[2]`. The caller adds the script's own arguments.
    fn entry_call<'a>(
        &self,
        script: &'a redis::Script,
        key: &str,
        mark: Option<&str>,
        overwrite: bool,
    ) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        inv.key(entry_key(key));
        if let Some(transfer_id) = mark {
            inv.key(mark_key(key, transfer_id));
        }
        common_args(
            &mut inv,
            &self.cached_epoch(),
            self.empty_ttl_ms,
            self.mark_ttl_ms,
            overwrite,
        );
        inv
    }

    /// Runs a script that may replace an entry of another epoch (credit, fence,
    /// resolve). If it finds one (`[-1]`), the cached epoch may be the stale one: the
    /// epoch is re-read and the script runs once more, now allowed to replace it. The
    /// first run changed nothing, so running it again is safe.
    async fn run_replacing(
        &self,
        script: &redis::Script,
        key: &str,
        mark: Option<&str>,
        args: &[u64],
    ) -> Result<Vec<u64>, HotError> {
        for overwrite in [false, true] {
            let mut inv = self.entry_call(script, key, mark, overwrite);
            for a in args {
                inv.arg(*a);
            }
            let r: Vec<i64> = self.run(&inv).await?;
            if r == [-1] {
                if !overwrite {
                    self.refresh_epoch().await?;
                }
                continue;
            }
            return r
                .iter()
                .map(|v| u64::try_from(*v))
                .collect::<Result<Vec<u64>, _>>()
                .map_err(|_| HotError::Other(format!("unexpected reply: {r:?}")));
        }
        Err(HotError::Other(
            "an entry of another epoch was not replaced".into(),
        ))
    }
}

/// Runs one script. A call that certainly did not leave (refused connection, a reconnect
/// that had failed before this call) is tried once more, since the manager has started a
/// fresh connection attempt; an ambiguous one never is.
async fn invoke<T: redis::FromRedisValue>(
    conn: &ConnectionManager,
    inv: &ScriptInvocation<'_>,
) -> Result<T, HotError> {
    let mut conn = conn.clone();
    match inv.invoke_async(&mut conn).await {
        Err(e) if not_sent(&e) => inv.invoke_async(&mut conn).await.map_err(|e| fail(&e)),
        r => r.map_err(|e| fail(&e)),
    }
}

/// Counts a failed call by kind and classifies it.
fn fail(e: &redis::RedisError) -> HotError {
    let err = classify(e);
    let kind = match err {
        HotError::Unreachable(_) => "unreachable",
        HotError::Ambiguous(_) => "ambiguous",
        HotError::Other(_) => "other",
    };
    metrics::counter!(m::ERRORS, "kind" => kind).increment(1);
    err
}

/// Most spends one batch carries (one script call, `KEYS` of this many entries).
const MAX_SPEND_BATCH: usize = 128;
/// Batches in flight at once; spends arriving meanwhile wait for the next batch.
const MAX_SPEND_BATCHES_IN_FLIGHT: usize = 2;

/// One caller's spend, waiting for its batch.
struct PendingSpend {
    entry: String,
    cost: u64,
    deadline: u64,
    reply: oneshot::Sender<Result<SpendReply, HotError>>,
}

/// Spends of concurrent callers, sent to Redis together: one script call (`SPEND_MANY`)
/// for what queued while earlier batches were in flight. A lone spend goes at once; under
/// load, each round trip carries many, which saves Redis most of its per-call work and
/// this node most of the client's. Each item's reply is exactly what the one-key
/// `spend_one` would answer, in the order the items were queued.
struct SpendBatcher {
    queue: Arc<SpendQueue>,
    driver: tokio::task::JoinHandle<()>,
    /// How long a caller waits for its answer, queued or in flight, as for a single
    /// call; past it the outcome is unknown (a spend sent later is past its deadline in
    /// Redis and does nothing).
    response_timeout: Duration,
}

#[derive(Default)]
struct SpendQueue {
    pending: std::sync::Mutex<Vec<PendingSpend>>,
    wake: tokio::sync::Notify,
    /// Batch calls made and spends they carried.
    calls: AtomicU64,
    spends: AtomicU64,
}

impl SpendQueue {
    fn take(&self, max: usize) -> Vec<PendingSpend> {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let n = pending.len().min(max);
        pending.drain(..n).collect()
    }
}

/// What a batch call needs of the store.
#[derive(Clone)]
struct SpendCaller {
    conn: ConnectionManager,
    script: redis::Script,
    epoch: Arc<RwLock<Arc<str>>>,
    empty_ttl_ms: u64,
    mark_ttl_ms: u64,
}

impl SpendBatcher {
    fn start(caller: SpendCaller, response_timeout: Duration) -> Self {
        let queue = Arc::new(SpendQueue::default());
        let driver = tokio::spawn(Self::drive(queue.clone(), caller));
        Self {
            queue,
            driver,
            response_timeout,
        }
    }

    async fn spend(&self, entry: String, cost: u64, deadline: u64) -> Result<SpendReply, HotError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(PendingSpend {
                entry,
                cost,
                deadline,
                reply,
            });
        self.queue.wake.notify_one();
        match tokio::time::timeout(self.response_timeout, answer).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(HotError::Ambiguous(
                "the hot store stopped with the spend queued or in flight".into(),
            )),
            Err(_) => {
                metrics::counter!(m::ERRORS, "kind" => "ambiguous").increment(1);
                Err(HotError::Ambiguous(
                    "no answer from Redis within the response timeout".into(),
                ))
            }
        }
    }

    async fn drive(queue: Arc<SpendQueue>, caller: SpendCaller) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SPEND_BATCHES_IN_FLIGHT));
        loop {
            queue.wake.notified().await;
            loop {
                let Ok(slot) = slots.clone().acquire_owned().await else {
                    return;
                };
                let batch = queue.take(MAX_SPEND_BATCH);
                if batch.is_empty() {
                    break;
                }
                queue.calls.fetch_add(1, Ordering::Relaxed);
                queue
                    .spends
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                let caller = caller.clone();
                tokio::spawn(async move {
                    caller.run(batch).await;
                    drop(slot);
                });
            }
        }
    }
}

impl Drop for SpendBatcher {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl SpendCaller {
    async fn run(&self, batch: Vec<PendingSpend>) {
        metrics::histogram!(m::SPEND_BATCH_SIZE).record(batch.len() as f64);
        let epoch = self.epoch.read().unwrap_or_else(|e| e.into_inner()).clone();
        let mut inv = self.script.prepare_invoke();
        for item in &batch {
            inv.key(item.entry.as_str());
        }
        common_args(&mut inv, &epoch, self.empty_ttl_ms, self.mark_ttl_ms, false);
        for item in &batch {
            inv.arg(item.cost).arg(item.deadline);
        }
        let reply: Result<Vec<u64>, HotError> = invoke(&self.conn, &inv).await;
        let replies = reply.and_then(|r| {
            if r.len() == 3 * batch.len() {
                Ok(r)
            } else {
                Err(HotError::Other(format!(
                    "unexpected reply to a batch of {} spends: {} numbers",
                    batch.len(),
                    r.len()
                )))
            }
        });
        match replies {
            Ok(r) => {
                for (item, reply) in batch.into_iter().zip(r.chunks_exact(3)) {
                    let _ = item.reply.send(spend_reply(reply));
                }
            }
            Err(e) => {
                for item in batch {
                    let _ = item.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// `ARGV[1..4]` of every entry script: the cached epoch, the TTLs, `overwrite`.
fn common_args(
    inv: &mut ScriptInvocation<'_>,
    epoch: &str,
    empty_ttl_ms: u64,
    mark_ttl_ms: u64,
    overwrite: bool,
) {
    inv.arg(epoch)
        .arg(empty_ttl_ms)
        .arg(mark_ttl_ms)
        .arg(u8::from(overwrite));
}

/// One item's reply: the numbers of `spend_one` reply, zero-padded to three.
fn spend_reply(r: &[u64]) -> Result<SpendReply, HotError> {
    match *r {
        [0, _, _] => Ok(SpendReply::Miss),
        [1, remaining, bal] => Ok(SpendReply::Valid { remaining, bal }),
        [2, remaining, _] => Ok(SpendReply::Exceeded { remaining }),
        [3, bal, generation] => Ok(SpendReply::Low { bal, generation }),
        // It reached Redis after its deadline and did nothing.
        [4, _, _] => {
            metrics::counter!(m::SPENDS_TOO_LATE).increment(1);
            Err(HotError::Unreachable(
                "the spend reached Redis after its deadline; nothing was spent".into(),
            ))
        }
        _ => Err(unexpected("spend", r)),
    }
}

/// Keys holding credits have no TTL; a policy that evicts such keys under memory
/// pressure (`allkeys-*`) would silently lose balances. Returns such a policy (warned
/// about), `None` when safe or unreadable (`CONFIG` may be disabled on managed Redis).
async fn check_eviction_policy(conn: &mut ConnectionManager) -> Option<String> {
    let reply: redis::RedisResult<std::collections::HashMap<String, String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(conn)
        .await;
    let policy = match reply {
        Ok(mut map) => map.remove("maxmemory-policy")?,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read Redis maxmemory-policy");
            return None;
        }
    };
    if policy == "noeviction" || policy.starts_with("volatile-") {
        return None;
    }
    tracing::warn!(
        policy = %policy,
        "Redis maxmemory-policy may evict keys without a TTL: hot balances could be lost under memory pressure; use noeviction or volatile-*"
    );
    Some(policy)
}

#[async_trait]
impl HotStore for RedisHotStore {
    async fn epoch(&self) -> Result<String, HotError> {
        self.refresh_epoch().await
    }

    /// Once queued, a spend is run by the batcher whether or not its caller still waits.
    fn spend_survives_cancellation(&self) -> bool {
        true
    }

    async fn spend(&self, key: &KeyId, cost: Cost) -> Result<SpendReply, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let deadline = self.clock.deadline(self.spend_window);
        self.spends
            .spend(entry_key(key), cost.get(), deadline)
            .await
    }

    async fn spend_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
        probe: bool,
    ) -> Result<(bool, Vec<SpendReply>), HotError> {
        let mut inv = self.scripts.spend_all.prepare_invoke();
        for a in accounts {
            check_key(a.as_str())?;
            inv.key(entry_key(a.as_str()));
        }
        common_args(
            &mut inv,
            &self.cached_epoch(),
            self.empty_ttl_ms,
            self.mark_ttl_ms,
            false,
        );
        inv.arg(cost.get())
            .arg(u8::from(probe))
            .arg(self.clock.deadline(self.spend_window));
        let r: Vec<u64> = self.run(&inv).await?;
        let (&spent, items) = r.split_first().ok_or_else(|| unexpected("spend_all", &r))?;
        if spent == 4 && items.is_empty() {
            metrics::counter!(m::SPENDS_TOO_LATE).increment(1);
            return Err(HotError::Unreachable(
                "the spend reached Redis after its deadline; nothing was spent".into(),
            ));
        }
        if items.len() != 3 * accounts.len() || spent > 1 {
            return Err(unexpected("spend_all", &r));
        }
        let replies = items
            .chunks(3)
            .map(spend_reply)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((spent == 1, replies))
    }

    async fn credit(&self, key: &KeyId, credit: &Credit<'_>) -> Result<CreditReply, HotError> {
        let key = key.as_str();
        let &Credit {
            transfer_id,
            generation,
            amount,
            unalloc,
            version,
        } = credit;
        check_key(key)?;
        let r = self
            .run_replacing(
                &self.scripts.credit,
                key,
                Some(transfer_id),
                &[generation, amount, unalloc, version],
            )
            .await?;
        match r.as_slice() {
            [0, spent] => Ok(CreditReply::Credited { spent: *spent }),
            [1] => Ok(CreditReply::Duplicate),
            [2] => Ok(CreditReply::Refused),
            _ => Err(unexpected("credit", &r)),
        }
    }

    async fn sync_unalloc(
        &self,
        key: &KeyId,
        unalloc: Option<u64>,
        version: u64,
    ) -> Result<(), HotError> {
        let key = key.as_str();
        check_key(key)?;
        let mut inv = self.entry_call(&self.scripts.sync_unalloc, key, None, false);
        inv.arg(u64::from(unalloc.is_some()))
            .arg(unalloc.unwrap_or(0))
            .arg(version);
        let _: u64 = self.run(&inv).await?;
        Ok(())
    }

    async fn drain(
        &self,
        key: &KeyId,
        transfer_id: &str,
        min_idle_ms: u64,
    ) -> Result<Drained, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let mut inv = self.entry_call(&self.scripts.drain, key, Some(transfer_id), false);
        inv.arg(min_idle_ms.min(crate::MAX_INT));
        let r: Vec<u64> = self.run(&inv).await?;
        match r.as_slice() {
            [amount, spent, generation] => Ok(Drained {
                amount: *amount,
                spent: *spent,
                generation: *generation,
            }),
            _ => Err(unexpected("drain", &r)),
        }
    }

    async fn fence(&self, key: &KeyId, generation: u64) -> Result<Drained, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let r = self
            .run_replacing(&self.scripts.fence, key, None, &[generation])
            .await?;
        match r.as_slice() {
            [amount, spent, generation] => Ok(Drained {
                amount: *amount,
                spent: *spent,
                generation: *generation,
            }),
            _ => Err(unexpected("fence", &r)),
        }
    }

    async fn resolve_transfer(
        &self,
        key: &KeyId,
        transfer_id: &str,
        generation: u64,
    ) -> Result<TransferFate, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let r = self
            .run_replacing(&self.scripts.resolve, key, Some(transfer_id), &[generation])
            .await?;
        match r.as_slice() {
            [0, spent] => Ok(TransferFate::Credited { spent: *spent }),
            [1] => Ok(TransferFate::Refused),
            _ => Err(unexpected("resolve_transfer", &r)),
        }
    }

    async fn lock(
        &self,
        key: &KeyId,
        ttl: Duration,
        wait: Duration,
    ) -> Result<Option<LockToken>, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let token = random_id();
        let lock = lock_key(key);
        let mut inv = self.scripts.lock.prepare_invoke();
        inv.key(&lock).arg(&token).arg(millis(ttl));
        let r: Vec<i64> = self.run(&inv).await?;
        let held_ms = match r.as_slice() {
            [1] => return Ok(Some(LockToken(token))),
            [0, pttl] => u64::try_from(*pttl).unwrap_or(0),
            _ => return Err(HotError::Other(format!("unexpected reply to lock: {r:?}"))),
        };
        // Held: wait for its release (or expiry), at most `wait`, then let the caller
        // retry its spend first; whoever held the lock has probably refilled.
        // (A little past the expiry, so the expired lock is seen gone.)
        let deadline = Instant::now() + wait.min(Duration::from_millis(held_ms) + LOCK_POLL_MAX);
        let mut pause = Duration::from_millis(1);
        let mut conn = self.conn.clone();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(pause.min(deadline - now)).await;
            pause = (pause * 2).min(LOCK_POLL_MAX);
            let pttl: redis::RedisResult<i64> =
                redis::cmd("PTTL").arg(&lock).query_async(&mut conn).await;
            // Released (-2), or a read error: the caller's next spend tells which.
            if !matches!(pttl, Ok(t) if t != -2) {
                return Ok(None);
            }
        }
    }

    async fn unlock(&self, key: &KeyId, token: &LockToken) -> Result<(), HotError> {
        let key = key.as_str();
        check_key(key)?;
        let mut inv = self.scripts.unlock.prepare_invoke();
        inv.key(lock_key(key)).arg(&token.0);
        let _: i64 = self.run(&inv).await?;
        Ok(())
    }

    async fn peek(&self, key: &KeyId) -> Result<Option<HotEntry>, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let inv = self.entry_call(&self.scripts.peek, key, None, false);
        let r: Option<Vec<u64>> = self.run(&inv).await?;
        let Some(r) = r else {
            return Ok(None);
        };
        match r.as_slice() {
            [bal, unalloc, uvalid, generation, spent, idle_ms] => Ok(Some(HotEntry {
                bal: *bal,
                unalloc: (*uvalid == 1).then_some(*unalloc),
                generation: *generation,
                spent: *spent,
                idle_ms: *idle_ms,
            })),
            _ => Err(unexpected("peek", &r)),
        }
    }

    /// Nothing to do: entries holding nothing carry a TTL (`empty_entry_ttl`) and Redis
    /// removes them itself; entries holding credits never expire. Always returns 0.
    async fn expire_idle(&self, _min_idle_ms: u64) -> Result<usize, HotError> {
        Ok(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_share_one_hash_tag() {
        assert_eq!(entry_key("key_1"), "cg:{key_1}:e");
        assert_eq!(mark_key("key_1", "t"), "cg:{key_1}:m:t");
        assert_eq!(lock_key("key_1"), "cg:{key_1}:lock");
        assert!(check_key("a}b").is_err());
        assert!(check_key("key_abc").is_ok());
    }

    #[test]
    fn replid_is_parsed() {
        let info = "# Replication\r\nrole:master\r\nmaster_replid:abc123\r\nmaster_replid2:000\r\n";
        assert_eq!(master_replid(info), Some("abc123"));
        assert_eq!(master_replid("role:master"), None);
    }
}
