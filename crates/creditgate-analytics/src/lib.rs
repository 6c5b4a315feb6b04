//! Analytics: one [`VerificationEvent`] per verification, one [`RequestEvent`] per API
//! request. The request path hands events to the [`Batcher`] with `try_send` on a
//! bounded channel and never waits; a background task writes batches to a [`Sink`]
//! every `flush_interval` or at `batch_size` rows, retries with backoff, counts what it
//! drops, and flushes what it holds on shutdown.

mod batcher;
pub mod clickhouse;
pub mod usage;

pub use batcher::{Analytics, Batcher, BatcherConfig};
pub use usage::{Granularity, UsageBucket, UsageGroup, UsageQuery, UsageSource};

use std::borrow::Cow;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;

/// One row of `key_verifications`. The strings are shared (`Arc<str>`) or static: an
/// event is built on every verification, and a clone of a shared id is a reference
/// count where a `String` was an allocation, a copy and a free on another thread.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct VerificationEvent {
    pub request_id: Arc<str>,
    /// Unix ms.
    pub time: i64,
    pub workspace_id: Arc<str>,
    /// Empty when the key was not found.
    pub api_id: Arc<str>,
    pub key_id: Arc<str>,
    pub node_id: Arc<str>,
    pub region: Arc<str>,
    pub outcome: &'static str,
    pub cost: u64,
    pub spent_credits: u64,
    /// Balance after the decision; `None` for unlimited or unknown keys.
    pub remaining: Option<u64>,
    pub latency_us: u64,
    pub tags: Vec<String>,
    /// The key's identity; empty when it has none (or the key was not found).
    pub identity_id: Arc<str>,
    /// Names of the rate limits that refused the verification (`RATE_LIMITED`).
    pub exceeded_ratelimits: Vec<String>,
}

/// One row of `api_requests`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RequestEvent {
    pub request_id: Arc<str>,
    pub time: i64,
    /// Empty when the request had no valid root key.
    pub workspace_id: Arc<str>,
    pub method: Cow<'static, str>,
    pub path: Cow<'static, str>,
    pub status: u16,
    pub latency_us: u64,
    pub node_id: Arc<str>,
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

    /// [`Sink::write`] of a batch the caller shares (the batcher's own, kept for its
    /// retries): a sink that writes on a thread of its own overrides it to hand the
    /// batch over instead of copying it.
    async fn write_shared(&self, batch: Arc<Batch>) -> Result<(), SinkError> {
        self.write(&batch).await
    }
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
