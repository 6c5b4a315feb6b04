//! Standalone rate limits (`ratelimit.limit`, `ratelimit.multiLimit`): counters named
//! by workspace, namespace, identifier and window, checked all-or-nothing on the
//! node's [`RateLimiter`](creditgate_limiter::RateLimiter). Namespaces need no creation:
//! a namespace exists once a check or an override names it.
//!
//! **Overrides** (`ratelimit.setOverride` …) give identifiers of a namespace their own
//! limit and window. A check uses the override of exactly its identifier, else the
//! matching pattern (`*` = any run of characters) with the most characters other than
//! `*`, ties going to the smallest pattern. Each node caches a namespace's overrides for
//! [`CACHE_TTL`](crate::CACHE_TTL); a change on one node reaches the others through the
//! cache bus at once, or by the end of that time if a message is lost.

use std::sync::Arc;

use creditgate_domain::{Action, RatelimitOverride};
use creditgate_limiter::LimitCheck;

use crate::{Caller, Service, ServiceError};

/// The prefix of a cache-bus message that makes nodes forget a namespace's overrides
/// (key hashes, the other messages, are hexadecimal).
pub const OVERRIDES_MESSAGE: &str = "overrides:";

/// The cache key of a workspace's namespace.
pub(crate) fn namespace_key(workspace: &str, namespace: &str) -> String {
    format!("{workspace}\u{1f}{namespace}")
}

/// The override that applies to `identifier` among a namespace's.
pub fn override_for<'a>(
    overrides: &'a [RatelimitOverride],
    identifier: &str,
) -> Option<&'a RatelimitOverride> {
    overrides
        .iter()
        .find(|o| o.identifier == identifier)
        .or_else(|| {
            overrides
                .iter()
                .filter(|o| o.is_pattern() && o.matches(identifier))
                .min_by(|a, b| {
                    b.specificity()
                        .cmp(&a.specificity())
                        .then_with(|| a.identifier.cmp(&b.identifier))
                })
        })
}

/// `ratelimit.setOverride`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetOverride {
    pub namespace: String,
    pub identifier: String,
    pub limit: u64,
    pub duration_ms: u64,
}

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
    /// The override whose limit and window applied.
    pub override_id: Option<String>,
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
        let mut applied = Vec::with_capacity(requests.len());
        for r in &requests {
            let overrides = self.namespace_overrides(caller, &r.namespace).await?;
            let found = override_for(&overrides, &r.identifier);
            applied.push(found.map(|o| (o.id.clone(), o.limit, o.duration_ms)));
        }
        let checks: Vec<LimitCheck> = requests
            .iter()
            .zip(&applied)
            .map(|(r, o)| {
                let (limit, duration_ms) =
                    o.as_ref().map_or((r.limit, r.duration_ms), |o| (o.1, o.2));
                LimitCheck {
                    // Parts are validated to exclude the separator (a unit separator).
                    counter: format!(
                        "{}\u{1f}{}\u{1f}{}\u{1f}{}",
                        caller.workspace(),
                        r.namespace,
                        r.identifier,
                        duration_ms
                    ),
                    limit,
                    duration_ms,
                    cost: r.cost,
                }
            })
            .collect();
        let (passed, states) = self.ratelimiter.limit(&checks).await?;
        let answers = requests
            .into_iter()
            .zip(states)
            .zip(applied)
            .map(|((request, s), o)| LimitAnswer {
                request,
                limit: s.limit,
                remaining: s.remaining,
                reset_ms: s.reset_ms,
                passed: s.passed,
                override_id: o.map(|o| o.0),
            })
            .collect();
        Ok((passed, answers))
    }

    /// A namespace's overrides, through this node's cache.
    async fn namespace_overrides(
        &self,
        caller: &Caller,
        namespace: &str,
    ) -> Result<Arc<Vec<RatelimitOverride>>, ServiceError> {
        let key = namespace_key(caller.workspace().as_str(), namespace);
        if let Some(found) = self.overrides.get(&key) {
            return Ok(found);
        }
        let loaded = Arc::new(self.store.overrides(caller.workspace(), namespace).await?);
        self.overrides.insert(key, loaded.clone());
        Ok(loaded)
    }

    /// Forgets a namespace's overrides here, and tells the other nodes.
    async fn overrides_changed(&self, caller: &Caller, namespace: &str) {
        let key = namespace_key(caller.workspace().as_str(), namespace);
        self.overrides.invalidate(&key);
        self.publish(&format!("{OVERRIDES_MESSAGE}{key}")).await;
    }

    pub async fn set_override(
        &self,
        caller: &Caller,
        cmd: SetOverride,
    ) -> Result<RatelimitOverride, ServiceError> {
        caller.require(Action::SetOverride, None)?;
        let now = self.clock.now_ms();
        let wanted = RatelimitOverride {
            id: creditgate_domain::ids::new_id("rlo"),
            workspace_id: caller.workspace().clone(),
            namespace: cmd.namespace,
            identifier: cmd.identifier,
            limit: cmd.limit,
            duration_ms: cmd.duration_ms,
            created_at: now,
            updated_at: None,
        };
        let stored = self.store.set_override(&wanted).await?;
        self.overrides_changed(caller, &stored.namespace).await;
        Ok(stored)
    }

    /// The override of exactly `identifier` (a pattern names itself).
    pub async fn get_override(
        &self,
        caller: &Caller,
        namespace: &str,
        identifier: &str,
    ) -> Result<RatelimitOverride, ServiceError> {
        caller.require(Action::ReadOverride, None)?;
        self.store
            .overrides(caller.workspace(), namespace)
            .await?
            .into_iter()
            .find(|o| o.identifier == identifier)
            .ok_or(ServiceError::OverrideNotFound)
    }

    pub async fn list_overrides(
        &self,
        caller: &Caller,
        namespace: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<RatelimitOverride>, Option<String>), ServiceError> {
        caller.require(Action::ReadOverride, None)?;
        Ok(self
            .store
            .list_overrides(caller.workspace(), namespace, limit, cursor)
            .await?)
    }

    pub async fn delete_override(
        &self,
        caller: &Caller,
        namespace: &str,
        identifier: &str,
    ) -> Result<(), ServiceError> {
        caller.require(Action::DeleteOverride, None)?;
        if !self
            .store
            .delete_override(caller.workspace(), namespace, identifier)
            .await?
        {
            return Err(ServiceError::OverrideNotFound);
        }
        self.overrides_changed(caller, namespace).await;
        Ok(())
    }
}
