//! Idempotency keys (`Idempotency-Key`, or `idempotencyKey` in the body): a retry of a
//! request returns the first decision and never changes credits twice, from any node.
//!
//! The ledger keeps one record per workspace and key. A request first claims it (with a
//! lease), then the ledger transaction that makes its change marks it decided — the
//! change and the record commit together —, then its answer is stored. A retry finds:
//! the stored answer (replayed as it was), a live claim (`409`), another request under
//! the same key (`422`), or a decision whose answer was never stored (the node died in
//! between: the request runs again as a replay, which changes nothing and answers the
//! balance as it is then — the first answer was never sent).

use std::sync::Arc;
use std::time::Duration;

use creditgate_domain::new_id;
use creditgate_limiter::ports::{ClaimOutcome, IdemClaim, IdemMark, IdemState};
use creditgate_limiter::{EngineError, IDEMPOTENCY_RETENTION_MS};
use sha2::{Digest, Sha256};

use crate::{Caller, Service, ServiceError};

/// How long a claim is its request's before a retry may take it over (if nothing was
/// decided by then, the first request can no longer decide: its mark is refused).
pub const CLAIM_LEASE_MS: i64 = 10_000;
/// How long a node looks for the outcome of a call whose result it could not read.
const LOOKUP_BUDGET: Duration = Duration::from_secs(1);
const LOOKUP_PAUSE: Duration = Duration::from_millis(100);
/// Longest idempotency key.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// An idempotency key and the request it names.
#[derive(Debug, Clone)]
pub struct IdemRequest {
    pub key: String,
    /// Digest of the route and the request's body.
    pub fingerprint: String,
}

impl IdemRequest {
    /// `route` and `canonical_body` (the body without the key, in one canonical form)
    /// make the fingerprint.
    pub fn new(key: String, route: &str, canonical_body: &str) -> Self {
        let mut h = Sha256::new();
        h.update(route.as_bytes());
        h.update([0]);
        h.update(canonical_body.as_bytes());
        Self {
            key,
            fingerprint: hex(&h.finalize()),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A request's claim on its idempotency key.
#[derive(Debug, Clone)]
pub struct Ticket {
    scope: Arc<str>,
    key: Arc<str>,
    token: Arc<str>,
    /// A request with this key decided before and its answer was not stored: answer,
    /// change nothing.
    pub(crate) replay: bool,
}

impl Ticket {
    pub fn mark(&self) -> IdemMark<'_> {
        IdemMark {
            scope: &self.scope,
            key: &self.key,
            token: &self.token,
        }
    }

    /// The id of the hold a reserve under this key makes: the same for every retry.
    pub(crate) fn hold_id(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.scope.as_bytes());
        h.update([0]);
        h.update(self.key.as_bytes());
        format!("hold_i{}", &hex(&h.finalize())[..30])
    }

    /// Whether this request answers a change made before.
    pub fn is_replay(&self) -> bool {
        self.replay
    }

    /// The same claim, answering a change already made.
    pub fn replaying(&self) -> Self {
        Self {
            replay: true,
            ..self.clone()
        }
    }
}

/// Result of [`Service::claim`].
#[derive(Debug)]
pub enum Claim {
    /// Run the request with this ticket.
    Run(Ticket),
    /// The first request's answer, as it was sent (the response's `data`).
    Answered(String),
}

/// What a failed request with a ticket turned out to have done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterFailure {
    /// Its change was made (the failure came after the decision): answer it as a replay.
    Decided,
    /// Nothing was decided, and the claim is dropped: the failure stands, and a retry
    /// runs afresh.
    Undecided,
    /// The ledger cannot say within the lookup budget.
    Unknown,
}

impl Service {
    /// Claims `req.key` in the caller's workspace for one request.
    pub async fn claim(&self, caller: &Caller, req: &IdemRequest) -> Result<Claim, ServiceError> {
        let scope: Arc<str> = caller.workspace().as_str().into();
        let token: Arc<str> = new_id("idem").into();
        let now = self.clock.now_ms();
        let claim = IdemClaim {
            scope: &scope,
            key: &req.key,
            fingerprint: &req.fingerprint,
            token: &token,
            now_ms: now,
            lease_until_ms: now.saturating_add(CLAIM_LEASE_MS),
            expired_before_ms: now.saturating_sub(IDEMPOTENCY_RETENTION_MS),
        };
        let outcome = self
            .engine
            .ledger()
            .claim_idempotency(&claim)
            .await
            .map_err(EngineError::from)?;
        let ticket = |token: Arc<str>, replay| Ticket {
            scope: scope.clone(),
            key: req.key.as_str().into(),
            token,
            replay,
        };
        match outcome {
            ClaimOutcome::Claimed => Ok(Claim::Run(ticket(token.clone(), false))),
            ClaimOutcome::Mismatch => Err(ServiceError::IdempotencyMismatch),
            ClaimOutcome::InFlight => Err(ServiceError::IdempotencyInFlight),
            ClaimOutcome::Decided(record) => match record.answer {
                Some(answer) if record.state == IdemState::Answered => Ok(Claim::Answered(answer)),
                _ => Ok(Claim::Run(ticket(record.token.into(), true))),
            },
        }
    }

    /// Stores the answer of a request that ran with `ticket`. A failure is logged: the
    /// decision stands, and a retry answers it as a replay.
    pub async fn answered(&self, ticket: &Ticket, answer: &str) {
        if let Err(e) = self
            .engine
            .ledger()
            .answer_idempotency(&ticket.mark(), answer)
            .await
        {
            tracing::warn!(idempotency_key = %ticket.key, error = %e, "could not store the answer of an idempotent request");
        }
    }

    /// After a request with `ticket` failed: whether its change was made, looked up for
    /// at most a second. An undecided claim is dropped so a retry need not wait.
    pub async fn after_failure(&self, ticket: &Ticket) -> AfterFailure {
        if ticket.replay {
            return AfterFailure::Decided;
        }
        let ledger = self.engine.ledger();
        let deadline = tokio::time::Instant::now() + LOOKUP_BUDGET;
        loop {
            match ledger.idempotency(&ticket.scope, &ticket.key).await {
                Ok(Some(r)) if *r.token == *ticket.token && r.state != IdemState::Claimed => {
                    return AfterFailure::Decided
                }
                Ok(_) => {
                    if let Err(e) = ledger.abandon_idempotency(&ticket.mark()).await {
                        tracing::debug!(error = %e, "an undecided claim stays until its lease ends");
                    }
                    return AfterFailure::Undecided;
                }
                Err(e) if tokio::time::Instant::now() + LOOKUP_PAUSE >= deadline => {
                    tracing::warn!(idempotency_key = %ticket.key, error = %e, "outcome of an idempotent request unknown");
                    return AfterFailure::Unknown;
                }
                Err(_) => tokio::time::sleep(LOOKUP_PAUSE).await,
            }
        }
    }
}
