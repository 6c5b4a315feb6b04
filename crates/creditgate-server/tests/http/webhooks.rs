//! Webhook endpoints over HTTP: create (the signing secret shown once), list with
//! pages, delete; the permission and the workspace scope them; URLs this server does not
//! send to and malformed bodies are refused, naming the field, and change nothing. An
//! expired hold's event reaches a real receiver signed (checked by an HMAC written out
//! in the testkit), retried with backoff until a 2xx, every attempt listed.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate_domain::{Clock, ManualClock, SystemClock};
use creditgate_testkit::webhooks::{signed_by, Answer, Receiver};
use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, Client, TestApp};

const CREATE: &str = "/v2/webhooks.createEndpoint";
const LIST: &str = "/v2/webhooks.listEndpoints";
const DELETE: &str = "/v2/webhooks.deleteEndpoint";
/// How long a test waits for a delivery that is due.
const WAIT: Duration = Duration::from_secs(10);

async fn list_all(c: &Client, limit: u64) -> Vec<Value> {
    c.list_all(LIST, limit).await
}

fn ids(endpoints: &[Value]) -> BTreeSet<String> {
    endpoints
        .iter()
        .map(|e| e["endpointId"].as_str().expect("endpointId").to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_are_created_listed_and_deleted_with_the_secret_shown_once() {
    let app = TestApp::start_configured(|c| c.webhook_allow_private = true).await;
    let created = app
        .ok(
            CREATE,
            json!({
                "url": "http://127.0.0.1:9/hooks",
                "events": ["credits.exhausted", "credits.low", "credits.low"],
                "description": "billing alerts"
            }),
        )
        .await;
    let secret = created["secret"].as_str().expect("secret");
    let body = secret.strip_prefix("whsec_").expect("whsec_ prefix");
    assert_eq!(body.len(), 32, "base64 of 24 bytes: {secret}");
    assert_eq!(
        created["events"],
        json!(["credits.low", "credits.exhausted"]),
        "distinct, in a fixed order"
    );
    assert_eq!(created["url"], "http://127.0.0.1:9/hooks");
    assert_eq!(created["description"], "billing alerts");
    let first = created["endpointId"].as_str().expect("id").to_owned();
    assert!(first.starts_with("whe_"), "{first}");

    let mut made = BTreeSet::from([first.clone()]);
    for i in 0..4 {
        let d = app
            .ok(
                CREATE,
                json!({ "url": format!("https://hooks.example.com/{i}"), "events": ["hold.expired"] }),
            )
            .await;
        assert_ne!(d["secret"], created["secret"], "a secret per endpoint");
        made.insert(d["endpointId"].as_str().expect("id").to_owned());
    }
    let listed = list_all(&app, 2).await;
    assert_eq!(ids(&listed), made, "every endpoint once over the pages");
    assert_eq!(listed.len(), made.len());
    for e in &listed {
        assert!(
            e.get("secret").is_none(),
            "a listing never shows the secret: {e}"
        );
    }
    let shown = listed
        .iter()
        .find(|e| e["endpointId"] == first.as_str())
        .expect("the first endpoint");
    assert_eq!(shown["events"], json!(["credits.low", "credits.exhausted"]));
    assert!(shown["createdAt"]
        .as_i64()
        .is_some_and(|t| t > 1_600_000_000_000));

    // Another workspace neither sees nor deletes them.
    let stranger = app.root_key("ws_other", &["webhook.*.manage"]).await;
    let (status, resp) = app.post_as(Some(&stranger), LIST, json!({})).await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["data"], json!([]));
    let (status, resp) = app
        .post_as(Some(&stranger), DELETE, json!({ "endpointId": first }))
        .await;
    assert_error(status, &resp, 404, "webhook_endpoint_not_found");
    // A root key without the permission can do nothing here.
    let verifier = app
        .root_key(creditgate_server::DEFAULT_WORKSPACE, &["api.*.verify_key"])
        .await;
    for (path, body) in [
        (LIST, json!({})),
        (DELETE, json!({ "endpointId": first })),
        (
            CREATE,
            json!({ "url": "https://hooks.example.com/", "events": ["credits.low"] }),
        ),
    ] {
        let (status, resp) = app.post_as(Some(&verifier), path, body).await;
        assert_error(status, &resp, 403, "/insufficient_permissions");
    }
    assert_eq!(ids(&list_all(&app, 100).await), made, "nothing changed");

    app.ok(DELETE, json!({ "endpointId": first })).await;
    made.remove(&first);
    assert_eq!(ids(&list_all(&app, 100).await), made);
    let (status, resp) = app.post(DELETE, json!({ "endpointId": first })).await;
    assert_error(status, &resp, 404, "webhook_endpoint_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urls_this_server_does_not_send_to_and_bad_bodies_change_nothing() {
    let app = TestApp::start().await;
    let events = json!(["credits.low"]);
    // Well-formed strings, but not a target: 422 naming body.url.
    for url in [
        "http://127.0.0.1:8080/hook",
        "http://localhost/hook",
        "http://2130706433/",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/",
        "http://10.0.0.7/",
        "http://[::1]/",
        "http://[fd00:ec2::254]/",
        "ftp://hooks.example.com/",
        "hooks.example.com/no-scheme",
        "https://user:secret@hooks.example.com/",
        "https://hooks.example.com/#fragment",
    ] {
        let (status, resp) = app
            .post(CREATE, json!({ "url": url, "events": events }))
            .await;
        assert_eq!(status, 422, "{url}: {resp}");
        let first = &resp["error"]["errors"][0];
        assert_eq!(first["location"], "body.url", "{url}: {resp}");
        assert!(
            first["fix"].as_str().is_some_and(|f| !f.is_empty()),
            "{resp}"
        );
    }
    // Malformed fields: 400 naming them.
    let long_description = "d".repeat(1_001);
    let cases: [(Value, &str); 6] = [
        (json!({ "url": "", "events": events }), "body.url"),
        (
            json!({ "url": "https://h.example.com/", "events": [] }),
            "body.events",
        ),
        (
            json!({ "url": "https://h.example.com/", "events": ["credits.spent"] }),
            "body.events[0]",
        ),
        (
            json!({ "url": "https://h.example.com/", "events": ["credits.low", "credits.exhausted", "credits.refilled", "hold.expired", "credits.low"] }),
            "body.events",
        ),
        (
            json!({ "url": "https://h.example.com/", "events": events, "description": long_description }),
            "body.description",
        ),
        (json!({ "limit": 0 }), "body.limit"),
    ];
    for (body, location) in cases {
        let path = if body.get("limit").is_some() {
            LIST
        } else {
            CREATE
        };
        let (status, resp) = app.post(path, body).await;
        assert_bad_request(status, &resp, location);
    }
    let (status, resp) = app
        .post(
            CREATE,
            json!({ "url": "https://h.example.com/", "events": events, "secret": "mine" }),
        )
        .await;
    assert_eq!(status, 400, "an unknown field: {resp}");
    let (status, resp) = app.post(DELETE, json!({ "endpointId": "" })).await;
    assert_bad_request(status, &resp, "body.endpointId");
    assert!(list_all(&app, 100).await.is_empty(), "nothing was created");

    // A public URL is accepted by the same node.
    app.ok(
        CREATE,
        json!({ "url": "https://hooks.example.com/creditgate", "events": events }),
    )
    .await;
    assert_eq!(list_all(&app, 100).await.len(), 1);
}

/// Waits until the endpoint's deliveries list `n` attempts in all (the retry is then
/// scheduled from the clock as it was).
async fn attempts_recorded(app: &TestApp, endpoint_id: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let page = app
            .ok(
                "/v2/webhooks.listDeliveries",
                json!({ "endpointId": endpoint_id }),
            )
            .await;
        let recorded: usize = page
            .as_array()
            .expect("list")
            .iter()
            .map(|d| d["attempts"].as_array().map_or(0, Vec::len))
            .sum();
        if recorded >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{recorded} attempts recorded, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_hold_is_sent_signed_once_and_retried_until_accepted() {
    let clock = Arc::new(ManualClock::new(SystemClock.now_ms()));
    let app =
        TestApp::start_with_clock_configured(clock.clone(), |c| c.webhook_allow_private = true)
            .await;
    let receiver = Receiver::scripted(vec![500, 503]).await;
    let other = Receiver::scripted(vec![]).await;
    let endpoint = app
        .ok(
            CREATE,
            json!({ "url": receiver.url, "events": ["hold.expired"] }),
        )
        .await;
    let secret = endpoint["secret"].as_str().expect("secret").to_owned();
    let endpoint_id = endpoint["endpointId"].as_str().expect("id").to_owned();
    let unsubscribed = app
        .ok(
            CREATE,
            json!({ "url": other.url, "events": ["credits.low"] }),
        )
        .await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 100).await;
    let hold = app
        .ok(
            "/v2/keys.reserveCredits",
            json!({ "key": key, "amount": 30, "ttlMs": 1_000 }),
        )
        .await;
    let hold_id = hold["holdId"].as_str().expect("holdId").to_owned();

    // The hold expires; the first attempt is answered 500, the second 503, the third
    // 200, each retry once the clock passes its backoff.
    clock.advance(2_000);
    let first = receiver.wait_for(1, WAIT).await;
    attempts_recorded(&app, &endpoint_id, 1).await;
    clock.advance(7_000);
    receiver.wait_for(2, WAIT).await;
    attempts_recorded(&app, &endpoint_id, 2).await;
    clock.advance(13_000);
    let got = receiver.wait_for(3, WAIT).await;
    attempts_recorded(&app, &endpoint_id, 3).await;
    clock.advance(60_000);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(receiver.got().len(), 3, "nothing after the 200");
    assert!(
        other.got().is_empty(),
        "an endpoint not subscribed gets nothing"
    );

    let event_id = format!("evt_{hold_id}");
    for r in &got {
        assert_eq!(r.id, event_id, "one event id for every attempt");
        assert!(signed_by(r, &secret), "a valid signature: {r:?}");
        assert!(
            !signed_by(r, "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
            "not any key's"
        );
        let body: Value = serde_json::from_str(&r.body).expect("JSON body");
        assert_eq!(body["type"], "hold.expired");
        assert_eq!(body["data"]["holdId"], hold_id.as_str());
        assert_eq!(body["data"]["keyId"], key_id.as_str());
        assert_eq!(body["data"]["amount"], 30);
    }
    assert_eq!(first[0].body, got[2].body, "the same body on every attempt");

    let (status, page) = app
        .post(
            "/v2/webhooks.listDeliveries",
            json!({ "endpointId": endpoint_id }),
        )
        .await;
    assert_eq!(status, 200, "{page}");
    let deliveries = page["data"].as_array().expect("list");
    assert_eq!(deliveries.len(), 1, "{page}");
    let d = &deliveries[0];
    assert_eq!(d["eventId"], event_id.as_str());
    assert_eq!(d["state"], "delivered");
    let attempts = d["attempts"].as_array().expect("attempts");
    let statuses: Vec<u64> = attempts
        .iter()
        .map(|a| a["status"].as_u64().expect("status"))
        .collect();
    assert_eq!(statuses, [500, 503, 200]);
    assert!(attempts[0]["nextRetryAt"].as_i64().is_some());
    assert!(attempts[1]["nextRetryAt"].as_i64().is_some());
    assert!(attempts[2].get("nextRetryAt").is_none(), "{d}");
    let (status, page) = app
        .post(
            "/v2/webhooks.listDeliveries",
            json!({ "endpointId": unsubscribed["endpointId"] }),
        )
        .await;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["data"], json!([]));
    let (status, resp) = app
        .post(
            "/v2/webhooks.listDeliveries",
            json!({ "endpointId": "whe_none" }),
        )
        .await;
    assert_error(status, &resp, 404, "webhook_endpoint_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_holds_only_its_own_slots() {
    let app = TestApp::start_configured(|c| c.webhook_allow_private = true).await;
    // A receiver that never answers (each attempt times out after 10 s) and one that
    // answers at once, both subscribed to the same events. 300 events: the dead
    // endpoint's backlog of due deliveries is larger than one claim's page, and must not
    // starve the other endpoint.
    let hanging = Receiver::start(|_, _| Answer::Hang).await;
    let hang_url = hanging.url.clone();
    let ok = Receiver::scripted(vec![]).await;
    for url in [&hang_url, &ok.url] {
        app.ok(CREATE, json!({ "url": url, "events": ["hold.expired"] }))
            .await;
    }
    let api = app.create_api().await;
    let (_, key) = app.create_limited(&api, 1_000).await;
    let mut holds = BTreeSet::new();
    for _ in 0..300 {
        let h = app
            .ok(
                "/v2/keys.reserveCredits",
                json!({ "key": key, "amount": 1, "ttlMs": 100 }),
            )
            .await;
        holds.insert(format!("evt_{}", h["holdId"].as_str().expect("holdId")));
    }
    // Every event reaches the answering endpoint while the other hangs.
    let got = ok.wait_for(300, WAIT).await;
    let ids: BTreeSet<String> = got.iter().map(|r| r.id.clone()).collect();
    assert_eq!(ids, holds, "each expired hold's event, once");
    let waiting = hanging.got().len();
    assert!(
        (1..=4).contains(&waiting),
        "the hanging endpoint holds at most 4 deliveries at once, got {waiting}"
    );
    // Verifications do not wait on deliveries.
    for _ in 0..50 {
        assert_eq!(app.verify(&key, None).await["code"], "VALID");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_keys_expired_hold_is_told_once_by_the_key() {
    let app = TestApp::start_configured(|c| c.webhook_allow_private = true).await;
    let receiver = Receiver::scripted(vec![]).await;
    app.ok(
        CREATE,
        json!({ "url": receiver.url, "events": ["hold.expired"] }),
    )
    .await;
    app.ok(
        "/v2/identities.createIdentity",
        json!({ "externalId": "acme", "credits": { "remaining": 100 } }),
    )
    .await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key_with(
            json!({ "apiId": api, "externalId": "acme", "credits": { "remaining": 50 } }),
        )
        .await;
    let hold = app
        .ok(
            "/v2/keys.reserveCredits",
            json!({ "key": key, "amount": 10, "ttlMs": 100 }),
        )
        .await;
    let hold_id = hold["holdId"].as_str().expect("holdId").to_owned();
    receiver.wait_for(1, WAIT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = receiver.got();
    assert_eq!(
        got.len(),
        1,
        "the key's hold and its pool's twin: one event"
    );
    let body = got[0].json();
    assert_eq!(got[0].id, format!("evt_{hold_id}"));
    assert_eq!(body["data"]["keyId"], key_id.as_str());
    assert_eq!(body["data"]["amount"], 10);
}
