//! `CacheBus`: cross-node cache invalidation over Redis pub/sub (channel
//! `cg:invalidate`). A node publishes what it changed; every subscriber gets the message
//! on a bounded channel. After every (re)connect, and whenever the subscriber fell behind
//! and messages were dropped, it receives [`CacheBus::ALL`] (`"*"`): it may have missed
//! messages and should drop its whole cache.
//!
//! On a Redis Cluster a message published on any node reaches the subscribers of every
//! node (classic pub/sub is cluster-wide). The bus learns every node of the cluster at
//! connect; a publish goes to the first node that takes it, and a subscriber whose node
//! is lost subscribes on the next one (dropping its cache, as after any reconnect), so
//! losing a master (or any node) does not silence the bus.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncConnectionConfig, PushInfo, PushKind};
use tokio::sync::{mpsc, Notify};

use crate::conn::Target;
use crate::error::RedisError;
use crate::hot::{client, manager_config};
use crate::metrics as m;

/// The pub/sub channel of invalidations.
pub const CHANNEL: &str = "cg:invalidate";
/// Messages a subscriber may have queued before further ones are dropped (and replaced
/// by one `"*"`).
const SUBSCRIBER_QUEUE: usize = 1024;
/// Timeout of one connection attempt and of one command.
const TIMEOUT: Duration = Duration::from_millis(500);
/// A silent subscription is checked with a PING this often.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Reconnect backoff bounds.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Publishes and subscribes to cache invalidations. Clones share the publish
/// connections.
#[derive(Clone)]
pub struct CacheBus {
    /// One Redis, or every node of a cluster.
    clients: Arc<Vec<redis::Client>>,
    /// A connection per client that could be reached at connect.
    publishers: Arc<Vec<ConnectionManager>>,
}

impl std::fmt::Debug for CacheBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBus").finish_non_exhaustive()
    }
}

/// What the connection's push handler tells the subscriber task.
#[derive(Default)]
struct Signals {
    disconnected: AtomicBool,
    overflowed: AtomicBool,
    wake: Notify,
}

impl CacheBus {
    /// The message that tells a subscriber to drop its whole cache.
    pub const ALL: &'static str = "*";

    /// Connects the publish side to one Redis. Subscriptions connect on their own, in
    /// the background.
    pub async fn connect(url: &str) -> Result<CacheBus, RedisError> {
        Self::connect_to(&Target::Single(url.to_owned())).await
    }

    /// Connects the publish side to one Redis or to every node of a cluster (found
    /// through the seeds with `CLUSTER NODES`).
    pub async fn connect_to(target: &Target) -> Result<CacheBus, RedisError> {
        let urls = match target {
            Target::Single(url) => vec![url.clone()],
            Target::Cluster(seeds) => cluster_nodes(seeds).await?,
        };
        let clients = urls
            .iter()
            .map(|u| client(u))
            .collect::<Result<Vec<_>, _>>()?;
        let mut publishers = Vec::new();
        let mut last_error = None;
        for c in &clients {
            match ConnectionManager::new_with_config(c.clone(), manager_config(TIMEOUT, TIMEOUT))
                .await
            {
                Ok(p) => publishers.push(p),
                Err(e) => last_error = Some(e.to_string()),
            }
        }
        if publishers.is_empty() {
            return Err(RedisError::Connect(
                last_error.unwrap_or_else(|| "no Redis node to publish on".into()),
            ));
        }
        Ok(CacheBus {
            clients: Arc::new(clients),
            publishers: Arc::new(publishers),
        })
    }

    /// Publishes one invalidation to every node (best effort: a subscriber that misses it
    /// gets `"*"` when it reconnects).
    ///
    /// An I/O failure is retried once: the connection manager reconnects on it, and a
    /// duplicate invalidation is harmless.
    /// On a cluster, a node that fails the publish is skipped for the next one.
    pub async fn publish(&self, msg: &str) -> Result<(), RedisError> {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(CHANNEL).arg(msg);
        let mut last_error = String::new();
        for publisher in self.publishers.iter() {
            let mut conn = publisher.clone();
            let result = match cmd.query_async::<i64>(&mut conn).await {
                Err(e) if e.is_io_error() => cmd.query_async::<i64>(&mut conn).await,
                r => r,
            };
            match result {
                Ok(_) => return Ok(()),
                Err(e) => last_error = e.to_string(),
            }
        }
        metrics::counter!(m::BUS_PUBLISH_ERRORS).increment(1);
        Err(RedisError::Command(last_error))
    }

    /// A new subscription on its own connection, kept alive (reconnecting with backoff
    /// from 50 ms up to 2 s) until the receiver is dropped. The first message is `"*"`,
    /// once subscribed; another `"*"` follows every reconnect. Spawns a Tokio task.
    pub fn subscribe(&self) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        tokio::spawn(run_subscription(self.clients.clone(), tx));
        rx
    }
}

/// Subscribes on the first node, and on the next one (round robin) whenever the
/// subscription is lost or a node cannot be reached.
async fn run_subscription(clients: Arc<Vec<redis::Client>>, tx: mpsc::Sender<String>) {
    let mut backoff = BACKOFF_MIN;
    let mut next = 0;
    loop {
        if tx.is_closed() {
            return;
        }
        let client = &clients[next % clients.len()];
        let signals = Arc::new(Signals::default());
        let conn = tokio::select! {
            c = connect_subscribed(client, &tx, &signals) => c,
            () = tx.closed() => return,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "cache bus: subscribing failed; retrying");
                next += 1;
                // Every node tried once: wait before the next round.
                if clients.len() > 1 && next % clients.len() != 0 {
                    continue;
                }
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = tx.closed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        metrics::counter!(m::BUS_SUBSCRIBES).increment(1);
        // Subscribed: anything published before now may have been missed.
        if tx.send(CacheBus::ALL.to_owned()).await.is_err() {
            return;
        }
        if !watch(conn, &tx, &signals).await {
            return;
        }
        tracing::warn!("cache bus: subscription lost; reconnecting");
        next += 1;
    }
}

/// A connection subscribed to [`CHANNEL`], forwarding messages to `tx`.
async fn connect_subscribed(
    client: &redis::Client,
    tx: &mpsc::Sender<String>,
    signals: &Arc<Signals>,
) -> redis::RedisResult<MultiplexedConnection> {
    let forward = tx.clone();
    let sig = signals.clone();
    let on_push = move |info: PushInfo| -> Result<(), ()> {
        match info.kind {
            PushKind::Message => {
                let payload = info
                    .data
                    .get(1)
                    .and_then(|v| redis::from_redis_value::<String>(v).ok());
                if let Some(p) = payload {
                    if forward.try_send(p).is_err() {
                        // Full (or closed): the subscriber gets one "*" instead.
                        metrics::counter!(m::BUS_DROPPED).increment(1);
                        sig.overflowed.store(true, Ordering::SeqCst);
                        sig.wake.notify_one();
                    }
                }
            }
            PushKind::Disconnection => {
                sig.disconnected.store(true, Ordering::SeqCst);
                sig.wake.notify_one();
            }
            _ => {}
        }
        Ok(())
    };
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(TIMEOUT)
        .set_response_timeout(TIMEOUT)
        .set_push_sender(on_push);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    conn.subscribe(CHANNEL).await?;
    Ok(conn)
}

/// Serves one subscribed connection until it is lost (`true`) or the receiver is
/// dropped (`false`).
async fn watch(
    mut conn: MultiplexedConnection,
    tx: &mpsc::Sender<String>,
    signals: &Signals,
) -> bool {
    loop {
        let ping_due = tokio::select! {
            () = signals.wake.notified() => false,
            () = tokio::time::sleep(HEALTH_CHECK_EVERY) => true,
            () = tx.closed() => return false,
        };
        if signals.disconnected.load(Ordering::SeqCst) {
            return true;
        }
        if signals.overflowed.swap(false, Ordering::SeqCst)
            && tx.send(CacheBus::ALL.to_owned()).await.is_err()
        {
            return false;
        }
        if ping_due {
            let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
            if let Err(e) = pong {
                tracing::debug!(error = %e, "cache bus: health check failed");
                return true;
            }
        }
    }
}

/// The address of every node of the cluster (masters and replicas), from `CLUSTER
/// NODES` of the first seed that answers, with the seeds' scheme and credentials.
async fn cluster_nodes(seeds: &[String]) -> Result<Vec<String>, RedisError> {
    let mut last_error = String::from("no seed given");
    for seed in seeds {
        let reply: redis::RedisResult<String> = async {
            let mut conn = client(seed)
                .map_err(|e| {
                    redis::RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "url",
                        e.to_string(),
                    ))
                })?
                .get_multiplexed_async_connection()
                .await?;
            redis::cmd("CLUSTER")
                .arg("NODES")
                .query_async(&mut conn)
                .await
        }
        .await;
        match reply {
            Ok(nodes) => {
                let base: redis::ConnectionInfo = seed
                    .parse()
                    .map_err(|e: redis::RedisError| RedisError::InvalidUrl(e.to_string()))?;
                let mut urls: Vec<String> = parse_cluster_nodes(&nodes)
                    .into_iter()
                    .map(|(host, port)| with_address(&base, &host, port))
                    .collect();
                urls.sort();
                urls.dedup();
                if urls.is_empty() {
                    urls = seeds.to_vec();
                }
                return Ok(urls);
            }
            Err(e) => last_error = format!("{seed}: {e}"),
        }
    }
    Err(RedisError::Connect(last_error))
}

/// `(host, port)` of each node line of `CLUSTER NODES` (`<id> <ip:port@cport[,host]> …`),
/// skipping nodes flagged as failed or without an address.
fn parse_cluster_nodes(text: &str) -> Vec<(String, u16)> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let addr = fields.nth(1)?;
            let flags = fields.next()?;
            if flags.contains("fail") || flags.contains("noaddr") {
                return None;
            }
            let addr = addr.split(['@', ',']).next()?;
            let (host, port) = addr.rsplit_once(':')?;
            let port = port.parse().ok()?;
            (!host.is_empty()).then(|| (host.to_owned(), port))
        })
        .collect()
}

/// `base` (scheme, credentials, database) pointed at `host:port`, as a URL.
fn with_address(base: &redis::ConnectionInfo, host: &str, port: u16) -> String {
    let scheme = match base.addr {
        redis::ConnectionAddr::TcpTls { .. } => "rediss",
        _ => "redis",
    };
    let auth = match (&base.redis.username, &base.redis.password) {
        (Some(u), Some(p)) => format!("{u}:{p}@"),
        (None, Some(p)) => format!(":{p}@"),
        _ => String::new(),
    };
    format!("{scheme}://{auth}{host}:{port}/{}", base.redis.db)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_nodes_lines_give_addresses() {
        let text = "07c37 127.0.0.1:30004@31004 slave e7d1e 0 1426238317239 4 connected\n\
                    67ed2 127.0.0.1:30002@31002,host.example master - 0 1426238316232 2 connected 5461-10922\n\
                    292f8 127.0.0.1:30005@31005 master,fail - 0 0 5 disconnected\n\
                    e7d1e :0@0 master,noaddr - 0 0 0 disconnected\n";
        assert_eq!(
            parse_cluster_nodes(text),
            vec![
                ("127.0.0.1".to_owned(), 30004),
                ("127.0.0.1".to_owned(), 30002)
            ]
        );
        let base: redis::ConnectionInfo = "redis://:pw@127.0.0.1:1/0".parse().unwrap();
        assert_eq!(
            with_address(&base, "10.0.0.2", 7001),
            "redis://:pw@10.0.0.2:7001/0"
        );
    }
}
