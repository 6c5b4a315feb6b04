//! Identities over HTTP: create / get (by id or external id) / list / update / delete,
//! keys linked by `externalId` (created with the key when missing), the identity a
//! verification answers (its meta, changes seen at once), permissions and workspaces,
//! and bad input that changes nothing.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, Client, TestApp};

async fn create_identity(c: &Client, body: Value) -> String {
    let d = c.ok("/v2/identities.createIdentity", body).await;
    d["identityId"]
        .as_str()
        .unwrap_or_else(|| panic!("no identityId in {d}"))
        .to_owned()
}

async fn get_identity(c: &Client, identity: &str) -> (u16, Value) {
    c.post(
        "/v2/identities.getIdentity",
        json!({ "identity": identity }),
    )
    .await
}

async fn list_all(c: &Client, limit: u64) -> Vec<Value> {
    c.list_all("/v2/identities.listIdentities", limit).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_group_keys_and_verifications_answer_them() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let id = create_identity(
        &app,
        json!({ "externalId": "acme_1", "meta": { "plan": "pro" } }),
    )
    .await;
    assert!(id.starts_with("id_"), "{id}");

    // By id and by external id, the same identity.
    for handle in [id.as_str(), "acme_1"] {
        let (status, body) = get_identity(&app, handle).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["data"],
            json!({ "id": id, "externalId": "acme_1", "meta": { "plan": "pro" }, "ratelimits": [] })
        );
    }
    // A taken external id is a conflict that changes nothing.
    let (status, body) = app
        .post(
            "/v2/identities.createIdentity",
            json!({ "externalId": "acme_1", "meta": { "plan": "free" } }),
        )
        .await;
    assert_error(status, &body, 409, "/conflict");
    assert!(
        body["error"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("acme_1"),
        "{body}"
    );
    assert_eq!(
        get_identity(&app, "acme_1").await.1["data"]["meta"]["plan"],
        "pro"
    );

    // A key with the external id belongs to it: verifications and getKey say so.
    let (key_id, key) = app
        .create_key_with(
            json!({ "apiId": api, "externalId": "acme_1", "credits": { "remaining": 10 } }),
        )
        .await;
    let v = app.verify(&key, None).await;
    assert_eq!(v["code"], "VALID", "{v}");
    assert_eq!(
        v["identity"],
        json!({ "id": id, "externalId": "acme_1", "meta": { "plan": "pro" }, "ratelimits": [] }),
        "{v}"
    );
    assert_eq!(app.get_key(&key_id).await["identity"]["id"], json!(id));

    // A new meta is what the next verification answers (the cached key is forgotten).
    let (status, body) = app
        .post(
            "/v2/identities.updateIdentity",
            json!({ "identity": "acme_1", "meta": { "plan": "enterprise" } }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["meta"], json!({ "plan": "enterprise" }));
    let v = app.verify(&key, None).await;
    assert_eq!(
        v["identity"]["meta"],
        json!({ "plan": "enterprise" }),
        "{v}"
    );
    // No meta leaves it; null clears it.
    let same = app
        .ok("/v2/identities.updateIdentity", json!({ "identity": id }))
        .await;
    assert_eq!(same["meta"], json!({ "plan": "enterprise" }), "{same}");
    let cleared = app
        .ok(
            "/v2/identities.updateIdentity",
            json!({ "identity": id, "meta": null }),
        )
        .await;
    assert!(cleared.get("meta").is_none(), "{cleared}");
    let v = app.verify(&key, None).await;
    assert_eq!(
        v["identity"],
        json!({ "id": id, "externalId": "acme_1", "ratelimits": [] }),
        "{v}"
    );

    // A key naming an unknown external id creates its identity; updateKey links too.
    let (_, other) = app
        .create_key_with(json!({ "apiId": api, "externalId": "globex" }))
        .await;
    let globex = app.verify(&other, None).await["identity"].clone();
    assert_eq!(globex["externalId"], "globex", "{globex}");
    let (moved_id, moved) = app.create_limited(&api, 5).await;
    assert!(app.verify(&moved, None).await.get("identity").is_none());
    app.ok(
        "/v2/keys.updateKey",
        json!({ "keyId": moved_id, "externalId": "initech" }),
    )
    .await;
    let initech = app.verify(&moved, None).await["identity"].clone();
    assert_eq!(initech["externalId"], "initech", "{initech}");

    // Every identity once, across pages.
    for i in 0..4 {
        create_identity(&app, json!({ "externalId": format!("bulk.{i}") })).await;
    }
    let listed = list_all(&app, 2).await;
    let ids: BTreeSet<String> = listed
        .iter()
        .map(|i| i["externalId"].as_str().expect("externalId").to_owned())
        .collect();
    assert_eq!(listed.len(), ids.len(), "no identity twice: {listed:?}");
    let want: BTreeSet<String> = [
        "acme_1", "globex", "initech", "bulk.0", "bulk.1", "bulk.2", "bulk.3",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(ids, want);

    // Deleting the identity keeps its keys, without an identity.
    app.ok(
        "/v2/identities.deleteIdentity",
        json!({ "identity": "acme_1" }),
    )
    .await;
    let v = app.verify(&key, None).await;
    assert_eq!(v["code"], "VALID", "{v}");
    assert!(v.get("identity").is_none(), "{v}");
    assert!(app.get_key(&key_id).await.get("identity").is_none());
    let (status, body) = get_identity(&app, &id).await;
    assert_error(status, &body, 404, "/identity_not_found");
    let (status, body) = app
        .post("/v2/identities.deleteIdentity", json!({ "identity": id }))
        .await;
    assert_error(status, &body, 404, "/identity_not_found");
    // The external id is free again.
    create_identity(&app, json!({ "externalId": "acme_1" })).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_need_their_permissions_and_stay_in_their_workspace() {
    let app = TestApp::start().await;
    let id = create_identity(&app, json!({ "externalId": "cust_1" })).await;

    let verifier = app
        .root_key(creditgate_server::DEFAULT_WORKSPACE, &["api.*.verify_key"])
        .await;
    for (route, body, permission) in [
        (
            "/v2/identities.createIdentity",
            json!({ "externalId": "cust_2" }),
            "identity.*.create_identity",
        ),
        (
            "/v2/identities.getIdentity",
            json!({ "identity": id }),
            "identity.*.read_identity",
        ),
        (
            "/v2/identities.listIdentities",
            json!({}),
            "identity.*.read_identity",
        ),
        (
            "/v2/identities.updateIdentity",
            json!({ "identity": id, "meta": { "a": 1 } }),
            "identity.*.update_identity",
        ),
        (
            "/v2/identities.deleteIdentity",
            json!({ "identity": id }),
            "identity.*.delete_identity",
        ),
    ] {
        let (status, body) = app.post_as(Some(&verifier), route, body).await;
        assert_error(status, &body, 403, "/insufficient_permissions");
        let detail = body["error"]["detail"].as_str().unwrap_or("");
        assert!(detail.contains(permission), "{route}: {body}");
    }
    // Nothing changed.
    let (_, body) = get_identity(&app, &id).await;
    assert!(body["data"].get("meta").is_none(), "{body}");
    assert_eq!(list_all(&app, 100).await.len(), 1);

    // Another workspace sees none of it, and may use the same external id.
    let other = app
        .root_key(
            "ws_other",
            &[
                "identity.*.create_identity",
                "identity.*.read_identity",
                "identity.*.delete_identity",
            ],
        )
        .await;
    let (status, body) = app
        .post_as(
            Some(&other),
            "/v2/identities.getIdentity",
            json!({ "identity": id }),
        )
        .await;
    assert_error(status, &body, 404, "/identity_not_found");
    let (status, body) = app
        .post_as(
            Some(&other),
            "/v2/identities.deleteIdentity",
            json!({ "identity": "cust_1" }),
        )
        .await;
    assert_error(status, &body, 404, "/identity_not_found");
    let (status, body) = app
        .post_as(
            Some(&other),
            "/v2/identities.createIdentity",
            json!({ "externalId": "cust_1" }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = app
        .post_as(Some(&other), "/v2/identities.listIdentities", json!({}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().map(Vec::len), Some(1), "{body}");
    assert_ne!(body["data"][0]["id"], json!(id), "{body}");
    let (_, body) = get_identity(&app, &id).await;
    assert_eq!(body["data"]["externalId"], "cust_1", "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_identity_input_is_a_400_that_changes_nothing() {
    let app = TestApp::start().await;
    let id = create_identity(&app, json!({ "externalId": "kept", "meta": { "v": 1 } })).await;
    let many: serde_json::Map<String, Value> =
        (0..101).map(|i| (format!("p{i}"), json!(i))).collect();
    let cases = [
        (
            "/v2/identities.createIdentity",
            json!({ "externalId": "" }),
            "body.externalId",
        ),
        (
            "/v2/identities.createIdentity",
            json!({ "externalId": "x".repeat(256) }),
            "body.externalId",
        ),
        (
            "/v2/identities.createIdentity",
            json!({ "externalId": "has space" }),
            "body.externalId",
        ),
        (
            "/v2/identities.createIdentity",
            json!({ "externalId": "ok", "meta": many }),
            "body.meta",
        ),
        (
            "/v2/identities.createIdentity",
            json!({ "externalId": "ok", "ratelimits": [{ "name": "r", "limit": 0, "duration": 1000 }] }),
            "body.ratelimits[0].limit",
        ),
        (
            "/v2/identities.getIdentity",
            json!({ "identity": "" }),
            "body.identity",
        ),
        (
            "/v2/identities.updateIdentity",
            json!({ "identity": id, "meta": many }),
            "body.meta",
        ),
        (
            "/v2/identities.updateIdentity",
            json!({ "identity": id, "meta": { "v": 2 }, "ratelimits": [{ "name": "r", "limit": 1, "duration": 10 }] }),
            "body.ratelimits[0].duration",
        ),
        (
            "/v2/identities.listIdentities",
            json!({ "limit": 0 }),
            "body.limit",
        ),
        (
            "/v2/identities.listIdentities",
            json!({ "limit": 101 }),
            "body.limit",
        ),
        (
            "/v2/identities.deleteIdentity",
            json!({ "identity": "y".repeat(256) }),
            "body.identity",
        ),
    ];
    for (route, body, location) in cases {
        let (status, answer) = app.post(route, body.clone()).await;
        assert_bad_request(status, &answer, location);
    }
    let all = list_all(&app, 100).await;
    assert_eq!(
        all,
        vec![json!({ "id": id, "externalId": "kept", "meta": { "v": 1 }, "ratelimits": [] })]
    );
}
