//! Shared state of the handlers, built once at startup: the service and the node's HTTP
//! settings.

use std::sync::Arc;

use async_trait::async_trait;
use creditgate_service::{Invalidations, Service};

/// Read-only node settings the HTTP layer needs.
#[derive(Debug, Clone)]
pub struct NodeSettings {
    pub node_id: String,
    pub max_body_bytes: usize,
    pub max_in_flight: usize,
}

#[derive(Clone)]
pub struct AppState {
    pub service: Service,
    pub config: Arc<NodeSettings>,
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
