//! Key operations: create, read (with the exact balance), update, change credits,
//! delete. A refill due in the current period is applied before any read or change of
//! the balance.

use std::sync::Arc;

use creditgate_domain::{
    hash_secret, new_secret, secret_start, Action, ApiId, ApiRecord, KeyId, KeyPatch, KeyRecord,
    NewKey, RatelimitRule, Refill, StoreError,
};
use creditgate_limiter::CreditOp;

use crate::{Caller, CreateKey, Service, ServiceError, Ticket, UpdateCredits, UpdateKey};

/// A key as a caller sees it: the record after any due refill, and its exact balance.
#[derive(Debug, Clone)]
pub struct KeyView {
    pub record: KeyRecord,
    /// `None`: unlimited. The balance outside holds.
    pub remaining: Option<u64>,
    /// Credits in open holds.
    pub reserved: u64,
    /// The exact balance of its identity's shared pool, when it has one.
    pub pool_remaining: Option<u64>,
}

/// A new key: its id and its secret (shown once, stored only as a hash).
#[derive(Debug, Clone)]
pub struct CreatedKey {
    pub key_id: KeyId,
    pub secret: String,
}

/// A refill needs a balance to refill. Known from the request alone it is invalid input;
/// known only from the stored key it is a conflict with the key's state.
/// Random bytes in a secret that `createKey` did not size, and in rerolled secrets.
pub const DEFAULT_BYTE_LENGTH: usize = 16;

/// The prefix of a key's secret, from its visible start (`<prefix>_` and 4 characters).
fn key_prefix(start: &str) -> Option<&str> {
    let cut = start.len().checked_sub(5)?;
    start
        .get(cut..)
        .filter(|tail| tail.starts_with('_'))
        .and_then(|_| start.get(..cut))
        .filter(|p| !p.is_empty())
}

fn refill_needs_balance(
    refill: Option<&Refill>,
    limited: bool,
    from_request: bool,
) -> Result<(), ServiceError> {
    if refill.is_none() || limited {
        return Ok(());
    }
    if from_request {
        return Err(ServiceError::field(
            "body.credits.refill",
            "a refill needs a balance: credits.remaining is null (unlimited)",
            "set credits.remaining to a number, or drop the refill",
        ));
    }
    Err(ServiceError::Conflict(
        "the key has unlimited credits, and a refill needs a balance: send \
         credits.remaining with the refill"
            .into(),
    ))
}

impl Service {
    /// Applies the key's periodic refill if this is its first use in a new period, so
    /// that every read and change of the balance sees it. The ledger applies a refill
    /// once per period however many nodes race for it.
    pub(crate) async fn refill_if_due(
        &self,
        key: Arc<KeyRecord>,
        now: i64,
    ) -> Result<Arc<KeyRecord>, ServiceError> {
        let Some(refill) = key.refill else {
            return Ok(key);
        };
        let last = key.last_refill_at.unwrap_or(key.created_at);
        if !key.limited || !refill.is_due(last, now) {
            return Ok(key);
        }
        let op = CreditOp::Refill {
            amount: refill.amount,
            period_start: refill.period_start(now),
        };
        self.engine.update(&key.id, op).await?;
        // Applied here or by another node first: either way this period is done.
        let mut updated = (*key).clone();
        updated.last_refill_at = Some(now);
        let updated = Arc::new(updated);
        self.keys.insert(key.hash.clone(), updated.clone());
        Ok(updated)
    }

    /// The key with its exact balance, after any due refill.
    pub(crate) async fn view(&self, key: Arc<KeyRecord>) -> Result<KeyView, ServiceError> {
        let key = self.refill_if_due(key, self.clock.now_ms()).await?;
        let (remaining, reserved) = self.books(&key).await?;
        let pool_remaining = match key.identity.as_deref() {
            Some(identity) => self.pool_balance(identity).await?,
            None => None,
        };
        Ok(KeyView {
            record: (*key).clone(),
            remaining,
            reserved,
            pool_remaining,
        })
    }

    /// The key's balance outside holds (`None`: unlimited) and its credits in holds.
    async fn books(&self, key: &KeyRecord) -> Result<(Option<u64>, u64), ServiceError> {
        let (remaining, reserved) = self.engine.books(&key.id).await?;
        Ok((remaining.filter(|_| key.limited), reserved))
    }

    /// The caller's live key by id (not found for unknown, deleted or another
    /// workspace's), after checking `action` on its API (forbidden).
    pub(crate) async fn find_key(
        &self,
        caller: &Caller,
        key_id: &KeyId,
        action: Action,
    ) -> Result<KeyRecord, ServiceError> {
        let key = self
            .store
            .key_by_id(key_id)
            .await?
            .filter(|k| &k.workspace_id == caller.workspace())
            .ok_or(ServiceError::KeyNotFound)?;
        caller.require(action, Some(&key.api_id))?;
        Ok(key)
    }

    pub async fn create_key(
        &self,
        caller: &Caller,
        cmd: CreateKey,
    ) -> Result<CreatedKey, ServiceError> {
        caller.require(Action::CreateKey, Some(&cmd.api_id))?;
        refill_needs_balance(cmd.refill.as_ref(), cmd.remaining.is_some(), true)?;
        let api = self
            .store
            .get_api(caller.workspace(), &cmd.api_id)
            .await?
            .ok_or(ServiceError::ApiNotFound)?;
        let secret = new_secret(cmd.prefix.as_deref(), cmd.byte_length);
        let hash = hash_secret(&secret);
        let start = secret_start(&secret, cmd.prefix.as_deref());
        let key_id = self.insert_key(&api, cmd, hash, start).await?;
        Ok(CreatedKey { key_id, secret })
    }

    /// `keys.migrateKeys`: keys whose secrets exist elsewhere, imported by the SHA-256
    /// of the secret with their settings, so their holders keep them. Each key on its
    /// own: one whose hash is already known fails (`None`), the others are created
    /// (their id), answered in the order sent.
    pub async fn migrate_keys(
        &self,
        caller: &Caller,
        api_id: &ApiId,
        keys: Vec<(String, CreateKey)>,
    ) -> Result<Vec<Option<KeyId>>, ServiceError> {
        caller.require(Action::CreateKey, Some(api_id))?;
        for (_, cmd) in &keys {
            refill_needs_balance(cmd.refill.as_ref(), cmd.remaining.is_some(), true)?;
        }
        let api = self
            .store
            .get_api(caller.workspace(), api_id)
            .await?
            .ok_or(ServiceError::ApiNotFound)?;
        let mut outcomes = Vec::with_capacity(keys.len());
        for (hash, cmd) in keys {
            // The secret is not known: nothing of it is shown.
            match self.insert_key(&api, cmd, hash, String::new()).await {
                Ok(id) => outcomes.push(Some(id)),
                Err(ServiceError::Store(StoreError::Conflict(_))) => outcomes.push(None),
                Err(e) => return Err(e),
            }
        }
        Ok(outcomes)
    }

    /// Stores a new key of `api` with the secret hash `hash`.
    async fn insert_key(
        &self,
        api: &ApiRecord,
        cmd: CreateKey,
        hash: String,
        start: String,
    ) -> Result<KeyId, ServiceError> {
        let now = self.clock.now_ms();
        let record = KeyRecord {
            id: KeyId::generate(),
            workspace_id: api.workspace_id.clone(),
            api_id: api.id.clone(),
            hash,
            start,
            name: cmd.name,
            external_id: cmd.external_id,
            meta: cmd.meta,
            created_at: now,
            updated_at: None,
            expires: cmd.expires,
            enabled: cmd.enabled,
            limited: cmd.remaining.is_some(),
            refill: cmd.refill,
            last_refill_at: Some(now),
            identity: None,
            ratelimits: RatelimitRule::replacing(&[], cmd.ratelimits),
            previous: None,
            credit_alerts: cmd.credit_alerts,
        };
        let key_id = record.id.clone();
        self.store
            .create_key(&NewKey {
                record,
                remaining: cmd.remaining,
            })
            .await?;
        Ok(key_id)
    }

    /// Gives the key a new secret with the same prefix; everything else stays (id,
    /// balance, limits, identity). The old secret keeps verifying for `grace_ms`
    /// (`0`: it stops at once).
    pub async fn reroll_key(
        &self,
        caller: &Caller,
        key_id: &KeyId,
        grace_ms: u64,
    ) -> Result<CreatedKey, ServiceError> {
        let key = self.find_key(caller, key_id, Action::CreateKey).await?;
        let prefix = key_prefix(&key.start);
        let secret = new_secret(prefix, DEFAULT_BYTE_LENGTH);
        let now = self.clock.now_ms();
        let previous_expires =
            (grace_ms > 0).then(|| now.saturating_add(i64::try_from(grace_ms).unwrap_or(i64::MAX)));
        let rerolled = self
            .store
            .reroll_key(
                &key.id,
                &hash_secret(&secret),
                &secret_start(&secret, prefix),
                previous_expires,
                now,
            )
            .await?
            .ok_or(ServiceError::KeyNotFound)?;
        // Every node forgets the key under its old secret (and the one before).
        self.invalidate_key(&key).await;
        Ok(CreatedKey {
            key_id: rerolled.id,
            secret,
        })
    }

    pub async fn get_key(&self, caller: &Caller, key_id: &KeyId) -> Result<KeyView, ServiceError> {
        let key = self.find_key(caller, key_id, Action::ReadKey).await?;
        self.view(Arc::new(key)).await
    }

    /// The key behind a secret. Unknown, foreign and unreadable keys are all not found:
    /// existence does not leak.
    pub async fn whoami(&self, caller: &Caller, secret: &str) -> Result<KeyView, ServiceError> {
        let key = self
            .key_by_hash(&hash_secret(secret))
            .await?
            .filter(|k| caller.sees(&k.workspace_id, Action::ReadKey, &k.api_id))
            .ok_or(ServiceError::KeyNotFound)?;
        self.view(key).await
    }

    pub async fn delete_key(&self, caller: &Caller, key_id: &KeyId) -> Result<(), ServiceError> {
        let key = self.find_key(caller, key_id, Action::DeleteKey).await?;
        let deleted = self.store.delete_key(&key.id, self.clock.now_ms()).await?;
        self.invalidate_key(&key).await;
        if !deleted {
            return Err(ServiceError::KeyNotFound);
        }
        Ok(())
    }

    /// Sets, increments or decrements the balance; returns the key as it is afterwards.
    /// With a `ticket` the ledger transaction that changes the balance records the
    /// decision; a replay changes nothing and answers the key as it is.
    pub async fn update_credits(
        &self,
        caller: &Caller,
        key_id: &KeyId,
        cmd: UpdateCredits,
        ticket: Option<&Ticket>,
    ) -> Result<KeyView, ServiceError> {
        let key = self.find_key(caller, key_id, Action::UpdateKey).await?;
        if ticket.is_some_and(|t| t.replay) {
            return self.view(Arc::new(key)).await;
        }
        // A refill due in this period applies before the change, not after it.
        let key = self
            .refill_if_due(Arc::new(key), self.clock.now_ms())
            .await?;
        if !key.limited && matches!(cmd.op, CreditOp::Increment(_) | CreditOp::Decrement(_)) {
            return Err(ServiceError::Conflict(
                "the key has unlimited credits: use operation 'set' with a value to give it a \
                 balance first"
                    .into(),
            ));
        }
        let record = self.apply_credit_op(caller, &key, cmd.op, ticket).await?;
        let (remaining, reserved) = self.books(&record).await?;
        let pool_remaining = match record.identity.as_deref() {
            Some(identity) => self.pool_balance(identity).await?,
            None => None,
        };
        Ok(KeyView {
            record,
            remaining,
            reserved,
            pool_remaining,
        })
    }

    /// Runs a balance change through the engine (its history entry names the caller's
    /// root key); a switch to unlimited also drops the refill. Returns the key as it is
    /// afterwards.
    async fn apply_credit_op(
        &self,
        caller: &Caller,
        key: &KeyRecord,
        op: CreditOp,
        ticket: Option<&Ticket>,
    ) -> Result<KeyRecord, ServiceError> {
        let mark = ticket.map(Ticket::mark);
        self.engine
            .update_marked(&key.id, op, mark.as_ref(), Some(caller.root_key_id()))
            .await?;
        let mut record = key.clone();
        if op == CreditOp::Set(None) && key.refill.is_some() {
            let patch = KeyPatch {
                refill: Some(None),
                ..KeyPatch::default()
            };
            record = self
                .store
                .update_key(&key.id, &patch, self.clock.now_ms())
                .await?
                .ok_or(ServiceError::KeyNotFound)?;
        }
        record.limited = !matches!(op, CreditOp::Set(None));
        self.invalidate_key(key).await;
        Ok(record)
    }

    pub async fn update_key(&self, caller: &Caller, cmd: UpdateKey) -> Result<(), ServiceError> {
        let key = self
            .find_key(caller, &cmd.key_id, Action::UpdateKey)
            .await?;
        // A refill needs a balance after the change; unlimited drops the refill.
        let limited_after = match cmd.remaining {
            Some(r) => r.is_some(),
            None => key.limited,
        };
        refill_needs_balance(
            cmd.refill.as_ref().and_then(Option::as_ref),
            limited_after,
            cmd.remaining.is_some(),
        )?;
        let refill = match cmd.remaining {
            Some(None) => Some(None),
            _ => cmd.refill,
        };
        let op = cmd.remaining.map(CreditOp::Set);
        if let Some(op) = op {
            self.apply_credit_op(caller, &key, op, None).await?;
        }
        let patch = KeyPatch {
            name: cmd.name,
            external_id: cmd.external_id,
            meta: cmd.meta,
            expires: cmd.expires,
            enabled: cmd.enabled,
            refill,
            ratelimits: cmd
                .ratelimits
                .map(|wanted| RatelimitRule::replacing(&key.ratelimits, wanted)),
            credit_alerts: cmd.credit_alerts,
        };
        if !patch.is_empty() {
            self.store
                .update_key(&key.id, &patch, self.clock.now_ms())
                .await?
                .ok_or(ServiceError::KeyNotFound)?;
        }
        self.invalidate_key(&key).await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::key_prefix;

    #[test]
    fn the_prefix_is_read_back_from_the_start() {
        assert_eq!(key_prefix("sk_live_AbCd"), Some("sk_live"));
        assert_eq!(key_prefix("sk_AbCd"), Some("sk"));
        assert_eq!(key_prefix("AbCd"), None);
        assert_eq!(key_prefix("_AbCd"), None);
        assert_eq!(key_prefix(""), None);
    }
}
