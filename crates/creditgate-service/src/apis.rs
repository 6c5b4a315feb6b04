//! API operations: create, read, delete, and list an API's keys.

use std::sync::Arc;

use creditgate_domain::{Action, ApiId, ApiRecord};

use crate::{Caller, KeyView, ListKeys, Service, ServiceError};

/// One page of an API's keys.
#[derive(Debug, Clone)]
pub struct KeyListing {
    pub keys: Vec<KeyView>,
    /// Pass back for the next page; `None` on the last one.
    pub cursor: Option<String>,
}

impl Service {
    pub async fn create_api(&self, caller: &Caller, name: String) -> Result<ApiId, ServiceError> {
        caller.require(Action::CreateApi, None)?;
        let api = ApiRecord {
            id: ApiId::generate(),
            workspace_id: caller.workspace().clone(),
            name,
            created_at: self.clock.now_ms(),
        };
        self.store.create_api(&api).await?;
        Ok(api.id)
    }

    pub async fn get_api(&self, caller: &Caller, id: &ApiId) -> Result<ApiRecord, ServiceError> {
        caller.require(Action::ReadApi, Some(id))?;
        self.find_api(caller, id).await
    }

    /// Deletes the API and with it every key of it.
    pub async fn delete_api(&self, caller: &Caller, id: &ApiId) -> Result<(), ServiceError> {
        caller.require(Action::DeleteApi, Some(id))?;
        self.find_api(caller, id).await?;
        if !self.store.delete_api(caller.workspace(), id).await? {
            return Err(ServiceError::ApiNotFound);
        }
        // Its keys are gone too: every node forgets every cached key.
        self.invalidate_all_keys().await;
        Ok(())
    }

    pub async fn list_keys(
        &self,
        caller: &Caller,
        cmd: ListKeys,
    ) -> Result<KeyListing, ServiceError> {
        caller.require(Action::ReadKey, Some(&cmd.api_id))?;
        caller.require(Action::ReadApi, Some(&cmd.api_id))?;
        self.find_api(caller, &cmd.api_id).await?;
        let page = self
            .store
            .list_keys(
                &cmd.api_id,
                cmd.limit,
                cmd.cursor.as_deref(),
                cmd.external_id.as_deref(),
            )
            .await?;
        let mut keys = Vec::with_capacity(page.keys.len());
        for k in page.keys {
            keys.push(self.view(Arc::new(k)).await?);
        }
        Ok(KeyListing {
            keys,
            cursor: page.cursor,
        })
    }

    /// The caller's live API, or not found.
    async fn find_api(&self, caller: &Caller, id: &ApiId) -> Result<ApiRecord, ServiceError> {
        self.store
            .get_api(caller.workspace(), id)
            .await?
            .ok_or(ServiceError::ApiNotFound)
    }
}
