//! Idempotency keys over HTTP: a retry answers the first decision and spends nothing
//! again (verifyKey, reserve / settle / release, updateCredits), the body field works
//! as the header does, another body under the same key is 422, keys are per workspace,
//! bad keys are 400 and change nothing, and concurrent retries spend once.

use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, TestApp};

const VERIFY: &str = "/v2/keys.verifyKey";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_verification_answers_the_first_decision() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 100).await;
    let body = json!({ "key": key, "credits": { "cost": 30 } });

    let (s1, first, r1) = app.post_idem(VERIFY, "retry-1", body.clone()).await;
    assert_eq!((s1, r1.as_deref()), (200, Some("false")), "{first}");
    assert_eq!(first["data"]["credits"], 70, "{first}");
    // Spends in between do not change the replayed answer.
    app.verify(&key, Some(10)).await;
    for _ in 0..3 {
        let (s, again, r) = app.post_idem(VERIFY, "retry-1", body.clone()).await;
        assert_eq!((s, r.as_deref()), (200, Some("true")), "{again}");
        assert_eq!(
            again["data"], first["data"],
            "the first decision, as it was"
        );
        assert_ne!(
            again["meta"]["requestId"], first["meta"]["requestId"],
            "a new request id"
        );
    }
    assert_eq!(
        app.balance(&key_id).await,
        Some(60),
        "spent 30 once, then 10"
    );

    // The same key in the body works as the header does.
    let with_field = json!({ "key": key, "credits": { "cost": 5 }, "idempotencyKey": "field-1" });
    let a = app.ok(VERIFY, with_field.clone()).await;
    let b = app.ok(VERIFY, with_field).await;
    assert_eq!((a["credits"].clone(), b), (json!(55), a.clone()));
    // Header and body naming the same key is the same request.
    let (s, c, r) = app
        .post_idem(
            VERIFY,
            "field-1",
            json!({ "key": key, "credits": { "cost": 5 }, "idempotencyKey": "field-1" }),
        )
        .await;
    assert_eq!((s, r.as_deref(), &c["data"]), (200, Some("true"), &a));
    assert_eq!(app.balance(&key_id).await, Some(55));

    // A USAGE_EXCEEDED decision is replayed too, even once the balance covers it.
    let big = json!({ "key": key, "credits": { "cost": 80 } });
    let (_, refused, _) = app.post_idem(VERIFY, "big", big.clone()).await;
    assert_eq!(refused["data"]["code"], "USAGE_EXCEEDED", "{refused}");
    app.ok(
        "/v2/keys.updateCredits",
        json!({ "keyId": key_id, "operation": "increment", "value": 100 }),
    )
    .await;
    let (_, again, _) = app.post_idem(VERIFY, "big", big).await;
    assert_eq!(again["data"], refused["data"], "the first decision stands");
    assert_eq!(app.balance(&key_id).await, Some(155));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_request_under_the_same_key_is_refused() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 100).await;
    let (s, _, _) = app
        .post_idem(VERIFY, "k", json!({ "key": key, "credits": { "cost": 1 } }))
        .await;
    assert_eq!(s, 200);
    let (s, body, _) = app
        .post_idem(VERIFY, "k", json!({ "key": key, "credits": { "cost": 2 } }))
        .await;
    assert_error(s, &body, 422, "idempotency/key_reused");
    // Another route under the same key is another request.
    let (s, body, _) = app
        .post_idem(
            "/v2/keys.reserveCredits",
            "k",
            json!({ "key": key, "amount": 1 }),
        )
        .await;
    assert_error(s, &body, 422, "idempotency/key_reused");
    assert_eq!(app.balance(&key_id).await, Some(99), "nothing moved");

    // Keys are per workspace: another workspace's request with the same key is its own.
    let other = app
        .root_key(
            "ws_other",
            &["api.*.create_api", "api.*.create_key", "api.*.verify_key"],
        )
        .await;
    let mut c = app.client();
    c.root_key = other;
    let (s, created) = c
        .post("/v2/apis.createApi", json!({ "name": "other" }))
        .await;
    assert_eq!(s, 200, "{created}");
    let api2 = created["data"]["apiId"].as_str().expect("apiId").to_owned();
    let (s, k2) = c
        .post(
            "/v2/keys.createKey",
            json!({ "apiId": api2, "credits": { "remaining": 10 } }),
        )
        .await;
    assert_eq!(s, 200, "{k2}");
    let secret = k2["data"]["key"].as_str().expect("key").to_owned();
    let (s, v, r) = c
        .post_idem(
            VERIFY,
            "k",
            json!({ "key": secret, "credits": { "cost": 2 } }),
        )
        .await;
    assert_eq!((s, r.as_deref()), (200, Some("false")), "{v}");
    assert_eq!(v["data"]["credits"], 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_and_credit_updates_are_idempotent() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 100).await;
    let reserve = json!({ "key": key, "amount": 40 });
    let (_, r1, _) = app
        .post_idem("/v2/keys.reserveCredits", "res", reserve.clone())
        .await;
    let (_, r2, replayed) = app
        .post_idem("/v2/keys.reserveCredits", "res", reserve)
        .await;
    assert_eq!(replayed.as_deref(), Some("true"));
    assert_eq!(r2["data"], r1["data"], "the same hold");
    let hold = r1["data"]["holdId"].as_str().expect("holdId").to_owned();
    assert_eq!(app.get_key(&key_id).await["credits"]["reserved"], 40);

    let settle = json!({ "holdId": hold, "cost": 25 });
    let (_, s1, _) = app
        .post_idem("/v2/keys.settleCredits", "set", settle.clone())
        .await;
    let (_, s2, _) = app.post_idem("/v2/keys.settleCredits", "set", settle).await;
    assert_eq!(s1["data"], s2["data"]);
    assert_eq!(s1["data"]["spent"], 25, "{s1}");
    assert_eq!(app.balance(&key_id).await, Some(75));

    let (_, r3, _) = app
        .post_idem(
            "/v2/keys.reserveCredits",
            "res2",
            json!({ "key": key, "amount": 5 }),
        )
        .await;
    let h2 = r3["data"]["holdId"].as_str().expect("holdId").to_owned();
    let release = json!({ "holdId": h2 });
    let (s, a, _) = app
        .post_idem("/v2/keys.releaseCredits", "rel", release.clone())
        .await;
    let (_, b, _) = app
        .post_idem("/v2/keys.releaseCredits", "rel", release)
        .await;
    assert_eq!((s, &a["data"]), (200, &b["data"]));
    assert_eq!(app.balance(&key_id).await, Some(75));

    let inc = json!({ "keyId": key_id, "operation": "increment", "value": 10 });
    let (_, i1, _) = app
        .post_idem("/v2/keys.updateCredits", "inc", inc.clone())
        .await;
    app.verify(&key, Some(1)).await;
    let (_, i2, _) = app.post_idem("/v2/keys.updateCredits", "inc", inc).await;
    assert_eq!(i1["data"], i2["data"], "the first answer");
    assert_eq!(app.balance(&key_id).await, Some(84), "incremented once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_idempotency_keys_are_400_and_move_nothing() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 10).await;
    let body = json!({ "key": key });
    let long = "x".repeat(256);
    let (s, b, _) = app.post_idem(VERIFY, &long, body.clone()).await;
    assert_bad_request(s, &b, "header.Idempotency-Key");
    let (s, b, _) = app.post_idem(VERIFY, "a\tb", body.clone()).await;
    assert_bad_request(s, &b, "header.Idempotency-Key");
    let (s, b) = app
        .post(VERIFY, json!({ "key": key, "idempotencyKey": " padded" }))
        .await;
    assert_bad_request(s, &b, "body.idempotencyKey");
    let (s, b) = app
        .post(VERIFY, json!({ "key": key, "idempotencyKey": long }))
        .await;
    assert_bad_request(s, &b, "body.idempotencyKey");
    let (s, b) = app
        .post(VERIFY, json!({ "key": key, "idempotencyKey": "" }))
        .await;
    assert_bad_request(s, &b, "body.idempotencyKey");
    let (s, b) = app
        .post(VERIFY, json!({ "key": key, "idempotencyKey": 7 }))
        .await;
    assert_bad_request(s, &b, "body.idempotencyKey");
    let (s, b, _) = app
        .post_idem(VERIFY, "a", json!({ "key": key, "idempotencyKey": "b" }))
        .await;
    assert_error(s, &b, 422, "idempotency/keys_differ");
    // 255 characters are fine; a quoted header (a structured-field string) is its content.
    let ok = "y".repeat(255);
    assert_eq!(app.post_idem(VERIFY, &ok, body.clone()).await.0, 200);
    let (s, q, r) = app.post_idem(VERIFY, &format!("\"{ok}\""), body).await;
    assert_eq!((s, r.as_deref()), (200, Some("true")), "{q}");
    assert_eq!(app.balance(&key_id).await, Some(9), "one spend");
    // A bad body under a good key claims nothing: the key still works.
    let (s, b, _) = app
        .post_idem(
            VERIFY,
            "later",
            json!({ "key": key, "credits": { "cost": -1 } }),
        )
        .await;
    assert_eq!(s, 400, "{b}");
    let (s, v, r) = app.post_idem(VERIFY, "later", json!({ "key": key })).await;
    assert_eq!(
        (s, r.as_deref(), v["data"]["credits"].clone()),
        (200, Some("false"), json!(8))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_retries_spend_once() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 1_000).await;
    // Most of the balance moves to the hot store first.
    app.verify(&key, Some(0)).await;
    let body = json!({ "key": key, "credits": { "cost": 7 } });
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (c, body) = (app.client(), body.clone());
        tasks.push(tokio::spawn(async move {
            c.post_idem(VERIFY, "same", body).await
        }));
    }
    let mut answers: Vec<Value> = Vec::new();
    let mut conflicts = 0;
    for t in tasks {
        let (s, b, _) = t.await.expect("task");
        match s {
            200 => answers.push(b["data"].clone()),
            409 => {
                assert_error(s, &b, 409, "idempotency/in_flight");
                conflicts += 1;
            }
            other => panic!("{other}: {b}"),
        }
    }
    assert!(!answers.is_empty(), "{conflicts} conflicts, no answer");
    assert!(
        answers.iter().all(|a| a == &answers[0]),
        "one decision: {answers:?}"
    );
    assert_eq!(answers[0]["credits"], 993);
    // After the first is answered, every retry gets it.
    let (s, b, r) = app.post_idem(VERIFY, "same", body).await;
    assert_eq!(
        (s, r.as_deref(), &b["data"]),
        (200, Some("true"), &answers[0])
    );
    assert_eq!(app.balance(&key_id).await, Some(993), "spent once");
}
