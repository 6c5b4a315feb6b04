//! Holds: `keys.reserveCredits`, `keys.settleCredits`, `keys.releaseCredits`,
//! `keys.getHold`. A reserve runs the checks of a verification in the same order, then
//! the engine moves the amount into a hold; a settle or release closes it once. Every
//! step that changes credits gets its analytics row, so summing `spent_credits` over a
//! key gives exactly what was spent.

use std::sync::Arc;
use std::time::Instant;

use creditgate_analytics::Analytics;
use creditgate_domain::{new_id, Action, Clock, Cost, KeyRecord, KeyStore, Outcome};
use creditgate_limiter::ports::{Hold, HoldClose, HoldState, ReserveRequest};
use creditgate_limiter::rules::pool_hold_id;
use creditgate_limiter::{EngineError, ExpiryObserver, HoldAnswer, SharedHoldAnswer};

use crate::identities::pool_account;
use crate::verify::Decided;
use crate::{Caller, Service, ServiceError, ServiceSettings, Ticket};

/// `keys.reserveCredits`.
#[derive(Debug, Clone)]
pub struct Reserve {
    pub secret: String,
    pub amount: Cost,
    /// How long the hold stays open, in ms (1..=24 h).
    pub ttl_ms: i64,
}

/// Default time a hold stays open.
pub const DEFAULT_HOLD_TTL_MS: i64 = 60_000;
/// Longest time a hold stays open.
pub const MAX_HOLD_TTL_MS: i64 = 24 * 3_600_000;

/// How `keys.settleCredits` / `keys.releaseCredits` close a hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseHold {
    Settle(Cost),
    Release,
}

/// The decision on a reserve.
#[derive(Debug, Clone)]
pub struct Reservation {
    /// `Valid` (the hold is made), `UsageExceeded` (nothing moved) or a failed check.
    pub outcome: Outcome,
    pub key: Option<Arc<KeyRecord>>,
    pub hold: Option<Hold>,
    /// The exact balance outside holds after the decision (`None`: unlimited).
    pub remaining: Option<u64>,
}

/// The decision on a settle or release.
#[derive(Debug, Clone)]
pub struct Closing {
    /// `false`: a settle above the hold that the balance could not cover; the hold stays
    /// open and nothing moved.
    pub done: bool,
    pub hold: Hold,
    /// The exact balance outside holds after the decision (`None`: unlimited).
    pub remaining: Option<u64>,
}

impl Service {
    /// With a `ticket` the hold's id comes from the idempotency key, so every retry
    /// finds the first hold, and the transaction that makes it records the decision.
    pub async fn reserve(
        &self,
        caller: &Caller,
        cmd: Reserve,
        request_id: Arc<str>,
        ticket: Option<&Ticket>,
    ) -> Result<Reservation, ServiceError> {
        let started = Instant::now();
        let decision = self.decide_reserve(caller, &cmd, ticket).await?;
        if ticket.is_some_and(|t| t.replay) {
            return Ok(decision);
        }
        let outcome = match decision.outcome {
            Outcome::Valid => "RESERVED",
            other => other.as_str(),
        };
        self.record(Decided {
            request_id,
            workspace: caller.workspace().shared(),
            key: decision.key.as_deref(),
            outcome,
            cost: cmd.amount.get(),
            spent: 0,
            remaining: decision.remaining,
            started,
            tags: Vec::new(),
            exceeded: Vec::new(),
        });
        Ok(decision)
    }

    async fn decide_reserve(
        &self,
        caller: &Caller,
        cmd: &Reserve,
        ticket: Option<&Ticket>,
    ) -> Result<Reservation, ServiceError> {
        let refused = |outcome, key| Reservation {
            outcome,
            key,
            hold: None,
            remaining: None,
        };
        let now = self.clock.now_ms();
        let key = match self.checked_key(caller, &cmd.secret, now).await? {
            Ok(key) => key,
            Err((outcome, key)) => return Ok(refused(outcome, key)),
        };
        // A key of an identity with a shared pool holds from both.
        let pool = key
            .identity
            .as_deref()
            .filter(|i| i.pool.is_some())
            .map(pool_account);
        let hold_id = ticket.map_or_else(|| new_id("hold"), Ticket::hold_id);
        let (engine, key_id, amount) = (self.engine.clone(), key.id.clone(), cmd.amount.get());
        let expires_at_ms = now.saturating_add(cmd.ttl_ms);
        let ticket = ticket.cloned();
        let answer = self
            .in_engine_task(async move {
                let mark = ticket.as_ref().map(Ticket::mark);
                let req = ReserveRequest {
                    key: &key_id,
                    hold_id: &hold_id,
                    amount,
                    now_ms: now,
                    expires_at_ms,
                    mark: mark.as_ref(),
                };
                Ok(match pool {
                    Some(pool) => Answer::from(engine.reserve_shared(&req, &pool).await?),
                    None => Answer::from(engine.reserve(&req).await?),
                })
            })
            .await?;
        Ok(match answer {
            Answer::Hold {
                hold, remaining, ..
            } => Reservation {
                outcome: Outcome::Valid,
                key: Some(key),
                hold: Some(hold),
                remaining,
            },
            Answer::Exceeded { remaining } => Reservation {
                outcome: Outcome::UsageExceeded,
                key: Some(key),
                hold: None,
                remaining,
            },
            // Deleted since it was cached.
            Answer::NotFound => refused(Outcome::NotFound, None),
        })
    }

    /// Settles or releases one of the caller's holds. A hold closed by the same
    /// operation before is answered as it is; one closed otherwise (or expired) is a
    /// conflict naming its state. With a `ticket`, the closing records the decision.
    pub async fn close_hold(
        &self,
        caller: &Caller,
        hold_id: &str,
        close: CloseHold,
        request_id: Arc<str>,
        ticket: Option<&Ticket>,
    ) -> Result<Closing, ServiceError> {
        let started = Instant::now();
        let (hold, key) = self.find_hold(caller, hold_id).await?;
        let (engine, key_id, id) = (self.engine.clone(), hold.key.clone(), hold.id.clone());
        let op = match close {
            CloseHold::Settle(cost) => HoldClose::Settle(cost.get()),
            CloseHold::Release => HoldClose::Release,
        };
        // A pooled key's hold has a twin on the pool: both close together.
        let pool = self
            .engine
            .ledger()
            .hold(&pool_hold_id(&hold.id))
            .await
            .map_err(EngineError::from)?
            .map(|twin| twin.key);
        let ticket = ticket.cloned();
        let answer = self
            .in_engine_task(async move {
                let mark = ticket.as_ref().map(Ticket::mark);
                Ok(match pool {
                    Some(pool) => Answer::from(
                        engine
                            .close_hold_shared(&key_id, &pool, &id, op, mark.as_ref())
                            .await?,
                    ),
                    None => Answer::from(engine.close_hold(&key_id, &id, op, mark.as_ref()).await?),
                })
            })
            .await?;
        let wanted = match close {
            CloseHold::Settle(_) => HoldState::Settled,
            CloseHold::Release => HoldState::Released,
        };
        let (closing, changed) = match answer {
            Answer::Hold {
                hold,
                changed,
                remaining,
            } => (
                Closing {
                    done: true,
                    hold,
                    remaining,
                },
                changed,
            ),
            Answer::Exceeded { remaining } => (
                Closing {
                    done: false,
                    hold,
                    remaining,
                },
                true,
            ),
            Answer::NotFound => return Err(ServiceError::HoldNotFound),
        };
        if changed {
            let h = &closing.hold;
            let (outcome, spent) = match (closing.done, h.state) {
                (false, _) => ("USAGE_EXCEEDED", 0),
                (true, HoldState::Settled) => {
                    let cost = h.cost.unwrap_or(0);
                    ("SETTLED", if h.funded { cost } else { 0 })
                }
                (true, HoldState::Released) => ("RELEASED", 0),
                (true, _) => ("EXPIRED", 0),
            };
            self.record(Decided {
                request_id,
                workspace: caller.workspace().shared(),
                key: Some(&key),
                outcome,
                cost: match close {
                    CloseHold::Settle(c) => c.get(),
                    CloseHold::Release => 0,
                },
                spent,
                remaining: closing.remaining,
                started,
                tags: Vec::new(),
                exceeded: Vec::new(),
            });
        }
        if closing.done && closing.hold.state != wanted {
            return Err(ServiceError::HoldClosed(closing.hold.state));
        }
        Ok(closing)
    }

    /// One of the caller's holds, as it stands.
    pub async fn get_hold(&self, caller: &Caller, hold_id: &str) -> Result<Hold, ServiceError> {
        Ok(self.find_hold(caller, hold_id).await?.0)
    }

    /// A hold of a live key the caller may verify (else not found: a root key cannot
    /// probe for other workspaces' holds).
    async fn find_hold(
        &self,
        caller: &Caller,
        hold_id: &str,
    ) -> Result<(Hold, KeyRecord), ServiceError> {
        let hold = self
            .engine
            .ledger()
            .hold(hold_id)
            .await
            .map_err(EngineError::from)?
            .ok_or(ServiceError::HoldNotFound)?;
        let key = self
            .store
            .key_by_id(&hold.key)
            .await?
            .filter(|k| caller.sees(&k.workspace_id, Action::VerifyKey, &k.api_id))
            .ok_or(ServiceError::HoldNotFound)?;
        Ok((hold, key))
    }
}

/// A hold call's answer, for a plain key's hold or a pooled one (`remaining`: the key's
/// exact balance outside holds; `None` for an unlimited key).
enum Answer {
    Hold {
        hold: Hold,
        changed: bool,
        remaining: Option<u64>,
    },
    Exceeded {
        remaining: Option<u64>,
    },
    NotFound,
}

impl From<HoldAnswer> for Answer {
    fn from(a: HoldAnswer) -> Self {
        match a {
            HoldAnswer::Hold {
                hold,
                changed,
                remaining,
            } => Answer::Hold {
                hold,
                changed,
                remaining,
            },
            HoldAnswer::Exceeded { remaining } => Answer::Exceeded {
                remaining: Some(remaining),
            },
            HoldAnswer::NotFound => Answer::NotFound,
        }
    }
}

impl From<SharedHoldAnswer> for Answer {
    fn from(a: SharedHoldAnswer) -> Self {
        match a {
            SharedHoldAnswer::Hold {
                hold, changed, key, ..
            } => Answer::Hold {
                hold,
                changed,
                remaining: key,
            },
            SharedHoldAnswer::Exceeded { key, .. } => Answer::Exceeded { remaining: key },
            SharedHoldAnswer::NotFound => Answer::NotFound,
        }
    }
}

/// The engine's expiry observer: one analytics row per expired hold, written from a
/// task of its own (the keys are looked up for their workspace and API).
pub(crate) fn expiry_recorder(
    store: Arc<dyn KeyStore>,
    analytics: Analytics,
    clock: Arc<dyn Clock>,
    settings: Arc<ServiceSettings>,
) -> ExpiryObserver {
    Box::new(move |holds: Vec<Hold>| {
        let (store, analytics, clock, settings) = (
            store.clone(),
            analytics.clone(),
            clock.clone(),
            settings.clone(),
        );
        tokio::spawn(async move {
            for hold in holds {
                let key = match store.key_by_id(&hold.key).await {
                    Ok(Some(k)) => k,
                    Ok(None) => continue,
                    Err(e) => {
                        tracing::warn!(hold_id = %hold.id, error = %e, "no analytics row for an expired hold");
                        continue;
                    }
                };
                let row = Decided {
                    request_id: hold.id.as_str().into(),
                    workspace: key.workspace_id.shared(),
                    key: Some(&key),
                    outcome: "EXPIRED",
                    cost: 0,
                    spent: 0,
                    remaining: None,
                    started: Instant::now(),
                    tags: Vec::new(),
                    exceeded: Vec::new(),
                };
                analytics.verification(row.event(clock.now_ms(), &settings));
            }
        });
    })
}
