//! The shared servers are started once per test binary, and the ClickHouse sink writes
//! to a real server (the launchers' own tests live in creditgate-local).

use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate_analytics::clickhouse::{ClickHouseOptions, ClickHouseSink};
use creditgate_analytics::{Batch, Batcher, BatcherConfig, RequestEvent, Sink, VerificationEvent};
use creditgate_testkit::{unique_name, ClickHouse, RedisServer, Shared};

#[test]
fn shared_instances_are_started_once() {
    let a = RedisServer::shared();
    let b = RedisServer::shared();
    assert!(std::ptr::eq(a, b));
    assert_eq!(a.command(&["PING"]).expect("ping"), "+PONG");
}

fn verification(i: u64, remaining: Option<u64>) -> VerificationEvent {
    VerificationEvent {
        request_id: format!("req_v{i}").into(),
        time: 1_700_000_000_000 + i64::try_from(i).unwrap(),
        workspace_id: "ws_1".into(),
        api_id: "api_1".into(),
        key_id: format!("key_{i}").into(),
        node_id: "node_a".into(),
        region: "local".into(),
        outcome: if remaining.is_some() {
            "VALID"
        } else {
            "NOT_FOUND"
        },
        cost: 1,
        spent_credits: u64::from(remaining.is_some()),
        remaining,
        latency_us: 100 + i,
        tags: vec![format!("tag{i}"), "path=/x".into()],
        identity_id: format!("id_{}", i % 2).into(),
        exceeded_ratelimits: if i.is_multiple_of(3) {
            vec!["requests".into()]
        } else {
            Vec::new()
        },
    }
}

fn request(i: u64) -> RequestEvent {
    RequestEvent {
        request_id: format!("req_r{i}").into(),
        time: 1_700_000_000_000,
        workspace_id: "ws_1".into(),
        method: "POST".into(),
        path: "/v2/keys.verifyKey".into(),
        status: 200,
        latency_us: 250,
        node_id: "node_a".into(),
    }
}

fn batch() -> Batch {
    Batch {
        verifications: vec![
            verification(1, Some(4)),
            verification(2, None),
            verification(3, Some(u64::MAX)),
        ],
        requests: vec![request(1), request(2)],
    }
}

/// A sink on the shared server in its own database, with its own table prefix.
async fn isolated_sink(ch: &ClickHouse) -> (ClickHouseSink, String) {
    let db = unique_name("cg");
    let options = ClickHouseOptions {
        table_prefix: format!("{}_", unique_name("p")),
        ..ClickHouseOptions::default()
    };
    // The sink creates the database named in the URL.
    let url = format!("{}?database={db}", ch.url());
    let sink = ClickHouseSink::connect(&url, options).await.unwrap();
    (sink, db)
}

fn count(ch: &ClickHouse, db: &str, table: &str) -> u64 {
    ch.query(&format!("SELECT count() FROM `{db}`.`{table}`"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A verifications table made by a version before identities gets their columns.
#[tokio::test]
async fn clickhouse_sink_adds_new_columns_to_an_older_table() {
    let ch = ClickHouse::shared();
    let db = unique_name("cg");
    let prefix = format!("{}_", unique_name("p"));
    ch.query(&format!("CREATE DATABASE `{db}`")).unwrap();
    ch.query(&format!(
        "CREATE TABLE `{db}`.`{prefix}key_verifications` (request_id String, \
         time DateTime('UTC'), time_ms UInt64, workspace_id String, api_id String, \
         key_id String, node_id String, region String, outcome String, cost UInt64, \
         spent_credits UInt64, remaining Nullable(UInt64), latency_us UInt64, \
         tags Array(String)) ENGINE = ReplacingMergeTree() PARTITION BY toYYYYMM(time) \
         ORDER BY (workspace_id, key_id, time, request_id)"
    ))
    .unwrap();
    let options = ClickHouseOptions {
        table_prefix: prefix.clone(),
        ..ClickHouseOptions::default()
    };
    let url = format!("{}?database={db}", ch.url());
    let sink = ClickHouseSink::connect(&url, options.clone())
        .await
        .unwrap();
    sink.write(&batch()).await.unwrap();
    let ids = ch
        .query(&format!(
            "SELECT identity_id FROM `{db}`.`{prefix}key_verifications` ORDER BY request_id"
        ))
        .unwrap();
    assert_eq!(ids, "id_1\nid_0\nid_1\n");
    // Connecting again finds the columns there.
    ClickHouseSink::connect(&url, options).await.unwrap();
}

#[tokio::test]
async fn clickhouse_sink_writes_a_batch_that_select_count_returns() {
    let ch = ClickHouse::shared();
    let (sink, db) = isolated_sink(ch).await;
    sink.write(&batch()).await.unwrap();
    assert_eq!(count(ch, &db, sink.verifications_table()), 3);
    assert_eq!(count(ch, &db, sink.requests_table()), 2);

    // Values round-trip, including NULL, u64::MAX and arrays; `time` is the second.
    let rows = ch
        .query(&format!(
            "SELECT request_id, toUnixTimestamp(time), time_ms, remaining, tags, outcome \
             FROM `{db}`.`{}` ORDER BY request_id FORMAT JSONEachRow",
            sink.verifications_table()
        ))
        .unwrap();
    let rows: Vec<serde_json::Value> = rows
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 3);
    assert_eq!(rows[0]["request_id"], "req_v1");
    assert_eq!(rows[0]["toUnixTimestamp(time)"], 1_700_000_000);
    // 64-bit integers come back quoted in JSON.
    assert_eq!(rows[0]["time_ms"], "1700000000001");
    assert_eq!(rows[0]["remaining"], "4");
    assert_eq!(rows[1]["remaining"], serde_json::Value::Null);
    assert_eq!(rows[2]["remaining"], u64::MAX.to_string());
    assert_eq!(rows[2]["tags"], serde_json::json!(["tag3", "path=/x"]));
    assert_eq!(rows[1]["outcome"], "NOT_FOUND");
    let extra = ch
        .query(&format!(
            "SELECT identity_id, exceeded_ratelimits FROM `{db}`.`{}` ORDER BY request_id",
            sink.verifications_table()
        ))
        .unwrap();
    assert_eq!(
        extra, "id_1\t[]\nid_0\t[]\nid_1\t['requests']\n",
        "the identity and the limits that refused"
    );
    let status = ch
        .query(&format!(
            "SELECT status, method, path FROM `{db}`.`{}` LIMIT 1",
            sink.requests_table()
        ))
        .unwrap();
    assert_eq!(status.trim(), "200\tPOST\t/v2/keys.verifyKey");

    // Connecting again finds the tables and keeps the rows.
    let url = format!("{}?database={db}", ch.url());
    let options = ClickHouseOptions {
        table_prefix: sink
            .verifications_table()
            .trim_end_matches("key_verifications")
            .to_owned(),
        ..ClickHouseOptions::default()
    };
    let again = ClickHouseSink::connect(&url, options).await.unwrap();
    assert_eq!(again.verifications_table(), sink.verifications_table());
    assert_eq!(count(ch, &db, sink.verifications_table()), 3);
}

#[tokio::test]
async fn clickhouse_sink_behind_the_batcher_flushes_on_shutdown() {
    let ch = ClickHouse::shared();
    let (sink, db) = isolated_sink(ch).await;
    let (vt, rt) = (
        sink.verifications_table().to_owned(),
        sink.requests_table().to_owned(),
    );
    let (analytics, batcher) = Batcher::start(Arc::new(sink), BatcherConfig::default());
    for i in 0..25 {
        analytics.verification(verification(i, Some(i)));
    }
    analytics.request(request(1));
    drop(analytics);
    batcher.shutdown(Duration::from_secs(10)).await;
    assert_eq!(count(ch, &db, &vt), 25);
    assert_eq!(count(ch, &db, &rt), 1);
}

#[tokio::test]
async fn clickhouse_sink_reports_server_errors_and_retries_without_duplicates() {
    let ch = ClickHouse::shared();
    let (sink, db) = isolated_sink(ch).await;
    let requests_ddl = sink.schema()[1].clone();
    ch.query(&format!("DROP TABLE `{db}`.`{}`", sink.requests_table()))
        .unwrap();

    // The verifications land, the requests fail with ClickHouse's own message.
    let err = sink.write(&batch()).await.unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains(sink.requests_table()) && message.contains("doesn't exist"),
        "{message}"
    );

    // The batcher retries the same batch: only the missing part is written.
    ch.query_in(Some(&db), &requests_ddl).unwrap();
    sink.write(&batch()).await.unwrap();
    assert_eq!(count(ch, &db, sink.verifications_table()), 3);
    assert_eq!(count(ch, &db, sink.requests_table()), 2);

    // A new batch (even an identical one) is written in full.
    sink.write(&batch()).await.unwrap();
    assert_eq!(count(ch, &db, sink.verifications_table()), 6);
}

#[tokio::test]
async fn clickhouse_sink_fails_while_the_server_is_down_and_recovers() {
    let ch = ClickHouse::start().unwrap();
    let options = ClickHouseOptions {
        table_prefix: "down_".into(),
        request_timeout: Duration::from_secs(2),
        connect_timeout: Duration::from_secs(1),
        ..ClickHouseOptions::default()
    };
    let sink = ClickHouseSink::connect(&ch.url(), options).await.unwrap();
    // Graceful stop: bounded by the server's keep-alive timeout (3 s) for idle clients.
    let stopping = Instant::now();
    ch.stop().unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(10));
    let started = Instant::now();
    let err = sink.write(&batch()).await.unwrap_err();
    assert!(err.to_string().contains("unreachable"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));

    // Paused (accepts, never answers): bounded by the request timeout.
    ch.start_again().unwrap();
    ch.pause().unwrap();
    let started = Instant::now();
    assert!(sink.write(&batch()).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(5));
    ch.resume().unwrap();

    sink.write(&batch()).await.unwrap();
    // The paused server may still have applied the insert whose reply never came (the
    // documented duplicate of a lost reply); the engine collapses it.
    let distinct = ch
        .query("SELECT count() FROM down_key_verifications FINAL")
        .unwrap();
    assert_eq!(distinct.trim(), "3");
    let requests = ch
        .query("SELECT count() FROM down_api_requests FINAL")
        .unwrap();
    assert_eq!(requests.trim(), "2");
}
