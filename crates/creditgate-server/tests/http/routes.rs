//! Every route once through its happy path, with the fields a client reads back.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::support::{assert_error, assert_verdict, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn liveness_openapi_and_metrics() {
    let app = TestApp::start().await;

    let (status, body) = app.get_json("/v2/liveness").await;
    assert_eq!(status, 200);
    assert_eq!(body["data"], json!({ "message": "OK" }));

    let (status, ctype, text) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("application/json"), "{ctype}");
    let doc: Value = serde_json::from_str(&text).expect("openapi.json is JSON");
    let version = doc["openapi"].as_str().unwrap_or("");
    assert!(version.starts_with("3.1."), "OpenAPI version {version}");
    let paths = doc["paths"].as_object().expect("paths");
    for route in [
        "apis.createApi",
        "apis.getApi",
        "apis.listKeys",
        "apis.deleteApi",
        "keys.createKey",
        "keys.getKey",
        "keys.updateKey",
        "keys.updateCredits",
        "keys.deleteKey",
        "keys.verifyKey",
        "keys.whoami",
    ] {
        let path = format!("/v2/{route}");
        assert!(
            paths.get(&path).and_then(|p| p.get("post")).is_some(),
            "openapi.json lacks POST {path}"
        );
    }
    assert!(
        paths
            .get("/v2/liveness")
            .and_then(|p| p.get("get"))
            .is_some(),
        "openapi.json lacks GET /v2/liveness"
    );

    let api = app.create_api().await;
    let (_, key) = app.create_limited(&api, 3).await;
    let before = valid_verifications(&app.get("/metrics").await.2);
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(2));
    let (status, ctype, text) = app.get("/metrics").await;
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let after = valid_verifications(&text);
    // The recorder is process-wide (other tests count too), so at least one more.
    assert!(
        after >= before + 1.0,
        "creditgate_verifications_total{{outcome=\"VALID\"}} went {before} -> {after}:\n{text}"
    );
}

/// The `creditgate_verifications_total{outcome="VALID"}` sample of a Prometheus text.
fn valid_verifications(text: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with("creditgate_verifications_total{") && l.contains("outcome=\"VALID\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apis_create_get_delete() {
    let app = TestApp::start().await;
    let data = app
        .ok("/v2/apis.createApi", json!({ "name": "billing.v2-prod_1" }))
        .await;
    let api = data["apiId"].as_str().expect("apiId").to_owned();
    assert_eq!(data, json!({ "apiId": api }));

    let got = app.ok("/v2/apis.getApi", json!({ "apiId": api })).await;
    assert_eq!(got, json!({ "id": api, "name": "billing.v2-prod_1" }));

    let (key_id, key) = app.create_limited(&api, 5).await;
    let (unlimited_id, unlimited) = app.create_key(&api, Value::Null).await;
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(4));
    assert_verdict(&app.verify(&unlimited, None).await, "VALID", None);

    let deleted = app.ok("/v2/apis.deleteApi", json!({ "apiId": api })).await;
    assert_eq!(deleted, json!({}));

    // Its keys are gone for every route.
    for k in [&key, &unlimited] {
        let v = app.verify(k, None).await;
        assert_verdict(&v, "NOT_FOUND", None);
        assert!(v.get("keyId").is_none(), "{v}");
    }
    for (id, k) in [(&key_id, &key), (&unlimited_id, &unlimited)] {
        let (status, body) = app.post("/v2/keys.getKey", json!({ "keyId": id })).await;
        assert_error(status, &body, 404, "/data/key_not_found");
        let (status, body) = app.post("/v2/keys.whoami", json!({ "key": k })).await;
        assert_error(status, &body, 404, "/data/key_not_found");
    }
    let (status, body) = app.post("/v2/apis.getApi", json!({ "apiId": api })).await;
    assert_error(status, &body, 404, "/data/api_not_found");
    let (status, body) = app.post("/v2/apis.listKeys", json!({ "apiId": api })).await;
    assert_error(status, &body, 404, "/data/api_not_found");
    let (status, body) = app
        .post("/v2/apis.deleteApi", json!({ "apiId": api }))
        .await;
    assert_error(status, &body, 404, "/data/api_not_found");
    let (status, body) = app
        .post("/v2/keys.createKey", json!({ "apiId": api }))
        .await;
    assert_error(status, &body, 404, "/data/api_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_keys_pages_with_a_cursor_until_the_last_page() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let other = app.create_api().await;
    let mut created = BTreeSet::new();
    for i in 0..5 {
        let (id, _) = app
            .create_key_with(json!({
                "apiId": api,
                "externalId": if i % 2 == 0 { "even" } else { "odd" },
                "credits": { "remaining": i },
            }))
            .await;
        created.insert(id);
    }
    app.create_limited(&other, 1).await;

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut req = json!({ "apiId": api, "limit": 2, "decrypt": false,
            "revalidateKeysCache": false });
        if let Some(c) = &cursor {
            req["cursor"] = json!(c);
        }
        let (status, body) = app.post("/v2/apis.listKeys", req).await;
        assert_eq!(status, 200, "{body}");
        pages += 1;
        let data = body["data"].as_array().expect("data is a list");
        let pagination = &body["pagination"];
        for k in data {
            seen.push(k["keyId"].as_str().expect("keyId").to_owned());
            assert!(k["start"].is_string() && k["createdAt"].is_i64(), "{k}");
            assert!(k["credits"]["remaining"].is_i64(), "{k}");
        }
        if pages < 3 {
            assert_eq!(data.len(), 2, "page {pages}: {body}");
            assert_eq!(pagination["hasMore"], true, "page {pages}: {body}");
            let c = pagination["cursor"]
                .as_str()
                .expect("cursor before the last page");
            assert!(!c.is_empty());
            cursor = Some(c.to_owned());
        } else {
            assert_eq!(data.len(), 1, "last page: {body}");
            assert_eq!(pagination["hasMore"], false, "last page: {body}");
            assert!(
                pagination.get("cursor").is_none(),
                "the last page must omit cursor: {body}"
            );
            break;
        }
    }
    assert_eq!(seen.len(), 5, "{seen:?}");
    assert_eq!(seen.iter().cloned().collect::<BTreeSet<_>>(), created);

    // One page holding everything: no cursor.
    let (status, body) = app
        .post("/v2/apis.listKeys", json!({ "apiId": api, "limit": 5 }))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body["data"].as_array().map(Vec::len), Some(5));
    assert_eq!(body["pagination"], json!({ "hasMore": false }));

    // Filter by externalId.
    let (status, body) = app
        .post(
            "/v2/apis.listKeys",
            json!({ "apiId": api, "externalId": "odd" }),
        )
        .await;
    assert_eq!(status, 200);
    let odd: Vec<&Value> = body["data"].as_array().expect("data").iter().collect();
    assert_eq!(odd.len(), 2, "{body}");
    for k in odd {
        assert_eq!(k["identity"]["externalId"], "odd", "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_key_echoes_every_field() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let expires = 4_000_000_000_000_i64;
    let (key_id, key) = app
        .create_key_with(json!({
            "apiId": api,
            "prefix": "acme",
            "name": "customer 42",
            "byteLength": 32,
            "externalId": "user_42",
            "meta": { "plan": "pro", "seats": 3, "tags": ["a", "b"] },
            "expires": expires,
            "enabled": false,
            "recoverable": false,
            "credits": { "remaining": 1000, "refill": { "interval": "daily", "amount": 500 } },
        }))
        .await;
    assert!(key.starts_with("acme_"), "{key}");
    let random = bs58::decode(&key["acme_".len()..])
        .into_vec()
        .expect("the key body is base58");
    assert_eq!(random.len(), 32, "byteLength 32: {key}");

    let got = app.get_key(&key_id).await;
    let start = got["start"].as_str().expect("start");
    assert!(
        start.starts_with("acme_") && key.starts_with(start) && start.len() < key.len(),
        "start {start} of {key}"
    );
    assert_eq!(got["keyId"], key_id.as_str());
    assert_eq!(got["name"], "customer 42");
    assert_eq!(got["enabled"], false);
    assert_eq!(got["expires"], expires);
    assert_eq!(
        got["meta"],
        json!({ "plan": "pro", "seats": 3, "tags": ["a", "b"] })
    );
    assert_eq!(got["identity"]["externalId"], "user_42");
    assert!(got["identity"]["id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    assert!(got["createdAt"]
        .as_i64()
        .is_some_and(|t| t > 1_600_000_000_000));
    assert_eq!(
        got["credits"],
        json!({ "remaining": 1000, "refill": { "interval": "daily", "amount": 500 } })
    );

    let (monthly_id, monthly) = app
        .create_key_with(json!({
            "apiId": api,
            "credits": { "remaining": 7,
                "refill": { "interval": "monthly", "amount": 100, "refillDay": 15 } },
        }))
        .await;
    assert_eq!(
        app.get_key(&monthly_id).await["credits"],
        json!({ "remaining": 7,
            "refill": { "interval": "monthly", "amount": 100, "refillDay": 15 } })
    );
    // Default byte length 16, no prefix, enabled by default.
    assert_eq!(
        bs58::decode(&monthly)
            .into_vec()
            .expect("the key is base58")
            .len(),
        16
    );
    let got = app.get_key(&monthly_id).await;
    assert_eq!(got["enabled"], true);
    assert!(monthly.starts_with(got["start"].as_str().expect("start")));
    for absent in ["name", "meta", "expires", "identity", "updatedAt"] {
        assert!(
            got.get(absent).is_none(),
            "{absent} should be omitted: {got}"
        );
    }

    // Unlimited key: no credits at all.
    let (unlimited_id, _) = app.create_key(&api, Value::Null).await;
    assert!(app.get_key(&unlimited_id).await.get("credits").is_none());
    let (null_id, _) = app.create_key(&api, json!({ "remaining": null })).await;
    assert!(app.get_key(&null_id).await.get("credits").is_none());

    // The disabled key verifies as DISABLED and echoes its fields.
    let v = app.verify(&key, None).await;
    assert_verdict(&v, "DISABLED", None);
    assert_eq!(v["keyId"], key_id.as_str());
    assert_eq!(v["enabled"], false);
    assert_eq!(app.balance(&key_id).await, Some(1000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whoami_and_delete_key() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key_with(json!({ "apiId": api, "name": "w", "credits": { "remaining": 9 } }))
        .await;
    let me = app.ok("/v2/keys.whoami", json!({ "key": key })).await;
    assert_eq!(me["keyId"], key_id.as_str());
    assert_eq!(me["name"], "w");
    assert_eq!(me["credits"], json!({ "remaining": 9 }));
    let (status, body) = app
        .post("/v2/keys.whoami", json!({ "key": "nope_not_a_key" }))
        .await;
    assert_error(status, &body, 404, "/data/key_not_found");

    let done = app
        .ok(
            "/v2/keys.deleteKey",
            json!({ "keyId": key_id, "permanent": false }),
        )
        .await;
    assert_eq!(done, json!({}));
    let v = app.verify(&key, None).await;
    assert_verdict(&v, "NOT_FOUND", None);
    assert!(v.get("keyId").is_none(), "{v}");
    for (route, body) in [
        ("/v2/keys.getKey", json!({ "keyId": key_id })),
        ("/v2/keys.whoami", json!({ "key": key })),
        ("/v2/keys.deleteKey", json!({ "keyId": key_id })),
        (
            "/v2/keys.updateKey",
            json!({ "keyId": key_id, "name": "x" }),
        ),
        (
            "/v2/keys.updateCredits",
            json!({ "keyId": key_id, "operation": "set", "value": 5 }),
        ),
    ] {
        let (status, resp) = app.post(route, body).await;
        assert_error(status, &resp, 404, "/data/key_not_found");
    }
    let (status, body) = app.post("/v2/apis.listKeys", json!({ "apiId": api })).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"], json!([]), "a deleted key is not listed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_key_sets_and_clears_fields() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key_with(json!({ "apiId": api, "name": "n1", "credits": { "remaining": 10 } }))
        .await;
    let expires = 4_000_000_000_000_i64;
    let done = app
        .ok(
            "/v2/keys.updateKey",
            json!({
                "keyId": key_id,
                "name": "n2",
                "meta": { "plan": "pro" },
                "expires": expires,
                "enabled": false,
                "externalId": "ext-1",
                "credits": { "remaining": 20, "refill": { "interval": "daily", "amount": 20 } },
            }),
        )
        .await;
    assert_eq!(done, json!({}));
    let got = app.get_key(&key_id).await;
    assert_eq!(got["name"], "n2");
    assert_eq!(got["meta"], json!({ "plan": "pro" }));
    assert_eq!(got["expires"], expires);
    assert_eq!(got["enabled"], false);
    assert_eq!(got["identity"]["externalId"], "ext-1");
    assert_eq!(
        got["credits"],
        json!({ "remaining": 20, "refill": { "interval": "daily", "amount": 20 } })
    );
    assert!(
        got["updatedAt"].is_i64(),
        "updatedAt after an update: {got}"
    );
    assert_verdict(&app.verify(&key, None).await, "DISABLED", None);
    assert_eq!(app.balance(&key_id).await, Some(20));

    // null clears; omitted fields stay.
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": key_id, "name": null, "enabled": true }),
    )
    .await;
    let got = app.get_key(&key_id).await;
    assert!(got.get("name").is_none(), "name cleared: {got}");
    assert_eq!(got["meta"], json!({ "plan": "pro" }));
    assert_eq!(got["expires"], expires);
    let v = app.verify(&key, None).await;
    assert_verdict(&v, "VALID", Some(19));
    assert_eq!(v["meta"], json!({ "plan": "pro" }));
    assert!(v.get("name").is_none(), "{v}");

    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": key_id, "meta": null, "expires": null, "externalId": null }),
    )
    .await;
    let got = app.get_key(&key_id).await;
    for absent in ["meta", "expires", "identity", "name"] {
        assert!(got.get(absent).is_none(), "{absent} cleared: {got}");
    }
    assert_eq!(got["credits"]["remaining"], 19);

    // credits: null → unlimited.
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": key_id, "credits": null }),
    )
    .await;
    assert!(app.get_key(&key_id).await.get("credits").is_none());
    for _ in 0..3 {
        assert_verdict(&app.verify(&key, Some(1000)).await, "VALID", None);
    }

    // And back to a balance.
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": key_id, "credits": { "remaining": 2 } }),
    )
    .await;
    assert_eq!(
        app.get_key(&key_id).await["credits"],
        json!({ "remaining": 2 })
    );
    assert_verdict(&app.verify(&key, Some(2)).await, "VALID", Some(0));
    assert_verdict(&app.verify(&key, None).await, "USAGE_EXCEEDED", Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_credits_set_increment_decrement() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key(
            &api,
            json!({ "remaining": 10, "refill": { "interval": "daily", "amount": 10 } }),
        )
        .await;
    let refill = json!({ "interval": "daily", "amount": 10 });
    let op = |operation: &str, value: Value| {
        let mut body = json!({ "keyId": key_id, "operation": operation });
        if !value.is_null() {
            body["value"] = value;
        }
        body
    };

    let r = app.ok("/v2/keys.updateCredits", op("set", json!(50))).await;
    assert_eq!(r, json!({ "remaining": 50, "refill": refill }));
    let r = app
        .ok("/v2/keys.updateCredits", op("increment", json!(5)))
        .await;
    assert_eq!(r, json!({ "remaining": 55, "refill": refill }));
    let r = app
        .ok("/v2/keys.updateCredits", op("decrement", json!(10)))
        .await;
    assert_eq!(r, json!({ "remaining": 45, "refill": refill }));
    assert_eq!(app.balance(&key_id).await, Some(45));
    assert_verdict(&app.verify(&key, Some(5)).await, "VALID", Some(40));
    let r = app
        .ok("/v2/keys.updateCredits", op("decrement", json!(1000)))
        .await;
    assert_eq!(r["remaining"], 0, "decrement clamps at 0: {r}");
    assert_eq!(app.balance(&key_id).await, Some(0));
    assert_verdict(&app.verify(&key, None).await, "USAGE_EXCEEDED", Some(0));
    let r = app
        .ok("/v2/keys.updateCredits", op("increment", json!(3)))
        .await;
    assert_eq!(r["remaining"], 3);
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(2));

    // set null → unlimited, refill dropped.
    let r = app
        .ok("/v2/keys.updateCredits", op("set", Value::Null))
        .await;
    assert_eq!(r, json!({ "remaining": null }));
    let got = app.get_key(&key_id).await;
    assert!(got.get("credits").is_none(), "unlimited: {got}");
    assert_verdict(&app.verify(&key, None).await, "VALID", None);

    // set with an explicit null, and set again to a balance: no refill comes back.
    let r = app
        .ok(
            "/v2/keys.updateCredits",
            json!({ "keyId": key_id, "operation": "set", "value": null }),
        )
        .await;
    assert_eq!(r, json!({ "remaining": null }));
    let r = app.ok("/v2/keys.updateCredits", op("set", json!(4))).await;
    assert_eq!(r, json!({ "remaining": 4 }));
    assert_eq!(
        app.get_key(&key_id).await["credits"],
        json!({ "remaining": 4 })
    );
    assert_verdict(&app.verify(&key, Some(4)).await, "VALID", Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_types_and_sdk_defaults_are_accepted() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 10).await;
    let body = json!({ "key": key }).to_string().into_bytes();
    // Media type parameters and case do not matter.
    for ctype in ["application/json; charset=utf-8", "Application/JSON"] {
        let (status, resp) = app
            .post_raw("/v2/keys.verifyKey", ctype, body.clone())
            .await;
        assert_eq!(status, 200, "{ctype}: {resp}");
    }
    assert_eq!(app.balance(&key_id).await, Some(8));
    // The defaults the official SDK always sends.
    let got = app
        .ok(
            "/v2/keys.getKey",
            json!({ "keyId": key_id, "decrypt": false }),
        )
        .await;
    assert_eq!(got["keyId"], key_id.as_str());
    let (k2, _) = app
        .create_key_with(json!({ "apiId": api, "byteLength": 16, "enabled": true,
            "recoverable": false, "roles": [], "permissions": [], "ratelimits": [] }))
        .await;
    let (status, resp) = app
        .post(
            "/v2/keys.verifyKey",
            json!({ "key": key, "ratelimits": [], "tags": [], "permissions": "" }),
        )
        .await;
    assert_eq!(status, 200, "{resp}");
    assert_verdict(&resp["data"], "VALID", Some(7));
    app.ok(
        "/v2/keys.deleteKey",
        json!({ "keyId": k2, "permanent": false }),
    )
    .await;
}

/// The auth scheme is case-insensitive (RFC 9110 §11.1); the SDK passes a root key that
/// already starts with "bearer " (in any case) through unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bearer_scheme_is_case_insensitive() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 10).await;
    for scheme in ["Bearer", "bearer", "BEARER", "BeArEr"] {
        let (status, resp) = app
            .post_with_authorization(
                &format!("{scheme} {}", app.root_key),
                "/v2/keys.verifyKey",
                json!({ "key": key }),
            )
            .await;
        assert_eq!(status, 200, "scheme {scheme}: {resp}");
    }
    assert_eq!(app.balance(&key_id).await, Some(6));
}

/// A known path with the wrong method still answers with the error envelope (JSON,
/// `meta.requestId`, `error.status` 405), like every other error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_method_gets_the_error_envelope() {
    let app = TestApp::start().await;
    let (status, resp) = app.get_json("/v2/keys.verifyKey").await;
    assert_eq!(status, 405, "{resp}");
    let (status, resp) = app.post("/v2/liveness", json!({})).await;
    assert_eq!(status, 405, "{resp}");
}
