//! What a load run does.

use std::time::Duration;

/// How requests arrive.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Paced arrivals at `rate_per_sec`, whatever the answers' latency (open loop).
    /// Latency is measured from each request's intended send time.
    Open { rate_per_sec: f64 },
    /// `concurrency` workers, each sending its next request when the previous one is
    /// answered (closed loop), after an optional random think time.
    Closed {
        concurrency: usize,
        think_time: Option<(Duration, Duration)>,
    },
}

/// When a run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// Send for this long (open mode: `rate × duration` requests).
    After(Duration),
    /// Send exactly this many requests.
    Requests(u64),
}

/// How each request picks its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeChoice {
    /// Uniformly at random, from a seeded generator.
    Random { seed: u64 },
    /// Request `i` goes to node `i % n`.
    RoundRobin,
}

/// A load run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Base URLs of the nodes, e.g. `http://127.0.0.1:7070`.
    pub nodes: Vec<String>,
    /// Root key with `verify_key` permission.
    pub root_key: String,
    /// Secrets of the keys to verify; request `i` uses key `i % keys.len()`.
    pub keys: Vec<String>,
    /// `credits.cost` of every verification.
    pub cost: u64,
    pub mode: Mode,
    pub stop: Stop,
    pub node_choice: NodeChoice,
    /// Bound on one request (beyond it: a `timeout` error).
    pub request_timeout: Duration,
    /// Open mode: requests in flight at most (beyond it arrivals are counted as
    /// `dropped_by_client` errors, never queued without bound).
    pub max_in_flight: usize,
    /// Keep every response's request id (for cross-checking analytics).
    pub keep_request_ids: bool,
}

impl Plan {
    /// `rps = ceil(ceil((credits / cost) / seconds) × load)`: the arrival rate that would
    /// spend `credits` in `seconds`, times `load` (the formula of the multi-node suite).
    pub fn rate_for(credits: u64, cost: u64, seconds: u64, load: f64) -> u64 {
        let requests = credits / cost.max(1);
        let base = requests.div_ceil(seconds.max(1));
        // `load` is a small positive factor; the product fits easily.
        let scaled = (base as f64 * load).ceil();
        if scaled.is_finite() && scaled > 0.0 {
            scaled as u64
        } else {
            0
        }
    }
}
