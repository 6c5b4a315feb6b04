//! Rate limits on keys and identities over HTTP: auto-applied limits on every
//! verification, named ones when a verification names them, a key's limit winning over
//! its identity's of the same name, an identity's limit shared by its keys, all limits
//! of a call counted or none, a rate-limited verification spending no credits, windows
//! ending on the clock, and bad input refused with nothing changed.

use std::sync::Arc;

use creditgate_domain::ManualClock;
use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, assert_verdict, TestApp};

/// The manual clock's start: a whole minute, so 60 s windows begin here.
const T0: i64 = 1_700_000_040_000;

fn limit(name: &str, limit: u64, duration: u64, auto_apply: bool) -> Value {
    json!({ "name": name, "limit": limit, "duration": duration, "autoApply": auto_apply })
}

async fn verify_with(app: &TestApp, key: &str, ratelimits: Value) -> Value {
    app.ok(
        "/v2/keys.verifyKey",
        json!({ "key": key, "ratelimits": ratelimits }),
    )
    .await
}

/// The entry of `name` in a verification's `ratelimits`.
fn entry<'a>(data: &'a Value, name: &str) -> &'a Value {
    data["ratelimits"]
        .as_array()
        .and_then(|l| l.iter().find(|r| r["name"] == name))
        .unwrap_or_else(|| panic!("no ratelimits entry {name}: {data}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_applied_limit_refuses_past_its_window_and_spends_nothing() {
    let clock = Arc::new(ManualClock::new(T0));
    let app = TestApp::start_with_clock(clock.clone()).await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key_with(json!({
            "apiId": api,
            "credits": { "remaining": 100 },
            "ratelimits": [limit("requests", 3, 60_000, true)],
        }))
        .await;
    let stored = app.get_key(&key_id).await;
    let rl = &stored["ratelimits"][0];
    let id = rl["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("rl_"), "{stored}");
    assert_eq!(
        *rl,
        json!({ "id": id, "name": "requests", "limit": 3, "duration": 60_000, "autoApply": true })
    );

    for left in [2, 1, 0] {
        let d = app.verify(&key, Some(5)).await;
        assert_verdict(&d, "VALID", Some(i64::from(left) * 5 + 85));
        assert_eq!(
            d["ratelimits"],
            json!([{ "id": id, "name": "requests", "limit": 3, "duration": 60_000,
                     "remaining": left, "reset": T0 + 60_000, "exceeded": false, "autoApply": true }])
        );
    }
    // Past the limit: RATE_LIMITED, and the credits stay.
    for _ in 0..2 {
        let d = app.verify(&key, Some(5)).await;
        assert_verdict(&d, "RATE_LIMITED", None);
        let r = entry(&d, "requests");
        assert_eq!((&r["remaining"], &r["exceeded"]), (&json!(0), &json!(true)));
    }
    assert_eq!(app.balance(&key_id).await, Some(85));

    // The next window allows 3 again.
    clock.set(T0 + 60_000);
    let d = app.verify(&key, Some(5)).await;
    assert_verdict(&d, "VALID", Some(80));
    assert_eq!(entry(&d, "requests")["reset"], T0 + 120_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_limits_count_their_cost_and_all_or_none() {
    let app = TestApp::start_with_clock(Arc::new(ManualClock::new(T0))).await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key_with(json!({
            "apiId": api,
            "credits": { "remaining": 1000 },
            "ratelimits": [
                limit("requests", 10, 60_000, true),
                limit("tokens", 100, 60_000, false),
            ],
        }))
        .await;
    // A limit without autoApply counts only when named.
    let d = app.verify(&key, None).await;
    assert_verdict(&d, "VALID", Some(999));
    assert_eq!(d["ratelimits"].as_array().map(Vec::len), Some(1), "{d}");
    assert_eq!(entry(&d, "requests")["remaining"], 9);

    let d = verify_with(&app, &key, json!([{ "name": "tokens", "cost": 60 }])).await;
    assert_verdict(&d, "VALID", Some(998));
    assert_eq!(entry(&d, "tokens")["remaining"], 40);
    assert_eq!(entry(&d, "tokens")["autoApply"], false);
    assert_eq!(entry(&d, "requests")["remaining"], 8);

    // 60 more tokens do not fit: nothing is counted, not even the auto-applied limit.
    let d = verify_with(&app, &key, json!([{ "name": "tokens", "cost": 60 }])).await;
    assert_verdict(&d, "RATE_LIMITED", None);
    assert_eq!(entry(&d, "tokens")["exceeded"], true);
    assert_eq!(entry(&d, "requests")["exceeded"], false);
    assert_eq!(entry(&d, "requests")["remaining"], 8);
    let d = verify_with(&app, &key, json!([{ "name": "tokens", "cost": 40 }])).await;
    assert_verdict(&d, "VALID", Some(997));
    assert_eq!(entry(&d, "tokens")["remaining"], 0);
    assert_eq!(entry(&d, "requests")["remaining"], 7);

    // Naming the auto-applied limit sets its cost; overrides change the limit.
    let d = verify_with(&app, &key, json!([{ "name": "requests", "cost": 7 }])).await;
    assert_verdict(&d, "VALID", Some(996));
    assert_eq!(entry(&d, "requests")["remaining"], 0);
    let d = verify_with(
        &app,
        &key,
        json!([{ "name": "requests", "cost": 1, "limit": 12 }]),
    )
    .await;
    assert_verdict(&d, "VALID", Some(995));
    assert_eq!(
        (
            &entry(&d, "requests")["limit"],
            &entry(&d, "requests")["remaining"]
        ),
        (&json!(12), &json!(1))
    );
    // A name given twice counts twice: 1 + 1 do not fit in the 1 left, none counts.
    let d = verify_with(
        &app,
        &key,
        json!([{ "name": "requests", "cost": 1, "limit": 12 }, { "name": "requests", "cost": 1, "limit": 12 }]),
    )
    .await;
    assert_verdict(&d, "RATE_LIMITED", None);
    assert_eq!(app.balance(&key_id).await, Some(995));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_limit_is_shared_and_a_key_limit_of_its_name_wins() {
    let app = TestApp::start_with_clock(Arc::new(ManualClock::new(T0))).await;
    let api = app.create_api().await;
    let identity = app
        .ok(
            "/v2/identities.createIdentity",
            json!({ "externalId": "acme", "ratelimits": [
                limit("requests", 4, 60_000, true),
                limit("daily", 100, 86_400_000, true),
            ] }),
        )
        .await["identityId"]
        .as_str()
        .expect("identityId")
        .to_owned();
    let shared = json!({ "apiId": api, "externalId": "acme" });
    let (_, k1) = app.create_key_with(shared.clone()).await;
    let (_, k2) = app.create_key_with(shared).await;
    let (_, own) = app
        .create_key_with(json!({ "apiId": api, "externalId": "acme",
            "ratelimits": [limit("requests", 6, 60_000, true)] }))
        .await;

    // k1 and k2 share the identity's 4 requests.
    let mut valid = 0;
    for key in [&k1, &k2, &k1, &k2, &k1, &k2] {
        let d = app.verify(key, None).await;
        if d["code"] == "VALID" {
            valid += 1;
        } else {
            assert_verdict(&d, "RATE_LIMITED", None);
        }
        assert_eq!(d["identity"]["id"], identity.as_str(), "{d}");
        assert_eq!(
            d["identity"]["ratelimits"].as_array().map(Vec::len),
            Some(2)
        );
    }
    assert_eq!(valid, 4);
    // The key's own "requests" (6) wins; the identity's "daily" still applies.
    for left in (0..6).rev() {
        let d = app.verify(&own, None).await;
        assert_verdict(&d, "VALID", None);
        assert_eq!(entry(&d, "requests")["remaining"], left);
        assert_eq!(entry(&d, "requests")["limit"], 6);
    }
    let d = app.verify(&own, None).await;
    assert_verdict(&d, "RATE_LIMITED", None);
    // 4 + 6 verifications passed the identity's daily limit.
    assert_eq!(entry(&d, "daily")["remaining"], 90);

    // New identity limits replace the old ones; a kept name keeps its id.
    let before = app
        .ok("/v2/identities.getIdentity", json!({ "identity": "acme" }))
        .await;
    let updated = app
        .ok(
            "/v2/identities.updateIdentity",
            json!({ "identity": "acme", "ratelimits": [limit("requests", 50, 60_000, true)] }),
        )
        .await;
    assert_eq!(updated["ratelimits"].as_array().map(Vec::len), Some(1));
    assert_eq!(
        updated["ratelimits"][0]["id"],
        entry(&json!({ "ratelimits": before["ratelimits"] }), "requests")["id"]
    );
    // The same counter, a larger limit: k1 passes again.
    let d = app.verify(&k1, None).await;
    assert_verdict(&d, "VALID", None);
    assert_eq!(entry(&d, "requests")["remaining"], 45);

    // Analytics rows name the identity, and the limit that refused a RATE_LIMITED one.
    let mut app = app;
    app.stop().await;
    let sql = app.analytics_sql().await;
    let rows: Vec<(String, String, String)> =
        sqlx::query_as("SELECT outcome, identity_id, exceeded_ratelimits FROM key_verifications")
            .fetch_all(sql.pool())
            .await
            .expect("reading key_verifications");
    assert_eq!(rows.len(), 14, "{rows:?}");
    assert!(rows.iter().all(|r| r.1 == identity), "{rows:?}");
    let limited: Vec<&str> = rows
        .iter()
        .filter(|r| r.0 == "RATE_LIMITED")
        .map(|r| r.2.as_str())
        .collect();
    assert_eq!(limited, vec![r#"["requests"]"#; 3], "{rows:?}");
    assert!(rows.iter().filter(|r| r.0 == "VALID").all(|r| r.2 == "[]"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_key_replaces_limits_and_keeps_ids_of_kept_names() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, _) = app
        .create_key_with(json!({ "apiId": api,
            "ratelimits": [limit("a", 1, 1_000, true), limit("b", 2, 2_000, false)] }))
        .await;
    let before = app.get_key(&key_id).await;
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": key_id, "ratelimits": [limit("b", 5, 5_000, true), limit("c", 3, 3_000, false)] }),
    )
    .await;
    let after = app.get_key(&key_id).await;
    let list = after["ratelimits"].as_array().expect("ratelimits");
    assert_eq!(list.len(), 2, "{after}");
    assert_eq!(
        list[0]["id"], before["ratelimits"][1]["id"],
        "b keeps its id"
    );
    assert_eq!(
        (
            &list[0]["limit"],
            &list[0]["duration"],
            &list[0]["autoApply"]
        ),
        (&json!(5), &json!(5_000), &json!(true))
    );
    assert_ne!(list[1]["id"], before["ratelimits"][0]["id"]);
    // Without ratelimits the update leaves them; [] removes them.
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": key_id, "name": "x" }),
    )
    .await;
    assert_eq!(
        app.get_key(&key_id).await["ratelimits"],
        after["ratelimits"]
    );
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": key_id, "ratelimits": [] }),
    )
    .await;
    assert!(app.get_key(&key_id).await.get("ratelimits").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rate_limits_are_refused_and_change_nothing() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key_with(json!({ "apiId": api, "credits": { "remaining": 10 },
            "ratelimits": [limit("requests", 5, 60_000, true)] }))
        .await;
    let before = app.get_key(&key_id).await;
    let many: Vec<Value> = (0..51)
        .map(|i| limit(&format!("l{i}"), 1, 1_000, false))
        .collect();
    let bad_rules = [
        (
            json!([limit("requests", 0, 60_000, true)]),
            "body.ratelimits[0].limit",
        ),
        (
            json!([limit("requests", 1, 999, true)]),
            "body.ratelimits[0].duration",
        ),
        (
            json!([limit("requests", 1, 2_592_000_001, true)]),
            "body.ratelimits[0].duration",
        ),
        (
            json!([limit("has space", 1, 1_000, true)]),
            "body.ratelimits[0].name",
        ),
        (
            json!([limit("", 1, 1_000, true)]),
            "body.ratelimits[0].name",
        ),
        (json!(many), "body.ratelimits"),
    ];
    for (rules, location) in &bad_rules {
        let (status, body) = app
            .post(
                "/v2/keys.createKey",
                json!({ "apiId": api, "ratelimits": rules }),
            )
            .await;
        assert_bad_request(status, &body, location);
        let (status, body) = app
            .post(
                "/v2/keys.updateKey",
                json!({ "keyId": key_id, "ratelimits": rules }),
            )
            .await;
        assert_bad_request(status, &body, location);
        let (status, body) = app
            .post(
                "/v2/identities.createIdentity",
                json!({ "externalId": "bad", "ratelimits": rules }),
            )
            .await;
        assert_bad_request(status, &body, location);
    }
    let (status, body) = app
        .post(
            "/v2/keys.createKey",
            json!({ "apiId": api, "ratelimits": [{ "name": "x", "limit": 1 }] }),
        )
        .await;
    assert_eq!(status, 400, "a limit needs its duration: {body}");
    // One limit per name: a list naming one twice conflicts with itself.
    let twice = json!([limit("a", 1, 1_000, true), limit("a", 2, 1_000, true)]);
    for (path, body) in [
        (
            "/v2/keys.createKey",
            json!({ "apiId": api, "ratelimits": twice }),
        ),
        (
            "/v2/keys.updateKey",
            json!({ "keyId": key_id, "ratelimits": twice }),
        ),
        (
            "/v2/identities.createIdentity",
            json!({ "externalId": "bad", "ratelimits": twice }),
        ),
    ] {
        let (status, resp) = app.post(path, body).await;
        assert_error(status, &resp, 409, "conflict");
        let detail = resp["error"]["detail"].as_str().unwrap_or_default();
        assert!(detail.contains("body.ratelimits[1].name"), "{resp}");
    }
    // A name neither the key nor its identity has conflicts with the key.
    let (status, resp) = app
        .post(
            "/v2/keys.verifyKey",
            json!({ "key": key, "ratelimits": [{ "name": "nope" }] }),
        )
        .await;
    assert_error(status, &resp, 409, "conflict");
    let detail = resp["error"]["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains("body.ratelimits[0].name") && detail.contains("'nope'"),
        "{resp}"
    );

    let bad_named = [
        (json!([{ "name": "no space" }]), "body.ratelimits[0].name"),
        (
            json!([{ "name": "requests", "cost": -1 }]),
            "body.ratelimits[0].cost",
        ),
        (
            json!([{ "name": "requests", "limit": -1 }]),
            "body.ratelimits[0].limit",
        ),
        (
            json!([{ "name": "requests", "duration": 10 }]),
            "body.ratelimits[0].duration",
        ),
    ];
    for (named, location) in &bad_named {
        let (status, body) = app
            .post(
                "/v2/keys.verifyKey",
                json!({ "key": key, "ratelimits": named }),
            )
            .await;
        assert_bad_request(status, &body, location);
    }
    // Nothing changed: the key as it was, no credit spent, no request counted.
    assert_eq!(app.get_key(&key_id).await, before);
    assert!(
        app.post("/v2/identities.getIdentity", json!({ "identity": "bad" }))
            .await
            .0
            == 404
    );
    let d = app.verify(&key, None).await;
    assert_verdict(&d, "VALID", Some(9));
    assert_eq!(entry(&d, "requests")["remaining"], 4);
}
