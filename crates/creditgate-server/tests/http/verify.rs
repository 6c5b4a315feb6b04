//! The verification contract of DESIGN.md §2: the order of checks, the credits table,
//! and that no failing check spends anything.

use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_verdict, TestApp};

const MAX_COST: u64 = 1_000_000_000_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_credits_table() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    // (remaining, cost, code, credits in the answer, balance afterwards)
    let rows: [(i64, Option<u64>, &str, i64); 5] = [
        (5, None, "VALID", 4),
        (0, None, "USAGE_EXCEEDED", 0),
        (5, Some(5), "VALID", 0),
        (5, Some(15), "USAGE_EXCEEDED", 5),
        (0, Some(0), "VALID", 0),
    ];
    for (remaining, cost, code, after) in rows {
        let (key_id, key) = app.create_limited(&api, remaining).await;
        let v = app.verify(&key, cost).await;
        assert_verdict(&v, code, Some(after));
        assert_eq!(v["keyId"], key_id.as_str(), "{v}");
        assert_eq!(v["enabled"], true, "{v}");
        assert_eq!(
            app.balance(&key_id).await,
            Some(after),
            "remaining {remaining}, cost {cost:?}"
        );
    }

    // Cost 0 on a positive balance spends nothing.
    let (key_id, key) = app.create_limited(&api, 3).await;
    assert_verdict(&app.verify(&key, Some(0)).await, "VALID", Some(3));
    assert_eq!(app.balance(&key_id).await, Some(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_disabled_expired_and_unknown_keys() {
    let app = TestApp::start().await;
    let api = app.create_api().await;

    let (unlimited_id, unlimited) = app
        .create_key_with(json!({ "apiId": api, "name": "free", "meta": { "t": 1 } }))
        .await;
    for cost in [None, Some(0), Some(MAX_COST)] {
        let v = app.verify(&unlimited, cost).await;
        assert_verdict(&v, "VALID", None);
        assert_eq!(v["keyId"], unlimited_id.as_str());
        assert_eq!(v["name"], "free");
        assert_eq!(v["meta"], json!({ "t": 1 }));
    }

    let (disabled_id, disabled) = app
        .create_key_with(json!({ "apiId": api, "enabled": false, "credits": { "remaining": 5 } }))
        .await;
    let v = app.verify(&disabled, None).await;
    assert_verdict(&v, "DISABLED", None);
    assert_eq!(v["keyId"], disabled_id.as_str());
    assert_eq!(app.balance(&disabled_id).await, Some(5));

    // Disabled is checked before expired.
    let past = now_ms() - 60_000;
    let (both_id, both) = app
        .create_key_with(json!({ "apiId": api, "enabled": false, "expires": past,
            "credits": { "remaining": 5 } }))
        .await;
    assert_verdict(&app.verify(&both, None).await, "DISABLED", None);
    assert_eq!(app.balance(&both_id).await, Some(5));

    let (expired_id, expired) = app
        .create_key_with(json!({ "apiId": api, "expires": past, "credits": { "remaining": 5 } }))
        .await;
    let v = app.verify(&expired, Some(2)).await;
    assert_verdict(&v, "EXPIRED", None);
    assert_eq!(v["keyId"], expired_id.as_str());
    assert_eq!(v["expires"], past);
    assert_eq!(app.balance(&expired_id).await, Some(5));

    // Expired and out of credits: EXPIRED wins.
    let (spent_id, spent) = app
        .create_key_with(json!({ "apiId": api, "expires": past, "credits": { "remaining": 0 } }))
        .await;
    assert_verdict(&app.verify(&spent, None).await, "EXPIRED", None);
    assert_eq!(app.balance(&spent_id).await, Some(0));

    // Not yet expired.
    let future = now_ms() + 3_600_000;
    let (live_id, live) = app
        .create_key_with(json!({ "apiId": api, "expires": future, "credits": { "remaining": 5 } }))
        .await;
    let v = app.verify(&live, None).await;
    assert_verdict(&v, "VALID", Some(4));
    assert_eq!(v["expires"], future);
    assert_eq!(app.balance(&live_id).await, Some(4));

    for unknown in ["sk_definitely_not_a_key", "x", &"a".repeat(512)] {
        let v = app.verify(unknown, None).await;
        assert_verdict(&v, "NOT_FOUND", None);
        assert!(v.get("keyId").is_none(), "{v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_keys_that_may_not_see_the_key_get_not_found() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let other_api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 5).await;
    let (unlimited_id, unlimited) = app.create_key(&api, Value::Null).await;

    let foreign = app
        .root_key(
            "ws_other",
            &[
                "api.*.create_api",
                "api.*.read_api",
                "api.*.create_key",
                "api.*.read_key",
                "api.*.update_key",
                "api.*.delete_key",
                "api.*.verify_key",
                "api.*.delete_api",
            ],
        )
        .await;
    let no_verify = app
        .root_key(
            creditgate_server::DEFAULT_WORKSPACE,
            &["api.*.read_key", "api.*.create_key", "api.*.update_key"],
        )
        .await;
    let other_api_only = app
        .root_key(
            creditgate_server::DEFAULT_WORKSPACE,
            &[&format!("api.{other_api}.verify_key")],
        )
        .await;
    for (who, root) in [
        ("another workspace", &foreign),
        ("no verify_key", &no_verify),
        ("verify_key on another API", &other_api_only),
    ] {
        for k in [&key, &unlimited] {
            for cost in [None, Some(3)] {
                let (status, body) = app
                    .post_as(
                        Some(root),
                        "/v2/keys.verifyKey",
                        json!({ "key": k, "credits": { "cost": cost.unwrap_or(1) } }),
                    )
                    .await;
                assert_eq!(status, 200, "{who}: {body}");
                let v = &body["data"];
                assert_verdict(v, "NOT_FOUND", None);
                assert!(
                    v.get("keyId").is_none(),
                    "{who} must not learn the key: {v}"
                );
                assert!(v.get("name").is_none() && v.get("enabled").is_none(), "{v}");
            }
        }
    }
    // The foreign workspace cannot read it either.
    let (status, body) = app
        .post_as(
            Some(&foreign),
            "/v2/keys.getKey",
            json!({ "keyId": key_id }),
        )
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(app.balance(&key_id).await, Some(5), "nothing was spent");

    // Control: a root key scoped to this very API verifies (and spends).
    let this_api_only = app
        .root_key(
            creditgate_server::DEFAULT_WORKSPACE,
            &[&format!("api.{api}.verify_key")],
        )
        .await;
    assert_verdict(
        &app.verify_as(&this_api_only, &key, None).await,
        "VALID",
        Some(4),
    );
    let v = app.verify_as(&this_api_only, &unlimited, None).await;
    assert_verdict(&v, "VALID", None);
    assert_eq!(v["keyId"], unlimited_id.as_str());
    assert_eq!(app.balance(&key_id).await, Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cost_bounds() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let max = i64::try_from(MAX_COST).expect("fits");
    let (key_id, key) = app.create_limited(&api, max + 5).await;

    let (status, body) = app
        .post(
            "/v2/keys.verifyKey",
            json!({ "key": key, "credits": { "cost": MAX_COST + 1 } }),
        )
        .await;
    assert_bad_request(status, &body, "body.credits.cost");
    assert_eq!(app.balance(&key_id).await, Some(max + 5));

    assert_verdict(&app.verify(&key, Some(MAX_COST)).await, "VALID", Some(5));
    assert_verdict(
        &app.verify(&key, Some(MAX_COST)).await,
        "USAGE_EXCEEDED",
        Some(5),
    );
    assert_eq!(app.balance(&key_id).await, Some(5));

    // The largest balance a key may hold: 2^53 - 1.
    let top = (1_i64 << 53) - 1;
    let (top_id, top_key) = app.create_limited(&api, top).await;
    assert_verdict(
        &app.verify(&top_key, Some(MAX_COST)).await,
        "VALID",
        Some(top - max),
    );
    assert_eq!(app.balance(&top_id).await, Some(top - max));
}

fn now_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(since.as_millis()).expect("fits")
}
