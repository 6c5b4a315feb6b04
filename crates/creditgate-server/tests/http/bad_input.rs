//! Bad input: each request gets the right status and Unkey's error envelope (400s name
//! the field and say how to fix it), and changes nothing. Plus a seeded fuzz loop.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::support::{
    assert_bad_request, assert_error, assert_verdict, bad_request_problem, Failures, TestApp,
};

const VERIFY: &str = "/v2/keys.verifyKey";
const CREATE_KEY: &str = "/v2/keys.createKey";
const UPDATE_CREDITS: &str = "/v2/keys.updateCredits";
const LIMIT: usize = 256 * 1024;

/// A JSON object of a bit more than `LIMIT` bytes.
fn oversized(mut body: Value) -> Vec<u8> {
    body["meta"] = json!({ "pad": "x".repeat(LIMIT) });
    let bytes = serde_json::to_vec(&body).expect("json");
    assert!(bytes.len() > LIMIT);
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_verify_requests_spend_nothing() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 5).await;

    let raw = |s: String| s.into_bytes();
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "invalid JSON",
            "application/json",
            raw(format!(
                "{{\"key\": \"{key}\", \"credits\": {{\"cost\": 1}}"
            )),
            "body",
        ),
        (
            "not JSON at all",
            "application/json",
            raw("key=abc".into()),
            "body",
        ),
        (
            "text/plain",
            "text/plain",
            raw(json!({ "key": key }).to_string()),
            "header.Content-Type",
        ),
        (
            "missing key",
            "application/json",
            raw(json!({ "credits": { "cost": 1 } }).to_string()),
            "body.key",
        ),
        (
            "empty key",
            "application/json",
            raw(json!({ "key": "" }).to_string()),
            "body.key",
        ),
        (
            "513-character key",
            "application/json",
            raw(json!({ "key": "a".repeat(513) }).to_string()),
            "body.key",
        ),
        (
            "negative cost",
            "application/json",
            raw(json!({ "key": key, "credits": { "cost": -1 } }).to_string()),
            "body.credits.cost",
        ),
        (
            "fractional cost",
            "application/json",
            raw(json!({ "key": key, "credits": { "cost": 1.5 } }).to_string()),
            "body.credits.cost",
        ),
        (
            "cost above 10^12",
            "application/json",
            raw(json!({ "key": key, "credits": { "cost": 1_000_000_000_001_u64 } }).to_string()),
            "body.credits.cost",
        ),
        (
            "cost as a string",
            "application/json",
            raw(json!({ "key": key, "credits": { "cost": "1" } }).to_string()),
            "body.credits.cost",
        ),
        (
            "credits without cost",
            "application/json",
            raw(json!({ "key": key, "credits": {} }).to_string()),
            "body.credits.cost",
        ),
        (
            "unknown field",
            "application/json",
            raw(json!({ "key": key, "apiId": "api_x" }).to_string()),
            "body.apiId",
        ),
        (
            "unknown field in credits",
            "application/json",
            raw(json!({ "key": key, "credits": { "cost": 1, "refund": true } }).to_string()),
            "body.credits.refund",
        ),
        (
            "a JSON array",
            "application/json",
            raw(json!([key]).to_string()),
            "body",
        ),
    ];
    let mut failures = Failures::default();
    for (what, ctype, bytes, location) in cases {
        let (status, body) = app.post_raw(VERIFY, ctype, bytes).await;
        failures.check(what, bad_request_problem(status, &body, location));
        assert_eq!(app.balance(&key_id).await, Some(5), "{what} spent credits");
    }

    let (status, body) = app
        .post_raw(VERIFY, "application/json", oversized(json!({ "key": key })))
        .await;
    assert_error(status, &body, 413, "/request_too_large");

    // Missing or wrong root key: 401, nothing spent.
    let (status, body) = app.post_as(None, VERIFY, json!({ "key": key })).await;
    assert_error(status, &body, 401, "");
    let (status, body) = app
        .post_as(Some("cg_root_wrong"), VERIFY, json!({ "key": key }))
        .await;
    assert_error(status, &body, 401, "/authentication/key_not_found");
    let (status, body) = app
        .post_with_authorization(
            &format!("Basic {}", app.root_key),
            VERIFY,
            json!({ "key": key }),
        )
        .await;
    assert_error(status, &body, 401, "");
    let (status, body) = app
        .post_with_authorization("Bearer ", VERIFY, json!({ "key": key }))
        .await;
    assert_error(status, &body, 401, "");

    assert_eq!(app.balance(&key_id).await, Some(5));
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(4));
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_create_requests_create_nothing() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let mk = |extra: Value| {
        let mut body = json!({ "apiId": api });
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        body.to_string().into_bytes()
    };
    let cases: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "invalid JSON",
            "application/json",
            b"{\"apiId\": ".to_vec(),
            "body",
        ),
        (
            "text/plain",
            "text/plain",
            mk(json!({})),
            "header.Content-Type",
        ),
        (
            "missing apiId",
            "application/json",
            b"{\"name\": \"k\"}".to_vec(),
            "body.apiId",
        ),
        (
            "unknown field",
            "application/json",
            mk(json!({ "owner": "me" })),
            "body.owner",
        ),
        (
            "monthly refill without refillDay",
            "application/json",
            mk(json!({ "credits": { "remaining": 5,
                "refill": { "interval": "monthly", "amount": 10 } } })),
            "body.credits.refill.refillDay",
        ),
        (
            "refillDay on a daily refill",
            "application/json",
            mk(json!({ "credits": { "remaining": 5,
                "refill": { "interval": "daily", "amount": 10, "refillDay": 3 } } })),
            "body.credits.refill.refillDay",
        ),
        (
            "refillDay 32",
            "application/json",
            mk(json!({ "credits": { "remaining": 5,
                "refill": { "interval": "monthly", "amount": 10, "refillDay": 32 } } })),
            "body.credits.refill.refillDay",
        ),
        (
            "refill with remaining null",
            "application/json",
            mk(json!({ "credits": { "remaining": null,
                "refill": { "interval": "daily", "amount": 10 } } })),
            "body.credits.refill",
        ),
        (
            "refill amount 0",
            "application/json",
            mk(json!({ "credits": { "remaining": 5,
                "refill": { "interval": "daily", "amount": 0 } } })),
            "body.credits.refill.amount",
        ),
        (
            "unknown interval",
            "application/json",
            mk(json!({ "credits": { "remaining": 5,
                "refill": { "interval": "weekly", "amount": 1 } } })),
            "body.credits.refill.interval",
        ),
        (
            "negative remaining",
            "application/json",
            mk(json!({ "credits": { "remaining": -1 } })),
            "body.credits.remaining",
        ),
        (
            "remaining above 2^53-1",
            "application/json",
            mk(json!({ "credits": { "remaining": 9_007_199_254_740_992_i64 } })),
            "body.credits.remaining",
        ),
        (
            "byteLength 8",
            "application/json",
            mk(json!({ "byteLength": 8 })),
            "body.byteLength",
        ),
        (
            "prefix with a dash",
            "application/json",
            mk(json!({ "prefix": "a-b" })),
            "body.prefix",
        ),
        (
            "prefix of 17 characters",
            "application/json",
            mk(json!({ "prefix": "p".repeat(17) })),
            "body.prefix",
        ),
        (
            "empty name",
            "application/json",
            mk(json!({ "name": "" })),
            "body.name",
        ),
        (
            "expires after 2100",
            "application/json",
            mk(json!({ "expires": 4_102_444_800_001_i64 })),
            "body.expires",
        ),
        (
            "recoverable",
            "application/json",
            mk(json!({ "recoverable": true })),
            "body.recoverable",
        ),
    ];
    let mut failures = Failures::default();
    for (what, ctype, bytes, location) in cases {
        let (status, body) = app.post_raw(CREATE_KEY, ctype, bytes).await;
        failures.check(what, bad_request_problem(status, &body, location));
    }
    assert_eq!(app.count("keys").await, 0, "a bad createKey created a key");
    let (status, body) = app
        .post_raw(
            CREATE_KEY,
            "application/json",
            oversized(json!({ "apiId": api })),
        )
        .await;
    assert_error(status, &body, 413, "/request_too_large");

    let (status, body) = app
        .post(CREATE_KEY, json!({ "apiId": "api_doesNotExist" }))
        .await;
    assert_error(status, &body, 404, "/data/api_not_found");
    let (status, body) = app.post_as(None, CREATE_KEY, json!({ "apiId": api })).await;
    assert_error(status, &body, 401, "");
    let (status, body) = app
        .post_as(Some("cg_root_wrong"), CREATE_KEY, json!({ "apiId": api }))
        .await;
    assert_error(status, &body, 401, "");
    let reader = app
        .root_key(
            creditgate_server::DEFAULT_WORKSPACE,
            &["api.*.read_key", "api.*.read_api", "api.*.verify_key"],
        )
        .await;
    let (status, body) = app
        .post_as(Some(&reader), CREATE_KEY, json!({ "apiId": api }))
        .await;
    assert_error(
        status,
        &body,
        403,
        "/authorization/insufficient_permissions",
    );
    // Another workspace cannot create keys in this API.
    let foreign = app.root_key("ws_other", &["api.*.create_key"]).await;
    let (status, body) = app
        .post_as(Some(&foreign), CREATE_KEY, json!({ "apiId": api }))
        .await;
    assert_error(status, &body, 404, "/data/api_not_found");

    // Bad createApi bodies.
    for (name, location) in [
        (json!("ab"), "body.name"),
        (json!("1abc"), "body.name"),
        (json!("a b c"), "body.name"),
        (json!(5), "body.name"),
    ] {
        let (status, body) = app
            .post("/v2/apis.createApi", json!({ "name": name }))
            .await;
        assert_bad_request(status, &body, location);
    }
    let (status, body) = app
        .post_as(
            Some(&reader),
            "/v2/apis.createApi",
            json!({ "name": "nope" }),
        )
        .await;
    assert_error(
        status,
        &body,
        403,
        "/authorization/insufficient_permissions",
    );

    assert_eq!(app.count("apis").await, 1, "no API was created");
    assert_eq!(app.count("keys").await, 0, "no key was created");
    let (status, body) = app.post("/v2/apis.listKeys", json!({ "apiId": api })).await;
    assert_eq!(status, 200);
    assert_eq!(body["data"], json!([]));
    failures.assert_none();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credit_updates_change_nothing() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 5).await;
    let (unlimited_id, _) = app.create_key(&api, Value::Null).await;
    let max = (1_i64 << 53) - 1;

    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "increment without value",
            json!({ "keyId": key_id, "operation": "increment" }),
            "body.value",
        ),
        (
            "decrement without value",
            json!({ "keyId": key_id, "operation": "decrement" }),
            "body.value",
        ),
        (
            "increment with null",
            json!({ "keyId": key_id, "operation": "increment", "value": null }),
            "body.value",
        ),
        (
            "negative value",
            json!({ "keyId": key_id, "operation": "set", "value": -3 }),
            "body.value",
        ),
        (
            "value above 2^53-1",
            json!({ "keyId": key_id, "operation": "set", "value": max + 1 }),
            "body.value",
        ),
        (
            "unknown operation",
            json!({ "keyId": key_id, "operation": "multiply", "value": 2 }),
            "body.operation",
        ),
        (
            "missing operation",
            json!({ "keyId": key_id, "value": 2 }),
            "body.operation",
        ),
    ];
    let mut failures = Failures::default();
    for (what, req, location) in cases {
        let (status, body) = app.post(UPDATE_CREDITS, req).await;
        failures.check(what, bad_request_problem(status, &body, location));
        assert_eq!(
            app.balance(&key_id).await,
            Some(5),
            "{what} changed the balance"
        );
        assert_eq!(
            app.balance(&unlimited_id).await,
            None,
            "{what} limited a key"
        );
    }

    let (status, body) = app
        .post(
            UPDATE_CREDITS,
            json!({ "keyId": "key_doesNotExist", "operation": "set", "value": 1 }),
        )
        .await;
    assert_error(status, &body, 404, "/data/key_not_found");

    // Well-formed, but the key's state does not allow it: 409, and nothing changes.
    for (what, path, req, reason) in [
        (
            "increment past 2^53-1",
            UPDATE_CREDITS,
            json!({ "keyId": key_id, "operation": "increment", "value": max }),
            "would exceed the maximum",
        ),
        (
            "increment on an unlimited key",
            UPDATE_CREDITS,
            json!({ "keyId": unlimited_id, "operation": "increment", "value": 2 }),
            "unlimited credits",
        ),
        (
            "decrement on an unlimited key",
            UPDATE_CREDITS,
            json!({ "keyId": unlimited_id, "operation": "decrement", "value": 2 }),
            "unlimited credits",
        ),
        (
            "a refill for a key that stays unlimited",
            "/v2/keys.updateKey",
            json!({ "keyId": unlimited_id, "credits": {
                "refill": { "interval": "daily", "amount": 3 } } }),
            "a refill needs a balance",
        ),
    ] {
        let (status, body) = app.post(path, req).await;
        assert_error(status, &body, 409, "/data/conflict");
        let detail = body["error"]["detail"].as_str().unwrap_or("");
        assert!(detail.contains(reason), "{what}: {body}");
        assert_eq!(app.balance(&key_id).await, Some(5), "{what}");
        let unlimited = app.get_key(&unlimited_id).await;
        assert!(
            unlimited.get("credits").is_none(),
            "{what} changed the unlimited key: {unlimited}"
        );
    }

    // updateKey: bad credits change nothing either.
    for (what, req, location) in [
        (
            "negative remaining",
            json!({ "keyId": key_id, "credits": { "remaining": -1 } }),
            "body.credits.remaining",
        ),
        (
            "refill on an unlimited balance",
            json!({ "keyId": key_id, "credits": { "remaining": null,
                "refill": { "interval": "daily", "amount": 3 } } }),
            "body.credits.refill",
        ),
        (
            "monthly refill without refillDay",
            json!({ "keyId": key_id, "name": "changed", "credits": {
                "refill": { "interval": "monthly", "amount": 3 } } }),
            "body.credits.refill.refillDay",
        ),
        (
            "unknown field",
            json!({ "keyId": key_id, "name": "changed", "colour": "red" }),
            "body.colour",
        ),
    ] {
        let (status, body) = app.post("/v2/keys.updateKey", req).await;
        failures.check(what, bad_request_problem(status, &body, location));
        let got = app.get_key(&key_id).await;
        assert_eq!(got["credits"], json!({ "remaining": 5 }), "{what}: {got}");
        assert!(got.get("name").is_none(), "{what} renamed the key: {got}");
    }
    failures.assert_none();
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_and_routes_are_404() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    for (route, body, kind) in [
        (
            "/v2/apis.getApi",
            json!({ "apiId": "api_nope" }),
            "/data/api_not_found",
        ),
        (
            "/v2/apis.listKeys",
            json!({ "apiId": "api_nope" }),
            "/data/api_not_found",
        ),
        (
            "/v2/apis.deleteApi",
            json!({ "apiId": "api_nope" }),
            "/data/api_not_found",
        ),
        (
            CREATE_KEY,
            json!({ "apiId": "api_nope" }),
            "/data/api_not_found",
        ),
        (
            "/v2/keys.getKey",
            json!({ "keyId": "key_nope" }),
            "/data/key_not_found",
        ),
        (
            "/v2/keys.updateKey",
            json!({ "keyId": "key_nope", "name": "x" }),
            "/data/key_not_found",
        ),
        (
            UPDATE_CREDITS,
            json!({ "keyId": "key_nope", "operation": "increment", "value": 1 }),
            "/data/key_not_found",
        ),
        (
            "/v2/keys.deleteKey",
            json!({ "keyId": "key_nope" }),
            "/data/key_not_found",
        ),
        (
            "/v2/keys.whoami",
            json!({ "key": "sk_nope" }),
            "/data/key_not_found",
        ),
    ] {
        let (status, resp) = app.post(route, body).await;
        assert_error(status, &resp, 404, kind);
        assert_eq!(resp["error"]["title"], "Not Found", "{resp}");
    }
    let (status, body) = app.post("/v2/keys.nope", json!({})).await;
    assert_error(status, &body, 404, "/route_not_found");
    let (status, body) = app.get_json("/v1/keys.verifyKey").await;
    assert_error(status, &body, 404, "/route_not_found");
    let (status, body) = app.get_json("/").await;
    assert_error(status, &body, 404, "/route_not_found");
    // Still one API, untouched.
    let got = app.ok("/v2/apis.getApi", json!({ "apiId": api })).await;
    assert_eq!(got["id"], api.as_str());
}

/// A random JSON value, small.
fn random_value(rng: &mut StdRng, depth: u32) -> Value {
    match rng.random_range(0..12) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 => json!(rng.random::<i64>()),
        3 => json!(rng.random::<u64>()),
        4 => json!(rng.random_range(-3.0..3.0_f64)),
        5 => json!(
            [
                0,
                -1,
                1,
                1_000_000_000_000_i64,
                1_000_000_000_001_i64,
                9_007_199_254_740_991_i64,
                9_007_199_254_740_992_i64
            ][rng.random_range(0..7)]
        ),
        6 => json!(""),
        7 => {
            let n = rng.random_range(0..600);
            let c = ['a', 'é', '_', '\u{0}', '"', '💥', ' '][rng.random_range(0..7)];
            json!(std::iter::repeat_n(c, n).collect::<String>())
        }
        8 if depth < 4 => {
            let n = rng.random_range(0..4);
            Value::Array((0..n).map(|_| random_value(rng, depth + 1)).collect())
        }
        9 if depth < 4 => {
            let mut m = Map::new();
            for _ in 0..rng.random_range(0..4) {
                m.insert(random_field(rng), random_value(rng, depth + 1));
            }
            Value::Object(m)
        }
        10 => json!(["daily", "monthly", "set", "increment", "VALID"][rng.random_range(0..5)]),
        _ => json!(rng.random_range(0..40)),
    }
}

fn random_field(rng: &mut StdRng) -> String {
    const NAMES: [&str; 16] = [
        "key",
        "credits",
        "cost",
        "apiId",
        "remaining",
        "refill",
        "interval",
        "amount",
        "refillDay",
        "prefix",
        "byteLength",
        "meta",
        "expires",
        "enabled",
        "tags",
        "ratelimits",
    ];
    if rng.random_bool(0.8) {
        NAMES[rng.random_range(0..NAMES.len())].to_owned()
    } else {
        format!("f{}", rng.random_range(0..100))
    }
}

/// Mutates a JSON value in place: replace, remove or add somewhere in the tree.
fn mutate(rng: &mut StdRng, v: &mut Value, depth: u32) {
    match v {
        Value::Object(m) if !m.is_empty() && rng.random_bool(0.7) => {
            let keys: Vec<String> = m.keys().cloned().collect();
            let k = &keys[rng.random_range(0..keys.len())];
            match rng.random_range(0..4) {
                0 => {
                    m.remove(k);
                }
                1 => {
                    m.insert(random_field(rng), random_value(rng, depth));
                }
                2 => {
                    m.insert(k.clone(), random_value(rng, depth));
                }
                _ => {
                    if let Some(inner) = m.get_mut(k) {
                        mutate(rng, inner, depth + 1);
                    }
                }
            }
        }
        _ => *v = random_value(rng, depth),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzzed_bodies_never_get_a_5xx() {
    let seed: u64 = 0x00c0_ffee_d00d;
    let mut rng = StdRng::seed_from_u64(seed);
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (_, key) = app
        .create_key(
            &api,
            json!({ "remaining": 1_000_000,
                "refill": { "interval": "monthly", "amount": 10, "refillDay": 31 } }),
        )
        .await;
    let verify = json!({ "key": key, "credits": { "cost": 1 }, "tags": ["a=b"] });
    let create = json!({
        "apiId": api, "prefix": "fz", "name": "fuzz", "byteLength": 16, "externalId": "u-1",
        "meta": { "a": 1 }, "expires": 4_000_000_000_000_i64, "enabled": true,
        "recoverable": false,
        "credits": { "remaining": 5,
            "refill": { "interval": "monthly", "amount": 10, "refillDay": 31 } },
    });
    for i in 0..200 {
        let (route, template) = if i % 2 == 0 {
            (VERIFY, &verify)
        } else {
            (CREATE_KEY, &create)
        };
        let (status, body) = if rng.random_bool(0.15) {
            // Raw bytes: a truncated or corrupted template.
            let mut bytes = template.to_string().into_bytes();
            let cut = rng.random_range(0..bytes.len());
            bytes.truncate(cut);
            if rng.random_bool(0.5) {
                bytes.push(rng.random::<u8>());
            }
            app.post_raw(route, "application/json", bytes).await
        } else {
            let mut body = template.clone();
            for _ in 0..rng.random_range(1..4) {
                mutate(&mut rng, &mut body, 0);
            }
            app.post(route, body).await
        };
        // The envelope was checked by the client; the status must be a decision.
        assert!(
            status == 200 || (400..500).contains(&status),
            "seed {seed:#x}, iteration {i}: {route} -> {status}: {body}"
        );
    }
    app.liveness_ok().await;
    let v = app.verify(&key, Some(0)).await;
    assert_eq!(v["code"], "VALID", "{v}");
    let left = v["credits"]
        .as_i64()
        .expect("a limited key reports credits");
    assert!((0..=1_000_000).contains(&left), "{v}");
}
