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
    /// `rps = max(1, ceil(ceil((credits / cost) / seconds) × load))`: the arrival rate that
    /// would spend `credits` in `seconds`, times `load` (the formula of the multi-node
    /// suite, `calculateUsageRPS`, including its floor of 1 request per second).
    pub fn rate_for(credits: u64, cost: u64, seconds: u64, load: f64) -> u64 {
        let requests = credits / cost.max(1);
        let base = requests.div_ceil(seconds.max(1));
        ceil_to_u64(base as f64 * load).max(1)
    }

    /// Requests an open-loop run sends: `floor(rate × d)` for [`Stop::After`], `n` for
    /// [`Stop::Requests`] (closed loop with [`Stop::After`]: `None`, not known ahead).
    pub fn planned_requests(&self) -> Option<u64> {
        match (&self.mode, self.stop) {
            (_, Stop::Requests(n)) => Some(n),
            (Mode::Open { rate_per_sec }, Stop::After(d)) => {
                // The epsilon keeps 0.1 × 30 s from flooring to 2.
                Some(floor_to_u64(rate_per_sec * d.as_secs_f64() + 1e-9))
            }
            (Mode::Closed { .. }, Stop::After(_)) => None,
        }
    }

    /// The bound on the whole run: once past it nothing new is sent (the rest of a
    /// [`Stop::Requests`] run counts as `not sent` errors) and answers still missing
    /// `request_timeout` later count as `unfinished`.
    ///
    /// - open loop: twice the schedule plus 5 s (the pacer only falls behind when the
    ///   machine is starved);
    /// - closed loop, [`Stop::After`]: the duration (requests in flight then finish);
    /// - closed loop, [`Stop::Requests`]: every worker's share of requests each taking
    ///   the whole `request_timeout` plus the longest think time, plus 5 s.
    pub fn time_bound(&self) -> Duration {
        let slack = Duration::from_secs(5);
        match (&self.mode, self.stop) {
            (Mode::Open { rate_per_sec }, _) => {
                let requests = self.planned_requests().unwrap_or(0);
                let schedule = if *rate_per_sec > 0.0 {
                    Duration::try_from_secs_f64(requests as f64 / rate_per_sec)
                        .unwrap_or(Duration::MAX)
                } else {
                    Duration::ZERO
                };
                schedule.saturating_mul(2).saturating_add(slack)
            }
            (Mode::Closed { .. }, Stop::After(d)) => d,
            (
                Mode::Closed {
                    concurrency,
                    think_time,
                },
                Stop::Requests(n),
            ) => {
                let workers = u64::try_from((*concurrency).max(1)).unwrap_or(u64::MAX);
                let rounds = u32::try_from(n.div_ceil(workers)).unwrap_or(u32::MAX);
                let think = think_time.map_or(Duration::ZERO, |(lo, hi)| lo.max(hi));
                self.request_timeout
                    .saturating_add(think)
                    .saturating_mul(rounds)
                    .saturating_add(slack)
            }
        }
    }
}

/// `ceil(x)` as a `u64`, saturating (`NaN` and negatives: 0).
pub(crate) fn ceil_to_u64(x: f64) -> u64 {
    floor_to_u64(x.ceil())
}

/// `floor(x)` as a `u64`, saturating (`NaN` and negatives: 0).
pub(crate) fn floor_to_u64(x: f64) -> u64 {
    let x = x.floor();
    if x.is_nan() || x <= 0.0 {
        0
    } else if x >= u64::MAX as f64 {
        u64::MAX
    } else {
        // In range, non-negative and integral: the conversion is exact.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = x as u64;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn float_conversions_saturate() {
        assert_eq!(ceil_to_u64(2.1), 3);
        assert_eq!(ceil_to_u64(-1.0), 0);
        assert_eq!(ceil_to_u64(f64::NAN), 0);
        assert_eq!(ceil_to_u64(f64::INFINITY), u64::MAX);
        assert_eq!(floor_to_u64(2.9), 2);
    }
}
