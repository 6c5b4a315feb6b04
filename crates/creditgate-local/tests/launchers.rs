//! The launchers start real servers that answer, their faults (kill, stop, pause) behave
//! as the fault tests expect, and dropping one stops its server.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use creditgate_local::{unique_name, ClickHouse, Postgres, RedisServer};

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

/// `redis-cli -c -p <port> <args…>` (follows MOVED redirections); its output, trimmed.
fn cluster_cli(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-c", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn a_redis_cluster_forms_survives_a_master_kill9_and_fails_over() {
    let cluster = creditgate_local::RedisCluster::start(3, 1).expect("a 3-master cluster");
    assert_eq!(cluster.nodes().len(), 6);
    assert_eq!(cluster.masters().len(), 3);
    let seed = cluster.nodes()[0].port();
    for k in ["a", "b", "c", "{user_1}:x"] {
        assert_eq!(cluster_cli(seed, &["SET", k, "1"]), "OK");
    }
    // Written to the replica before the master dies.
    let owner = cluster.master_of("a").expect("an owner of a");
    let port = cluster.nodes()[owner].port();
    // WAIT counts the acknowledgements of its own connection's writes: both on one.
    let mut cli = std::process::Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("redis-cli");
    cli.stdin
        .take()
        .expect("stdin")
        .write_all(b"SET a 2\nWAIT 1 2000\n")
        .expect("commands");
    let out = cli.wait_with_output().expect("redis-cli output");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "OK\n1",
        "the write reached the replica"
    );
    cluster.nodes()[owner].kill9().expect("kill -9 a master");
    // Its replica takes over after the node timeout.
    let started = std::time::Instant::now();
    loop {
        let now = cluster.master_of("a");
        if now.is_ok_and(|n| n != owner) {
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(30),
            "no replica took over slot of 'a'"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    cluster
        .wait_ok(std::time::Duration::from_secs(30))
        .expect("whole again");
    let alive = (0..6).find(|&i| i != owner).expect("a live node");
    assert_eq!(
        cluster_cli(cluster.nodes()[alive].port(), &["GET", "a"]),
        "2"
    );
    // A planned failover of another shard: its replica becomes master.
    let other = cluster.master_of("b").expect("an owner of b");
    let replica = (0..6)
        .find(|&i| {
            i != owner
                && cluster.role(i).as_deref() == Some("slave")
                && cluster_cli(cluster.nodes()[i].port(), &["INFO", "replication"])
                    .contains(&format!("master_port:{}", cluster.nodes()[other].port()))
        })
        .expect("a replica of b's master");
    cluster.failover(replica).expect("failover");
    assert_eq!(cluster.master_of("b").expect("b served"), replica);
    assert_eq!(
        cluster_cli(cluster.nodes()[replica].port(), &["GET", "b"]),
        "1"
    );
}
