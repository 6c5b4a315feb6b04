//! Webhook endpoints over HTTP: create (the signing secret shown once), list with
//! pages, delete; the permission and the workspace scope them; URLs this server does not
//! send to and malformed bodies are refused, naming the field, and change nothing.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, Client, TestApp};

const CREATE: &str = "/v2/webhooks.createEndpoint";
const LIST: &str = "/v2/webhooks.listEndpoints";
const DELETE: &str = "/v2/webhooks.deleteEndpoint";

async fn list_all(c: &Client, limit: u64) -> Vec<Value> {
    let mut all = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut body = json!({ "limit": limit });
        if let Some(cur) = &cursor {
            body["cursor"] = json!(cur);
        }
        let (status, page) = c.post(LIST, body).await;
        assert_eq!(status, 200, "{page}");
        let items = page["data"].as_array().expect("data is a list").clone();
        assert!(items.len() <= usize::try_from(limit).expect("small"));
        all.extend(items);
        match page["pagination"]["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return all,
        }
    }
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
