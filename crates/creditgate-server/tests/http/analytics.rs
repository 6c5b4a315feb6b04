//! Analytics: one `key_verifications` row per verification and one `api_requests` row
//! per HTTP request, matched to the request ids the responses carried.

use std::collections::BTreeSet;

use creditgate_server::DEFAULT_WORKSPACE;
use serde_json::{json, Value};

use crate::support::{by_request_id, Exchange, TestApp, NODE_ID};

type VerificationRow = (String, String, String, String, String, String, String);
type NumbersRow = (String, i64, i64, Option<i64>, i64, String);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_row_per_verification_and_per_request() {
    let mut app = TestApp::start().await;
    let api = app.create_api().await;
    let (key_id, key) = app.create_limited(&api, 10).await;

    // (request id, outcome, cost, spent, remaining)
    let mut expected: BTreeSet<(String, String, i64, i64, Option<i64>)> = BTreeSet::new();
    let mut tagged = String::new();
    for (i, cost) in [
        Some(3),
        Some(0),
        None,
        Some(4),
        Some(5),
        Some(2),
        None,
        Some(9),
    ]
    .into_iter()
    .enumerate()
    {
        let mut body = json!({ "key": key });
        if let Some(c) = cost {
            body["credits"] = json!({ "cost": c });
        }
        if i == 0 {
            body["tags"] = json!(["plan=pro", "region:eu"]);
        }
        let (status, resp) = app.post("/v2/keys.verifyKey", body).await;
        assert_eq!(status, 200, "{resp}");
        let rid = resp["meta"]["requestId"]
            .as_str()
            .expect("requestId")
            .to_owned();
        if i == 0 {
            tagged = rid.clone();
        }
        let data = &resp["data"];
        let outcome = data["code"].as_str().expect("code").to_owned();
        let cost = cost.unwrap_or(1);
        let spent = if outcome == "VALID" { cost } else { 0 };
        expected.insert((rid, outcome, cost, spent, data["credits"].as_i64()));
    }
    let outcomes: Vec<&str> = expected.iter().map(|e| e.1.as_str()).collect();
    assert!(outcomes.contains(&"VALID") && outcomes.contains(&"USAGE_EXCEEDED"));

    // Requests that are not verifications of this key.
    let (status, unknown) = app
        .post("/v2/keys.verifyKey", json!({ "key": "sk_unknown" }))
        .await;
    assert_eq!(status, 200);
    let unknown_rid = unknown["meta"]["requestId"]
        .as_str()
        .expect("rid")
        .to_owned();
    let (status, _) = app
        .post(
            "/v2/keys.verifyKey",
            json!({ "key": key, "credits": { "cost": -1 } }),
        )
        .await;
    assert_eq!(status, 400);
    let (status, _) = app
        .post_as(None, "/v2/keys.verifyKey", json!({ "key": key }))
        .await;
    assert_eq!(status, 401);
    let (status, _) = app.post("/v2/keys.nothing", json!({})).await;
    assert_eq!(status, 404);
    app.liveness_ok().await;
    app.get_key(&key_id).await;

    let exchanges = app.exchanges();
    app.stop().await;
    let sql = app.analytics_sql().await;
    // key_verifications: exactly one row per verification of the key.
    let rows: Vec<NumbersRow> = sqlx::query_as(
        "SELECT request_id, cost, spent_credits, remaining, time, tags \
         FROM key_verifications WHERE key_id = $1",
    )
    .bind(&key_id)
    .fetch_all(sql.pool())
    .await
    .expect("reading key_verifications");
    assert_eq!(rows.len(), expected.len(), "{rows:?}");
    let ids: BTreeSet<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    assert_eq!(ids.len(), rows.len(), "request ids are distinct");
    let meta: Vec<VerificationRow> = sqlx::query_as(
        "SELECT request_id, outcome, node_id, region, workspace_id, api_id, key_id \
         FROM key_verifications WHERE key_id = $1",
    )
    .bind(&key_id)
    .fetch_all(sql.pool())
    .await
    .expect("reading key_verifications");
    let mut got = BTreeSet::new();
    for (rid, cost, spent, remaining, time, tags) in &rows {
        let m = meta.iter().find(|m| &m.0 == rid).expect("the same row");
        assert_eq!(
            (m.2.as_str(), m.3.as_str(), m.4.as_str(), m.5.as_str()),
            (NODE_ID, "local", DEFAULT_WORKSPACE, api.as_str()),
            "{m:?}"
        );
        assert!(*time > 1_600_000_000_000, "time {time}");
        let tags: Value = serde_json::from_str(tags).expect("tags are JSON");
        if *rid == tagged {
            assert_eq!(tags, json!(["plan=pro", "region:eu"]));
        } else {
            assert_eq!(tags, json!([]));
        }
        got.insert((rid.clone(), m.1.clone(), *cost, *spent, *remaining));
    }
    assert_eq!(got, expected);

    // The unknown key has its row too; the 400 and 401 have none.
    let (outcome, count): (String, i64) = sqlx::query_as(
        "SELECT MIN(outcome), COUNT(*) FROM key_verifications WHERE request_id = $1",
    )
    .bind(&unknown_rid)
    .fetch_one(sql.pool())
    .await
    .expect("reading key_verifications");
    assert_eq!((outcome.as_str(), count), ("NOT_FOUND", 1));
    let total: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM key_verifications")
        .fetch_one(sql.pool())
        .await
        .expect("counting");
    assert_eq!(total, i64::try_from(expected.len() + 1).expect("fits"));

    // api_requests: one row per request made, with what the client saw.
    let rows: Vec<(String, String, String, i64, String, String)> = sqlx::query_as(
        "SELECT request_id, method, path, status, node_id, workspace_id FROM api_requests",
    )
    .fetch_all(sql.pool())
    .await
    .expect("reading api_requests");
    sql.close().await;
    assert_eq!(rows.len(), exchanges.len(), "{rows:?}\nvs {exchanges:?}");
    let want = by_request_id(&exchanges);
    assert_eq!(want.len(), exchanges.len(), "request ids are distinct");
    let mut seen = BTreeSet::new();
    for (rid, method, path, status, node, workspace) in rows {
        let sent = want
            .get(&rid)
            .unwrap_or_else(|| panic!("api_requests row {rid} matches no request"));
        let row = Exchange {
            request_id: rid.clone(),
            method,
            path,
            status: u16::try_from(status).expect("a status"),
        };
        assert_eq!(&row, sent);
        assert_eq!(node, NODE_ID);
        let authenticated =
            sent.status != 401 && sent.path != "/v2/liveness" && sent.path != "/v2/keys.nothing";
        if authenticated {
            assert_eq!(workspace, DEFAULT_WORKSPACE, "{row:?}");
        }
        assert!(seen.insert(rid), "one row per request");
    }
    let statuses: BTreeSet<u16> = exchanges.iter().map(|e| e.status).collect();
    assert_eq!(statuses, BTreeSet::from([200, 400, 401, 404]));
}
