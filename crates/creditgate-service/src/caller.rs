//! The authenticated caller: a root key's workspace and permissions.

use std::sync::Arc;

use creditgate_domain::{Action, ApiId, RootKeyRecord, WorkspaceId};

use crate::ServiceError;

#[derive(Debug, Clone)]
pub struct Caller(pub Arc<RootKeyRecord>);

impl Caller {
    /// `Forbidden` unless the root key may do `action` on `api` (or on every API).
    pub fn require(&self, action: Action, api: Option<&ApiId>) -> Result<(), ServiceError> {
        if self.allows(action, api) {
            return Ok(());
        }
        let (resource, name) = (action.resource(), action.as_str());
        Err(ServiceError::Forbidden(match api {
            Some(api) => format!(
                "this root key lacks the permission {resource}.{api}.{name} (or {resource}.*.{name})"
            ),
            None => format!("this root key lacks the permission {resource}.*.{name}"),
        }))
    }

    pub fn allows(&self, action: Action, api: Option<&ApiId>) -> bool {
        self.0.permissions.allows(action, api)
    }

    /// The root key's id: who a change it asks for is recorded as made by.
    pub fn root_key_id(&self) -> &str {
        self.0.id.as_str()
    }

    pub fn workspace(&self) -> &WorkspaceId {
        &self.0.workspace_id
    }

    /// Whether `key_workspace`/`api` is visible to this caller for `action`: keys of other
    /// workspaces and keys it may not act on look the same (not found).
    pub fn sees(&self, key_workspace: &WorkspaceId, action: Action, api: &ApiId) -> bool {
        key_workspace == self.workspace() && self.allows(action, Some(api))
    }
}
