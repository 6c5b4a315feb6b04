//! Protection under overload: the in-flight limit answers 503 with `Retry-After` and
//! changes nothing; a request that never finishes cannot hold up shutdown past the
//! drain bound.

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::support::{assert_verdict, TestApp};

/// A verification whose headers arrived but whose body never will: it holds its
/// in-flight slot until the connection closes.
async fn stalled_request(app: &TestApp) -> TcpStream {
    let addr = app.url("").trim_start_matches("http://").to_owned();
    let mut stream = TcpStream::connect(&addr).await.expect("connecting");
    let head = format!(
        "POST /v2/keys.verifyKey HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"key\":",
        app.root_key
    );
    stream.write_all(head.as_bytes()).await.expect("writing");
    stream
}

/// A metric's value in the Prometheus text (0 when absent).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the node counts `n` requests in flight.
async fn wait_in_flight(app: &TestApp, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = app.get("/metrics").await.2;
        let now = metric(&text, "creditgate_http_requests_in_flight");
        if now == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "in flight: {now}, expected {n} within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn past_the_in_flight_limit_a_request_gets_503_with_retry_after_and_spends_nothing() {
    let app = TestApp::start_configured(|c| c.max_in_flight = 2).await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 10).await;

    let stalled = [stalled_request(&app).await, stalled_request(&app).await];
    wait_in_flight(&app, 2.0).await;

    let resp = reqwest::Client::new()
        .post(app.url("/v2/keys.verifyKey"))
        .bearer_auth(&app.root_key)
        .json(&json!({ "key": key, "credits": { "cost": 3 } }))
        .send()
        .await
        .expect("sending");
    assert_eq!(resp.status().as_u16(), 503);
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(retry_after.as_deref(), Some("1"));
    let body: Value = resp.json().await.expect("a JSON body");
    let detail = body["error"]["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("limit of 2 requests in flight") && detail.contains("changed nothing"),
        "{body}"
    );
    assert!(body["meta"]["requestId"].as_str().is_some(), "{body}");
    // Liveness and metrics still answer while the node is full.
    app.liveness_ok().await;
    let text = app.get("/metrics").await.2;
    assert_eq!(
        metric(&text, "creditgate_http_requests_rejected_overload_total"),
        1.0,
        "{text}"
    );

    drop(stalled);
    wait_in_flight(&app, 0.0).await;
    // The rejected verification spent nothing: the next one sees 10 - 3.
    assert_verdict(&app.verify(&key, Some(3)).await, "VALID", Some(7));
    assert_eq!(app.balance(&key_id).await, Some(7));
}

#[tokio::test]
async fn a_request_that_never_finishes_does_not_hold_up_shutdown_past_the_drain_bound() {
    let mut app = TestApp::start_configured(|c| c.drain_timeout_ms = 300).await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 10).await;
    assert_verdict(&app.verify(&key, Some(4)).await, "VALID", Some(6));
    let _stalled = stalled_request(&app).await;
    wait_in_flight(&app, 1.0).await;

    let started = Instant::now();
    // `stop` also checks that every hot credit went back to the ledger.
    app.stop().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "shutdown took {took:?} with a drain bound of 300 ms"
    );
    app.restart().await;
    assert_eq!(app.balance(&key_id).await, Some(6));
}
