//! Balance alerts over HTTP: thresholds set on createKey / updateKey (and on an
//! identity's pool), `credits.low` once per threshold crossed however many spends race,
//! `credits.exhausted` when the balance reaches 0 or a spend is first refused, and
//! `credits.refilled` when a top-up re-arms them; every event delivered signed to a real
//! receiver. Bad thresholds are refused naming the field, and change nothing.

use std::collections::BTreeSet;
use std::time::Duration;

use creditgate_testkit::webhooks::{
    assert_spent_past_500_and_100_to_0, signed_by, Received, Receiver,
};
use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, TestApp};

const WAIT: Duration = Duration::from_secs(10);
const ALL_CREDIT_EVENTS: [&str; 3] = ["credits.low", "credits.exhausted", "credits.refilled"];

/// A node that sends webhooks to loopback, an endpoint on a fresh receiver subscribed to
/// the credit events, and an API; returns the endpoint's secret too.
async fn setup() -> (TestApp, Receiver, String, String) {
    let app = TestApp::start_configured(|c| c.webhook_allow_private = true).await;
    let receiver = Receiver::scripted(vec![]).await;
    let endpoint = app
        .ok(
            "/v2/webhooks.createEndpoint",
            json!({ "url": receiver.url, "events": ALL_CREDIT_EVENTS }),
        )
        .await;
    let secret = endpoint["secret"].as_str().expect("secret").to_owned();
    let api = app.create_api().await;
    (app, receiver, secret, api)
}

/// `(type, data)` of each request, in arrival order.
fn events(got: &[Received]) -> Vec<(String, Value)> {
    got.iter()
        .map(|r| {
            let body = r.json();
            (
                body["type"].as_str().expect("type").to_owned(),
                body["data"].clone(),
            )
        })
        .collect()
}

/// Waits for `n` requests, then checks no more come in a while; answers them.
async fn exactly(receiver: &Receiver, n: usize) -> Vec<Received> {
    receiver.wait_for(n, WAIT).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let got = receiver.got();
    assert_eq!(got.len(), n, "{:#?}", events(&got));
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_threshold_fires_once_under_racing_spends_and_rearms_on_a_top_up() {
    let (app, receiver, secret, api) = setup().await;
    let (key_id, key) = app
        .create_key_with(json!({
            "apiId": api,
            "credits": { "remaining": 1000, "alerts": [{ "threshold": 100 }, { "threshold": 500 }] }
        }))
        .await;
    assert_eq!(
        app.get_key(&key_id).await["credits"]["alerts"],
        json!([{ "threshold": 500 }, { "threshold": 100 }]),
        "kept, highest first"
    );

    // 1,200 verifications from 16 concurrent clients: 1,000 pass.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..16 {
        let (c, key) = (app.client(), key.clone());
        tasks.spawn(async move {
            let mut valid = 0;
            for _ in 0..75 {
                if c.verify(&key, Some(1)).await["code"] == "VALID" {
                    valid += 1;
                }
            }
            valid
        });
    }
    let mut valid = 0;
    while let Some(n) = tasks.join_next().await {
        valid += n.expect("client");
    }
    assert_eq!(valid, 1000);

    let got = exactly(&receiver, 3).await;
    assert_spent_past_500_and_100_to_0(&key_id, events(&got));
    for r in &got {
        assert!(signed_by(r, &secret), "a valid signature: {r:?}");
    }

    // An increment lifts the balance over both thresholds: one credits.refilled event
    // naming what it re-armed; then one spend crosses both again, with new event ids.
    app.ok(
        "/v2/keys.updateCredits",
        json!({ "keyId": key_id, "operation": "increment", "value": 600 }),
    )
    .await;
    let got = exactly(&receiver, 4).await;
    let (kind, data) = events(&got).pop().expect("the refill");
    assert_eq!(kind, "credits.refilled");
    assert_eq!(data["keyId"], key_id.as_str());
    assert_eq!(data["operation"], "increment");
    assert_eq!(data["value"], 600);
    assert_eq!(data["thresholds"], json!([500, 100]));
    assert_eq!(data["exhaustedRearmed"], true);
    assert_eq!(
        data["remaining"], 600,
        "the hot balance was returned first: exact"
    );

    let v = app.verify(&key, Some(550)).await;
    assert_eq!(
        (v["code"].as_str(), v["credits"].as_i64()),
        (Some("VALID"), Some(50))
    );
    let got = exactly(&receiver, 6).await;
    let last: BTreeSet<(String, i64)> = events(&got[4..])
        .into_iter()
        .map(|(t, d)| (t, d["threshold"].as_i64().expect("threshold")))
        .collect();
    assert_eq!(
        last,
        BTreeSet::from([
            ("credits.low".to_owned(), 100),
            ("credits.low".to_owned(), 500)
        ])
    );
    let ids: BTreeSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids.len(), 6, "an id per event");

    // A set below a threshold re-arms nothing; a set above 500 re-arms both.
    app.ok(
        "/v2/keys.updateCredits",
        json!({ "keyId": key_id, "operation": "set", "value": 80 }),
    )
    .await;
    app.ok(
        "/v2/keys.updateCredits",
        json!({ "keyId": key_id, "operation": "set", "value": 700 }),
    )
    .await;
    let got = exactly(&receiver, 7).await;
    let (kind, data) = events(&got).pop().expect("the set");
    assert_eq!(kind, "credits.refilled");
    assert_eq!(
        (
            &data["operation"],
            &data["value"],
            &data["remaining"],
            &data["thresholds"]
        ),
        (&json!("set"), &json!(700), &json!(700), &json!([500, 100]))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_is_an_exhaustion_once_until_a_top_up() {
    let (app, receiver, _, api) = setup().await;
    let (key_id, key) = app.create_limited(&api, 5).await;
    for _ in 0..3 {
        assert_eq!(app.verify(&key, Some(10)).await["code"], "USAGE_EXCEEDED");
    }
    let got = exactly(&receiver, 1).await;
    assert_eq!(
        events(&got),
        vec![(
            "credits.exhausted".to_owned(),
            json!({ "keyId": key_id, "remaining": 5, "cost": 10, "refused": true })
        )]
    );
    // A top-up re-arms it: the next refusal is told again.
    app.ok(
        "/v2/keys.updateCredits",
        json!({ "keyId": key_id, "operation": "increment", "value": 1 }),
    )
    .await;
    let got = exactly(&receiver, 2).await;
    assert_eq!(
        events(&got)[1],
        (
            "credits.refilled".to_owned(),
            json!({
                "keyId": key_id, "operation": "increment", "value": 1, "remaining": 6,
                "thresholds": [], "exhaustedRearmed": true
            })
        )
    );
    assert_eq!(app.verify(&key, Some(10)).await["code"], "USAGE_EXCEEDED");
    let got = exactly(&receiver, 3).await;
    let kinds: Vec<String> = events(&got).into_iter().map(|(t, _)| t).collect();
    assert_eq!(
        kinds,
        ["credits.exhausted", "credits.refilled", "credits.exhausted"]
    );
    assert_ne!(got[0].id, got[2].id, "two exhaustions, two events");
    // Thresholds replaced by updateKey, and removed.
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": key_id, "credits": { "alerts": [{ "threshold": 3 }] } }),
    )
    .await;
    assert_eq!(
        app.get_key(&key_id).await["credits"]["alerts"],
        json!([{ "threshold": 3 }])
    );
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": key_id, "credits": { "alerts": [] } }),
    )
    .await;
    assert!(app.get_key(&key_id).await["credits"]
        .get("alerts")
        .is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_alerts_on_its_own_thresholds() {
    let (app, receiver, _, api) = setup().await;
    let identity = app
        .ok(
            "/v2/identities.createIdentity",
            json!({
                "externalId": "acme",
                "credits": { "remaining": 100, "alerts": [{ "threshold": 50 }] }
            }),
        )
        .await;
    let identity_id = identity["identityId"]
        .as_str()
        .expect("identityId")
        .to_owned();
    let (_, key) = app
        .create_key_with(json!({ "apiId": api, "externalId": "acme" }))
        .await;
    let v = app.verify(&key, Some(60)).await;
    assert_eq!(v["code"], "VALID", "{v}");
    let got = exactly(&receiver, 1).await;
    assert_eq!(
        events(&got),
        vec![(
            "credits.low".to_owned(),
            json!({ "identityId": identity_id, "threshold": 50, "remaining": 40, "cost": 60 })
        )]
    );
    // updateIdentity replaces the pool's thresholds.
    let updated = app
        .ok(
            "/v2/identities.updateIdentity",
            json!({ "identity": "acme", "credits": { "alerts": [{ "threshold": 30 }] } }),
        )
        .await;
    assert_eq!(
        updated["credits"]["alerts"],
        json!([{ "threshold": 30 }]),
        "{updated}"
    );
    assert_eq!(app.verify(&key, Some(20)).await["code"], "VALID");
    let got = exactly(&receiver, 2).await;
    assert_eq!(events(&got)[1].1["threshold"], 30);
    // An identity without a pool has nothing to alert on.
    app.ok(
        "/v2/identities.createIdentity",
        json!({ "externalId": "solo" }),
    )
    .await;
    let (status, resp) = app
        .post(
            "/v2/identities.updateIdentity",
            json!({ "identity": "solo", "credits": { "alerts": [{ "threshold": 1 }] } }),
        )
        .await;
    assert_error(status, &resp, 409, "conflict");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_thresholds_are_refused_naming_the_field_and_change_nothing() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, _) = app.create_limited(&api, 10).await;
    let eleven: Vec<Value> = (1..=11).map(|t| json!({ "threshold": t })).collect();
    let cases = [
        (
            json!([{ "threshold": 0 }]),
            "body.credits.alerts[0].threshold",
        ),
        (
            json!([{ "threshold": -5 }]),
            "body.credits.alerts[0].threshold",
        ),
        (
            json!([{ "threshold": 1 }, { "threshold": 9_007_199_254_740_992i64 }]),
            "body.credits.alerts[1].threshold",
        ),
        (json!(eleven), "body.credits.alerts"),
        (
            json!([{ "threshold": 7 }, { "threshold": 7 }]),
            "body.credits.alerts[1].threshold",
        ),
        (
            json!([{ "threshold": 1.5 }]),
            "body.credits.alerts[0].threshold",
        ),
        (
            json!([{ "threshold": 5, "kind": "low" }]),
            "body.credits.alerts[0].kind",
        ),
        (json!({ "threshold": 5 }), "body.credits.alerts"),
    ];
    let keys_before = app.count("keys").await;
    for (alerts, location) in cases {
        let (status, resp) = app
            .post(
                "/v2/keys.createKey",
                json!({ "apiId": api, "credits": { "remaining": 10, "alerts": alerts } }),
            )
            .await;
        assert_bad_request(status, &resp, location);
        let (status, resp) = app
            .post(
                "/v2/keys.updateKey",
                json!({ "keyId": key_id, "credits": { "alerts": alerts } }),
            )
            .await;
        assert_bad_request(status, &resp, location);
    }
    assert_eq!(app.count("keys").await, keys_before, "no key was created");
    assert!(
        app.get_key(&key_id).await["credits"]
            .get("alerts")
            .is_none(),
        "nothing changed"
    );
}
