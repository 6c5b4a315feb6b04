//! Balance alerts on the verification path: which thresholds a decision crossed
//! (`creditgate_domain::alerts` has the rule), written to the webhook outbox before
//! the verification is answered, so an answered spend's event survives any crash.
//!
//! Only crossings cost a write: one per threshold and arming, plus the first refusal of
//! an exhausted account on each node (later refusals with the same balance are skipped
//! for [`REFUSAL_MEMORY`] by a node-local cache; the outbox would drop them anyway).

use std::time::Duration;

use creditgate_domain::{refusal_crossing, spend_crossings, Crossing, KeyId, KeyRecord, Outcome};

use crate::identities::pool_account;
use crate::{metrics as names, Service, Verdict};

/// How long a node remembers that an account's refusal at a balance was recorded.
pub const REFUSAL_MEMORY: Duration = Duration::from_secs(10);

impl Service {
    /// Records the crossings of `verdict` (a verification of `key` at `cost`): the key's
    /// and its pool's, each in one outbox transaction. A balance stated only as a lower
    /// bound (spent on the ledger while the hot store was unreachable) decides nothing.
    /// A failure is logged and counted; the verification is answered all the same.
    pub(crate) async fn record_crossings(&self, key: &KeyRecord, verdict: &Verdict, cost: u64) {
        if verdict.on_ledger {
            return;
        }
        // The key's side, then its pool's; an account id is made only for a crossing.
        if key.limited {
            if let Some(remaining) = verdict.remaining {
                self.record_side(&key.credit_alerts, remaining, verdict, cost, || {
                    key.id.clone()
                })
                .await;
            }
        }
        let pooled = key
            .identity
            .as_deref()
            .and_then(|i| Some((i, i.pool.as_ref()?)));
        if let (Some((identity, pool)), Some(remaining)) = (pooled, verdict.pool_remaining) {
            self.record_side(&pool.credit_alerts, remaining, verdict, cost, || {
                pool_account(identity)
            })
            .await;
        }
    }

    /// The crossings of one account (`account()` names it) whose balance after the
    /// decision is `remaining`, written when there are any.
    async fn record_side(
        &self,
        alerts: &[u64],
        remaining: u64,
        verdict: &Verdict,
        cost: u64,
        account: impl FnOnce() -> KeyId,
    ) {
        let crossings = match verdict.outcome {
            Outcome::Valid if verdict.spent > 0 => spend_crossings(alerts, remaining, cost),
            Outcome::UsageExceeded => match refusal_crossing(remaining, cost) {
                Some(c) => {
                    let account = account();
                    if !self.refusal_recorded(&account, remaining).await {
                        self.write_crossings(&account, &[c]).await;
                    }
                    return;
                }
                None => return,
            },
            _ => return,
        };
        if !crossings.is_empty() {
            self.write_crossings(&account(), &crossings).await;
        }
    }

    /// Whether this node recorded a refusal of `account` at `remaining` lately; notes
    /// this one either way.
    async fn refusal_recorded(&self, account: &KeyId, remaining: u64) -> bool {
        let seen = self.refusals.get(account.as_str()) == Some(remaining);
        if !seen {
            self.refusals.insert(account.as_str().to_owned(), remaining);
        }
        seen
    }

    async fn write_crossings(&self, account: &KeyId, crossings: &[Crossing]) {
        match self
            .store
            .record_crossings(account, crossings, self.clock.now_ms())
            .await
        {
            Ok(n) => {
                metrics::counter!(names::ALERT_EVENTS).increment(n.try_into().unwrap_or(0));
            }
            Err(e) => {
                // The refusal may be recorded by the next one.
                self.refusals.invalidate(account.as_str());
                metrics::counter!(names::ALERT_FAILURES).increment(1);
                tracing::error!(
                    account = %account,
                    error = %e,
                    "recording a balance alert failed; the verification is answered without it"
                );
            }
        }
    }
}
