//! Shared credit pools on identities (creditgate's extension) over HTTP: a verification
//! of a key whose identity has a pool spends from the key (if limited) and the pool,
//! both or neither; `identity.credits` answers the pool's exact balance;
//! `identities.updateCredits` sets, increments and decrements it; bad input and states
//! that do not allow a change are refused with nothing changed.

use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, assert_verdict, TestApp};

async fn pool_of(app: &TestApp, identity: &str) -> Value {
    app.ok(
        "/v2/identities.getIdentity",
        json!({ "identity": identity }),
    )
    .await["credits"]
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_spend_from_their_identity_pool_both_or_neither() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    app.ok(
        "/v2/identities.createIdentity",
        json!({ "externalId": "acme", "credits": { "remaining": 10 } }),
    )
    .await;
    assert_eq!(pool_of(&app, "acme").await, json!({ "remaining": 10 }));
    let (k1_id, k1) = app
        .create_key_with(
            json!({ "apiId": api, "externalId": "acme", "credits": { "remaining": 4 } }),
        )
        .await;
    // An unlimited key of the identity: the pool alone pays.
    let (_, free) = app
        .create_key_with(json!({ "apiId": api, "externalId": "acme" }))
        .await;

    let d = app.verify(&k1, Some(3)).await;
    assert_verdict(&d, "VALID", Some(1));
    assert_eq!(d["identity"]["credits"], json!({ "remaining": 7 }), "{d}");
    // The key cannot pay 2: nothing leaves the pool either.
    let d = app.verify(&k1, Some(2)).await;
    assert_verdict(&d, "USAGE_EXCEEDED", Some(1));
    assert_eq!(d["identity"]["credits"]["remaining"], 7, "{d}");
    let d = app.verify(&free, Some(6)).await;
    assert_verdict(&d, "VALID", None);
    assert_eq!(d["identity"]["credits"]["remaining"], 1, "{d}");
    // The pool cannot pay 2: nothing leaves the key either.
    let d = app.verify(&k1, Some(1)).await;
    assert_verdict(&d, "VALID", Some(0));
    assert_eq!(d["identity"]["credits"]["remaining"], 0);
    let d = app.verify(&free, Some(1)).await;
    assert_verdict(&d, "USAGE_EXCEEDED", None);
    assert_eq!(d["identity"]["credits"]["remaining"], 0);

    // Top up the pool: increment, decrement, set; getKey answers both balances.
    for (operation, value, want) in [("increment", 5, 5), ("decrement", 2, 3), ("set", 20, 20)] {
        let r = app
            .ok(
                "/v2/identities.updateCredits",
                json!({ "identity": "acme", "operation": operation, "value": value }),
            )
            .await;
        assert_eq!(r["remaining"], want, "{operation}: {r}");
    }
    let got = app.get_key(&k1_id).await;
    assert_eq!(got["credits"]["remaining"], 0);
    assert_eq!(got["identity"]["credits"]["remaining"], 20);
    let d = app.verify(&k1, Some(1)).await;
    assert_verdict(&d, "USAGE_EXCEEDED", Some(0));
    assert_eq!(
        d["identity"]["credits"]["remaining"], 20,
        "the key is short"
    );
    let d = app.verify(&free, Some(5)).await;
    assert_verdict(&d, "VALID", None);
    assert_eq!(d["identity"]["credits"]["remaining"], 15);

    // Holds on pooled keys reserve from the key and the pool, both or neither.
    let r = app
        .ok(
            "/v2/keys.reserveCredits",
            json!({ "key": free, "amount": 20 }),
        )
        .await;
    assert_eq!(r["code"], "USAGE_EXCEEDED", "the pool has 15: {r}");
    assert_eq!(pool_of(&app, "acme").await["remaining"], 15);
    let r = app
        .ok(
            "/v2/keys.reserveCredits",
            json!({ "key": free, "amount": 6 }),
        )
        .await;
    assert_eq!(r["code"], "VALID", "{r}");
    let hold = r["holdId"].as_str().expect("holdId").to_owned();
    assert_eq!(pool_of(&app, "acme").await["remaining"], 9, "6 held");
    let s = app
        .ok(
            "/v2/keys.settleCredits",
            json!({ "holdId": hold, "cost": 4 }),
        )
        .await;
    assert_eq!(s["code"], "VALID", "{s}");
    assert_eq!(pool_of(&app, "acme").await["remaining"], 11, "2 back");
    let again = app
        .ok(
            "/v2/keys.settleCredits",
            json!({ "holdId": hold, "cost": 4 }),
        )
        .await;
    assert_eq!(again["spent"], s["spent"], "settled once: {again}");
    assert_eq!(pool_of(&app, "acme").await["remaining"], 11);
    // A limited key: both hold; the key's 0 cannot cover 1, nothing leaves the pool.
    let r = app
        .ok("/v2/keys.reserveCredits", json!({ "key": k1, "amount": 1 }))
        .await;
    assert_eq!(
        (&r["code"], &r["credits"]),
        (&json!("USAGE_EXCEEDED"), &json!(0))
    );
    assert_eq!(pool_of(&app, "acme").await["remaining"], 11);
    app.ok(
        "/v2/identities.updateCredits",
        json!({ "identity": "acme", "operation": "set", "value": 15 }),
    )
    .await;
    let r = app
        .ok(
            "/v2/keys.reserveCredits",
            json!({ "key": free, "amount": 3 }),
        )
        .await;
    let hold = r["holdId"].as_str().expect("holdId").to_owned();
    app.ok("/v2/keys.releaseCredits", json!({ "holdId": hold }))
        .await;
    assert_eq!(pool_of(&app, "acme").await["remaining"], 15, "released");

    // Idempotent verifications of a pooled key spend once.
    let body = json!({ "key": free, "credits": { "cost": 2 } });
    for _ in 0..2 {
        let (status, resp, _) = app
            .post_idem("/v2/keys.verifyKey", "pool-retry-1", body.clone())
            .await;
        assert_eq!(status, 200, "{resp}");
        assert_eq!(
            resp["data"]["identity"]["credits"]["remaining"], 13,
            "{resp}"
        );
    }
    assert_eq!(pool_of(&app, "acme").await["remaining"], 13);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pools_open_with_a_set_and_refuse_bad_changes() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (_, key) = app
        .create_key_with(
            json!({ "apiId": api, "externalId": "newco", "credits": { "remaining": 5 } }),
        )
        .await;
    // No pool yet: the key pays alone; identity answers no credits.
    let d = app.verify(&key, Some(1)).await;
    assert_verdict(&d, "VALID", Some(4));
    assert!(d["identity"].get("credits").is_none(), "{d}");
    for operation in ["increment", "decrement"] {
        let (status, body) = app
            .post(
                "/v2/identities.updateCredits",
                json!({ "identity": "newco", "operation": operation, "value": 1 }),
            )
            .await;
        assert_error(status, &body, 409, "conflict");
    }
    assert_eq!(pool_of(&app, "newco").await, Value::Null);
    // `set` opens it; the next verification spends from it at once.
    let r = app
        .ok(
            "/v2/identities.updateCredits",
            json!({ "identity": "newco", "operation": "set", "value": 2 }),
        )
        .await;
    assert_eq!(r["remaining"], 2);
    let d = app.verify(&key, Some(2)).await;
    assert_verdict(&d, "VALID", Some(2));
    assert_eq!(d["identity"]["credits"]["remaining"], 0);

    for (body, location) in [
        (
            json!({ "identity": "newco", "operation": "set", "value": -1 }),
            "body.value",
        ),
        (
            json!({ "identity": "newco", "operation": "double", "value": 1 }),
            "body.operation",
        ),
        (
            json!({ "identity": "", "operation": "set", "value": 1 }),
            "body.identity",
        ),
    ] {
        let (status, resp) = app.post("/v2/identities.updateCredits", body).await;
        assert_bad_request(status, &resp, location);
    }
    let (status, resp) = app
        .post(
            "/v2/identities.updateCredits",
            json!({ "identity": "nobody", "operation": "set", "value": 1 }),
        )
        .await;
    assert_error(status, &resp, 404, "identity_not_found");
    let (status, resp) = app
        .post(
            "/v2/identities.createIdentity",
            json!({ "externalId": "bad", "credits": { "remaining": -5 } }),
        )
        .await;
    assert_bad_request(status, &resp, "body.credits.remaining");
    assert_eq!(pool_of(&app, "newco").await["remaining"], 0);
    // A root key without update_identity may not change a pool.
    let reader = app
        .root_key(
            creditgate_server::DEFAULT_WORKSPACE,
            &["identity.*.read_identity"],
        )
        .await;
    let (status, resp) = app
        .post_as(
            Some(&reader),
            "/v2/identities.updateCredits",
            json!({ "identity": "newco", "operation": "set", "value": 100 }),
        )
        .await;
    assert_error(status, &resp, 403, "/insufficient_permissions");
    assert_eq!(pool_of(&app, "newco").await["remaining"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_refills_once_per_period() {
    use std::sync::Arc;

    use creditgate_domain::ManualClock;

    // 2023-11-14 22:13:20 UTC; the next day starts 6,400 s later.
    let t0 = 1_700_000_000_000;
    let clock = Arc::new(ManualClock::new(t0));
    let app = TestApp::start_with_clock(clock.clone()).await;
    let api = app.create_api().await;
    app.ok(
        "/v2/identities.createIdentity",
        json!({ "externalId": "daily", "credits": { "remaining": 10,
                "refill": { "interval": "daily", "amount": 10 } } }),
    )
    .await;
    assert_eq!(
        pool_of(&app, "daily").await,
        json!({ "remaining": 10, "refill": { "interval": "daily", "amount": 10 } })
    );
    let (_, key) = app
        .create_key_with(json!({ "apiId": api, "externalId": "daily" }))
        .await;
    let d = app.verify(&key, Some(8)).await;
    assert_eq!(d["identity"]["credits"]["remaining"], 2);
    assert_verdict(&app.verify(&key, Some(3)).await, "USAGE_EXCEEDED", None);
    // The next day the pool is back to 10, once.
    clock.set(t0 + 6_400_000);
    let d = app.verify(&key, Some(3)).await;
    assert_verdict(&d, "VALID", None);
    assert_eq!(d["identity"]["credits"]["remaining"], 7, "{d}");
    let d = app.verify(&key, Some(3)).await;
    assert_eq!(
        d["identity"]["credits"]["remaining"], 4,
        "refilled once: {d}"
    );
}

/// A pooled key's hold expires on both balances, and a settle after that is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_hold_expires_on_both_balances() {
    use std::time::{Duration, Instant};

    let app = TestApp::start().await;
    let api = app.create_api().await;
    app.ok(
        "/v2/identities.createIdentity",
        json!({ "externalId": "exp", "credits": { "remaining": 100 } }),
    )
    .await;
    let (key_id, key) = app
        .create_key_with(
            json!({ "apiId": api, "externalId": "exp", "credits": { "remaining": 50 } }),
        )
        .await;
    let r = app
        .ok(
            "/v2/keys.reserveCredits",
            json!({ "key": key, "amount": 20, "ttlMs": 200 }),
        )
        .await;
    assert_eq!((&r["code"], &r["credits"]), (&json!("VALID"), &json!(30)));
    let hold = r["holdId"].as_str().expect("holdId").to_owned();
    assert_eq!(pool_of(&app, "exp").await["remaining"], 80);
    let started = Instant::now();
    loop {
        let (k, p) = (
            app.balance(&key_id).await,
            pool_of(&app, "exp").await["remaining"].clone(),
        );
        if k == Some(50) && p == 100 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(2_000),
            "credits of the expired hold not back: key {k:?}, pool {p}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, body) = app
        .post(
            "/v2/keys.settleCredits",
            json!({ "holdId": hold, "cost": 5 }),
        )
        .await;
    assert_error(status, &body, 409, "hold_expired");
    assert_eq!(app.balance(&key_id).await, Some(50));
    assert_eq!(pool_of(&app, "exp").await["remaining"], 100);
}
