//! Identity operations: create, read, list, update, delete. A key belongs to the
//! identity of its workspace with its `external_id`; the key caches carry the identity,
//! so a change of an identity makes every node forget its cached keys.

use creditgate_domain::{
    Action, IdentityId, IdentityPage, IdentityPatch, IdentityRecord, RatelimitRule, StoreError,
};
use serde_json::{Map, Value};

use crate::{Caller, Service, ServiceError};

/// `identities.createIdentity`, parsed.
#[derive(Debug, Clone)]
pub struct CreateIdentity {
    pub external_id: String,
    pub meta: Option<Map<String, Value>>,
    /// Rate limits (ids not assigned yet).
    pub ratelimits: Vec<RatelimitRule>,
}

/// `identities.updateIdentity`, parsed: the identity (id or external id), its new
/// meta (`Some(None)` clears it; `None` changes nothing) and rate limits (replacing
/// the current ones; ids not assigned yet).
#[derive(Debug, Clone)]
pub struct UpdateIdentity {
    pub identity: String,
    pub meta: Option<Option<Map<String, Value>>>,
    pub ratelimits: Option<Vec<RatelimitRule>>,
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
        let identity = IdentityRecord {
            id: IdentityId::generate(),
            workspace_id: caller.workspace().clone(),
            external_id: cmd.external_id,
            meta: cmd.meta,
            created_at: self.clock.now_ms(),
            updated_at: None,
            ratelimits: RatelimitRule::replacing(&[], cmd.ratelimits),
        };
        match self.store.create_identity(&identity).await {
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
        if cmd.meta.is_none() && cmd.ratelimits.is_none() {
            return self.get_identity(caller, &cmd.identity).await;
        }
        let ratelimits = match cmd.ratelimits {
            Some(wanted) => {
                let current = self.get_identity(caller, &cmd.identity).await?;
                Some(RatelimitRule::replacing(&current.ratelimits, wanted))
            }
            None => None,
        };
        let patch = IdentityPatch {
            meta: cmd.meta,
            ratelimits,
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
