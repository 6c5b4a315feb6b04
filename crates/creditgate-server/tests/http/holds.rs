//! Holds over HTTP: `keys.reserveCredits` → `settleCredits` / `releaseCredits` /
//! expiry, each exactly once, `keys.getHold`, `credits.reserved` on `keys.getKey`, bad
//! input that moves nothing, holds across a graceful restart, concurrent reserves, and
//! the analytics rows whose `spent_credits` add up to what was spent.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, Client, TestApp};

async fn reserve(c: &Client, key: &str, amount: u64, ttl_ms: Option<u64>) -> Value {
    let mut body = json!({ "key": key, "amount": amount });
    if let Some(t) = ttl_ms {
        body["ttlMs"] = json!(t);
    }
    c.ok("/v2/keys.reserveCredits", body).await
}

async fn settle(c: &Client, hold: &str, cost: u64) -> (u16, Value) {
    c.post(
        "/v2/keys.settleCredits",
        json!({ "holdId": hold, "cost": cost }),
    )
    .await
}

async fn release(c: &Client, hold: &str) -> (u16, Value) {
    c.post("/v2/keys.releaseCredits", json!({ "holdId": hold }))
        .await
}

async fn get_hold(c: &Client, hold: &str) -> Value {
    c.ok("/v2/keys.getHold", json!({ "holdId": hold })).await
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(d.as_millis()).expect("in range")
}

fn hold_id(v: &Value) -> String {
    v["holdId"]
        .as_str()
        .unwrap_or_else(|| panic!("no holdId in {v}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_settle_release_each_once() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 100).await;

    let before = now_ms();
    let r = reserve(&app, &key, 30, None).await;
    assert_eq!(
        (r["valid"].clone(), r["code"].clone()),
        (json!(true), json!("VALID")),
        "{r}"
    );
    assert_eq!(r["keyId"], key_id.as_str());
    assert_eq!(r["credits"], 70, "the balance outside holds: {r}");
    let expires = r["expiresAt"].as_i64().expect("expiresAt");
    assert!(
        (before + 60_000..before + 61_000).contains(&expires),
        "default ttl 60 s: {r}"
    );
    let h = hold_id(&r);
    assert!(h.starts_with("hold_"), "{h}");

    let k = app.get_key(&key_id).await;
    assert_eq!(k["credits"]["remaining"], 70, "{k}");
    assert_eq!(k["credits"]["reserved"], 30, "{k}");
    assert_eq!(
        app.verify(&key, Some(70)).await["credits"],
        0,
        "the rest is spendable"
    );
    assert_eq!(
        app.verify(&key, Some(1)).await["code"],
        "USAGE_EXCEEDED",
        "held credits are not spendable"
    );

    let (status, s) = settle(&app, &h, 12).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        s["data"],
        json!({ "valid": true, "code": "VALID", "credits": 18, "spent": 12 })
    );
    let g = get_hold(&app, &h).await;
    assert_eq!(g["state"], "settled", "{g}");
    assert_eq!(
        (g["cost"].clone(), g["amount"].clone()),
        (json!(12), json!(30)),
        "{g}"
    );
    assert_eq!(g["keyId"], key_id.as_str());
    let k = app.get_key(&key_id).await;
    assert_eq!(k["credits"]["remaining"], 18);
    assert!(k["credits"].get("reserved").is_none(), "no open holds: {k}");

    // Again: the first answer's state, nothing moves.
    let (status, again) = settle(&app, &h, 1).await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["data"]["spent"], 12, "{again}");
    assert_eq!(again["data"]["credits"], 18);
    let (status, body) = release(&app, &h).await;
    assert_error(status, &body, 409, "hold_settled");
    assert_eq!(app.balance(&key_id).await, Some(18), "nothing moved");

    // Release returns everything, once.
    let h2 = hold_id(&reserve(&app, &key, 10, None).await);
    assert_eq!(app.balance(&key_id).await, Some(8));
    let (status, body) = release(&app, &h2).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["data"],
        json!({ "valid": true, "code": "VALID", "credits": 18, "spent": 0 })
    );
    let (status, body) = release(&app, &h2).await;
    assert_eq!(
        (status, body["data"]["credits"].clone()),
        (200, json!(18)),
        "{body}"
    );
    let (status, body) = settle(&app, &h2, 1).await;
    assert_error(status, &body, 409, "hold_released");
    assert_eq!(get_hold(&app, &h2).await["state"], "released");
    assert_eq!(app.balance(&key_id).await, Some(18));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settling_above_the_hold_needs_the_balance_at_that_moment() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 50).await;
    let h = hold_id(&reserve(&app, &key, 20, None).await);
    // Covered: 20 held + 5 from the balance.
    let (_, s) = settle(&app, &h, 25).await;
    assert_eq!(
        s["data"],
        json!({ "valid": true, "code": "VALID", "credits": 25, "spent": 25 })
    );

    let h = hold_id(&reserve(&app, &key, 20, None).await);
    assert_eq!(app.balance(&key_id).await, Some(5));
    let (status, s) = settle(&app, &h, 26).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        s["data"],
        json!({ "valid": false, "code": "USAGE_EXCEEDED", "credits": 5, "spent": 0 }),
        "20 held + 5 cannot cover 26"
    );
    assert_eq!(
        get_hold(&app, &h).await["state"],
        "open",
        "the hold stays open"
    );
    assert_eq!(app.balance(&key_id).await, Some(5), "nothing moved");
    let (_, s) = settle(&app, &h, 25).await;
    assert_eq!(s["data"]["credits"], 0, "{s}");
    assert_eq!(app.balance(&key_id).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_checks_the_key_like_a_verification() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (_, key) = app.create_limited(&api, 10).await;
    let r = reserve(&app, "cg_not_a_key", 1, None).await;
    assert_eq!(
        (r["valid"].clone(), r["code"].clone()),
        (json!(false), json!("NOT_FOUND"))
    );
    assert!(r.get("holdId").is_none(), "{r}");

    let r = reserve(&app, &key, 11, None).await;
    assert_eq!(r["code"], "USAGE_EXCEEDED", "{r}");
    assert_eq!(r["credits"], 10, "{r}");
    assert!(r.get("holdId").is_none(), "{r}");

    let (off_id, off) = app.create_limited(&api, 10).await;
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": off_id, "enabled": false }),
    )
    .await;
    assert_eq!(reserve(&app, &off, 1, None).await["code"], "DISABLED");
    let (_, old) = app
        .create_key_with(json!({ "apiId": api, "expires": 1_000, "credits": { "remaining": 5 } }))
        .await;
    assert_eq!(reserve(&app, &old, 1, None).await["code"], "EXPIRED");

    // Unlimited keys get a hold too; settling records the cost.
    let (free_id, free) = app.create_key(&api, json!(null)).await;
    let r = reserve(&app, &free, 1_000, None).await;
    assert_eq!(r["code"], "VALID", "{r}");
    assert!(r.get("credits").is_none(), "unlimited: {r}");
    let (_, s) = settle(&app, &hold_id(&r), 3_000).await;
    assert_eq!(
        s["data"],
        json!({ "valid": true, "code": "VALID", "spent": 3000 })
    );
    assert_eq!(app.balance(&free_id).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_names_the_field_and_moves_nothing() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 100).await;
    let h = hold_id(&reserve(&app, &key, 10, None).await);
    let cases = [
        (
            "/v2/keys.reserveCredits",
            json!({ "key": key, "amount": -1 }),
            "body.amount",
        ),
        (
            "/v2/keys.reserveCredits",
            json!({ "key": key, "amount": 1_000_000_000_001u64 }),
            "body.amount",
        ),
        (
            "/v2/keys.reserveCredits",
            json!({ "key": key, "amount": 1, "ttlMs": 0 }),
            "body.ttlMs",
        ),
        (
            "/v2/keys.reserveCredits",
            json!({ "key": key, "amount": 1, "ttlMs": 86_400_001 }),
            "body.ttlMs",
        ),
        (
            "/v2/keys.reserveCredits",
            json!({ "key": "", "amount": 1 }),
            "body.key",
        ),
        (
            "/v2/keys.settleCredits",
            json!({ "holdId": "nope", "cost": 1 }),
            "body.holdId",
        ),
        (
            "/v2/keys.settleCredits",
            json!({ "holdId": "hold_", "cost": 1 }),
            "body.holdId",
        ),
        (
            "/v2/keys.settleCredits",
            json!({ "holdId": format!("hold_{}", "x".repeat(60)), "cost": 1 }),
            "body.holdId",
        ),
        (
            "/v2/keys.settleCredits",
            json!({ "holdId": h, "cost": -5 }),
            "body.cost",
        ),
        (
            "/v2/keys.settleCredits",
            json!({ "holdId": h, "cost": 1_000_000_000_001u64 }),
            "body.cost",
        ),
        (
            "/v2/keys.releaseCredits",
            json!({ "holdId": "hold_a-b" }),
            "body.holdId",
        ),
        ("/v2/keys.getHold", json!({ "holdId": 7 }), "body.holdId"),
    ];
    for (path, body, location) in cases {
        let (status, resp) = app.post(path, body.clone()).await;
        assert_bad_request(status, &resp, location);
    }
    // Unknown, and another workspace's: not found.
    let (status, body) = settle(&app, "hold_unknown123", 1).await;
    assert_error(status, &body, 404, "hold_not_found");
    let other = app.root_key("ws_other", &["api.*.verify_key"]).await;
    for (path, body) in [
        ("/v2/keys.settleCredits", json!({ "holdId": h, "cost": 1 })),
        ("/v2/keys.releaseCredits", json!({ "holdId": h })),
        ("/v2/keys.getHold", json!({ "holdId": h })),
    ] {
        let (status, body) = app.post_as(Some(&other), path, body).await;
        assert_error(status, &body, 404, "hold_not_found");
    }
    assert_eq!(
        get_hold(&app, &h).await["state"],
        "open",
        "nothing closed it"
    );
    assert_eq!(app.balance(&key_id).await, Some(90), "nothing moved");
    assert_eq!(app.get_key(&key_id).await["credits"]["reserved"], 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_holds_return_their_credits_and_refuse_a_settle() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 1_000).await;
    let mut holds = Vec::new();
    for _ in 0..50 {
        holds.push(hold_id(&reserve(&app, &key, 10, Some(200)).await));
    }
    let keep = hold_id(&reserve(&app, &key, 100, None).await);
    assert_eq!(app.balance(&key_id).await, Some(400));
    let started = Instant::now();
    // Expired within one reconciler period (500 ms) after the 200 ms ttl.
    loop {
        if app.balance(&key_id).await == Some(900) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_millis(1_500),
            "credits of expired holds not back: {:?}",
            app.balance(&key_id).await
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for h in &holds {
        assert_eq!(get_hold(&app, h).await["state"], "expired");
    }
    let (status, body) = settle(&app, &holds[0], 1).await;
    assert_error(status, &body, 409, "hold_expired");
    let (status, body) = release(&app, &holds[1]).await;
    assert_error(status, &body, 409, "hold_expired");
    assert_eq!(get_hold(&app, &keep).await["state"], "open");
    assert_eq!(app.balance(&key_id).await, Some(900), "nothing else moved");
    assert_eq!(app.get_key(&key_id).await["credits"]["reserved"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn holds_survive_a_graceful_restart() {
    let mut app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 100).await;
    let a = hold_id(&reserve(&app, &key, 30, None).await);
    let b = hold_id(&reserve(&app, &key, 20, None).await);
    assert_eq!(app.verify(&key, Some(5)).await["credits"], 45);
    app.restart().await;
    assert_eq!(app.sql_remaining(&key_id).await, Some(45));
    assert_eq!(app.get_key(&key_id).await["credits"]["reserved"], 50);
    let (_, s) = settle(&app, &a, 10).await;
    assert_eq!(s["data"]["credits"], 65, "{s}");
    let (_, s) = release(&app, &b).await;
    assert_eq!(s["data"]["credits"], 85, "{s}");
    app.stop().await;
    assert_eq!(app.sql_remaining(&key_id).await, Some(85));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reserves_never_hold_more_than_the_balance() {
    let mut app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 1_000).await;
    // Some of it in the hot store first.
    assert_eq!(app.verify(&key, Some(0)).await["code"], "VALID");
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let (c, key) = (app.client(), key.clone());
        tasks.push(tokio::spawn(
            async move { reserve(&c, &key, 10, None).await },
        ));
    }
    let mut held = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for t in tasks {
        let r = t.await.expect("task");
        match r["code"].as_str() {
            Some("VALID") => {
                assert!(seen.insert(r["credits"].as_i64().expect("credits")), "{r}");
                held.push(hold_id(&r));
            }
            Some("USAGE_EXCEEDED") => assert_eq!(r["credits"], 0, "{r}"),
            other => panic!("{other:?}: {r}"),
        }
    }
    assert_eq!(held.len(), 100, "exactly 1,000 / 10 holds");
    // Settle at costs 0..15 and release, concurrently; never more than allowed.
    let mut tasks = Vec::new();
    for (i, h) in held.into_iter().enumerate() {
        let c = app.client();
        tasks.push(tokio::spawn(async move {
            if i % 4 == 0 {
                let (status, body) = release(&c, &h).await;
                assert_eq!(status, 200, "{body}");
                0
            } else {
                let cost = u64::try_from(i * 7 % 16).expect("small");
                let (status, body) = settle(&c, &h, cost).await;
                assert_eq!(status, 200, "{body}");
                match body["data"]["code"].as_str() {
                    Some("VALID") => body["data"]["spent"].as_u64().expect("spent"),
                    // Above the hold with nothing outside it to cover the difference.
                    _ => {
                        let (status, body) = release(&c, &h).await;
                        assert_eq!(status, 200, "{body}");
                        0
                    }
                }
            }
        }));
    }
    let mut spent: i64 = 0;
    for t in tasks {
        spent += i64::try_from(t.await.expect("task")).expect("small");
    }
    assert!(spent <= 1_000);
    assert_eq!(app.balance(&key_id).await, Some(1_000 - spent));
    app.stop().await;
    assert_eq!(app.sql_remaining(&key_id).await, Some(1_000 - spent));

    // The analytics rows add up to what was spent.
    let sql = app.analytics_sql().await;
    let (summed, reserves, settles): (i64, i64, i64) = sqlx::query_as(
        "SELECT COALESCE(SUM(spent_credits), 0), \
         SUM(CASE WHEN outcome = 'RESERVED' THEN 1 ELSE 0 END), \
         SUM(CASE WHEN outcome = 'SETTLED' THEN 1 ELSE 0 END) \
         FROM key_verifications WHERE key_id = $1",
    )
    .bind(&key_id)
    .fetch_one(sql.pool())
    .await
    .expect("reading analytics");
    sql.close().await;
    assert_eq!(summed, spent, "sum of spent_credits");
    assert_eq!(reserves, 100);
    assert!(settles > 0 && settles <= 75, "{settles}");
}
