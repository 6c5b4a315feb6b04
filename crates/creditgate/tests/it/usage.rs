//! Usage over time on every analytics store: the same rows written to ClickHouse,
//! SQLite and Postgres give the same buckets, and exactly those a plain count of the
//! rows gives (`usage::usage_of`), for every granularity, grouping and filter.

use std::sync::Arc;

use creditgate_analytics::clickhouse::{ClickHouseOptions, ClickHouseSink};
use creditgate_analytics::usage::usage_of;
use creditgate_analytics::{
    Batch, Granularity, Sink, UsageGroup, UsageQuery, UsageSource, VerificationEvent,
};
use creditgate_sql::SqlStore;
use creditgate_testkit::{unique_name, ClickHouse, Postgres, Shared};

/// 2025-12-06T05:46:15Z.
const START: i64 = 1_764_999_975_000;

/// 3 minutes of rows: two workspaces, three keys, outcomes, tags, spends; a request id
/// each.
fn rows() -> Vec<VerificationEvent> {
    let keys = [
        ("ws_a", "api_1", "key_1", "id_acme"),
        ("ws_a", "api_1", "key_2", ""),
        ("ws_a", "api_2", "key_3", "id_acme"),
        ("ws_b", "api_9", "key_9", ""),
    ];
    let outcomes = [
        "VALID",
        "VALID",
        "USAGE_EXCEEDED",
        "RATE_LIMITED",
        "NOT_FOUND",
    ];
    (0..180i64)
        .map(|i| {
            let (ws, api, key, identity) = keys[usize::try_from(i % 4).expect("small")];
            let outcome = outcomes[usize::try_from(i % 5).expect("small")];
            let spent = if outcome == "VALID" {
                u64::try_from(i % 7).expect("small")
            } else {
                0
            };
            let tags = match i % 3 {
                0 => vec![],
                1 => vec!["model=small".to_owned()],
                _ => vec!["model=large".to_owned(), "region=eu".to_owned()],
            };
            VerificationEvent {
                request_id: format!("req_{i:04}").into(),
                // One a second, plus a few in the same millisecond as another.
                time: START + i * 1_000 - i64::from(i % 11 == 0) * 1_000,
                workspace_id: ws.into(),
                api_id: api.into(),
                key_id: key.into(),
                node_id: "n1".into(),
                region: "local".into(),
                outcome,
                cost: spent.max(1),
                spent_credits: spent,
                remaining: Some(100),
                latency_us: 250,
                tags,
                identity_id: identity.into(),
                exceeded_ratelimits: vec![],
            }
        })
        .collect()
}

/// The queries compared: every granularity and grouping on the whole workspace, and
/// each filter, over the whole range and over one that cuts minutes.
fn queries() -> Vec<UsageQuery> {
    let base = UsageQuery {
        workspace_id: "ws_a".into(),
        api_id: None,
        key_id: None,
        identity_id: None,
        from_ms: START - 15_000,
        to_ms: START + 4 * 60_000,
        granularity: Granularity::Minute,
        group_by: None,
        max_buckets: 1_440,
    };
    let mut qs = Vec::new();
    for granularity in Granularity::ALL {
        for group_by in [
            None,
            Some(UsageGroup::Outcome),
            Some(UsageGroup::KeyId),
            Some(UsageGroup::Tag),
        ] {
            qs.push(UsageQuery {
                granularity,
                group_by,
                ..base.clone()
            });
        }
    }
    qs.push(UsageQuery {
        api_id: Some("api_1".into()),
        group_by: Some(UsageGroup::KeyId),
        ..base.clone()
    });
    qs.push(UsageQuery {
        key_id: Some("key_3".into()),
        group_by: Some(UsageGroup::Tag),
        ..base.clone()
    });
    qs.push(UsageQuery {
        identity_id: Some("id_acme".into()),
        group_by: Some(UsageGroup::Outcome),
        ..base.clone()
    });
    qs.push(UsageQuery {
        from_ms: START + 52_500,
        to_ms: START + 121_000,
        ..base.clone()
    });
    qs.push(UsageQuery {
        workspace_id: "ws_b".into(),
        ..base.clone()
    });
    qs.push(UsageQuery {
        workspace_id: "ws_none".into(),
        ..base.clone()
    });
    qs.push(UsageQuery {
        workspace_id: "ws_a' OR '1'='1".into(),
        ..base.clone()
    });
    qs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_rows_give_the_same_buckets_on_clickhouse_sqlite_and_postgres() {
    let rows = rows();
    let batch = Batch {
        verifications: rows.clone(),
        requests: vec![],
    };

    let dir = tempfile::tempdir().expect("a temp dir");
    let sqlite = SqlStore::connect(&format!(
        "sqlite:{}",
        dir.path().join("analytics.db").display()
    ))
    .await
    .expect("SQLite");
    let pg_url = Postgres::shared()
        .create_database(&unique_name("usage"))
        .expect("a Postgres database");
    let postgres = SqlStore::connect(&pg_url).await.expect("Postgres");
    let ch_url = ClickHouse::shared()
        .create_database(&unique_name("usage"))
        .expect("a ClickHouse database");
    let clickhouse = ClickHouseSink::connect(&ch_url, ClickHouseOptions::default())
        .await
        .expect("ClickHouse");

    let stores: Vec<(&str, Arc<dyn UsageSource>)> = {
        sqlite.write(&batch).await.expect("write to SQLite");
        postgres.write(&batch).await.expect("write to Postgres");
        clickhouse.write(&batch).await.expect("write to ClickHouse");
        // A retried batch whose first reply was lost lands twice on ClickHouse; the
        // usage counts it once.
        clickhouse.write(&batch).await.expect("write to ClickHouse");
        vec![
            ("SQLite", Arc::new(sqlite)),
            ("Postgres", Arc::new(postgres)),
            ("ClickHouse", Arc::new(clickhouse)),
        ]
    };

    let mut nonempty = 0;
    for q in queries() {
        let mut want = usage_of(&q, &rows);
        want.sort();
        if !want.is_empty() {
            nonempty += 1;
        }
        for (name, store) in &stores {
            let mut got = store
                .usage(&q)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            got.sort();
            assert_eq!(got, want, "{name}, {q:?}");
        }
    }
    assert!(nonempty >= 15, "the queries find rows: {nonempty}");

    // The reference itself, on a number worked out by hand: ws_a has 135 of the 180
    // rows (3 of every 4), all in one day.
    let all = usage_of(
        &UsageQuery {
            granularity: Granularity::Day,
            ..queries()[0].clone()
        },
        &rows,
    );
    assert_eq!(all.len(), 1);
    assert_eq!(all[0].count, 135);

    // More rows than the bound: one more than asked for comes back, so the caller
    // can tell.
    let q = UsageQuery {
        group_by: Some(UsageGroup::KeyId),
        max_buckets: 2,
        ..queries()[0].clone()
    };
    for (name, store) in &stores {
        let got = store.usage(&q).await.expect("usage");
        assert_eq!(got.len(), 3, "{name}");
    }
}
