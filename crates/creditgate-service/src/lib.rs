//! The service layer: one function per operation, on domain types, between the HTTP
//! handlers and the engine. It owns the order of checks of a verification (DESIGN §2),
//! refill-if-due, the key and credit operations, the caches of keys and root keys and
//! their invalidation across nodes. Handlers extract → call one function here → map.

mod alerts;
mod apis;
mod cache;
mod caller;
pub mod commands;
mod error;
mod history;
mod holds;
mod idempotency;
mod identities;
mod keys;
pub mod metrics;
mod ratelimit;
mod usage;
mod verify;
mod webhooks;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use creditgate_analytics::{Analytics, UsageSource};
use creditgate_domain::{
    hash_secret, Clock, KeyRecord, KeyStore, RatelimitOverride, RootKeyRecord,
};
use creditgate_limiter::{Engine, RateLimiter};

use cache::TtlCache as Cache;

pub use apis::KeyListing;
pub use caller::Caller;
pub use commands::{CreateKey, ListKeys, NamedLimit, UpdateCredits, UpdateKey, Verify};
pub use error::{FieldError, ServiceError};
pub use history::{HistoryPage, HistoryQuery};
pub use holds::{CloseHold, Closing, Reservation, Reserve, DEFAULT_HOLD_TTL_MS, MAX_HOLD_TTL_MS};
pub use idempotency::{
    AfterFailure, Claim, IdemRequest, Ticket, CLAIM_LEASE_MS, MAX_IDEMPOTENCY_KEY_LEN,
};
pub use identities::{CreateIdentity, ListIdentities, UpdateIdentity};
pub use keys::{CreatedKey, KeyView, DEFAULT_BYTE_LENGTH};
pub use ratelimit::{override_for, LimitAnswer, LimitRequest, SetOverride, MAX_LIMIT};
pub use usage::{GetUsage, MAX_USAGE_BUCKETS, MAX_USAGE_RANGE_MS};
pub use verify::{LimitOutcome, Verdict};
pub use webhooks::{
    check_webhook_url, private_ip, CreateWebhookEndpoint, WebhookEndpointPage, MAX_WEBHOOK_URL_LEN,
};

/// Entries live this long in the key caches; writes on this node invalidate at once.
pub const CACHE_TTL: Duration = Duration::from_secs(10);

/// Tells the other nodes to forget a cached key (multi-node mode): a key hash, or
/// [`INVALIDATE_ALL`].
#[async_trait]
pub trait Invalidations: Send + Sync {
    async fn publish(&self, message: &str) -> Result<(), String>;
}

/// The invalidation message that means "forget every cached key".
pub const INVALIDATE_ALL: &str = "*";

/// Settings of this node the service needs.
#[derive(Debug, Clone)]
pub struct ServiceSettings {
    pub node_id: Arc<str>,
    pub region: Arc<str>,
    /// Answer VALID when the backends fail (`--on-backend-failure=allow`).
    pub allow_on_backend_failure: bool,
    /// Webhook endpoints may name loopback and private hosts (`--webhook-allow-private`).
    pub webhook_allow_private: bool,
}

/// The ports and caches one node's operations run on.
#[derive(Clone)]
pub struct Service {
    store: Arc<dyn KeyStore>,
    engine: Arc<Engine>,
    analytics: Analytics,
    clock: Arc<dyn Clock>,
    settings: Arc<ServiceSettings>,
    /// Live keys by secret hash.
    keys: Cache<Arc<KeyRecord>>,
    /// Root keys by secret hash.
    roots: Cache<Arc<RootKeyRecord>>,
    bus: Option<Arc<dyn Invalidations>>,
    /// Rate-limit counters: in process, or on Redis in multi-node mode.
    ratelimiter: Arc<dyn RateLimiter>,
    /// Rate-limit overrides by workspace and namespace.
    overrides: Cache<Arc<Vec<RatelimitOverride>>>,
    /// Where `analytics.getUsage` reads rows (`None`: analytics are not kept).
    usage: Option<Arc<dyn UsageSource>>,
    /// Accounts whose refusal this node recorded lately, with the balance refused.
    refusals: Cache<u64>,
}

/// This node's key caches, for the task that applies other nodes' invalidations (it
/// holds only the caches, so it keeps no store or pool alive).
#[derive(Clone)]
pub struct Caches {
    keys: Cache<Arc<KeyRecord>>,
    roots: Cache<Arc<RootKeyRecord>>,
    overrides: Cache<Arc<Vec<RatelimitOverride>>>,
}

impl Caches {
    /// Applies an invalidation another node published: a key hash, or
    /// [`INVALIDATE_ALL`].
    pub async fn apply(&self, message: &str) {
        if message == INVALIDATE_ALL {
            self.keys.invalidate_all();
            self.roots.invalidate_all();
            self.overrides.invalidate_all();
        } else if let Some(namespace) = message.strip_prefix(ratelimit::OVERRIDES_MESSAGE) {
            self.overrides.invalidate(namespace);
        } else {
            self.keys.invalidate(message);
        }
    }
}

impl Service {
    pub fn new(
        store: Arc<dyn KeyStore>,
        engine: Arc<Engine>,
        analytics: Analytics,
        clock: Arc<dyn Clock>,
        settings: ServiceSettings,
        bus: Option<Arc<dyn Invalidations>>,
        ratelimiter: Arc<dyn RateLimiter>,
    ) -> Self {
        let settings = Arc::new(settings);
        engine.observe_expiries(holds::expiry_recorder(
            store.clone(),
            analytics.clone(),
            clock.clone(),
            settings.clone(),
        ));
        Self {
            store,
            engine,
            analytics,
            clock,
            settings,
            keys: Cache::new(1_000_000, CACHE_TTL),
            roots: Cache::new(10_000, CACHE_TTL),
            bus,
            ratelimiter,
            overrides: Cache::new(10_000, CACHE_TTL),
            usage: None,
            refusals: Cache::new(100_000, alerts::REFUSAL_MEMORY),
        }
    }

    /// Reads usage over time from `source` (the store the analytics sink writes to).
    pub fn with_usage(mut self, source: Arc<dyn UsageSource>) -> Self {
        self.usage = Some(source);
        self
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn analytics(&self) -> &Analytics {
        &self.analytics
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    pub fn settings(&self) -> &ServiceSettings {
        &self.settings
    }

    /// The caller behind a root-key secret, through the cache.
    pub async fn authenticate(&self, secret: &str) -> Result<Caller, ServiceError> {
        let hash = hash_secret(secret);
        if let Some(root) = self.roots.get(&hash) {
            return Ok(Caller(root));
        }
        let Some(found) = self.store.root_key_by_hash(&hash).await? else {
            return Err(ServiceError::Unauthorized(
                "the root key is invalid or was revoked".into(),
            ));
        };
        let found = Arc::new(found);
        self.roots.insert(hash, found.clone());
        Ok(Caller(found))
    }

    /// The key caches, for applying other nodes' invalidations.
    pub fn caches(&self) -> Caches {
        Caches {
            keys: self.keys.clone(),
            roots: self.roots.clone(),
            overrides: self.overrides.clone(),
        }
    }

    /// A live key by the hash of its secret, through the cache: its current secret, or
    /// the one before its last reroll until that one expires.
    async fn key_by_hash(&self, hash: &str) -> Result<Option<Arc<KeyRecord>>, ServiceError> {
        let found = match self.keys.get(hash) {
            Some(k) => k,
            None => {
                let Some(found) = self.store.key_by_hash(hash).await? else {
                    return Ok(None);
                };
                let found = Arc::new(found);
                self.keys.insert(hash.to_owned(), found.clone());
                found
            }
        };
        Ok(Some(found).filter(|k| k.opens_with(hash, self.clock.now_ms())))
    }

    /// Forgets a key on this node at once and tells every other node (best effort: a
    /// node that misses it drops its whole cache when its subscription reconnects).
    async fn invalidate_key(&self, key: &KeyRecord) {
        for hash in std::iter::once(&key.hash).chain(key.previous.as_ref().map(|p| &p.hash)) {
            self.keys.invalidate(hash);
            self.publish(hash).await;
        }
    }

    /// Forgets every cached key on every node (an API was deleted).
    async fn invalidate_all_keys(&self) {
        self.keys.invalidate_all();
        self.publish(INVALIDATE_ALL).await;
    }

    async fn publish(&self, message: &str) {
        if let Some(bus) = &self.bus {
            if let Err(e) = bus.publish(message).await {
                tracing::warn!(error = %e, "cache invalidation not published");
            }
        }
    }
}
