//! `RedisHotStore`: the [`HotStore`] of multi-node mode, on one Redis or a Redis Cluster.
//! Every operation is one Lua script (see [`crate::scripts`]) on the keys of one
//! creditgate key, so each is atomic like a `MemoryHotStore` critical section and, on a
//! cluster, touches one hash slot.
//!
//! Epochs: an epoch is `<marker>:<master_replid>`, where the marker is a random id kept
//! in `cg:epoch` on one Redis, and in one marker key per hash slot on a cluster
//! (`cg:{<tag>}:epoch`, in the slot itself, created with `SET NX` when missing). A
//! restart without persistence, a `FLUSHALL` or a failover changes it — on a cluster,
//! only for the slots of the shard it happened to; a slot moved to another shard gets
//! that shard's `master_replid`, so it too starts a new epoch. Every script receives
//! the epoch the node believes current, checks it against the server's own first
//! (answering "stale" and doing nothing when they differ, after which the node re-reads
//! it and calls again), and treats entries of another epoch as absent: balances of a
//! lost epoch are never spent again, and the ledger writes off what it had allocated to
//! them (per key, at the key's next allocation; on one Redis also at once, by the
//! reconciler).
//!
//! Errors: `Unreachable` when the call certainly did not run (such a call is tried once
//! more, as the connection manager has just started a new connection), `Ambiguous`
//! after a response timeout or a connection lost with the call in flight (never
//! retried), `Other` when a script failed.
//!
//! Expiry: entries holding credits never expire; entries holding nothing expire
//! `empty_entry_ttl` after their last write, so [`HotStore::expire_idle`] has nothing to
//! scan and returns 0.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use creditgate_domain::{Cost, KeyId};
use creditgate_limiter::ports::{
    Credit, CreditReply, Drained, HotEntry, HotError, HotStore, LockToken, SpendReply, TransferFate,
};
use rand::Rng;
use redis::aio::ConnectionManagerConfig;
use redis::ProtocolVersion;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::conn::{invoke, slot_of_tag, tag_of_slot, Call, Conn, Lua, Target};
use crate::error::RedisError;
use crate::link::Link;
use crate::metrics as m;
use crate::scripts::Scripts;

/// The key holding the epoch marker on one Redis.
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
/// multiplexed connection (per cluster node) that reconnects by itself.
pub struct RedisHotStore {
    inner: Arc<Inner>,
    risky_eviction_policy: Option<String>,
    /// How long after it is sent a spend may still be applied: a little less than the
    /// response timeout, after which the caller no longer waits for the answer.
    spend_window: Duration,
    /// Concurrent spends, sent to Redis together.
    spends: SpendBatcher,
}

/// What every call needs: the connection, the scripts, the epochs.
struct Inner {
    conn: Conn,
    scripts: Scripts,
    epochs: Epochs,
    empty_ttl_ms: u64,
    mark_ttl_ms: u64,
    clock: RedisClock,
}

impl std::fmt::Debug for RedisHotStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisHotStore")
            .field("cluster", &self.inner.conn.is_cluster())
            .field("empty_ttl_ms", &self.inner.empty_ttl_ms)
            .field("mark_ttl_ms", &self.inner.mark_ttl_ms)
            .finish_non_exhaustive()
    }
}

/// The epochs this node believes current: one for a single Redis, one per hash slot on
/// a cluster (`<marker of the slot>:<master_replid of the shard serving it>`), read
/// lazily. The scripts check them (see [`crate::scripts`]), so a stale one costs a
/// re-read, never a wrong answer.
struct Epochs {
    cluster: bool,
    /// Single Redis: the one epoch (empty before the first read).
    one: RwLock<Arc<str>>,
    /// Cluster: the epoch of each slot read so far.
    slots: RwLock<HashMap<u16, Arc<str>>>,
    /// Serializes re-reads, so a slow read never overwrites a newer one.
    refresh: tokio::sync::Mutex<()>,
    /// For rate-limiting the warning of an epoch change: seconds since `started`.
    started: std::time::Instant,
    warned_at: AtomicU64,
}

impl Epochs {
    fn new(cluster: bool) -> Self {
        Self {
            cluster,
            one: RwLock::new(Arc::from("")),
            slots: RwLock::new(HashMap::new()),
            refresh: tokio::sync::Mutex::new(()),
            started: std::time::Instant::now(),
            warned_at: AtomicU64::new(0),
        }
    }

    /// The slot of a creditgate key's address on a cluster (`None` on one Redis).
    fn slot(&self, key: &str) -> Option<u16> {
        self.cluster.then(|| slot_of_tag(tag(key)))
    }

    /// The marker key of `slot` (`None`: the one Redis's).
    fn marker_key(slot: Option<u16>) -> String {
        match slot {
            None => EPOCH_KEY.to_owned(),
            Some(slot) => format!("cg:{{{}}}:epoch", tag_of_slot(slot)),
        }
    }

    /// The cached epoch of `slot`, empty when not read yet.
    fn cached(&self, slot: Option<u16>) -> Arc<str> {
        match slot {
            None => self.one.read().unwrap_or_else(|e| e.into_inner()).clone(),
            Some(slot) => self
                .slots
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .get(&slot)
                .cloned()
                .unwrap_or_else(|| Arc::from("")),
        }
    }

    fn store(&self, slot: Option<u16>, epoch: &str) {
        let old = match slot {
            None => {
                let mut one = self.one.write().unwrap_or_else(|e| e.into_inner());
                std::mem::replace(&mut *one, Arc::from(epoch))
            }
            Some(slot) => self
                .slots
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .insert(slot, Arc::from(epoch))
                .unwrap_or_else(|| Arc::from("")),
        };
        if !old.is_empty() && *old != *epoch {
            metrics::counter!(m::EPOCH_CHANGES).increment(1);
            // On a cluster a shard's failover changes thousands of slots' epochs: one
            // warning a second, the rest in the metric.
            let now = self.started.elapsed().as_secs();
            if self.warned_at.swap(now + 1, Ordering::Relaxed) > now {
                return;
            }
            tracing::warn!(
                old = %old,
                new = %epoch,
                slot = ?slot,
                "the Redis hot store lost or replaced its data (new epoch): balances of the old epoch are never spent again (further changes within a second are counted in creditgate_redis_epoch_changes_total)"
            );
        }
    }
}

/// Redis's clock as this node sees it, so that a spend can carry a deadline in Redis's
/// own milliseconds. Each `TIME` sample taken around a call gives `offset = redis −
/// (sent + received) / 2`, on a monotonic local clock; samples whose round trip is too
/// long to be precise are ignored. (On a cluster the shards' clocks are taken as one:
/// a deadline only has to be close, and a shard whose clock runs ahead refuses late
/// spends earlier.)
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

/// A duration as script argument: whole milliseconds in `1..=MAX_INT`.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis())
        .unwrap_or(u64::MAX)
        .clamp(1, crate::MAX_INT)
}

fn random_id() -> String {
    format!("{:016x}", rand::rng().random::<u64>())
}

/// The hash tag of an address: the account's id, or for `<account>@<home>` (a pooled
/// key's entries kept beside its pool's, see `HotStore::colocates`) the home's.
fn tag(address: &str) -> &str {
    address.split_once('@').map_or(address, |(_, home)| home)
}

/// The name of one of an address's keys: `cg:{key}` or `cg:{home}:key`, then `suffix`;
/// all the keys of one address share its hash tag. (Built by appending: every spend
/// names its entry, and `format!` cost several times the instructions.)
fn prefix(address: &str, suffix: &str) -> String {
    let mut name = String::with_capacity(address.len() + suffix.len() + 6);
    name.push_str("cg:{");
    match address.split_once('@') {
        None => {
            name.push_str(address);
            name.push('}');
        }
        Some((account, home)) => {
            name.push_str(home);
            name.push_str("}:");
            name.push_str(account);
        }
    }
    name.push_str(suffix);
    name
}
fn entry_key(key: &str) -> String {
    prefix(key, ":e")
}
fn mark_key(key: &str, transfer_id: &str) -> String {
    let mut name = prefix(key, ":m:");
    name.push_str(transfer_id);
    name
}
fn lock_key(key: &str) -> String {
    prefix(key, ":lock")
}

/// Braces would change the hash tag and could make two keys' names collide; an address
/// names at most one home.
fn check_key(key: &str) -> Result<(), HotError> {
    if key.contains(['{', '}']) || key.matches('@').count() > 1 {
        return Err(HotError::Other(format!(
            "key id {key:?} must not contain '{{', '}}' or more than one '@'"
        )));
    }
    Ok(())
}

fn unexpected<T: std::fmt::Debug>(what: &str, reply: &[T]) -> HotError {
    HotError::Other(format!("unexpected reply to {what}: {reply:?}"))
}

/// A script's reply as non-negative numbers.
fn unsigned(what: &str, r: &[i64]) -> Result<Vec<u64>, HotError> {
    r.iter()
        .map(|v| u64::try_from(*v))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| unexpected(what, r))
}

/// The reply of an entry script that found the node's epoch stale (it did nothing).
const EPOCH_CHANGED: [i64; 1] = [-2];

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

impl RedisHotStore {
    /// Connects to one Redis (see [`RedisHotStore::connect_to`]).
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, RedisError> {
        Self::connect_to(&Target::Single(url.to_owned()), options).await
    }

    /// Connects to one Redis or a cluster, loads the scripts, reads the epoch, and warns
    /// when the server may evict keys that hold credits.
    pub async fn connect_to(target: &Target, options: RedisOptions) -> Result<Self, RedisError> {
        let mut conn =
            Conn::connect(target, options.response_timeout, options.connection_timeout).await?;
        let scripts = Scripts::new();
        for s in scripts.all() {
            s.load(&conn)
                .await
                .map_err(|e| RedisError::Connect(format!("loading a script: {e}")))?;
        }
        let risky_eviction_policy = check_eviction_policy(&mut conn).await;
        let mut links = Vec::with_capacity(SPEND_LANES);
        for _ in 0..SPEND_LANES {
            let mut link =
                Link::for_target(target, options.response_timeout, options.connection_timeout);
            if let Some(link) = &mut link {
                link.connect()
                    .await
                    .map_err(|e| RedisError::Connect(format!("a spend lane's connection: {e}")))?;
            }
            links.push(link);
        }
        let inner = Arc::new(Inner {
            epochs: Epochs::new(conn.is_cluster()),
            conn,
            scripts,
            empty_ttl_ms: millis(options.empty_entry_ttl),
            mark_ttl_ms: millis(options.mark_ttl),
            clock: RedisClock::new(),
        });
        let store = Self {
            spends: SpendBatcher::start(inner.clone(), options.response_timeout, links),
            inner,
            risky_eviction_policy,
            spend_window: options.response_timeout.mul_f64(0.8),
        };
        store
            .inner
            .refresh_epoch(None)
            .await
            .map_err(|e| RedisError::Connect(format!("reading the epoch: {e}")))?;
        Ok(store)
    }

    /// The server's `maxmemory-policy` at connect if it may evict keys without a TTL
    /// (anything but `noeviction` / `volatile-*`), for health reports.
    pub fn risky_eviction_policy(&self) -> Option<&str> {
        self.risky_eviction_policy.as_deref()
    }

    /// Whether the store runs on a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.inner.conn.is_cluster()
    }

    /// Batched spend calls made so far and the spends they carried.
    pub fn spend_batches(&self) -> (u64, u64) {
        let q = &self.spends.queue;
        (
            q.calls.load(Ordering::Relaxed),
            q.spends.load(Ordering::Relaxed),
        )
    }

    /// The epoch `key`'s scripts currently run under, as cached (empty: not read yet).
    pub fn cached_epoch(&self, key: &str) -> Arc<str> {
        let epochs = &self.inner.epochs;
        epochs.cached(epochs.slot(key))
    }

    /// `spend` with the cost passed to the batch script as given, for tests of the
    /// script's own argument checks (negative, fractional, non-numeric costs are errors).
    #[cfg(feature = "testing")]
    pub async fn spend_raw_cost(&self, key: &str, cost: &str) -> Result<SpendReply, HotError> {
        check_key(key)?;
        let deadline = self.inner.clock.deadline(self.spend_window).to_string();
        let r = self
            .inner
            .run_entry(
                &self.inner.scripts.spend_many,
                key,
                None,
                false,
                &[cost, &deadline],
            )
            .await?;
        spend_reply(&unsigned("spend", &r)?)
    }
}

impl Inner {
    /// Re-reads the epoch of `key`'s slot (`None`: the one Redis's, or slot 0's on a
    /// cluster), creating its marker when missing.
    async fn refresh_epoch(&self, key: Option<&str>) -> Result<String, HotError> {
        let slot = if self.epochs.cluster {
            Some(key.map_or(0, |k| slot_of_tag(tag(k))))
        } else {
            None
        };
        // One Redis: serialized, so a slow read never overwrites a newer one. Per slot
        // they run at once; a stale value cached by a race is caught by the next
        // script's epoch check.
        let _serial = match slot {
            None => Some(self.epochs.refresh.lock().await),
            Some(_) => None,
        };
        let mut inv = Call::new(&self.scripts.epoch);
        inv.key(Epochs::marker_key(slot)).arg(random_id());
        let sent = self.clock.local_ms();
        let (marker, replid, secs, micros): (String, String, i64, i64) = self.run(&inv).await?;
        self.clock
            .observe(sent, self.clock.local_ms(), (secs, micros));
        if replid.is_empty() || replid == "nil" {
            return Err(HotError::Other(
                "INFO replication has no master_replid".into(),
            ));
        }
        let epoch = format!("{marker}:{replid}");
        self.epochs.store(slot, &epoch);
        Ok(epoch)
    }

    /// Runs one script (see [`invoke`]).
    async fn run<T: redis::FromRedisValue>(&self, inv: &Call<'_>) -> Result<T, HotError> {
        invoke(&self.conn, inv).await
    }

    /// Runs an entry script on `key` (`mark`: a transfer id whose mark is `KEYS[2]`)
    /// with the common arguments and `args`, under the epoch this node believes
    /// current. If the script finds that epoch stale (`{-2}`, it did nothing), the epoch
    /// is re-read and the script runs once more.
    async fn run_entry<A: redis::ToRedisArgs>(
        &self,
        script: &Lua,
        key: &str,
        mark: Option<&str>,
        overwrite: bool,
        args: &[A],
    ) -> Result<Vec<i64>, HotError> {
        let slot = self.epochs.slot(key);
        for _ in 0..2 {
            let epoch = self.epochs.cached(slot);
            let r = self
                .run_entry_under(script, key, mark, overwrite, &epoch, args)
                .await?;
            if r == EPOCH_CHANGED {
                self.refresh_epoch(Some(key)).await?;
                continue;
            }
            return Ok(r);
        }
        Err(HotError::Unreachable(
            "the hot store's epoch changed twice during one call; nothing was done".into(),
        ))
    }

    /// Runs an entry script once under `epoch` (`{-2}`: the server's is another).
    async fn run_entry_under<A: redis::ToRedisArgs>(
        &self,
        script: &Lua,
        key: &str,
        mark: Option<&str>,
        overwrite: bool,
        epoch: &str,
        args: &[A],
    ) -> Result<Vec<i64>, HotError> {
        let slot = self.epochs.slot(key);
        let mut inv = Call::new(script);
        inv.key(entry_key(key));
        if let Some(transfer_id) = mark {
            inv.key(mark_key(key, transfer_id));
        }
        inv.key(Epochs::marker_key(slot));
        common_args(
            &mut inv,
            epoch,
            self.empty_ttl_ms,
            self.mark_ttl_ms,
            overwrite,
        );
        for a in args {
            inv.arg(a);
        }
        self.run(&inv).await
    }

    /// Runs a script that may replace an entry of another epoch (credit, fence,
    /// resolve). If it finds one (`[-1]`), it runs once more, now allowed to replace it
    /// (the epoch check has just confirmed the node's epoch is the server's). The first
    /// run changed nothing, so running it again is safe.
    async fn run_replacing(
        &self,
        script: &Lua,
        key: &str,
        mark: Option<&str>,
        args: &[u64],
    ) -> Result<Vec<u64>, HotError> {
        let r = replacing(|overwrite| self.run_entry(script, key, mark, overwrite, args)).await?;
        unsigned("an entry script", &r)
    }
}

/// Runs an entry script that may replace an entry of another epoch: first without
/// `overwrite`; if it found such an entry (`[-1]`, nothing done) once more with it. Any
/// other reply, the epoch check's `{-2}` included, is the answer.
async fn replacing<F, Fut>(run: F) -> Result<Vec<i64>, HotError>
where
    F: Fn(bool) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<i64>, HotError>>,
{
    for overwrite in [false, true] {
        let r = run(overwrite).await?;
        if r != [-1] {
            return Ok(r);
        }
    }
    Err(HotError::Other(
        "an entry of another epoch was not replaced".into(),
    ))
}

/// Most spends one batch carries (one script call, `KEYS` of this many entries).
const MAX_SPEND_BATCH: usize = 128;
/// Batches in flight at once (one per lane); spends arriving meanwhile wait for the
/// next batch.
const SPEND_LANES: usize = 2;

/// One caller's spend, waiting for its batch.
struct PendingSpend {
    key: String,
    cost: u64,
    deadline: u64,
    reply: oneshot::Sender<Result<SpendReply, HotError>>,
}

/// Spends of concurrent callers, sent to Redis together: one script call (`SPEND_MANY`)
/// for what queued while earlier batches were in flight (on a cluster, one call per
/// hash slot among them, sent at once). A lone spend goes at once; under
/// load, each round trip carries many, which saves Redis most of its per-call work and
/// this node most of the client's. Each item's reply is exactly what a call of its own
/// would answer with the key's spends applied in the order they were queued.
///
/// Each of [`SPEND_LANES`] long-lived tasks (lanes) takes what is queued, calls Redis,
/// answers, and takes again: a spend is one wake from its caller to a lane, with no
/// task spawned per batch. On one Redis over TCP each lane calls on a connection of its
/// own ([`Link`]); on a cluster through the shared client.
struct SpendBatcher {
    queue: Arc<SpendQueue>,
    lanes: Vec<tokio::task::JoinHandle<()>>,
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

impl SpendBatcher {
    /// One lane per entry of `links` (its connection, `None`: the shared client's).
    fn start(caller: Arc<Inner>, response_timeout: Duration, links: Vec<Option<Link>>) -> Self {
        let queue = Arc::new(SpendQueue::default());
        let lanes = links
            .into_iter()
            .map(|link| tokio::spawn(Self::lane(queue.clone(), caller.clone(), link)))
            .collect();
        Self {
            queue,
            lanes,
            response_timeout,
        }
    }

    async fn spend(&self, key: String, cost: u64, deadline: u64) -> Result<SpendReply, HotError> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(PendingSpend {
                key,
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

    /// One lane: runs the queued spends, a batch at a time, until the batcher is
    /// dropped. (`notify_one` keeps a permit when no lane waits, so a spend queued
    /// between a lane's empty `take` and its wait still wakes it.)
    async fn lane(queue: Arc<SpendQueue>, caller: Arc<Inner>, mut link: Option<Link>) {
        loop {
            let batch = queue.take(MAX_SPEND_BATCH);
            if batch.is_empty() {
                queue.wake.notified().await;
                continue;
            }
            queue.calls.fetch_add(1, Ordering::Relaxed);
            queue
                .spends
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            caller.spend_batch(batch, link.as_mut()).await;
        }
    }
}

impl Drop for SpendBatcher {
    fn drop(&mut self) {
        for lane in &self.lanes {
            lane.abort();
        }
    }
}

impl Inner {
    /// Runs one batch of spends: one call (on the lane's `link` where it has one), or
    /// on a cluster one call per slot, all at once.
    async fn spend_batch(&self, batch: Vec<PendingSpend>, link: Option<&mut Link>) {
        metrics::histogram!(m::SPEND_BATCH_SIZE).record(batch.len() as f64);
        if !self.epochs.cluster {
            return self.spend_group(batch, link).await;
        }
        let mut groups: HashMap<u16, Vec<PendingSpend>> = HashMap::new();
        for item in batch {
            groups
                .entry(slot_of_tag(tag(&item.key)))
                .or_default()
                .push(item);
        }
        futures_util::future::join_all(groups.into_values().map(|g| self.spend_group(g, None)))
            .await;
    }

    /// The spends of one call (one slot on a cluster), answered each. The items are
    /// grouped by key first (a stable sort: each key's spends keep their order), so the
    /// script reads and writes a key's entry once for all of them (`SPEND_MANY`).
    async fn spend_group(&self, mut batch: Vec<PendingSpend>, mut link: Option<&mut Link>) {
        batch.sort_by(|a, b| a.key.cmp(&b.key));
        let Some(first) = batch.first() else {
            return;
        };
        let slot = self.epochs.slot(&first.key);
        let mut reply = None;
        for _ in 0..2 {
            let epoch = self.epochs.cached(slot);
            let mut inv = Call::new(&self.scripts.spend_many);
            for item in &batch {
                inv.key(entry_key(&item.key));
            }
            inv.key(Epochs::marker_key(slot));
            common_args(&mut inv, &epoch, self.empty_ttl_ms, self.mark_ttl_ms, false);
            for item in &batch {
                inv.arg(item.cost).arg(item.deadline);
            }
            let r = match link.as_deref_mut() {
                Some(link) => link.invoke(&inv).await,
                None => self.run::<Vec<i64>>(&inv).await,
            };
            match r {
                Ok(r) if r == EPOCH_CHANGED => {
                    if let Err(e) = self.refresh_epoch(Some(&first.key)).await {
                        reply = Some(Err(e));
                        break;
                    }
                }
                r => {
                    reply = Some(r);
                    break;
                }
            }
        }
        // (Only a call that found the epoch changed even after re-reading it has none.)
        let reply = reply.unwrap_or_else(|| {
            Err(HotError::Unreachable(
                "the hot store's epoch changed twice during one call; nothing was spent".into(),
            ))
        });
        let replies = reply.and_then(|r| {
            if r.len() == 3 * batch.len() {
                unsigned("a batch of spends", &r)
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
    inv: &mut Call<'_>,
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

/// One item's reply: its three numbers of a `SPEND_MANY` reply.
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
async fn check_eviction_policy(conn: &mut Conn) -> Option<String> {
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
    /// One Redis: its epoch. A cluster: the epoch of slot 0 (each slot has its own; see
    /// [`HotStore::epoch_of`]).
    async fn epoch(&self) -> Result<String, HotError> {
        self.inner.refresh_epoch(None).await
    }

    /// Read afresh, as [`HotStore::epoch`]: the ledger writes off what a key had
    /// allocated to any other epoch, so a stale one must never reach it.
    async fn epoch_of(&self, key: &KeyId) -> Result<String, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let epoch = self
            .inner
            .refresh_epoch(self.is_cluster().then_some(key))
            .await?;
        // An address at another home than its own: the ledger keeps an account's hot
        // credits at one home at a time by the home named here.
        Ok(match key.split_once('@') {
            Some((_, home)) => format!("{home}#{epoch}"),
            None => epoch,
        })
    }

    fn one_epoch(&self) -> bool {
        !self.is_cluster()
    }

    /// On a cluster only accounts in one hash slot can be spent together: the engine
    /// keeps a pooled key's entries at its pool's home (`<key>@<pool>`).
    fn colocates(&self) -> bool {
        self.is_cluster()
    }

    /// Once queued, a spend is run by the batcher whether or not its caller still waits.
    fn spend_survives_cancellation(&self) -> bool {
        true
    }

    async fn spend(&self, key: &KeyId, cost: Cost) -> Result<SpendReply, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let deadline = self.inner.clock.deadline(self.spend_window);
        self.spends
            .spend(key.to_owned(), cost.get(), deadline)
            .await
    }

    async fn spend_all(
        &self,
        accounts: &[KeyId],
        cost: Cost,
        probe: bool,
    ) -> Result<(bool, Vec<SpendReply>), HotError> {
        let inner = &self.inner;
        for a in accounts {
            check_key(a.as_str())?;
        }
        let first = accounts.first().map_or("", KeyId::as_str);
        if inner.epochs.cluster && accounts.iter().any(|a| tag(a.as_str()) != tag(first)) {
            return Err(HotError::Other(format!(
                "accounts spent together on a cluster must share one home: {accounts:?}"
            )));
        }
        let slot = inner.epochs.slot(first);
        let mut reply = Vec::new();
        for _ in 0..2 {
            let mut inv = Call::new(&inner.scripts.spend_all);
            for a in accounts {
                inv.key(entry_key(a.as_str()));
            }
            inv.key(Epochs::marker_key(slot));
            common_args(
                &mut inv,
                &inner.epochs.cached(slot),
                inner.empty_ttl_ms,
                inner.mark_ttl_ms,
                false,
            );
            inv.arg(cost.get())
                .arg(u8::from(probe))
                .arg(inner.clock.deadline(self.spend_window));
            reply = inner.run::<Vec<i64>>(&inv).await?;
            if reply != EPOCH_CHANGED {
                break;
            }
            inner.refresh_epoch(slot.map(|_| first)).await?;
        }
        let r = unsigned("spend_all", &reply)?;
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
            epoch,
        } = credit;
        check_key(key)?;
        // Only under the epoch the ledger recorded the allocation with (an address at
        // another home carries it as `<home>#<epoch>`): if the data was lost since,
        // the ledger writes the allocation off with that epoch, so it must not become
        // live in the new one.
        let epoch = epoch.rsplit_once('#').map_or(epoch, |(_, e)| e);
        let inner = &self.inner;
        let args = [generation, amount, unalloc, version];
        let r = replacing(|overwrite| {
            inner.run_entry_under(
                &inner.scripts.credit,
                key,
                Some(transfer_id),
                overwrite,
                epoch,
                &args,
            )
        })
        .await?;
        if r == EPOCH_CHANGED {
            inner.refresh_epoch(Some(key)).await?;
            return Ok(CreditReply::Refused);
        }
        match unsigned("credit", &r)?.as_slice() {
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
        let args = [u64::from(unalloc.is_some()), unalloc.unwrap_or(0), version];
        let inner = &self.inner;
        let r = inner
            .run_entry(&inner.scripts.sync_unalloc, key, None, false, &args)
            .await?;
        match r.as_slice() {
            [0] => Ok(()),
            _ => Err(unexpected("sync_unalloc", &r)),
        }
    }

    async fn drain(
        &self,
        key: &KeyId,
        transfer_id: &str,
        min_idle_ms: u64,
    ) -> Result<Drained, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let inner = &self.inner;
        let r = inner
            .run_entry(
                &inner.scripts.drain,
                key,
                Some(transfer_id),
                false,
                &[min_idle_ms.min(crate::MAX_INT)],
            )
            .await?;
        match unsigned("drain", &r)?.as_slice() {
            &[amount, spent, generation] => Ok(Drained {
                amount,
                spent,
                generation,
            }),
            _ => Err(unexpected("drain", &r)),
        }
    }

    async fn fence(&self, key: &KeyId, generation: u64) -> Result<Drained, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let inner = &self.inner;
        let r = inner
            .run_replacing(&inner.scripts.fence, key, None, &[generation])
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
        let inner = &self.inner;
        let r = inner
            .run_replacing(
                &inner.scripts.resolve,
                key,
                Some(transfer_id),
                &[generation],
            )
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
        let mut inv = Call::new(&self.inner.scripts.lock);
        inv.key(&lock).arg(&token).arg(millis(ttl));
        let r: Vec<i64> = self.inner.run(&inv).await?;
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
        let mut conn = self.inner.conn.clone();
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
        let mut inv = Call::new(&self.inner.scripts.unlock);
        inv.key(lock_key(key)).arg(&token.0);
        let _: i64 = self.inner.run(&inv).await?;
        Ok(())
    }

    async fn peek(&self, key: &KeyId) -> Result<Option<HotEntry>, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let inner = &self.inner;
        let r = inner
            .run_entry::<u64>(&inner.scripts.peek, key, None, false, &[])
            .await?;
        if r.is_empty() {
            return Ok(None);
        }
        match unsigned("peek", &r)?.as_slice() {
            &[bal, unalloc, uvalid, generation, spent, idle_ms] => Ok(Some(HotEntry {
                bal,
                unalloc: (uvalid == 1).then_some(unalloc),
                generation,
                spent,
                idle_ms,
            })),
            _ => Err(unexpected("peek", &r)),
        }
    }

    async fn pending_return(&self, key: &KeyId) -> Result<Option<(String, Drained)>, HotError> {
        let key = key.as_str();
        check_key(key)?;
        let inner = &self.inner;
        let r = inner
            .run_entry::<u64>(&inner.scripts.pending_return, key, None, false, &[])
            .await?;
        if r.is_empty() {
            return Ok(None);
        }
        match unsigned("pending_return", &r)?.as_slice() {
            &[nonce, amount, spent, generation] => Ok(Some((
                format!("drain-{nonce}"),
                Drained {
                    amount,
                    spent,
                    generation,
                },
            ))),
            _ => Err(unexpected("pending_return", &r)),
        }
    }

    async fn returned(&self, key: &KeyId, transfer_id: &str) -> Result<(), HotError> {
        let key = key.as_str();
        check_key(key)?;
        // Only drain-<nonce> transfers are recorded.
        let Some(nonce) = transfer_id
            .strip_prefix("drain-")
            .and_then(|n| n.parse::<u64>().ok())
            .filter(|&n| n <= crate::MAX_INT)
        else {
            return Ok(());
        };
        let inner = &self.inner;
        inner
            .run_entry(&inner.scripts.returned, key, None, false, &[nonce])
            .await?;
        Ok(())
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
        assert!(check_key("a@b@c").is_err());
        assert_eq!(entry_key("key_1@id_2"), "cg:{id_2}:key_1:e");
        assert_eq!(lock_key("key_1@id_2"), "cg:{id_2}:key_1:lock");
        assert_eq!(tag("key_1@id_2"), "id_2");
        assert_eq!(tag("key_1"), "key_1");
        assert!(check_key("key_abc").is_ok());
    }
}
