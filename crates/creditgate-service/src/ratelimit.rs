//! Standalone rate limits (`ratelimit.limit`, `ratelimit.multiLimit`): counters named
//! by workspace, namespace, identifier and window, checked all-or-nothing on the
//! node's [`RateLimiter`](creditgate_limiter::RateLimiter). Namespaces need no creation:
//! a namespace exists once a check names it.

use creditgate_domain::Action;
use creditgate_limiter::LimitCheck;

use crate::{Caller, Service, ServiceError};

/// The largest `limit` and `cost` (the Redis script computes in doubles).
pub const MAX_LIMIT: u64 = 1_000_000_000_000;

/// One check, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRequest {
    pub namespace: String,
    pub identifier: String,
    pub limit: u64,
    pub duration_ms: u64,
    pub cost: u64,
}

/// One check's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitAnswer {
    pub request: LimitRequest,
    pub limit: u64,
    pub remaining: u64,
    /// Unix milliseconds when the window ends.
    pub reset_ms: u64,
    /// Whether this check alone fits its window.
    pub passed: bool,
}

impl Service {
    /// Checks every limit at once: all pass and count, or none counts. Answers whether
    /// the call passed, and each check's state.
    pub async fn rate_limit(
        &self,
        caller: &Caller,
        requests: Vec<LimitRequest>,
    ) -> Result<(bool, Vec<LimitAnswer>), ServiceError> {
        caller.require(Action::Limit, None)?;
        let checks: Vec<LimitCheck> = requests
            .iter()
            .map(|r| LimitCheck {
                // Parts are validated to exclude the separator (a unit separator).
                counter: format!(
                    "{}\u{1f}{}\u{1f}{}\u{1f}{}",
                    caller.workspace(),
                    r.namespace,
                    r.identifier,
                    r.duration_ms
                ),
                limit: r.limit,
                duration_ms: r.duration_ms,
                cost: r.cost,
            })
            .collect();
        let (passed, states) = self.ratelimiter.limit(&checks).await?;
        let answers = requests
            .into_iter()
            .zip(states)
            .map(|(request, s)| LimitAnswer {
                request,
                limit: s.limit,
                remaining: s.remaining,
                reset_ms: s.reset_ms,
                passed: s.passed,
            })
            .collect();
        Ok((passed, answers))
    }
}
