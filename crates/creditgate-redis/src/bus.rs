//! `CacheBus`: cross-node cache invalidation over Redis pub/sub (channel
//! `cg:invalidate`). A node publishes what it changed; every subscriber gets the message
//! on a bounded channel. After every (re)connect, and whenever the subscriber fell behind
//! and messages were dropped, it receives [`CacheBus::ALL`] (`"*"`): it may have missed
//! messages and should drop its whole cache.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::{AsyncConnectionConfig, PushInfo, PushKind};
use tokio::sync::{mpsc, Notify};

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

/// Publishes and subscribes to cache invalidations. Clones share one publish connection.
#[derive(Clone)]
pub struct CacheBus {
    client: redis::Client,
    publisher: ConnectionManager,
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

    /// Connects the publish side. Subscriptions connect on their own, in the background.
    pub async fn connect(url: &str) -> Result<CacheBus, RedisError> {
        let client = client(url)?;
        let publisher =
            ConnectionManager::new_with_config(client.clone(), manager_config(TIMEOUT, TIMEOUT))
                .await
                .map_err(|e| RedisError::Connect(e.to_string()))?;
        Ok(CacheBus { client, publisher })
    }

    /// Publishes one invalidation to every node (best effort: a subscriber that misses it
    /// gets `"*"` when it reconnects).
    ///
    /// An I/O failure is retried once: the connection manager reconnects on it, and a
    /// duplicate invalidation is harmless.
    pub async fn publish(&self, msg: &str) -> Result<(), RedisError> {
        let mut conn = self.publisher.clone();
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(CHANNEL).arg(msg);
        let result = match cmd.query_async::<i64>(&mut conn).await {
            Err(e) if e.is_io_error() => cmd.query_async::<i64>(&mut conn).await,
            r => r,
        };
        result.map(|_| ()).map_err(|e| {
            metrics::counter!(m::BUS_PUBLISH_ERRORS).increment(1);
            RedisError::Command(e.to_string())
        })
    }

    /// A new subscription on its own connection, kept alive (reconnecting with backoff
    /// from 50 ms up to 2 s) until the receiver is dropped. The first message is `"*"`,
    /// once subscribed; another `"*"` follows every reconnect. Spawns a Tokio task.
    pub fn subscribe(&self) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        tokio::spawn(run_subscription(self.client.clone(), tx));
        rx
    }
}

async fn run_subscription(client: redis::Client, tx: mpsc::Sender<String>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        if tx.is_closed() {
            return;
        }
        let signals = Arc::new(Signals::default());
        let conn = tokio::select! {
            c = connect_subscribed(&client, &tx, &signals) => c,
            () = tx.closed() => return,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                tracing::debug!(error = %e, "cache bus: subscribing failed; retrying");
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
