//! Shared state of the handlers, built once at startup: the ports picked from config.

use std::sync::Arc;
use std::time::Duration;

use creditgate_analytics::Analytics;
use creditgate_domain::{Clock, KeyRecord, KeyStore, RootKeyRecord};
use creditgate_limiter::Engine;
use moka::future::Cache;

use crate::error::ApiError;

/// Read-only node settings the handlers need.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node_id: String,
    pub region: String,
    pub max_body_bytes: usize,
    pub allow_on_backend_failure: bool,
}

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn KeyStore>,
    pub engine: Arc<Engine>,
    pub analytics: Analytics,
    pub clock: Arc<dyn Clock>,
    pub config: Arc<NodeSettings>,
    /// Live keys by secret hash.
    pub keys: Cache<String, Arc<KeyRecord>>,
    /// Root keys by secret hash.
    pub roots: Cache<String, Arc<RootKeyRecord>>,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// Cross-node cache invalidation (multi-node mode).
    pub bus: Option<creditgate_redis::CacheBus>,
}

/// Entries live this long in the key caches; writes on this node invalidate at once.
pub const CACHE_TTL: Duration = Duration::from_secs(10);

pub fn key_cache() -> Cache<String, Arc<KeyRecord>> {
    Cache::builder()
        .max_capacity(1_000_000)
        .time_to_live(CACHE_TTL)
        .build()
}

pub fn root_cache() -> Cache<String, Arc<RootKeyRecord>> {
    Cache::builder()
        .max_capacity(10_000)
        .time_to_live(CACHE_TTL)
        .build()
}

impl AppState {
    /// A live key by the hash of its secret, through the cache.
    pub async fn key_by_hash(&self, hash: &str) -> Result<Option<Arc<KeyRecord>>, ApiError> {
        if let Some(k) = self.keys.get(hash).await {
            return Ok(Some(k));
        }
        let found = self.store.key_by_hash(hash).await?;
        Ok(match found {
            Some(k) => {
                let k = Arc::new(k);
                self.keys.insert(hash.to_owned(), k.clone()).await;
                Some(k)
            }
            None => None,
        })
    }

    /// Applies the key's periodic refill if this is its first use in a new period, so
    /// that every read and change of the balance sees it. The ledger applies a refill
    /// once per period however many nodes race for it.
    pub async fn refill_if_due(
        &self,
        key: Arc<KeyRecord>,
        now: i64,
    ) -> Result<Arc<KeyRecord>, ApiError> {
        let Some(refill) = key.refill else {
            return Ok(key);
        };
        let last = key.last_refill_at.unwrap_or(key.created_at);
        if !key.limited || !refill.is_due(last, now) {
            return Ok(key);
        }
        let op = creditgate_limiter::CreditOp::Refill {
            amount: refill.amount,
            period_start: refill.period_start(now),
        };
        self.engine.update(&key.id, op).await?;
        // Applied here or by another node first: either way this period is done.
        let mut updated = (*key).clone();
        updated.last_refill_at = Some(now);
        let updated = Arc::new(updated);
        self.keys.insert(key.hash.clone(), updated.clone()).await;
        Ok(updated)
    }

    /// Forgets a key on this node at once and tells every other node (best effort: a
    /// node that misses it drops its whole cache when its subscription reconnects).
    pub async fn invalidate_key(&self, hash: &str) {
        self.keys.invalidate(hash).await;
        self.publish(hash).await;
    }

    /// Forgets every cached key on every node (an API was deleted).
    pub async fn invalidate_all_keys(&self) {
        self.keys.invalidate_all();
        self.publish(creditgate_redis::CacheBus::ALL).await;
    }

    async fn publish(&self, msg: &str) {
        if let Some(bus) = &self.bus {
            if let Err(e) = bus.publish(msg).await {
                tracing::warn!(error = %e, "cache invalidation not published");
            }
        }
    }
}
