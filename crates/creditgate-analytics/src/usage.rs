//! Usage over time: verification counts and spent credits in time buckets, read from
//! the `key_verifications` rows a [`Sink`](crate::Sink) wrote. Every store that keeps
//! those rows answers the same [`UsageQuery`] with the same buckets for the same rows
//! (the SQL stores and ClickHouse; `analytics.getUsage` on the wire).

use async_trait::async_trait;

use crate::SinkError;

/// The width of a bucket. Buckets are aligned to the Unix epoch, so in UTC: a `day`
/// bucket runs from 00:00 to 24:00 UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Minute,
    Hour,
    Day,
}

impl Granularity {
    pub const ALL: [Granularity; 3] = [Granularity::Minute, Granularity::Hour, Granularity::Day];

    pub fn as_str(self) -> &'static str {
        match self {
            Granularity::Minute => "minute",
            Granularity::Hour => "hour",
            Granularity::Day => "day",
        }
    }

    pub fn millis(self) -> i64 {
        match self {
            Granularity::Minute => 60_000,
            Granularity::Hour => 3_600_000,
            Granularity::Day => 86_400_000,
        }
    }

    /// The start of the bucket `time_ms` falls in (`time_ms` ≥ 0).
    pub fn bucket_of(self, time_ms: i64) -> i64 {
        time_ms - time_ms.rem_euclid(self.millis())
    }

    pub fn parse(s: &str) -> Option<Granularity> {
        Granularity::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// What a bucket is further split by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageGroup {
    /// The verification's outcome (`VALID`, `USAGE_EXCEEDED`, …).
    Outcome,
    /// The key's id.
    KeyId,
    /// Each tag of the verification: a row with two tags counts in both groups, a row
    /// without tags in none.
    Tag,
}

impl UsageGroup {
    pub const ALL: [UsageGroup; 3] = [UsageGroup::Outcome, UsageGroup::KeyId, UsageGroup::Tag];

    pub fn as_str(self) -> &'static str {
        match self {
            UsageGroup::Outcome => "outcome",
            UsageGroup::KeyId => "keyId",
            UsageGroup::Tag => "tag",
        }
    }

    pub fn parse(s: &str) -> Option<UsageGroup> {
        UsageGroup::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// Rows of one workspace with `from_ms ≤ time < to_ms`, optionally of one API, key or
/// identity, counted per bucket (and group).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageQuery {
    pub workspace_id: String,
    pub api_id: Option<String>,
    pub key_id: Option<String>,
    pub identity_id: Option<String>,
    pub from_ms: i64,
    pub to_ms: i64,
    pub granularity: Granularity,
    pub group_by: Option<UsageGroup>,
    /// At most this many buckets are returned; the store is asked for one more, so the
    /// caller can tell that the answer would have been longer.
    pub max_buckets: usize,
}

/// One bucket: the rows of one time span (and group) that exist. Buckets without rows
/// are not returned.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct UsageBucket {
    /// The bucket's start, Unix ms.
    pub time: i64,
    /// The group's value; `None` without `group_by`.
    pub group: Option<String>,
    /// Verifications (rows).
    pub count: u64,
    /// The sum of their `spent_credits`.
    pub spent_credits: u64,
}

/// A store of `key_verifications` rows that answers usage queries.
#[async_trait]
pub trait UsageSource: Send + Sync {
    /// The buckets of `q`, ordered by time then group, at most `q.max_buckets + 1`.
    async fn usage(&self, q: &UsageQuery) -> Result<Vec<UsageBucket>, SinkError>;
}

/// Computes the buckets of `q` from rows in memory: the definition the stores' queries
/// implement, used by their tests.
pub fn usage_of<'a>(
    q: &UsageQuery,
    rows: impl IntoIterator<Item = &'a crate::VerificationEvent>,
) -> Vec<UsageBucket> {
    use std::collections::BTreeMap;
    let mut buckets: BTreeMap<(i64, Option<String>), (u64, u64)> = BTreeMap::new();
    for e in rows {
        let kept = *e.workspace_id == *q.workspace_id
            && q.api_id.as_deref().is_none_or(|a| *e.api_id == *a)
            && q.key_id.as_deref().is_none_or(|k| *e.key_id == *k)
            && q.identity_id
                .as_deref()
                .is_none_or(|i| *e.identity_id == *i)
            && e.time >= q.from_ms
            && e.time < q.to_ms;
        if !kept {
            continue;
        }
        let time = q.granularity.bucket_of(e.time);
        let groups: Vec<Option<String>> = match q.group_by {
            None => vec![None],
            Some(UsageGroup::Outcome) => vec![Some(e.outcome.to_owned())],
            Some(UsageGroup::KeyId) => vec![Some(e.key_id.to_string())],
            Some(UsageGroup::Tag) => e.tags.iter().map(|t| Some(t.clone())).collect(),
        };
        for g in groups {
            let b = buckets.entry((time, g)).or_default();
            b.0 += 1;
            b.1 += e.spent_credits;
        }
    }
    buckets
        .into_iter()
        .map(|((time, group), (count, spent_credits))| UsageBucket {
            time,
            group,
            count,
            spent_credits,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_aligned_to_the_epoch_in_utc() {
        let t = 1_765_000_123_456; // 2025-12-06T05:48:43.456Z
        assert_eq!(Granularity::Minute.bucket_of(t), 1_765_000_080_000);
        assert_eq!(Granularity::Hour.bucket_of(t), 1_764_997_200_000);
        assert_eq!(Granularity::Day.bucket_of(t), 1_764_979_200_000);
        assert_eq!(
            Granularity::Day.bucket_of(1_764_979_200_000),
            1_764_979_200_000
        );
    }

    #[test]
    fn names_parse_back() {
        for g in Granularity::ALL {
            assert_eq!(Granularity::parse(g.as_str()), Some(g));
        }
        for g in UsageGroup::ALL {
            assert_eq!(UsageGroup::parse(g.as_str()), Some(g));
        }
        assert_eq!(Granularity::parse("week"), None);
        assert_eq!(UsageGroup::parse("Outcome"), None);
    }
}
