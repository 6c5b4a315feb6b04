//! `analytics.getUsage` (creditgate's extension): parse → one service call → map.

use axum::extract::State;
use axum::Json;
use creditgate_analytics::UsageGroup;
use creditgate_service::GetUsage;

use super::ok;
use crate::auth::RootKey;
use crate::error::ApiError;
use crate::extract::ApiJson;
use crate::state::AppState;
use crate::wire::*;

#[utoipa::path(post, path = "/v2/analytics.getUsage", tag = "analytics", request_body = GetUsageRequest,
    responses((status = 200, body = Envelope<UsageData>), (status = 400, body = crate::error::ErrorEnvelope)),
    security(("rootKey" = [])))]
pub async fn get_usage(
    State(state): State<AppState>,
    RootKey(caller): RootKey,
    ApiJson(req): ApiJson<GetUsageRequest>,
) -> Result<Json<Envelope<UsageData>>, ApiError> {
    let query = GetUsage::try_from(req)?;
    let (granularity, group_by) = (query.granularity, query.group_by);
    let buckets = state.service.usage(&caller, query).await?;
    Ok(ok(UsageData {
        granularity: granularity.as_str().to_owned(),
        buckets: buckets
            .into_iter()
            .map(|b| {
                let mut data = UsageBucketData {
                    time: b.time,
                    outcome: None,
                    key_id: None,
                    tag: None,
                    count: b.count,
                    spent_credits: b.spent_credits,
                };
                match group_by {
                    Some(UsageGroup::Outcome) => data.outcome = b.group,
                    Some(UsageGroup::KeyId) => data.key_id = b.group,
                    Some(UsageGroup::Tag) => data.tag = b.group,
                    None => {}
                }
                data
            })
            .collect(),
    }))
}
