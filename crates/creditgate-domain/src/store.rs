//! The `KeyStore` port: durable workspaces, APIs, keys and root keys.
//! Balances are not here: they belong to the limiter's `Ledger`.

use async_trait::async_trait;
use serde_json::{Map, Value};

use crate::{
    ApiId, ApiRecord, Credits, Crossing, IdentityRecord, KeyId, KeyRecord, NewKey,
    RatelimitOverride, RatelimitRule, Refill, RootKeyRecord, WebhookDelivery, WebhookEndpoint,
    WorkspaceId,
};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("conflict: {0}")]
    Conflict(String),
    #[error("storage backend unavailable: {0}")]
    Unavailable(String),
    #[error("storage backend error: {0}")]
    Backend(String),
}

/// A partial update of a key; `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Debug, Clone, Default)]
pub struct KeyPatch {
    pub name: Option<Option<String>>,
    pub external_id: Option<Option<String>>,
    pub meta: Option<Option<Map<String, Value>>>,
    pub expires: Option<Option<i64>>,
    pub enabled: Option<bool>,
    pub refill: Option<Option<Refill>>,
    /// Replaces the key's rate limits.
    pub ratelimits: Option<Vec<RatelimitRule>>,
    /// Replaces the key's balance thresholds.
    pub credit_alerts: Option<Vec<u64>>,
}

/// What `identities.updateIdentity` changes (`None`: leave as it is).
#[derive(Debug, Clone, Default)]
pub struct IdentityPatch {
    /// `Some(None)` clears the meta.
    pub meta: Option<Option<Map<String, Value>>>,
    /// Replaces the identity's rate limits.
    pub ratelimits: Option<Vec<RatelimitRule>>,
    /// Replaces the balance thresholds of the identity's pool (it has one).
    pub credit_alerts: Option<Vec<u64>>,
}

impl KeyPatch {
    pub fn is_empty(&self) -> bool {
        self.name.is_none()
            && self.external_id.is_none()
            && self.meta.is_none()
            && self.expires.is_none()
            && self.enabled.is_none()
            && self.refill.is_none()
            && self.ratelimits.is_none()
            && self.credit_alerts.is_none()
    }
}

/// One page of `apis.listKeys`.
#[derive(Debug, Clone)]
pub struct KeyPage {
    pub keys: Vec<KeyRecord>,
    /// Pass back to get the next page; `None` when this is the last one.
    pub cursor: Option<String>,
}

/// One page of `identities.listIdentities`.
#[derive(Debug, Clone)]
pub struct IdentityPage {
    pub identities: Vec<IdentityRecord>,
    /// Pass back to get the next page; `None` when this is the last one.
    pub cursor: Option<String>,
}

#[async_trait]
pub trait KeyStore: Send + Sync {
    /// Makes sure the workspace and the root key exist (idempotent on the hash).
    async fn ensure_root_key(&self, root: &RootKeyRecord) -> Result<(), StoreError>;
    async fn insert_root_key(&self, root: &RootKeyRecord) -> Result<(), StoreError>;
    async fn root_key_by_hash(&self, hash: &str) -> Result<Option<RootKeyRecord>, StoreError>;
    /// Any root key at all (first-start detection).
    async fn has_root_keys(&self) -> Result<bool, StoreError>;

    async fn create_api(&self, api: &ApiRecord) -> Result<(), StoreError>;
    /// Live (not deleted) API of the workspace.
    async fn get_api(
        &self,
        workspace: &WorkspaceId,
        id: &ApiId,
    ) -> Result<Option<ApiRecord>, StoreError>;
    /// Soft-deletes the API and with it every key of it. `false` if it did not exist.
    async fn delete_api(&self, workspace: &WorkspaceId, id: &ApiId) -> Result<bool, StoreError>;

    async fn create_key(&self, key: &NewKey) -> Result<(), StoreError>;
    /// Live key (not deleted, API not deleted) by the SHA-256 of its secret.
    async fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, StoreError>;
    /// Live key by id.
    async fn key_by_id(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;
    async fn list_keys(
        &self,
        api: &ApiId,
        limit: u32,
        cursor: Option<&str>,
        external_id: Option<&str>,
    ) -> Result<KeyPage, StoreError>;
    /// Applies the patch; `None` when the key does not exist.
    async fn update_key(
        &self,
        id: &KeyId,
        patch: &KeyPatch,
        now_ms: i64,
    ) -> Result<Option<KeyRecord>, StoreError>;
    /// Soft-deletes the key. `false` if it did not exist.
    async fn delete_key(&self, id: &KeyId, now_ms: i64) -> Result<bool, StoreError>;

    /// Gives a live key a new secret (hash and visible start); the current one becomes
    /// its previous secret until `previous_expires`, or is forgotten at once when
    /// `None`. The key as it is afterwards, `None` when it is not live.
    async fn reroll_key(
        &self,
        id: &KeyId,
        hash: &str,
        start: &str,
        previous_expires: Option<i64>,
        now_ms: i64,
    ) -> Result<Option<KeyRecord>, StoreError>;

    /// Creates the identity (and, when it has a pool, the pool's ledger account with
    /// `pool` credits, `None`: unlimited), in one transaction; `Conflict` when the
    /// workspace has an identity with its external id.
    async fn create_identity(
        &self,
        identity: &IdentityRecord,
        pool: Option<Credits>,
    ) -> Result<(), StoreError>;
    /// Opens the shared pool of an identity that has none, with `remaining` credits;
    /// `Conflict` when it has one.
    async fn open_pool(
        &self,
        identity: &IdentityRecord,
        remaining: Credits,
        refill: Option<&Refill>,
        now_ms: i64,
    ) -> Result<(), StoreError>;
    /// The workspace's identity whose id or external id is `identity`.
    async fn identity(
        &self,
        workspace: &WorkspaceId,
        identity: &str,
    ) -> Result<Option<IdentityRecord>, StoreError>;
    /// Identities of the workspace ordered by id; the cursor is the last id of the page.
    async fn list_identities(
        &self,
        workspace: &WorkspaceId,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<IdentityPage, StoreError>;
    /// Replaces the identity's meta (`None` clears it); `None` when it does not exist.
    async fn update_identity(
        &self,
        workspace: &WorkspaceId,
        identity: &str,
        patch: &IdentityPatch,
        now_ms: i64,
    ) -> Result<Option<IdentityRecord>, StoreError>;
    /// Deletes the identity and unlinks its keys (their external id is cleared), in one
    /// transaction. The deleted identity, `None` when it did not exist.
    async fn delete_identity(
        &self,
        workspace: &WorkspaceId,
        identity: &str,
        now_ms: i64,
    ) -> Result<Option<IdentityRecord>, StoreError>;

    /// Sets the override of its (workspace, namespace, identifier): creates it, or
    /// changes its limit and window keeping its id and creation time. Answers it as
    /// stored.
    async fn set_override(
        &self,
        wanted: &RatelimitOverride,
    ) -> Result<RatelimitOverride, StoreError>;
    /// Every override of a namespace, by id.
    async fn overrides(
        &self,
        workspace: &WorkspaceId,
        namespace: &str,
    ) -> Result<Vec<RatelimitOverride>, StoreError>;
    /// One page of a namespace's overrides by id, after `cursor`, and the cursor of the
    /// next page when there is one.
    async fn list_overrides(
        &self,
        workspace: &WorkspaceId,
        namespace: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<RatelimitOverride>, Option<String>), StoreError>;
    /// Deletes the override of exactly `identifier`; whether there was one.
    async fn delete_override(
        &self,
        workspace: &WorkspaceId,
        namespace: &str,
        identifier: &str,
    ) -> Result<bool, StoreError>;

    /// Records the crossings one decision on `account` (a key, or an identity's pool)
    /// made, each as a `credits.low` or `credits.exhausted` event in the webhook outbox,
    /// in one transaction, unless the same threshold fired since its last re-arming (a
    /// top-up lifting the balance to it again). Answers how many events it recorded.
    async fn record_crossings(
        &self,
        account: &KeyId,
        crossings: &[Crossing],
        now_ms: i64,
    ) -> Result<usize, StoreError>;

    /// Stores a new webhook endpoint.
    async fn create_webhook_endpoint(&self, endpoint: &WebhookEndpoint) -> Result<(), StoreError>;
    /// One page of the workspace's webhook endpoints by id, after `cursor`, and the
    /// cursor of the next page when there is one.
    async fn list_webhook_endpoints(
        &self,
        workspace: &WorkspaceId,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<(Vec<WebhookEndpoint>, Option<String>), StoreError>;
    /// Deletes the workspace's endpoint `id`; whether there was one.
    async fn delete_webhook_endpoint(
        &self,
        workspace: &WorkspaceId,
        id: &str,
    ) -> Result<bool, StoreError>;
    /// One page of the deliveries to the workspace's endpoint `id`, newest first, with
    /// their attempts; `None` when the workspace has no such endpoint.
    async fn list_webhook_deliveries(
        &self,
        workspace: &WorkspaceId,
        id: &str,
        limit: u32,
        cursor: Option<&str>,
    ) -> Result<Option<(Vec<WebhookDelivery>, Option<String>)>, StoreError>;
}
