//! `analytics.getUsage`: verification counts and spent credits over time, read from the
//! analytics store (ClickHouse in multi-node mode, the SQL analytics tables otherwise).

use creditgate_analytics::{Granularity, UsageBucket, UsageGroup, UsageQuery};
use creditgate_domain::{Action, ApiId, KeyId};

use crate::{Caller, FieldError, Service, ServiceError};

/// Most buckets one answer holds (a day of minutes).
pub const MAX_USAGE_BUCKETS: usize = 1_440;
/// The widest range one query may span: 400 days.
pub const MAX_USAGE_RANGE_MS: i64 = 400 * 86_400_000;

/// A usage query as the caller asked it; [`Service::usage`] checks the range and
/// resolves the filters to ids.
#[derive(Debug, Clone)]
pub struct GetUsage {
    pub api_id: Option<ApiId>,
    pub key_id: Option<KeyId>,
    pub external_id: Option<String>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub granularity: Granularity,
    pub group_by: Option<UsageGroup>,
}

impl Service {
    /// The usage buckets of the caller's workspace. Needs `api.*.read_analytics`, or
    /// `api.<apiId>.read_analytics` for a query of one API or of one of its keys.
    pub async fn usage(
        &self,
        caller: &Caller,
        cmd: GetUsage,
    ) -> Result<Vec<UsageBucket>, ServiceError> {
        let mut api = cmd.api_id.clone();
        if let Some(key_id) = &cmd.key_id {
            let key = self.find_key(caller, key_id, Action::ReadAnalytics).await?;
            if api.as_ref().is_some_and(|a| *a != key.api_id) {
                return Err(ServiceError::Unprocessable(vec![FieldError::new(
                    "body.keyId",
                    "belongs to another API than body.apiId",
                )
                .fix("omit body.apiId, or send the key's own API")]));
            }
            api = Some(key.api_id);
        }
        caller.require(Action::ReadAnalytics, api.as_ref())?;
        if let (Some(api_id), None) = (&cmd.api_id, &cmd.key_id) {
            self.store
                .get_api(caller.workspace(), api_id)
                .await?
                .ok_or(ServiceError::ApiNotFound)?;
        }
        let identity_id = match &cmd.external_id {
            Some(external) => Some(
                self.store
                    .identity(caller.workspace(), external)
                    .await?
                    .ok_or(ServiceError::IdentityNotFound)?
                    .id,
            ),
            None => None,
        };
        let Some(source) = &self.usage else {
            return Err(ServiceError::Unavailable(
                "this node keeps no analytics to read usage from".into(),
            ));
        };
        let query = UsageQuery {
            workspace_id: caller.workspace().to_string(),
            api_id: api.map(|a| a.to_string()),
            key_id: cmd.key_id.map(|k| k.to_string()),
            identity_id: identity_id.map(|i| i.to_string()),
            from_ms: cmd.from_ms,
            to_ms: cmd.to_ms,
            granularity: cmd.granularity,
            group_by: cmd.group_by,
            max_buckets: MAX_USAGE_BUCKETS,
        };
        let mut buckets = source
            .usage(&query)
            .await
            .map_err(|e| ServiceError::Unavailable(e.to_string()))?;
        if buckets.len() > MAX_USAGE_BUCKETS {
            return Err(ServiceError::Unprocessable(vec![FieldError::new(
                "body.groupBy",
                format!("the answer would hold more than {MAX_USAGE_BUCKETS} buckets"),
            )
            .fix(
                "narrow the range (body.from, body.to), choose a coarser body.granularity, \
                 or filter by body.apiId or body.keyId",
            )]));
        }
        // One order whatever the store's collation.
        buckets.sort();
        Ok(buckets)
    }
}
