//! Shared state of the handlers, built once at startup: the service and the node's HTTP
//! settings.

use std::sync::Arc;

use async_trait::async_trait;
use creditgate_service::{Invalidations, Service};

/// Read-only node settings the HTTP layer needs.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node_id: Arc<str>,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
}

/// What every handler shares, behind one `Arc`: axum clones the state for each
/// extractor and middleware of every request, and a clone must be one reference count,
/// not one per field (the caches alone are several).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

pub struct Shared {
    pub service: Service,
    pub config: NodeSettings,
    pub metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// One permit per request in flight (`max_in_flight` in all).
    pub in_flight: Arc<tokio::sync::Semaphore>,
}

/// Cross-node cache invalidation over Redis pub/sub (multi-node mode).
pub struct RedisInvalidations(pub creditgate_redis::CacheBus);

#[async_trait]
impl Invalidations for RedisInvalidations {
    async fn publish(&self, message: &str) -> Result<(), String> {
        self.0.publish(message).await.map_err(|e| e.to_string())
    }
}
