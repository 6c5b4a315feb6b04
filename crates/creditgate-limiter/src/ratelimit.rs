//! Rate limits: the [`RateLimiter`] port, the fixed-window rule it keeps, and the
//! in-process implementation (the embedded default; Redis runs the same rule in one
//! script, `creditgate-redis`).
//!
//! **The algorithm and its guarantee.** Time is cut into fixed windows of `duration`
//! milliseconds (`[w·duration, (w+1)·duration)` on the limiter's clock: the process's
//! in embedded mode, Redis's `TIME` on Redis, so every node agrees). A check of `cost`
//! passes when the window's counter plus `cost` is at most `limit`, and only then adds
//! `cost`. Every check is one atomic step on its counter, so in every window the costs
//! of passed checks sum to at most `limit`, however many nodes check at once. Several
//! checks in one call are all-or-nothing: either every one passes and every counter
//! grows, or none grows. Counters live as long as their window; a lost store (a Redis
//! restart without persistence) forgets the current windows' counts.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use creditgate_domain::Clock;

/// One counter to check: its name, the limit per window, the window and the cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitCheck {
    /// The counter's name, unique per (workspace, namespace, identifier, duration).
    pub counter: String,
    pub limit: u64,
    pub duration_ms: u64,
    pub cost: u64,
}

/// The state of one counter after a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitState {
    pub limit: u64,
    /// What the window still allows after this call.
    pub remaining: u64,
    /// When the window ends: Unix milliseconds.
    pub reset_ms: u64,
    /// Whether this check alone would pass (the call passes only if every check does).
    pub passed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    /// The store did not answer; nothing was counted.
    #[error("rate limiter unavailable: {0}")]
    Unavailable(String),
    /// The store took the call and did not answer in time: it may have counted.
    #[error("rate limiter did not answer in time: {0}")]
    Ambiguous(String),
    #[error("rate limiter error: {0}")]
    Other(String),
}

#[async_trait]
pub trait RateLimiter: Send + Sync {
    /// Checks every counter at once: all pass and count, or none counts. Answers
    /// whether the call passed and each counter's state.
    async fn limit(&self, checks: &[LimitCheck]) -> Result<(bool, Vec<LimitState>), LimitError>;
}

/// The window a time falls in, and when it ends.
pub fn window(now_ms: u64, duration_ms: u64) -> (u64, u64) {
    let d = duration_ms.max(1);
    let w = now_ms / d;
    (w, w.saturating_add(1).saturating_mul(d))
}

/// The rule, on counters already read for the current windows (`counts[i]` for
/// `checks[i]`): whether the call passes, the count of each check's counter after the
/// call (the last one of a counter named twice is its final count), and each check's
/// state. Checks of one call count as if made one after the other, so a counter named
/// twice sees the first check's cost. Redis's script mirrors it line for line.
pub fn decide(
    now_ms: u64,
    checks: &[LimitCheck],
    counts: &[u64],
) -> (bool, Vec<u64>, Vec<LimitState>) {
    let mut pending: HashMap<&str, u64> = HashMap::new();
    let mut tried = Vec::with_capacity(checks.len());
    for (c, &stored) in checks.iter().zip(counts) {
        let before = pending.get(c.counter.as_str()).copied().unwrap_or(stored);
        let after = before.saturating_add(c.cost);
        tried.push((after <= c.limit, after));
        pending.insert(&c.counter, after);
    }
    let passed = tried.iter().all(|&(fit, _)| fit);
    let mut after = Vec::with_capacity(checks.len());
    let mut states = Vec::with_capacity(checks.len());
    for ((c, &stored), &(fit, counted)) in checks.iter().zip(counts).zip(&tried) {
        // Nothing is counted unless the whole call passes.
        let count = if passed { counted } else { stored };
        after.push(count);
        states.push(LimitState {
            limit: c.limit,
            remaining: c.limit.saturating_sub(count),
            reset_ms: window(now_ms, c.duration_ms).1,
            passed: fit,
        });
    }
    (passed, after, states)
}

/// Counters kept in process before those of ended windows are swept
/// (`creditgate_ratelimit_counters` shows how many are kept).
const MAX_COUNTERS: usize = 1_000_000;

/// Counters in process memory: exact for one process (the embedded default).
pub struct MemoryRateLimiter {
    clock: Arc<dyn Clock>,
    /// Counter name → (end of its window in Unix ms, count in it).
    counters: Mutex<HashMap<String, (u64, u64)>>,
}

impl MemoryRateLimiter {
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        Self {
            clock,
            counters: Mutex::new(HashMap::new()),
        }
    }
}

#[async_trait]
impl RateLimiter for MemoryRateLimiter {
    async fn limit(&self, checks: &[LimitCheck]) -> Result<(bool, Vec<LimitState>), LimitError> {
        let now = u64::try_from(self.clock.now_ms()).unwrap_or(0);
        let mut counters = self
            .counters
            .lock()
            .map_err(|_| LimitError::Other("rate limit counters poisoned".into()))?;
        let counts: Vec<u64> = checks
            .iter()
            .map(|c| match counters.get(&c.counter) {
                Some(&(end, n)) if end == window(now, c.duration_ms).1 => n,
                _ => 0,
            })
            .collect();
        let (passed, after, states) = decide(now, checks, &counts);
        if passed {
            if counters.len() >= MAX_COUNTERS {
                // Counters of ended windows count nothing any more.
                counters.retain(|_, (end, _)| *end > now);
            }
            for (c, n) in checks.iter().zip(after) {
                counters.insert(c.counter.clone(), (window(now, c.duration_ms).1, n));
            }
        }
        metrics::gauge!("creditgate_ratelimit_counters").set(counters.len() as f64);
        Ok((passed, states))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use creditgate_domain::ManualClock;

    fn check(counter: &str, limit: u64, cost: u64) -> LimitCheck {
        LimitCheck {
            counter: counter.into(),
            limit,
            duration_ms: 1_000,
            cost,
        }
    }

    #[tokio::test]
    async fn a_window_passes_at_most_its_limit_and_resets() {
        let clock = Arc::new(ManualClock::new(10_500));
        let rl = MemoryRateLimiter::new(clock.clone());
        let mut passed = 0;
        for _ in 0..5 {
            let (ok, states) = rl.limit(&[check("a", 3, 1)]).await.unwrap();
            assert_eq!(states[0].reset_ms, 11_000);
            passed += u64::from(ok);
        }
        assert_eq!(passed, 3);
        let (ok, states) = rl.limit(&[check("a", 3, 1)]).await.unwrap();
        assert!(!ok);
        assert_eq!(states[0].remaining, 0);
        clock.set(11_000);
        let (ok, states) = rl.limit(&[check("a", 3, 2)]).await.unwrap();
        assert!(ok);
        assert_eq!((states[0].remaining, states[0].reset_ms), (1, 12_000));
    }

    #[tokio::test]
    async fn several_checks_are_all_or_nothing() {
        let clock = Arc::new(ManualClock::new(0));
        let rl = MemoryRateLimiter::new(clock);
        assert!(rl.limit(&[check("b", 1, 1)]).await.unwrap().0);
        // "b" is exhausted: "c" must not count.
        let (ok, states) = rl
            .limit(&[check("c", 5, 1), check("b", 1, 1)])
            .await
            .unwrap();
        assert!(!ok);
        assert!(states[0].passed && !states[1].passed);
        assert_eq!(states[0].remaining, 5);
        let (ok, states) = rl.limit(&[check("c", 5, 5)]).await.unwrap();
        assert!(ok);
        assert_eq!(states[0].remaining, 0);
    }

    #[tokio::test]
    async fn a_counter_named_twice_counts_both_checks() {
        let rl = MemoryRateLimiter::new(Arc::new(ManualClock::new(0)));
        // 2 + 2 on a limit of 3: the second check does not fit, nothing counts.
        let (ok, states) = rl
            .limit(&[check("d", 3, 2), check("d", 3, 2)])
            .await
            .unwrap();
        assert!(!ok);
        assert!(states[0].passed && !states[1].passed);
        let (ok, states) = rl
            .limit(&[check("d", 3, 1), check("d", 3, 2)])
            .await
            .unwrap();
        assert!(ok);
        assert_eq!(states[1].remaining, 0);
        assert!(!rl.limit(&[check("d", 3, 1)]).await.unwrap().0);
    }
}
