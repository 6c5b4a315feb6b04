//! Exact balances on one node: concurrent verifications spend each credit exactly once,
//! and a graceful restart keeps the balance to the credit.

use std::collections::BTreeSet;

use serde_json::json;

use crate::support::{assert_verdict, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_concurrent_verifications_of_a_hundred_credits() {
    let mut app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 100).await;

    let mut tasks = Vec::new();
    for _ in 0..200 {
        let client = app.client();
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            client
                .post("/v2/keys.verifyKey", json!({ "key": key }))
                .await
        }));
    }
    let mut valid = Vec::new();
    let mut exceeded = 0;
    for t in tasks {
        let (status, body) = t.await.expect("a verification task");
        assert_eq!(status, 200, "{body}");
        let data = &body["data"];
        match data["code"].as_str() {
            Some("VALID") => {
                assert_eq!(data["valid"], true);
                valid.push(data["credits"].as_i64().expect("credits of a VALID answer"));
            }
            Some("USAGE_EXCEEDED") => {
                assert_verdict(data, "USAGE_EXCEEDED", Some(0));
                exceeded += 1;
            }
            _ => panic!("unexpected answer {body}"),
        }
    }
    assert_eq!(valid.len(), 100, "exactly 100 VALID");
    assert_eq!(exceeded, 100);
    let got: BTreeSet<i64> = valid.iter().copied().collect();
    assert_eq!(
        got,
        (0..100).collect::<BTreeSet<i64>>(),
        "each VALID answer reports a distinct balance 99..0: {valid:?}"
    );
    assert_eq!(app.balance(&key_id).await, Some(0));

    app.stop().await;
    assert_eq!(app.sql_remaining(&key_id).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_restart_keeps_the_exact_balance() {
    let mut app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 100).await;
    let (other_id, other) = app.create_limited(&api, 10).await;

    assert_verdict(&app.verify(&key, Some(30)).await, "VALID", Some(70));
    for i in 0..7 {
        assert_verdict(&app.verify(&key, None).await, "VALID", Some(69 - i));
    }
    assert_verdict(
        &app.verify(&other, Some(11)).await,
        "USAGE_EXCEEDED",
        Some(10),
    );
    assert_eq!(app.balance(&key_id).await, Some(63));

    app.stop().await;
    assert_eq!(app.sql_remaining(&key_id).await, Some(63));
    assert_eq!(app.sql_remaining(&other_id).await, Some(10));

    app.restart().await;
    assert_eq!(app.balance(&key_id).await, Some(63));
    assert_eq!(app.sql_remaining(&key_id).await, Some(63));
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(62));
    assert_verdict(&app.verify(&other, Some(10)).await, "VALID", Some(0));

    // Twice more, with spends in between.
    app.restart().await;
    assert_eq!(app.balance(&key_id).await, Some(62));
    assert_verdict(&app.verify(&key, Some(62)).await, "VALID", Some(0));
    assert_verdict(&app.verify(&key, None).await, "USAGE_EXCEEDED", Some(0));
    app.restart().await;
    assert_eq!(app.balance(&key_id).await, Some(0));
    assert_eq!(app.balance(&other_id).await, Some(0));
    app.stop().await;
    assert_eq!(app.sql_remaining(&key_id).await, Some(0));
}
