//! `keys.verifyKey`: checks in the order of DESIGN.md §2, the first failure decides;
//! nothing is spent before the credit step. Every verification is counted and recorded.

use std::sync::Arc;
use std::time::Instant;

use creditgate_analytics::VerificationEvent;
use creditgate_domain::{
    hash_secret, Action, Cost, IdentityRecord, KeyRecord, Outcome, RatelimitRule,
};
use creditgate_limiter::{Decision, EngineError, LimitCheck, SharedDecision, SharedOutcome};

use crate::identities::pool_account;

use crate::{
    metrics as names, Caller, NamedLimit, Service, ServiceError, ServiceSettings, Ticket, Verify,
};

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
    /// The rate limits checked, in the order checked (named ones, then auto-applied).
    pub ratelimits: Vec<LimitOutcome>,
    /// Exact balance of the identity's shared pool after the decision, when it has one
    /// and the decision states it.
    pub pool_remaining: Option<u64>,
    /// Spent on the ledger alone while this node could not reach the hot store:
    /// `remaining` and `pool_remaining` are then the ledger's parts, and each balance
    /// is at least that (the hot store may hold more).
    pub on_ledger: bool,
}

/// One rate limit a verification checked: the rule as applied (overrides included)
/// and its window after the check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitOutcome {
    pub rule: RatelimitRule,
    pub remaining: u64,
    /// Unix milliseconds when the window ends.
    pub reset_ms: u64,
    /// Whether this limit alone refused the verification.
    pub exceeded: bool,
}

impl Verdict {
    fn without_credits(outcome: Outcome, key: Option<Arc<KeyRecord>>) -> Self {
        Self {
            outcome,
            key,
            remaining: None,
            spent: 0,
            ratelimits: Vec::new(),
            pool_remaining: None,
            on_ledger: false,
        }
    }
}

/// The rate limits a verification of `key` checks: those it names (the key's rule of
/// that name, else its identity's, with the request's overrides), then every
/// auto-applied rule not named (the key's, then its identity's whose name the key does
/// not use), at cost 1. A name neither has is a conflict with the key; a name given
/// twice is checked twice, one after the other.
fn limit_checks(
    key: &KeyRecord,
    named: &[NamedLimit],
) -> Result<Vec<(LimitCheck, RatelimitRule)>, ServiceError> {
    let identity_rules = key.identity.as_deref().map_or(&[][..], |i| &i.ratelimits);
    // Counters are named by owner (key or identity), rule name and window; ids hold no
    // unit separator.
    let check = |rule: RatelimitRule, on_key: bool, cost: u64| {
        let owner = match (on_key, key.identity.as_deref()) {
            (false, Some(identity)) => format!("i\u{1f}{}", identity.id),
            _ => format!("k\u{1f}{}", key.id),
        };
        let check = LimitCheck {
            counter: format!("{owner}\u{1f}{}\u{1f}{}", rule.name, rule.duration_ms),
            limit: rule.limit,
            duration_ms: rule.duration_ms,
            cost,
        };
        (check, rule)
    };
    let mut checks = Vec::new();
    for (i, n) in named.iter().enumerate() {
        let (rule, on_key) = match key.ratelimits.iter().find(|r| r.name == n.name) {
            Some(r) => (r, true),
            None => match identity_rules.iter().find(|r| r.name == n.name) {
                Some(r) => (r, false),
                // The request is well-formed; the key is not as it expects (409).
                None => {
                    return Err(ServiceError::Conflict(format!(
                        "body.ratelimits[{i}].name: neither the key nor its identity has a rate \
                         limit named '{}'; nothing was counted or spent: name one of theirs, or \
                         add it with keys.updateKey or identities.updateIdentity",
                        n.name
                    )))
                }
            },
        };
        let rule = RatelimitRule {
            limit: n.limit.unwrap_or(rule.limit),
            duration_ms: n.duration_ms.unwrap_or(rule.duration_ms),
            ..rule.clone()
        };
        checks.push(check(rule, on_key, n.cost));
    }
    let is_named = |name: &str| named.iter().any(|n| n.name == name);
    for r in key.ratelimits.iter().filter(|r| r.auto_apply) {
        if !is_named(&r.name) {
            checks.push(check(r.clone(), true, 1));
        }
    }
    for r in identity_rules.iter().filter(|r| r.auto_apply) {
        let on_key = key.ratelimits.iter().any(|k| k.name == r.name);
        if !on_key && !is_named(&r.name) {
            checks.push(check(r.clone(), false, 1));
        }
    }
    Ok(checks)
}

/// One analytics row of a credit decision: a verification or a hold step.
pub(crate) struct Decided<'a> {
    pub request_id: Arc<str>,
    pub workspace: Arc<str>,
    pub key: Option<&'a KeyRecord>,
    pub outcome: &'static str,
    pub cost: u64,
    pub spent: u64,
    pub remaining: Option<u64>,
    pub started: Instant,
    pub tags: Vec<String>,
    /// Names of the rate limits that refused it.
    pub exceeded: Vec<String>,
}

impl Decided<'_> {
    pub(crate) fn event(self, now_ms: i64, settings: &ServiceSettings) -> VerificationEvent {
        let key = self.key;
        VerificationEvent {
            request_id: self.request_id,
            time: now_ms,
            workspace_id: self.workspace,
            api_id: key.map_or_else(|| "".into(), |k| k.api_id.shared()),
            key_id: key.map_or_else(|| "".into(), |k| k.id.shared()),
            node_id: settings.node_id.clone(),
            region: settings.region.clone(),
            outcome: self.outcome,
            cost: self.cost,
            spent_credits: self.spent,
            remaining: self.remaining,
            latency_us: u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX),
            tags: self.tags,
            identity_id: key
                .and_then(|k| k.identity.as_deref())
                .map_or_else(|| "".into(), |i| i.id.shared()),
            exceeded_ratelimits: self.exceeded,
        }
    }
}

/// The key of a verification or a reserve once its checks passed, or the outcome of the
/// first check that failed.
pub(crate) type Checked = Result<Arc<KeyRecord>, (Outcome, Option<Arc<KeyRecord>>)>;

impl Service {
    /// Verifies a key and spends `cost` if it is valid. `request_id` ties the analytics
    /// row to the request. With a `ticket` (an idempotency key) the spend is decided on
    /// the ledger in the transaction that records it; a replay changes nothing.
    pub async fn verify(
        &self,
        caller: &Caller,
        cmd: Verify,
        request_id: Arc<str>,
        ticket: Option<&Ticket>,
    ) -> Result<Verdict, ServiceError> {
        let started = Instant::now();
        let verdict = self
            .decide(caller, &cmd.secret, cmd.cost, &cmd.ratelimits, ticket)
            .await?;
        if ticket.is_some_and(|t| t.replay) {
            return Ok(verdict);
        }
        if let Some(key) = verdict.key.as_deref() {
            self.record_crossings(key, &verdict, cmd.cost.get()).await;
        }
        names::verifications(verdict.outcome).increment(1);
        names::verify_seconds().record(started.elapsed().as_secs_f64());
        self.record(Decided {
            request_id,
            workspace: caller.workspace().shared(),
            key: verdict.key.as_deref(),
            outcome: verdict.outcome.as_str(),
            cost: cmd.cost.get(),
            spent: verdict.spent,
            remaining: verdict.remaining,
            started,
            tags: cmd.tags,
            exceeded: verdict
                .ratelimits
                .iter()
                .filter(|l| l.exceeded)
                .map(|l| l.rule.name.clone())
                .collect(),
        });
        Ok(verdict)
    }

    /// Hands the row to the analytics batcher (never waits).
    pub(crate) fn record(&self, d: Decided<'_>) {
        self.analytics
            .verification(d.event(self.clock.now_ms(), &self.settings));
    }

    /// The checks of DESIGN §2 before any credit moves, the first failure deciding: the
    /// key by secret hash (unknown, deleted, another workspace's, or not verifiable by
    /// this root key: all `NOT_FOUND`, so a root key cannot probe for keys it may not
    /// see), `DISABLED`, `EXPIRED`; then a refill due in this period is applied.
    pub(crate) async fn checked_key(
        &self,
        caller: &Caller,
        secret: &str,
        now: i64,
    ) -> Result<Checked, ServiceError> {
        let key = match self.key_by_hash(&hash_secret(secret)).await? {
            Some(k) if caller.sees(&k.workspace_id, Action::VerifyKey, &k.api_id) => k,
            _ => return Ok(Err((Outcome::NotFound, None))),
        };
        if !key.enabled {
            return Ok(Err((Outcome::Disabled, Some(key))));
        }
        if key.is_expired(now) {
            return Ok(Err((Outcome::Expired, Some(key))));
        }
        match self.refill_if_due(key, now).await {
            Ok(k) => Ok(Ok(k)),
            // Deleted since it was cached: the ledger row is gone.
            Err(ServiceError::Engine(EngineError::NotFound)) => Ok(Err((Outcome::NotFound, None))),
            Err(e) => Err(e),
        }
    }

    /// Runs an engine call in a task of its own, so a client that hangs up cannot
    /// cancel it half-way.
    pub(crate) async fn in_engine_task<T: Send + 'static>(
        &self,
        call: impl std::future::Future<Output = Result<T, EngineError>> + Send + 'static,
    ) -> Result<T, ServiceError> {
        tokio::spawn(call)
            .await
            .map_err(|e| ServiceError::Internal(format!("engine task failed: {e}")))?
            .map_err(ServiceError::from)
    }

    /// Checks the rate limits of a verification, all or nothing: `Ok` with their
    /// outcomes, and whether every one passed.
    async fn check_limits(
        &self,
        key: &KeyRecord,
        named: &[NamedLimit],
    ) -> Result<(bool, Vec<LimitOutcome>), ServiceError> {
        let checks = limit_checks(key, named)?;
        if checks.is_empty() {
            return Ok((true, Vec::new()));
        }
        let (counters, rules): (Vec<LimitCheck>, Vec<RatelimitRule>) = checks.into_iter().unzip();
        let (passed, states) = self.ratelimiter.limit(&counters).await?;
        let outcomes = rules
            .into_iter()
            .zip(states)
            .map(|(rule, s)| LimitOutcome {
                rule,
                remaining: s.remaining,
                reset_ms: s.reset_ms,
                exceeded: !s.passed,
            })
            .collect();
        Ok((passed, outcomes))
    }

    async fn decide(
        &self,
        caller: &Caller,
        secret: &str,
        cost: Cost,
        named: &[NamedLimit],
        ticket: Option<&Ticket>,
    ) -> Result<Verdict, ServiceError> {
        let key = match self
            .checked_key(caller, secret, self.clock.now_ms())
            .await?
        {
            Ok(key) => key,
            Err((outcome, key)) => return Ok(Verdict::without_credits(outcome, key)),
        };
        // Decided before: the spend is made, its answer was never sent. Nothing is
        // counted again.
        if ticket.is_some_and(|t| t.replay) {
            let pool_remaining = match key.identity.as_deref() {
                Some(identity) => self.pool_balance(identity).await?,
                None => None,
            };
            let pays = key.limited || pool_remaining.is_some();
            return Ok(Verdict {
                outcome: Outcome::Valid,
                remaining: if key.limited {
                    self.engine.balance(&key.id).await?
                } else {
                    None
                },
                spent: if pays { cost.get() } else { 0 },
                key: Some(key),
                ratelimits: Vec::new(),
                pool_remaining,
                on_ledger: false,
            });
        }
        // Rate limits before credits: a rate-limited verification spends nothing.
        let ratelimits = match self.check_limits(&key, named).await {
            Ok((true, outcomes)) => outcomes,
            Ok((false, outcomes)) => {
                return Ok(Verdict {
                    ratelimits: outcomes,
                    ..Verdict::without_credits(Outcome::RateLimited, Some(key))
                })
            }
            Err(e @ ServiceError::Conflict(_)) => return Err(e),
            Err(e) if ticket.is_some() => return Err(e),
            Err(e) => return self.on_backend_failure(Some(key), e),
        };
        // A key of an identity with a shared pool pays with the pool.
        if let Some(identity) = key.identity.clone().filter(|i| i.pool.is_some()) {
            return self
                .decide_pooled(key, &identity, cost, ratelimits, ticket)
                .await;
        }
        if !key.limited {
            return Ok(Verdict {
                ratelimits,
                ..Verdict::without_credits(Outcome::Valid, Some(key))
            });
        }
        let decision = match ticket {
            Some(t) => {
                let (engine, id, t) = (self.engine.clone(), key.id.clone(), t.clone());
                self.in_engine_task(async move { engine.spend_once(&id, cost, &t.mark()).await })
                    .await
            }
            None => self.spend(&key, cost).await,
        };
        match decision {
            Ok(Decision::Valid { remaining }) => Ok(Verdict {
                outcome: Outcome::Valid,
                spent: if remaining.is_some() { cost.get() } else { 0 },
                key: Some(key),
                remaining,
                ratelimits,
                pool_remaining: None,
                on_ledger: false,
            }),
            Ok(Decision::ValidOnLedger { at_least }) => Ok(Verdict {
                outcome: Outcome::Valid,
                spent: cost.get(),
                key: Some(key),
                remaining: Some(at_least),
                ratelimits,
                pool_remaining: None,
                on_ledger: true,
            }),
            Ok(Decision::Exceeded { remaining }) => Ok(Verdict {
                outcome: Outcome::UsageExceeded,
                key: Some(key),
                remaining: Some(remaining),
                spent: 0,
                ratelimits,
                pool_remaining: None,
                on_ledger: false,
            }),
            Ok(Decision::NotFound) => Ok(Verdict::without_credits(Outcome::NotFound, None)),
            // An idempotent request never fails open: its retry is safe instead.
            Err(e) if ticket.is_some() => Err(e),
            Err(e) => self.on_backend_failure(Some(key), e),
        }
    }

    /// The credit step of a key whose identity has a shared pool: the key (if limited)
    /// and the pool pay together, both or neither; `USAGE_EXCEEDED` when either cannot,
    /// with both exact balances where known.
    async fn decide_pooled(
        &self,
        key: Arc<KeyRecord>,
        identity: &IdentityRecord,
        cost: Cost,
        ratelimits: Vec<LimitOutcome>,
        ticket: Option<&Ticket>,
    ) -> Result<Verdict, ServiceError> {
        let pool = pool_account(identity);
        let decided = match self.refill_pool_if_due(identity, self.clock.now_ms()).await {
            Err(e) => Err(e),
            Ok(()) => {
                let (engine, key_id, limited) = (self.engine.clone(), key.id.clone(), key.limited);
                let mark = ticket.cloned();
                self.in_engine_task(async move {
                    match (limited, mark) {
                        (true, None) => engine.spend_shared(&key_id, &pool, cost).await,
                        (true, Some(t)) => {
                            engine
                                .spend_shared_once(&key_id, &pool, cost, &t.mark())
                                .await
                        }
                        // An unlimited key: the pool alone pays.
                        (false, mark) => {
                            let d = match mark {
                                None => engine.spend(&pool, cost).await?,
                                Some(t) => engine.spend_once(&pool, cost, &t.mark()).await?,
                            };
                            Ok(match d {
                                Decision::Valid { remaining } => SharedDecision {
                                    outcome: SharedOutcome::Valid,
                                    key: None,
                                    pool: remaining,
                                    on_ledger: false,
                                },
                                Decision::ValidOnLedger { at_least } => SharedDecision {
                                    outcome: SharedOutcome::Valid,
                                    key: None,
                                    pool: Some(at_least),
                                    on_ledger: true,
                                },
                                Decision::Exceeded { remaining } => SharedDecision {
                                    outcome: SharedOutcome::PoolExceeded,
                                    key: None,
                                    pool: Some(remaining),
                                    on_ledger: false,
                                },
                                Decision::NotFound => SharedDecision {
                                    outcome: SharedOutcome::NotFound,
                                    key: None,
                                    pool: None,
                                    on_ledger: false,
                                },
                            })
                        }
                    }
                })
                .await
            }
        };
        let d = match decided {
            Ok(d) => d,
            // An idempotent request never fails open: its retry is safe instead.
            Err(e) if ticket.is_some() => return Err(e),
            Err(e) => return self.on_backend_failure(Some(key), e),
        };
        let mut remaining = d.key.filter(|_| key.limited);
        let mut pool_remaining = d.pool;
        if matches!(
            d.outcome,
            SharedOutcome::KeyExceeded | SharedOutcome::PoolExceeded
        ) {
            // The side that decided is exact; read the other one's exact balance.
            if remaining.is_none() && key.limited {
                remaining = self.engine.balance(&key.id).await.ok().flatten();
            }
            if pool_remaining.is_none() {
                pool_remaining = self
                    .engine
                    .balance(&pool_account(identity))
                    .await
                    .ok()
                    .flatten();
            }
        }
        Ok(match d.outcome {
            SharedOutcome::Valid => Verdict {
                outcome: Outcome::Valid,
                spent: cost.get(),
                key: Some(key),
                remaining,
                ratelimits,
                pool_remaining,
                on_ledger: d.on_ledger,
            },
            SharedOutcome::KeyExceeded | SharedOutcome::PoolExceeded => Verdict {
                outcome: Outcome::UsageExceeded,
                key: Some(key),
                remaining,
                spent: 0,
                ratelimits,
                pool_remaining,
                on_ledger: false,
            },
            SharedOutcome::NotFound => Verdict::without_credits(Outcome::NotFound, None),
        })
    }

    /// A spend on the hot path.
    async fn spend(&self, key: &KeyRecord, cost: Cost) -> Result<Decision, ServiceError> {
        // The hot store decides most spends in one step that cancellation cannot cut
        // half-way; anything else (a refill) runs in a task of its own.
        match self.engine.spend_fast(&key.id, cost).await {
            Some(decision) => decision.map_err(ServiceError::from),
            None => {
                let engine = self.engine.clone();
                let id = key.id.clone();
                self.in_engine_task(async move { engine.spend(&id, cost).await })
                    .await
            }
        }
    }

    /// Fails closed, or open with `--on-backend-failure=allow`.
    fn on_backend_failure(
        &self,
        key: Option<Arc<KeyRecord>>,
        e: ServiceError,
    ) -> Result<Verdict, ServiceError> {
        let backend = matches!(
            e,
            ServiceError::Engine(_) | ServiceError::Store(_) | ServiceError::RateLimiter(_)
        );
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
