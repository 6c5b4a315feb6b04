//! Credit history: the entries of a key's account, or of an identity's shared pool,
//! newest first, a page at a time. Each entry is written by the ledger transaction of
//! the change it records (`creditgate_limiter::rules`); this only finds the account the
//! caller may read and pages through it.

use std::sync::Arc;

use creditgate_domain::{Action, KeyId};
use creditgate_limiter::ports::CreditEntry;
use creditgate_limiter::EngineError;

use crate::identities::pool_account;
use crate::{Caller, Service, ServiceError};

/// A page request: entries with a seq below `before` (the previous page's cursor; `None`:
/// from the newest), at most `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryQuery {
    pub before: Option<u64>,
    pub limit: u32,
}

/// One page of a credit history, newest first, and the cursor of the next (older) page
/// when there is one: the seq of this page's oldest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub entries: Vec<CreditEntry>,
    pub cursor: Option<String>,
}

impl Service {
    /// `keys.getCreditHistory`: the history of a key the caller may read (`read_key`
    /// on its API), after a refill that is due (as `keys.getKey` applies it).
    pub async fn key_credit_history(
        &self,
        caller: &Caller,
        key_id: &KeyId,
        query: HistoryQuery,
    ) -> Result<HistoryPage, ServiceError> {
        let key = self.find_key(caller, key_id, Action::ReadKey).await?;
        self.refill_if_due(Arc::new(key), self.clock.now_ms())
            .await?;
        self.history_page(key_id, query).await
    }

    /// `identities.getCreditHistory`: the history of the identity's shared pool (empty
    /// when it has none), after a refill that is due.
    pub async fn identity_credit_history(
        &self,
        caller: &Caller,
        identity: &str,
        query: HistoryQuery,
    ) -> Result<HistoryPage, ServiceError> {
        let found = self.get_identity(caller, identity).await?;
        if found.pool.is_none() {
            return Ok(HistoryPage {
                entries: Vec::new(),
                cursor: None,
            });
        }
        self.refill_pool_if_due(&found, self.clock.now_ms()).await?;
        self.history_page(&pool_account(&found), query).await
    }

    async fn history_page(
        &self,
        account: &KeyId,
        query: HistoryQuery,
    ) -> Result<HistoryPage, ServiceError> {
        let limit = query.limit.clamp(1, 1_000);
        let mut entries = self
            .engine
            .ledger()
            .credit_history(account, query.before, limit + 1)
            .await
            .map_err(EngineError::from)?;
        let more = entries.len() > usize::try_from(limit).unwrap_or(usize::MAX);
        entries.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        let cursor = more
            .then(|| entries.last().map(|e| e.seq.to_string()))
            .flatten();
        Ok(HistoryPage { entries, cursor })
    }
}
