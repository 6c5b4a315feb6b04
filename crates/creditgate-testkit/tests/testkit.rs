//! The launchers start real servers that answer, and their faults (kill, stop, pause)
//! behave as the fault tests expect; the ClickHouse sink writes to a real server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate_analytics::clickhouse::{ClickHouseOptions, ClickHouseSink};
use creditgate_analytics::{Batch, Batcher, BatcherConfig, RequestEvent, Sink, VerificationEvent};
use creditgate_testkit::{unique_name, ClickHouse, Postgres, RedisServer, Shared};

/// Sends raw bytes and waits at most `timeout` for the first bytes of a reply; `None`
/// when nothing answers (refused, or a paused server).
fn raw_reply(port: u16, request: &[u8], timeout: Duration) -> Option<String> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.write_all(request).ok()?;
    let mut buf = [0_u8; 512];
    let n = stream.read(&mut buf).ok()?;
    (n > 0).then(|| String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn redis_ping(redis: &RedisServer) -> bool {
    let reply = raw_reply(
        redis.port(),
        b"*1\r\n$4\r\nPING\r\n",
        Duration::from_millis(500),
    );
    reply.is_some_and(|r| r.starts_with("+PONG"))
}

fn clickhouse_ping(ch: &ClickHouse) -> bool {
    let reply = raw_reply(
        ch.http_port(),
        b"GET /ping HTTP/1.0\r\n\r\n",
        Duration::from_millis(500),
    );
    reply.is_some_and(|r| r.contains("Ok."))
}

#[test]
fn redis_starts_and_survives_kill_restart_pause_and_flush() {
    let redis = RedisServer::start().unwrap();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert!(redis_ping(&redis));

    assert_eq!(redis.command(&["SET", "k", "v"]).unwrap(), "+OK");
    redis.flushall().unwrap();
    assert_eq!(redis.command(&["EXISTS", "k"]).unwrap(), ":0");

    // Paused: the port accepts connections but nothing answers; resumed: it answers again.
    redis.pause().unwrap();
    assert!(!redis_ping(&redis), "a paused redis answered");
    redis.resume().unwrap();
    assert!(redis_ping(&redis));

    // kill -9 loses the data; restart comes back empty on the same port.
    redis.command(&["SET", "k", "v"]).unwrap();
    let port = redis.port();
    redis.kill9().unwrap();
    assert!(!redis_ping(&redis), "a killed redis answered");
    redis.restart().unwrap();
    assert_eq!(redis.port(), port);
    assert_eq!(redis.command(&["EXISTS", "k"]).unwrap(), ":0");

    // restart of a running server, and stop / start_again.
    redis.restart().unwrap();
    redis.stop().unwrap();
    assert!(!redis_ping(&redis));
    redis.start_again().unwrap();
    assert!(redis_ping(&redis));
}

#[test]
fn dropping_a_launcher_stops_its_server_and_removes_its_directory() {
    let redis = RedisServer::start().unwrap();
    let port = redis.port();
    let pid = redis.pid().unwrap();
    drop(redis);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(raw_reply(port, b"*1\r\n$4\r\nPING\r\n", Duration::from_millis(300)).is_none());
}

#[test]
fn shared_instances_are_started_once() {
    let a = RedisServer::shared();
    let b = RedisServer::shared();
    assert!(std::ptr::eq(a, b));
    assert!(redis_ping(a));
}

#[test]
fn postgres_starts_isolates_databases_and_survives_stop_and_kill() {
    let pg = Postgres::start().unwrap();
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/postgres", pg.port())
    );
    assert_eq!(pg.query("postgres", "SELECT 1 + 1").unwrap(), "2");
    assert_eq!(pg.query("postgres", "SHOW fsync").unwrap(), "off");

    let db = unique_name("t");
    let url = pg.create_database(&db).unwrap();
    assert!(url.ends_with(&format!("/{db}")), "{url}");
    pg.query(&db, "CREATE TABLE t (v int); INSERT INTO t VALUES (7)")
        .unwrap();
    assert!(
        pg.create_database(&db).is_err(),
        "a database was created twice"
    );
    assert!(pg.create_database("x; DROP").is_err());

    // Down for a moment, then back with its data on the same port.
    let port = pg.port();
    pg.stop().unwrap();
    let err = pg.query(&db, "SELECT v FROM t").unwrap_err();
    assert!(format!("{err:#}").contains("psql failed"), "{err:#}");
    let down_since = Instant::now();
    pg.start_again().unwrap();
    assert!(down_since.elapsed() < Duration::from_secs(30));
    assert_eq!(pg.port(), port);
    assert_eq!(pg.query(&db, "SELECT v FROM t").unwrap(), "7");

    // A crash: kill -9 of the postmaster, then recovery.
    pg.kill9().unwrap();
    assert!(pg.query(&db, "SELECT v FROM t").is_err());
    pg.start_again().unwrap();
    assert_eq!(pg.query(&db, "SELECT v FROM t").unwrap(), "7");
}

#[test]
fn clickhouse_starts_answers_and_survives_kill_and_pause() {
    let ch = ClickHouse::start().unwrap();
    assert!(clickhouse_ping(&ch));
    assert_eq!(ch.query("SELECT 1 + 1").unwrap().trim(), "2");
    let err = ch.query("SELECT no_such_function()").unwrap_err();
    assert!(format!("{err:#}").contains("no_such_function"), "{err:#}");

    let db = unique_name("t");
    let url = ch.create_database(&db).unwrap();
    assert_eq!(url, format!("{}?database={db}", ch.url()));
    ch.query_in(
        Some(&db),
        "CREATE TABLE t (v UInt64) ENGINE = MergeTree ORDER BY v",
    )
    .unwrap();
    ch.query_in(Some(&db), "INSERT INTO t VALUES (7)").unwrap();

    ch.pause().unwrap();
    assert!(!clickhouse_ping(&ch), "a paused clickhouse answered");
    ch.resume().unwrap();
    assert!(clickhouse_ping(&ch));

    ch.kill9().unwrap();
    assert!(!clickhouse_ping(&ch));
    assert!(ch.query("SELECT 1").is_err());
    ch.start_again().unwrap();
    assert_eq!(
        ch.query_in(Some(&db), "SELECT v FROM t").unwrap().trim(),
        "7"
    );
}

fn verification(i: u64, remaining: Option<u64>) -> VerificationEvent {
    VerificationEvent {
        request_id: format!("req_v{i}"),
        time: 1_700_000_000_000 + i64::try_from(i).unwrap(),
        workspace_id: "ws_1".into(),
        api_id: "api_1".into(),
        key_id: format!("key_{i}"),
        node_id: "node_a".into(),
        region: "local".into(),
        outcome: if remaining.is_some() {
            "VALID"
        } else {
            "NOT_FOUND"
        }
        .into(),
        cost: 1,
        spent_credits: u64::from(remaining.is_some()),
        remaining,
        latency_us: 100 + i,
        tags: vec![format!("tag{i}"), "path=/x".into()],
    }
}

fn request(i: u64) -> RequestEvent {
    RequestEvent {
        request_id: format!("req_r{i}"),
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
