//! The figures of a run; serialised as the `--json` output of `creditgate loadtest`.

use std::collections::BTreeMap;

use serde::Serialize;

/// Latency percentiles in milliseconds (from an HDR histogram).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LatencyMs {
    pub p50: f64,
    pub p95: f64,
    pub p99: f64,
    pub max: f64,
    pub mean: f64,
}

/// One second of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Second {
    /// Seconds since the start.
    pub t: u64,
    pub requests: u64,
    pub valid: u64,
    pub errors: u64,
    pub p99_ms: f64,
    /// Lowest `credits` in a VALID answer during this second (`None`: no VALID).
    pub min_remaining: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub requests: u64,
    pub valid: u64,
    pub usage_exceeded: u64,
    /// Other verification codes (NOT_FOUND, DISABLED, …) by code.
    pub other_outcomes: BTreeMap<String, u64>,
    /// Failures without a verification answer, by kind (`http 503`,
    /// `http 503 outcome unknown`, `timeout`, `connect`, `transport`,
    /// `dropped_by_client`, …; see [`crate::run::error_kind`]).
    pub errors: BTreeMap<String, u64>,
    /// Seconds from the first send to the last answer.
    pub duration_s: f64,
    /// Answered requests per second.
    pub rps: f64,
    pub latency_ms: LatencyMs,
    /// Requests sent to each node URL.
    pub nodes: BTreeMap<String, u64>,
    /// Lowest `credits` seen in a VALID answer.
    pub min_remaining: Option<u64>,
    /// Every `credits` value of a VALID answer, in arrival order of the answers.
    pub valid_remaining: Vec<u64>,
    pub timeline: Vec<Second>,
    /// Latency histogram for plots: (upper bound in ms, count), ascending.
    pub histogram_ms: Vec<(f64, u64)>,
    /// Request ids of all answers (only with `Plan::keep_request_ids`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub request_ids: Vec<String>,
}

impl Report {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Errors after which the request may or may not have been spent
    /// ([`crate::run::error_kind::AMBIGUOUS`]): the only requests whose credits a run
    /// cannot account for. Every other error spent nothing.
    pub fn ambiguous_count(&self) -> u64 {
        crate::run::error_kind::AMBIGUOUS
            .iter()
            .filter_map(|kind| self.errors.get(*kind))
            .sum()
    }

    /// Errors over requests (0 when nothing was sent).
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            0.0
        } else {
            self.error_count() as f64 / self.requests as f64
        }
    }
}
