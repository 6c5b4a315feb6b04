//! Root-key permissions in Unkey's form: `api.*.<action>` or `api.<apiId>.<action>` for
//! APIs and their keys, `identity.*.<action>` for identities, `ratelimit.*.<action>`
//! for the standalone rate limits and their overrides, `webhook.*.manage` for webhook
//! endpoints.

use serde::{Deserialize, Serialize};

use crate::ApiId;

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    CreateApi,
    ReadApi,
    DeleteApi,
    CreateKey,
    ReadKey,
    UpdateKey,
    DeleteKey,
    VerifyKey,
    ReadAnalytics,
    CreateIdentity,
    ReadIdentity,
    UpdateIdentity,
    DeleteIdentity,
    Limit,
    SetOverride,
    ReadOverride,
    DeleteOverride,
    ManageWebhooks,
}

impl Action {
    pub const ALL: [Action; 18] = [
        Action::CreateApi,
        Action::ReadApi,
        Action::DeleteApi,
        Action::CreateKey,
        Action::ReadKey,
        Action::UpdateKey,
        Action::DeleteKey,
        Action::VerifyKey,
        Action::ReadAnalytics,
        Action::CreateIdentity,
        Action::ReadIdentity,
        Action::UpdateIdentity,
        Action::DeleteIdentity,
        Action::Limit,
        Action::SetOverride,
        Action::ReadOverride,
        Action::DeleteOverride,
        Action::ManageWebhooks,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::CreateApi => "create_api",
            Action::ReadApi => "read_api",
            Action::DeleteApi => "delete_api",
            Action::CreateKey => "create_key",
            Action::ReadKey => "read_key",
            Action::UpdateKey => "update_key",
            Action::DeleteKey => "delete_key",
            Action::VerifyKey => "verify_key",
            Action::ReadAnalytics => "read_analytics",
            Action::CreateIdentity => "create_identity",
            Action::ReadIdentity => "read_identity",
            Action::UpdateIdentity => "update_identity",
            Action::DeleteIdentity => "delete_identity",
            Action::Limit => "limit",
            Action::SetOverride => "set_override",
            Action::ReadOverride => "read_override",
            Action::DeleteOverride => "delete_override",
            Action::ManageWebhooks => "manage",
        }
    }

    /// The resource the action is on: the first part of the permission.
    pub fn resource(self) -> &'static str {
        match self {
            Action::CreateIdentity
            | Action::ReadIdentity
            | Action::UpdateIdentity
            | Action::DeleteIdentity => "identity",
            Action::Limit | Action::SetOverride | Action::ReadOverride | Action::DeleteOverride => {
                "ratelimit"
            }
            Action::ManageWebhooks => "webhook",
            _ => "api",
        }
    }

    fn parse(resource: &str, s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.resource() == resource && a.as_str() == s)
    }
}

/// One granted permission.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Permission {
    /// `None` means every API (`api.*`); always `None` for identity actions.
    pub api: Option<ApiId>,
    pub action: Action,
}

impl Permission {
    pub fn parse(s: &str) -> Result<Self, String> {
        let err = || {
            format!(
                "invalid permission '{s}': expected api.*.<action> or api.<apiId>.<action> \
                 with action one of create_api, read_api, delete_api, create_key, read_key, \
                 update_key, delete_key, verify_key, read_analytics; or identity.*.<action> with action one \
                 of create_identity, read_identity, update_identity, delete_identity; or \
                 ratelimit.*.<action> with action one of limit, set_override, read_override, \
                 delete_override; or webhook.*.manage"
            )
        };
        let mut parts = s.splitn(3, '.');
        let (Some(resource), Some(scope), Some(action)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(err());
        };
        let action = Action::parse(resource, action).ok_or_else(err)?;
        let api = match (resource, scope) {
            (_, "*") => None,
            ("api", id) if !id.is_empty() => Some(ApiId(id.into())),
            _ => return Err(err()),
        };
        Ok(Self { api, action })
    }

    /// Every permission on every API: what the bootstrap root key holds.
    pub fn all() -> Vec<Permission> {
        Action::ALL
            .into_iter()
            .map(|action| Permission { api: None, action })
            .collect()
    }
}

impl std::fmt::Display for Permission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scope = self.api.as_ref().map_or("*", |a| a.as_str());
        write!(
            f,
            "{}.{scope}.{}",
            self.action.resource(),
            self.action.as_str()
        )
    }
}

impl TryFrom<String> for Permission {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Self::parse(&s)
    }
}

impl From<Permission> for String {
    fn from(p: Permission) -> String {
        p.to_string()
    }
}

/// The permissions a root key holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PermissionSet(pub Vec<Permission>);

impl PermissionSet {
    /// Whether `action` is allowed on `api` (or, with `api = None`, on every API).
    pub fn allows(&self, action: Action, api: Option<&ApiId>) -> bool {
        self.0.iter().any(|p| {
            p.action == action
                && match (&p.api, api) {
                    (None, _) => true,
                    (Some(granted), Some(wanted)) => granted == wanted,
                    (Some(_), None) => false,
                }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_allow() {
        let p = Permission::parse("api.*.verify_key").unwrap();
        assert_eq!(p.to_string(), "api.*.verify_key");
        let q = Permission::parse("api.api_123.read_key").unwrap();
        let set = PermissionSet(vec![p, q]);
        let a = ApiId::from("api_123");
        let b = ApiId::from("api_999");
        assert!(set.allows(Action::VerifyKey, Some(&b)));
        assert!(set.allows(Action::ReadKey, Some(&a)));
        assert!(!set.allows(Action::ReadKey, Some(&b)));
        assert!(!set.allows(Action::ReadKey, None));
        assert!(!set.allows(Action::DeleteKey, Some(&a)));
        assert!(Permission::parse("api.*.fly").is_err());
        assert_eq!(
            Permission::parse("ratelimit.*.limit").unwrap().action,
            Action::Limit
        );
        let i = Permission::parse("identity.*.create_identity").unwrap();
        assert_eq!(i.to_string(), "identity.*.create_identity");
        assert!(PermissionSet(vec![i]).allows(Action::CreateIdentity, None));
        assert!(Permission::parse("identity.id_1.create_identity").is_err());
        assert!(Permission::parse("api.*.create_identity").is_err());
        assert!(Permission::parse("identity.*.verify_key").is_err());
        assert!(Permission::parse("api..verify_key").is_err());
    }
}
