//! `keys.verifyKey`: checks in the order of DESIGN.md §2, the first failure decides;
//! nothing is spent before the credit step. Every verification is counted and recorded.

use std::sync::Arc;
use std::time::Instant;

use creditgate_analytics::VerificationEvent;
use creditgate_domain::{hash_secret, Action, Cost, KeyRecord, Outcome};
use creditgate_limiter::{Decision, EngineError};

use crate::{metrics as names, Caller, Service, ServiceError, Verify};

/// The decision on one verification.
#[derive(Debug, Clone)]
pub struct Verdict {
    pub outcome: Outcome,
    /// The key the secret belongs to (`None` when it is not found for this caller).
    pub key: Option<Arc<KeyRecord>>,
    /// Exact balance after the decision (`None`: unlimited or unknown).
    pub remaining: Option<u64>,
    /// Credits this verification spent.
    pub spent: u64,
}

impl Verdict {
    fn without_credits(outcome: Outcome, key: Option<Arc<KeyRecord>>) -> Self {
        Self {
            outcome,
            key,
            remaining: None,
            spent: 0,
        }
    }
}

impl Service {
    /// Verifies a key and spends `cost` if it is valid. `request_id` ties the analytics
    /// row to the request.
    pub async fn verify(
        &self,
        caller: &Caller,
        cmd: Verify,
        request_id: Arc<str>,
    ) -> Result<Verdict, ServiceError> {
        let started = Instant::now();
        let verdict = self.decide(caller, &cmd.secret, cmd.cost).await?;
        let elapsed = started.elapsed();
        names::verifications(verdict.outcome).increment(1);
        names::verify_seconds().record(elapsed.as_secs_f64());
        let key = verdict.key.as_deref();
        self.analytics.verification(VerificationEvent {
            request_id,
            time: self.clock.now_ms(),
            workspace_id: caller.workspace().shared(),
            api_id: key.map_or_else(|| "".into(), |k| k.api_id.shared()),
            key_id: key.map_or_else(|| "".into(), |k| k.id.shared()),
            node_id: self.settings.node_id.clone(),
            region: self.settings.region.clone(),
            outcome: verdict.outcome.as_str(),
            cost: cmd.cost.get(),
            spent_credits: verdict.spent,
            remaining: verdict.remaining,
            latency_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            tags: cmd.tags,
        });
        Ok(verdict)
    }

    async fn decide(
        &self,
        caller: &Caller,
        secret: &str,
        cost: Cost,
    ) -> Result<Verdict, ServiceError> {
        // Unknown, deleted, foreign, or not verifiable with this root key: all NOT_FOUND,
        // so a root key cannot probe for keys it may not see.
        let key = match self.key_by_hash(&hash_secret(secret)).await? {
            Some(k) if caller.sees(&k.workspace_id, Action::VerifyKey, &k.api_id) => k,
            _ => return Ok(Verdict::without_credits(Outcome::NotFound, None)),
        };
        let now = self.clock.now_ms();
        if !key.enabled {
            return Ok(Verdict::without_credits(Outcome::Disabled, Some(key)));
        }
        if key.is_expired(now) {
            return Ok(Verdict::without_credits(Outcome::Expired, Some(key)));
        }
        if !key.limited {
            return Ok(Verdict::without_credits(Outcome::Valid, Some(key)));
        }
        let key = match self.refill_if_due(key, now).await {
            Ok(k) => k,
            // Deleted since it was cached: the ledger row is gone.
            Err(ServiceError::Engine(EngineError::NotFound)) => {
                return Ok(Verdict::without_credits(Outcome::NotFound, None))
            }
            Err(e) => return Err(e),
        };
        // The hot store decides most spends in one step that cancellation cannot cut
        // half-way; anything else (a refill) is spawned so a client that hangs up cannot
        // cancel the engine half-way.
        let decision = match self.engine.spend_fast(&key.id, cost).await {
            Some(decision) => decision,
            None => {
                let engine = self.engine.clone();
                let id = key.id.clone();
                tokio::spawn(async move { engine.spend(&id, cost).await })
                    .await
                    .map_err(|e| ServiceError::Internal(format!("verification task failed: {e}")))?
            }
        };
        match decision {
            Ok(Decision::Valid { remaining }) => Ok(Verdict {
                outcome: Outcome::Valid,
                spent: if remaining.is_some() { cost.get() } else { 0 },
                key: Some(key),
                remaining,
            }),
            Ok(Decision::Exceeded { remaining }) => Ok(Verdict {
                outcome: Outcome::UsageExceeded,
                key: Some(key),
                remaining: Some(remaining),
                spent: 0,
            }),
            Ok(Decision::NotFound) => Ok(Verdict::without_credits(Outcome::NotFound, None)),
            Err(e) => self.on_backend_failure(Some(key), e.into()),
        }
    }

    /// Fails closed, or open with `--on-backend-failure=allow`.
    fn on_backend_failure(
        &self,
        key: Option<Arc<KeyRecord>>,
        e: ServiceError,
    ) -> Result<Verdict, ServiceError> {
        let backend = matches!(e, ServiceError::Engine(_) | ServiceError::Store(_));
        match key {
            Some(key) if backend && self.settings.allow_on_backend_failure => {
                tracing::warn!(key_id = %key.id, error = %e, "backends failed; allowing (on-backend-failure=allow)");
                metrics::counter!(names::FAIL_OPEN).increment(1);
                Ok(Verdict::without_credits(Outcome::Valid, Some(key)))
            }
            _ => Err(e),
        }
    }
}
