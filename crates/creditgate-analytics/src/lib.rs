//! Analytics: one [`VerificationEvent`] per verification, one [`RequestEvent`] per API
//! request. The request path hands events to the [`Batcher`] with `try_send` on a
//! bounded channel and never waits; a background task writes batches to a [`Sink`]
//! every `flush_interval` or at `batch_size` rows, retries with backoff, counts what it
//! drops, and flushes what it holds on shutdown.

mod batcher;
pub mod clickhouse;

pub use batcher::{Analytics, Batcher, BatcherConfig};

use async_trait::async_trait;
use serde::Serialize;

/// One row of `key_verifications`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerificationEvent {
    pub request_id: String,
    /// Unix ms.
    pub time: i64,
    pub workspace_id: String,
    pub api_id: String,
    pub key_id: String,
    pub node_id: String,
    pub region: String,
    pub outcome: String,
    pub cost: u64,
    pub spent_credits: u64,
    /// Balance after the decision; `None` for unlimited or unknown keys.
    pub remaining: Option<u64>,
    pub latency_us: u64,
    pub tags: Vec<String>,
}

/// One row of `api_requests`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestEvent {
    pub request_id: String,
    pub time: i64,
    pub workspace_id: String,
    pub method: String,
    pub path: String,
    pub status: u16,
    pub latency_us: u64,
    pub node_id: String,
}

/// A batch handed to a sink.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    pub verifications: Vec<VerificationEvent>,
    pub requests: Vec<RequestEvent>,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.verifications.len() + self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[derive(Debug, thiserror::Error)]
#[error("analytics sink error: {0}")]
pub struct SinkError(pub String);

/// Where batches go (SQL table, ClickHouse, …). `write` must be all-or-nothing.
#[async_trait]
pub trait Sink: Send + Sync {
    async fn write(&self, batch: &Batch) -> Result<(), SinkError>;
}

/// A sink that keeps nothing (analytics disabled).
#[derive(Debug, Default)]
pub struct NullSink;

#[async_trait]
impl Sink for NullSink {
    async fn write(&self, _batch: &Batch) -> Result<(), SinkError> {
        Ok(())
    }
}
