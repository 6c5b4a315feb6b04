//! Credit history over HTTP (`keys.getCreditHistory`, `identities.getCreditHistory`):
//! after creates, balance changes by two root keys, a refill, a hold, and a hot store
//! that loses its data, the history read page by page is newest first, its seqs have no
//! gap, the balances chain over the spends counted between entries, every balance change
//! names the root key that asked for it, and the history replays to exactly the balance
//! `keys.getKey` reports. Bad input is a 400 naming the field, with nothing changed.

use std::sync::Arc;
use std::time::Duration;

use creditgate_domain::{hash_secret, ManualClock};
use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, assert_verdict, Client, TestApp};

// 2025-03-10 12:00:00 UTC, and the next day.
const MAR_10_1200: i64 = 1_741_608_000_000;
const MAR_11_0900: i64 = 1_741_683_600_000;

/// Every entry of a history route, `limit` per page, newest first: checks each page's
/// size and that `hasMore` comes exactly with a cursor.
async fn history(c: &Client, path: &str, body: Value, limit: u64) -> Vec<Value> {
    c.list_all_of(path, body, limit).await
}

fn int(e: &Value, field: &str) -> i64 {
    e[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} in {e}"))
}

/// The chain rule over a history read newest first; returns it oldest first.
fn check_chain(newest_first: &[Value]) -> Vec<Value> {
    let n = newest_first.len();
    for (i, e) in newest_first.iter().enumerate() {
        assert_eq!(
            int(e, "seq"),
            i64::try_from(n - i).expect("small"),
            "newest first, seqs without gaps: {newest_first:#?}"
        );
    }
    let entries: Vec<Value> = newest_first.iter().rev().cloned().collect();
    for pair in entries.windows(2) {
        let (prev, next) = (&pair[0], &pair[1]);
        let spent_between = int(next, "spentTotal") - int(prev, "spentTotal");
        assert!(spent_between >= 0, "{prev} then {next}");
        assert!(int(next, "time") >= int(prev, "time"), "{prev} then {next}");
        assert_eq!(
            int(next, "balanceBefore"),
            int(prev, "balanceAfter") - spent_between,
            "the chain breaks between {prev} and {next}"
        );
    }
    entries
}

/// `n` verifications of cost 1 from the exact balance `from`, each answering the balance
/// after it; returns the balance after the last.
async fn verify_n(app: &TestApp, key: &str, from: i64, n: i64) -> i64 {
    for i in 1..=n {
        assert_verdict(&app.verify(key, None).await, "VALID", Some(from - i));
    }
    from - n
}

/// The id of the root key behind `secret`, as the node stored it.
async fn root_key_id(app: &TestApp, secret: &str) -> String {
    let sql = app.sql().await;
    let id: String = sqlx::query_scalar("SELECT id FROM root_keys WHERE hash = $1")
        .bind(hash_secret(secret))
        .fetch_one(sql.pool())
        .await
        .expect("the root key's row");
    sql.close().await;
    id
}

async fn update_credits(c: &Client, root: &str, key_id: &str, op: &str, value: i64) -> i64 {
    let (status, body) = c
        .post_as(
            Some(root),
            "/v2/keys.updateCredits",
            json!({ "keyId": key_id, "operation": op, "value": value }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    int(&body["data"], "remaining")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_replays_to_the_balance_after_updates_a_refill_and_a_lost_hot_store() {
    let clock = Arc::new(ManualClock::new(MAR_10_1200));
    let app = TestApp::start_with_hot_store(clock.clone(), |c| {
        // Balances stay in the hot store until it loses them; the reconciler is quick.
        c.idle_return_ms = 600_000;
        c.reconcile_interval_ms = 50;
    })
    .await;
    let c = app.client();
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key(
            &api,
            json!({ "remaining": 100, "refill": { "interval": "daily", "amount": 150 } }),
        )
        .await;
    let admin = app.root_key.clone();
    let admin_id = root_key_id(&app, &admin).await;
    let operator = app
        .root_key("ws_default", &["api.*.update_key", "api.*.read_key"])
        .await;
    let operator_id = root_key_id(&app, &operator).await;
    assert_ne!(admin_id, operator_id);

    // The exact balance as the test knows it; every verification answers it.
    let balance = verify_n(&app, &key, 100, 5).await;
    assert_eq!(
        update_credits(&c, &admin, &key_id, "increment", 10).await,
        balance + 10
    );
    let balance = verify_n(&app, &key, balance + 10, 3).await;
    assert_eq!(balance, 102);
    assert_eq!(
        update_credits(&c, &operator, &key_id, "decrement", 20).await,
        82
    );
    verify_n(&app, &key, 82, 2).await;
    assert_eq!(update_credits(&c, &admin, &key_id, "set", 60).await, 60);
    verify_n(&app, &key, 60, 4).await;
    // The next day: the first verification applies the refill (56 -> 150), then spends.
    clock.set(MAR_11_0900);
    verify_n(&app, &key, 150, 4).await;
    // A hold of 20, settled for 5.
    let held = app
        .ok(
            "/v2/keys.reserveCredits",
            json!({ "key": key, "amount": 20 }),
        )
        .await;
    assert_eq!(held["credits"], 126, "{held}");
    let hold_id = held["holdId"].as_str().expect("holdId").to_owned();
    app.ok(
        "/v2/keys.settleCredits",
        json!({ "holdId": hold_id, "cost": 5 }),
    )
    .await;
    assert_eq!(app.balance(&key_id).await, Some(141));

    // The hot store loses its data; the reconciler writes off what it held.
    let written_off = history_after_loss(&app, &key_id).await;
    let after_loss = int(&written_off, "balanceAfter");
    assert!(
        after_loss < 141,
        "the hot store held credits: {written_off}"
    );
    verify_n(&app, &key, after_loss, 3).await;
    let now = app.balance(&key_id).await.expect("limited");
    assert_eq!(now, after_loss - 3);

    // The whole history, 3 per page.
    let body = json!({ "keyId": key_id });
    let newest_first = history(&c, "/v2/keys.getCreditHistory", body, 3).await;
    let entries = check_chain(&newest_first);
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().expect("kind"))
        .collect();
    assert_eq!(
        kinds,
        [
            "create",
            "increment",
            "decrement",
            "set",
            "refill",
            "hold.reserve",
            "hold.settle",
            "write_off"
        ],
        "{entries:#?}"
    );
    let figures = |i: usize| {
        let e = &entries[i];
        (
            e.get("balanceBefore").and_then(Value::as_i64),
            int(e, "balanceAfter"),
            e["exact"].as_bool(),
        )
    };
    // Creation, the increment (the hot store gives its balance back first) and the
    // fences (decrement, set, refill) are exact.
    assert_eq!(figures(0), (None, 100, Some(true)));
    assert_eq!(figures(1), (Some(95), 105, Some(true)));
    assert_eq!(figures(2), (Some(102), 82, Some(true)));
    assert_eq!(figures(3), (Some(80), 60, Some(true)));
    assert_eq!(figures(4), (Some(56), 150, Some(true)));
    // Who asked: the root key each change was made with; none for system changes.
    let actors: Vec<Option<&str>> = entries.iter().map(|e| e["actor"].as_str()).collect();
    let (a, o) = (Some(admin_id.as_str()), Some(operator_id.as_str()));
    assert_eq!(actors, [None, a, o, a, None, None, None, None]);
    let values: Vec<i64> = entries.iter().map(|e| int(e, "value")).collect();
    assert_eq!(values[..7], [100, 10, 20, 60, 150, 20, 5]);
    assert_eq!(entries[5]["holdId"], json!(hold_id));
    assert_eq!(
        (
            int(&entries[5], "heldBefore"),
            int(&entries[5], "heldAfter")
        ),
        (0, 20)
    );
    assert_eq!(
        (
            int(&entries[6], "heldBefore"),
            int(&entries[6], "heldAfter")
        ),
        (20, 0)
    );
    assert_eq!(entries[7], written_off);
    assert_eq!(entries[7]["exact"], json!(false));
    // The replay: the newest entry less the spends since it is the balance now.
    assert_eq!(int(&entries[7], "balanceAfter") - 3, now);
    // Reading changed nothing.
    assert_eq!(
        history(
            &c,
            "/v2/keys.getCreditHistory",
            json!({ "keyId": key_id }),
            100
        )
        .await,
        newest_first
    );
}

/// Wipes the hot store, and waits for the reconciler's `write_off` entry (the newest).
async fn history_after_loss(app: &TestApp, key_id: &str) -> Value {
    app.hot.as_ref().expect("a held hot store").wipe();
    for _ in 0..200 {
        let page = app
            .ok(
                "/v2/keys.getCreditHistory",
                json!({ "keyId": key_id, "limit": 1 }),
            )
            .await;
        if page[0]["kind"] == "write_off" {
            return page[0].clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no write_off entry within 5 s of the hot store's loss");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_pool_has_its_own_history() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let created = app
        .ok(
            "/v2/identities.createIdentity",
            json!({ "externalId": "acme", "credits": { "remaining": 50 } }),
        )
        .await;
    let identity_id = created["identityId"].as_str().expect("id").to_owned();
    let (key_id, key) = app
        .create_key_with(json!({ "apiId": api, "externalId": "acme" }))
        .await;
    for _ in 0..4 {
        let d = app.verify(&key, Some(2)).await;
        assert_verdict(&d, "VALID", None);
    }
    let r = app
        .ok(
            "/v2/identities.updateCredits",
            json!({ "identity": "acme", "operation": "increment", "value": 5 }),
        )
        .await;
    assert_eq!(r["remaining"], 47, "{r}");
    let d = app.verify(&key, Some(3)).await;
    assert_eq!(d["identity"]["credits"]["remaining"], 44, "{d}");

    // By external id and by id: the same history.
    let by_external = history(
        &app.client(),
        "/v2/identities.getCreditHistory",
        json!({ "identity": "acme" }),
        1,
    )
    .await;
    let by_id = history(
        &app.client(),
        "/v2/identities.getCreditHistory",
        json!({ "identity": identity_id }),
        100,
    )
    .await;
    assert_eq!(by_external, by_id);
    let entries = check_chain(&by_id);
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["create", "increment"], "{entries:#?}");
    let root_id = root_key_id(&app, &app.root_key.clone()).await;
    assert_eq!(entries[1]["actor"], json!(root_id));
    assert_eq!(int(&entries[1], "value"), 5);
    assert_eq!(int(&entries[1], "balanceBefore"), 42);
    assert_eq!(entries[1]["exact"], json!(true));
    assert_eq!(int(&entries[1], "balanceAfter") - 3, 44, "the replay");
    // The unlimited key of the identity has only its creation.
    let key_history = history(
        &app.client(),
        "/v2/keys.getCreditHistory",
        json!({ "keyId": key_id }),
        100,
    )
    .await;
    assert_eq!(key_history.len(), 1, "{key_history:#?}");
    assert_eq!(key_history[0]["kind"], "create");
    assert!(key_history[0].get("balanceAfter").is_none(), "unlimited");
    // An identity without a pool has an empty history; an unknown one is not found.
    app.ok(
        "/v2/identities.createIdentity",
        json!({ "externalId": "nopool" }),
    )
    .await;
    let empty = history(
        &app.client(),
        "/v2/identities.getCreditHistory",
        json!({ "identity": "nopool" }),
        10,
    )
    .await;
    assert!(empty.is_empty(), "{empty:?}");
    let (status, body) = app
        .post(
            "/v2/identities.getCreditHistory",
            json!({ "identity": "nobody" }),
        )
        .await;
    assert_error(status, &body, 404, "/identity_not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_history_requests_name_the_field_and_change_nothing() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 10).await;
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(9));
    let before = history(
        &app.client(),
        "/v2/keys.getCreditHistory",
        json!({ "keyId": key_id }),
        100,
    )
    .await;
    let path = "/v2/keys.getCreditHistory";
    for (body, location) in [
        (json!({ "keyId": "ab" }), "body.keyId"),
        (json!({ "keyId": key_id, "limit": 0 }), "body.limit"),
        (json!({ "keyId": key_id, "limit": 101 }), "body.limit"),
        (json!({ "keyId": key_id, "limit": -1 }), "body.limit"),
        (json!({ "keyId": key_id, "cursor": "abc" }), "body.cursor"),
        (json!({ "keyId": key_id, "cursor": "0" }), "body.cursor"),
        (json!({ "keyId": key_id, "cursor": "007" }), "body.cursor"),
        (
            json!({ "keyId": key_id, "cursor": "1234567890123456789" }),
            "body.cursor",
        ),
        (json!({ "keyId": key_id, "cursor": 5 }), "body.cursor"),
        (json!({ "keyId": key_id, "other": 1 }), "body"),
    ] {
        let (status, resp) = app.post(path, body.clone()).await;
        if location == "body" {
            assert_eq!(status, 400, "{body} -> {resp}");
        } else {
            assert_bad_request(status, &resp, location);
        }
    }
    for (body, location) in [
        (json!({ "identity": "" }), "body.identity"),
        (json!({ "identity": "acme", "limit": 0 }), "body.limit"),
        (json!({ "identity": "acme", "cursor": "x1" }), "body.cursor"),
    ] {
        let (status, resp) = app
            .post("/v2/identities.getCreditHistory", body.clone())
            .await;
        assert_bad_request(status, &resp, location);
    }
    // The largest cursor answers from the newest entry.
    let page = app
        .ok(
            path,
            json!({ "keyId": key_id, "cursor": "999999999999999999" }),
        )
        .await;
    assert_eq!(page.as_array().map(Vec::len), Some(before.len()));
    // Another workspace's key is not found; a root key without read_key may not read.
    let foreign = app.root_key("ws_other", &["api.*.read_key"]).await;
    let (status, body) = app
        .post_as(Some(&foreign), path, json!({ "keyId": key_id }))
        .await;
    assert_error(status, &body, 404, "/key_not_found");
    let (status, body) = app.post(path, json!({ "keyId": "key_unknown" })).await;
    assert_error(status, &body, 404, "/key_not_found");
    let blind = app.root_key("ws_default", &["api.*.verify_key"]).await;
    let (status, body) = app
        .post_as(Some(&blind), path, json!({ "keyId": key_id }))
        .await;
    assert_error(status, &body, 403, "/insufficient_permissions");
    let (status, body) = app
        .post_as(
            Some(&blind),
            "/v2/identities.getCreditHistory",
            json!({ "identity": "acme" }),
        )
        .await;
    assert_error(status, &body, 403, "/insufficient_permissions");
    // Nothing changed.
    let after = history(
        &app.client(),
        "/v2/keys.getCreditHistory",
        json!({ "keyId": key_id }),
        100,
    )
    .await;
    assert_eq!(after, before);
    assert_eq!(app.balance(&key_id).await, Some(9));
}
