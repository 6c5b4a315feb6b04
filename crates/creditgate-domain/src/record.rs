//! Records of workspaces' APIs, keys and root keys as the stores hold them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use std::sync::Arc;

use crate::{ApiId, Credits, IdentityId, KeyId, PermissionSet, Refill, RootKeyId, WorkspaceId};

/// An API: a namespace of keys in one workspace.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiRecord {
    pub id: ApiId,
    pub workspace_id: WorkspaceId,
    pub name: String,
    pub created_at: i64,
}

/// A key as stored: never the secret, only its SHA-256 and its visible start.
/// The balance lives in the ledger; `limited` says whether there is one at all.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub workspace_id: WorkspaceId,
    pub api_id: ApiId,
    pub hash: String,
    pub start: String,
    pub name: Option<String>,
    pub external_id: Option<String>,
    pub meta: Option<Map<String, Value>>,
    pub created_at: i64,
    pub updated_at: Option<i64>,
    /// Unix ms after which the key is `EXPIRED`.
    pub expires: Option<i64>,
    pub enabled: bool,
    /// `false` for unlimited keys (`remaining = null`).
    pub limited: bool,
    pub refill: Option<Refill>,
    /// When the last periodic refill was applied (creation time before the first).
    pub last_refill_at: Option<i64>,
    /// The identity the key belongs to: the workspace's identity with the key's
    /// `external_id` (created with the key when missing).
    pub identity: Option<Arc<IdentityRecord>>,
    /// Named rate limits of the key; one of the same name on its identity yields to it.
    pub ratelimits: Vec<RatelimitRule>,
    /// The secret the key had before its last reroll, while it still verifies.
    pub previous: Option<PreviousSecret>,
    /// Balance thresholds (`credits.alerts`), distinct, descending: a spend that takes
    /// the balance from at or above one to below it records a `credits.low` event.
    pub credit_alerts: Vec<u64>,
}

/// A key's secret before a reroll: its SHA-256 and when it stops verifying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousSecret {
    pub hash: String,
    /// Unix ms from which the old secret is unknown.
    pub expires: i64,
}

/// An identity: a customer (user, organisation) of the workspace that groups keys by
/// their `external_id`, unique in the workspace.
#[derive(Debug, Clone, PartialEq)]
pub struct IdentityRecord {
    pub id: IdentityId,
    pub workspace_id: WorkspaceId,
    pub external_id: String,
    pub meta: Option<Map<String, Value>>,
    pub created_at: i64,
    pub updated_at: Option<i64>,
    /// Named rate limits shared by all keys of the identity.
    pub ratelimits: Vec<RatelimitRule>,
    /// The identity's shared credit pool, when it has one: every verification of its
    /// keys also spends from it (the balance lives in the ledger, account = the id).
    pub pool: Option<PoolRecord>,
}

/// An identity's shared credit pool, as the key store keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolRecord {
    pub refill: Option<Refill>,
    /// When the last periodic refill was applied (creation time before the first).
    pub last_refill_at: Option<i64>,
    /// Balance thresholds of the pool (as [`KeyRecord::credit_alerts`]).
    pub credit_alerts: Vec<u64>,
}

/// A named rate limit on a key or an identity (stored as JSON with its owner). A
/// verification checks it when it names it, or always when `auto_apply` is set.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RatelimitRule {
    /// `rl_…`, kept across updates that keep the name.
    pub id: String,
    pub name: String,
    pub limit: u64,
    /// The window in milliseconds.
    #[serde(rename = "duration")]
    pub duration_ms: u64,
    pub auto_apply: bool,
}

impl RatelimitRule {
    /// `wanted` (ids not set yet) replacing `current`: a rule keeps the id of the
    /// current rule of its name, a new name gets a new id.
    pub fn replacing(current: &[RatelimitRule], wanted: Vec<RatelimitRule>) -> Vec<Self> {
        wanted
            .into_iter()
            .map(|rule| RatelimitRule {
                id: current
                    .iter()
                    .find(|r| r.name == rule.name)
                    .map_or_else(|| crate::ids::new_id("rl"), |r| r.id.clone()),
                ..rule
            })
            .collect()
    }
}

/// A rate-limit override: the limit and window that `ratelimit.limit` applies to the
/// identifiers of a namespace that match `identifier` (exactly, or as a pattern where
/// `*` stands for any run of characters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RatelimitOverride {
    /// `rlo_…`, kept when the override is set again.
    pub id: String,
    pub workspace_id: WorkspaceId,
    pub namespace: String,
    pub identifier: String,
    pub limit: u64,
    pub duration_ms: u64,
    pub created_at: i64,
    pub updated_at: Option<i64>,
}

impl RatelimitOverride {
    pub fn is_pattern(&self) -> bool {
        self.identifier.contains('*')
    }

    /// Whether `identifier` matches this override's identifier, where `*` matches any
    /// run of characters (the empty one too).
    pub fn matches(&self, identifier: &str) -> bool {
        glob_match(self.identifier.as_bytes(), identifier.as_bytes())
    }

    /// How specific a pattern is: its characters other than `*`.
    pub fn specificity(&self) -> usize {
        self.identifier.chars().filter(|&c| c != '*').count()
    }
}

/// `*`-only glob matching in linear time (the last `*` is the only backtrack point).
fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

impl KeyRecord {
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires.is_some_and(|e| e <= now_ms)
    }

    /// Whether a secret with this hash opens the key at `now_ms`: the current one, or
    /// the one before the last reroll until it expires.
    pub fn opens_with(&self, hash: &str, now_ms: i64) -> bool {
        self.hash == hash
            || self
                .previous
                .as_ref()
                .is_some_and(|p| p.hash == hash && now_ms < p.expires)
    }
}

/// What `keys.createKey` stores.
#[derive(Debug, Clone)]
pub struct NewKey {
    pub record: KeyRecord,
    /// Initial balance; `None` = unlimited.
    pub remaining: Option<Credits>,
}

/// A root key: authorises calls to the admin and verify routes of one workspace.
#[derive(Debug, Clone, PartialEq)]
pub struct RootKeyRecord {
    pub id: RootKeyId,
    pub workspace_id: WorkspaceId,
    pub hash: String,
    pub name: Option<String>,
    pub permissions: PermissionSet,
    pub created_at: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(identifier: &str) -> RatelimitOverride {
        RatelimitOverride {
            id: "rlo_1".into(),
            workspace_id: WorkspaceId::from("ws_1"),
            namespace: "api".into(),
            identifier: identifier.into(),
            limit: 1,
            duration_ms: 1_000,
            created_at: 0,
            updated_at: None,
        }
    }

    #[test]
    fn patterns_match_runs_of_characters() {
        for (pattern, text, want) in [
            ("user_1", "user_1", true),
            ("user_1", "user_12", false),
            ("*", "", true),
            ("*", "anything", true),
            ("*@acme.com", "ann@acme.com", true),
            ("*@acme.com", "ann@acme.co", false),
            ("user_*", "user_", true),
            ("user_*", "use", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abcbc", true),
            ("a*b*c", "acb", false),
            ("**x", "x", true),
        ] {
            assert_eq!(with(pattern).matches(text), want, "{pattern} ~ {text}");
        }
        assert_eq!(with("*@acme.com").specificity(), 9);
        assert!(with("a*").is_pattern() && !with("a").is_pattern());
    }
}
