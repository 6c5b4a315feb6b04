//! Identity operations: create, read, list, update, delete. A key belongs to the
//! identity of its workspace with its `external_id`; the key caches carry the identity,
//! so a change of an identity makes every node forget its cached keys.

use std::sync::Arc;

use creditgate_domain::{
    Action, Credits, IdentityId, IdentityPage, IdentityPatch, IdentityRecord, KeyId, PoolRecord,
    RatelimitRule, Refill, StoreError,
};
use creditgate_limiter::{CreditOp, EngineError};
use serde_json::{Map, Value};

use crate::{Caller, Service, ServiceError};

/// `identities.createIdentity`, parsed.
#[derive(Debug, Clone)]
pub struct CreateIdentity {
    pub external_id: String,
    pub meta: Option<Map<String, Value>>,
    /// Rate limits (ids not assigned yet).
    pub ratelimits: Vec<RatelimitRule>,
    /// A shared credit pool: its balance, refill and balance thresholds.
    pub credits: Option<(Credits, Option<Refill>, Vec<u64>)>,
}

/// The ledger account of an identity's shared pool: named by the identity's id.
pub fn pool_account(identity: &IdentityRecord) -> KeyId {
    KeyId::from(identity.id.as_str())
}

/// `identities.updateIdentity`, parsed: the identity (id or external id), its new
/// meta (`Some(None)` clears it; `None` changes nothing) and rate limits (replacing
/// the current ones; ids not assigned yet).
#[derive(Debug, Clone)]
pub struct UpdateIdentity {
    pub identity: String,
    pub meta: Option<Option<Map<String, Value>>>,
    pub ratelimits: Option<Vec<RatelimitRule>>,
    /// Replaces the balance thresholds of the identity's pool.
    pub credit_alerts: Option<Vec<u64>>,
}

/// `identities.listIdentities`, parsed.
#[derive(Debug, Clone)]
pub struct ListIdentities {
    pub limit: u32,
    pub cursor: Option<String>,
}

impl Service {
    pub async fn create_identity(
        &self,
        caller: &Caller,
        cmd: CreateIdentity,
    ) -> Result<IdentityId, ServiceError> {
        caller.require(Action::CreateIdentity, None)?;
        let now = self.clock.now_ms();
        let (pool, remaining) = match cmd.credits {
            Some((remaining, refill, credit_alerts)) => (
                Some(PoolRecord {
                    refill,
                    last_refill_at: Some(now),
                    credit_alerts,
                }),
                Some(remaining),
            ),
            None => (None, None),
        };
        let identity = IdentityRecord {
            id: IdentityId::generate(),
            workspace_id: caller.workspace().clone(),
            external_id: cmd.external_id,
            meta: cmd.meta,
            created_at: self.clock.now_ms(),
            updated_at: None,
            ratelimits: RatelimitRule::replacing(&[], cmd.ratelimits),
            pool,
        };
        match self.store.create_identity(&identity, remaining).await {
            Ok(()) => Ok(identity.id),
            Err(StoreError::Conflict(_)) => Err(ServiceError::Conflict(format!(
                "an identity with externalId '{}' already exists in this workspace; nothing \
                 was changed: use identities.getIdentity or identities.updateIdentity",
                identity.external_id
            ))),
            Err(e) => Err(e.into()),
        }
    }

    /// The caller's identity by id or external id.
    pub async fn get_identity(
        &self,
        caller: &Caller,
        identity: &str,
    ) -> Result<IdentityRecord, ServiceError> {
        caller.require(Action::ReadIdentity, None)?;
        self.store
            .identity(caller.workspace(), identity)
            .await?
            .ok_or(ServiceError::IdentityNotFound)
    }

    pub async fn list_identities(
        &self,
        caller: &Caller,
        cmd: ListIdentities,
    ) -> Result<IdentityPage, ServiceError> {
        caller.require(Action::ReadIdentity, None)?;
        Ok(self
            .store
            .list_identities(caller.workspace(), cmd.limit, cmd.cursor.as_deref())
            .await?)
    }

    /// Replaces the identity's meta and rate limits (those that are sent).
    pub async fn update_identity(
        &self,
        caller: &Caller,
        cmd: UpdateIdentity,
    ) -> Result<IdentityRecord, ServiceError> {
        caller.require(Action::UpdateIdentity, None)?;
        if cmd.meta.is_none() && cmd.ratelimits.is_none() && cmd.credit_alerts.is_none() {
            return self.get_identity(caller, &cmd.identity).await;
        }
        let current = match cmd.ratelimits.is_some() || cmd.credit_alerts.is_some() {
            true => Some(self.get_identity(caller, &cmd.identity).await?),
            false => None,
        };
        if cmd.credit_alerts.is_some() && current.as_ref().is_some_and(|c| c.pool.is_none()) {
            return Err(ServiceError::Conflict(
                "body.credits.alerts: the identity has no credit pool to alert on; open one \
                 with identities.updateCredits (operation 'set'); nothing was changed"
                    .into(),
            ));
        }
        let ratelimits = match (cmd.ratelimits, &current) {
            (Some(wanted), Some(current)) => {
                Some(RatelimitRule::replacing(&current.ratelimits, wanted))
            }
            _ => None,
        };
        let patch = IdentityPatch {
            meta: cmd.meta,
            ratelimits,
            credit_alerts: cmd.credit_alerts,
        };
        let updated = self
            .store
            .update_identity(
                caller.workspace(),
                &cmd.identity,
                &patch,
                self.clock.now_ms(),
            )
            .await?
            .ok_or(ServiceError::IdentityNotFound)?;
        // Verifications of its keys answer the identity: forget cached keys.
        self.invalidate_all_keys().await;
        Ok(updated)
    }

    /// The exact balance of the identity's pool now (`None`: it has none), after a
    /// refill that is due.
    pub async fn pool_balance(
        &self,
        identity: &IdentityRecord,
    ) -> Result<Option<u64>, ServiceError> {
        if identity.pool.is_none() {
            return Ok(None);
        }
        self.refill_pool_if_due(identity, self.clock.now_ms())
            .await?;
        match self.engine.balance(&pool_account(identity)).await {
            Ok(b) => Ok(b),
            Err(EngineError::NotFound) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Applies the pool's refill when one is due in this period (once per period, on
    /// any node: the ledger's fence decides).
    pub(crate) async fn refill_pool_if_due(
        &self,
        identity: &IdentityRecord,
        now: i64,
    ) -> Result<(), ServiceError> {
        let Some(pool) = &identity.pool else {
            return Ok(());
        };
        let Some(refill) = pool.refill else {
            return Ok(());
        };
        if !refill.is_due(pool.last_refill_at.unwrap_or(identity.created_at), now) {
            return Ok(());
        }
        let op = CreditOp::Refill {
            amount: refill.amount,
            period_start: refill.period_start(now),
        };
        match self.engine.update(&pool_account(identity), op).await {
            Ok(_) => {}
            Err(EngineError::NotFound) => return Ok(()),
            Err(e) => return Err(e.into()),
        }
        // Cached keys carry the pool's last refill time: forget them.
        self.invalidate_all_keys().await;
        Ok(())
    }

    /// `identities.updateCredits`: set, increment or decrement the pool. `set` on an
    /// identity without a pool opens one. Answers the identity and the pool's exact
    /// balance after.
    pub async fn update_identity_credits(
        &self,
        caller: &Caller,
        identity: &str,
        op: CreditOp,
    ) -> Result<(Arc<IdentityRecord>, Option<u64>), ServiceError> {
        caller.require(Action::UpdateIdentity, None)?;
        let found = self.get_identity(caller, identity).await?;
        if found.pool.is_none() {
            let CreditOp::Set(Some(value)) = op else {
                return Err(ServiceError::Conflict(
                    "the identity has no credit pool: open one with operation 'set' and a \
                     value; nothing was changed"
                        .into(),
                ));
            };
            match self
                .store
                .open_pool(&found, value, None, self.clock.now_ms())
                .await
            {
                // Opened here, or by a concurrent call: either way it exists now.
                Ok(()) | Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
            // Verifications of its keys must now spend from the pool: forget them.
            self.invalidate_all_keys().await;
            let found = self.get_identity(caller, identity).await?;
            let balance = self.pool_balance(&found).await?;
            return Ok((Arc::new(found), balance));
        }
        if matches!(op, CreditOp::Set(None)) {
            return Err(ServiceError::Conflict(
                "a credit pool cannot be unlimited: set a number; nothing was changed".into(),
            ));
        }
        self.engine
            .update_marked(&pool_account(&found), op, None, Some(caller.root_key_id()))
            .await?;
        let balance = self.pool_balance(&found).await?;
        Ok((Arc::new(found), balance))
    }

    /// Deletes the identity; its keys stay, without an external id.
    pub async fn delete_identity(
        &self,
        caller: &Caller,
        identity: &str,
    ) -> Result<(), ServiceError> {
        caller.require(Action::DeleteIdentity, None)?;
        self.store
            .delete_identity(caller.workspace(), identity, self.clock.now_ms())
            .await?
            .ok_or(ServiceError::IdentityNotFound)?;
        self.invalidate_all_keys().await;
        Ok(())
    }
}
