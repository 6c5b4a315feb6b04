//! `analytics.getUsage` on the embedded node (SQLite analytics): a known set of
//! verifications spread over 3 minutes of a manual clock gives exactly the buckets a
//! plain count of them gives, for every grouping and filter; permissions and workspaces
//! scope it; bad input is a 400 naming the field.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use creditgate_domain::{Clock, ManualClock, SystemClock};
use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, Client, TestApp};

/// 2025-12-06T05:46:15Z: the verifications start mid-minute.
const START: i64 = 1_765_000_000_000 - 1_765_000_000_000 % 60_000 + 15_000;
const MINUTE: i64 = 60_000;

/// One verification as the test made it.
#[derive(Debug, Clone)]
struct Made {
    time: i64,
    api: String,
    key: String,
    acme: bool,
    outcome: String,
    spent: u64,
    tags: Vec<String>,
}

/// The buckets a plain count of `made` gives: (time, group) → (count, spent).
fn expected(
    made: &[Made],
    keep: impl Fn(&Made) -> bool,
    granularity: i64,
    group: Option<&str>,
) -> Vec<Value> {
    let mut buckets: BTreeMap<(i64, String), (u64, u64)> = BTreeMap::new();
    for m in made.iter().filter(|m| keep(m)) {
        let time = m.time / granularity * granularity;
        let groups: Vec<String> = match group {
            None => vec![String::new()],
            Some("outcome") => vec![m.outcome.clone()],
            Some("keyId") => vec![m.key.clone()],
            Some("tag") => m.tags.clone(),
            Some(other) => panic!("no group {other}"),
        };
        for g in groups {
            let b = buckets.entry((time, g)).or_default();
            b.0 += 1;
            b.1 += m.spent;
        }
    }
    buckets
        .into_iter()
        .map(|((time, g), (count, spent))| {
            let mut b = json!({ "time": time, "count": count, "spentCredits": spent });
            if let Some(name) = group {
                b[name] = json!(g);
            }
            b
        })
        .collect()
}

async fn usage(c: &Client, body: Value) -> Vec<Value> {
    let data = c.ok("/v2/analytics.getUsage", body).await;
    data["buckets"].as_array().expect("buckets").clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_buckets_are_exactly_the_verifications_made() {
    let clock = Arc::new(ManualClock::new(START));
    let app = TestApp::start_with_clock(clock.clone()).await;
    let api_a = app.create_api().await;
    let api_b = app.create_api().await;
    let (limited, limited_secret) = app
        .create_key_with(
            json!({ "apiId": api_a, "externalId": "acme", "credits": { "remaining": 12 } }),
        )
        .await;
    let (unlimited, unlimited_secret) = app.create_key(&api_a, Value::Null).await;
    let (other, other_secret) = app.create_limited(&api_b, 1_000).await;
    let keys = [
        (&limited, &limited_secret, &api_a, true, true),
        (&unlimited, &unlimited_secret, &api_a, false, false),
        (&other, &other_secret, &api_b, false, true),
    ];

    // 36 verifications, one every 5 s over 3 minutes, with costs 1..4 and tags.
    let mut made = Vec::new();
    for i in 0..36i64 {
        let time = START + i * 5_000;
        clock.set(time);
        let (key, secret, api, acme, limited) = keys[usize::try_from(i % 3).expect("small")];
        let cost = 1 + u64::try_from(i % 4).expect("small");
        let tags: Vec<String> = match i % 4 {
            0 => vec![],
            1 => vec!["plan=pro".into()],
            2 => vec!["plan=free".into(), "region=eu".into()],
            _ => vec!["region=eu".into()],
        };
        let (status, resp) = app
            .post(
                "/v2/keys.verifyKey",
                json!({ "key": secret, "credits": { "cost": cost }, "tags": tags }),
            )
            .await;
        assert_eq!(status, 200, "{resp}");
        let outcome = resp["data"]["code"].as_str().expect("code").to_owned();
        let spent = if outcome == "VALID" && limited {
            cost
        } else {
            0
        };
        made.push(Made {
            time,
            api: api.clone(),
            key: key.clone(),
            acme,
            outcome,
            spent,
            tags,
        });
    }
    // An unknown key: a NOT_FOUND row of the workspace, of no API or key.
    clock.set(START + 36 * 5_000);
    let answer = app.verify("cg_unknown_key_of_no_one", None).await;
    assert_eq!(answer["code"], "NOT_FOUND");
    made.push(Made {
        time: START + 36 * 5_000,
        api: String::new(),
        key: String::new(),
        acme: false,
        outcome: "NOT_FOUND".into(),
        spent: 0,
        tags: vec![],
    });
    let outcomes: Vec<&str> = made.iter().map(|m| m.outcome.as_str()).collect();
    assert!(
        outcomes.contains(&"VALID") && outcomes.contains(&"USAGE_EXCEEDED"),
        "the limited key runs out during the run: {outcomes:?}"
    );

    let from = START - 15_000;
    let to = START + 4 * MINUTE;
    let all = json!({ "from": from, "to": to, "granularity": "minute" });
    // The analytics batcher writes every second or so: wait for every row.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let total: u64 = usage(&app, all.clone())
            .await
            .iter()
            .map(|b| b["count"].as_u64().expect("count"))
            .sum();
        if total == made.len() as u64 {
            break;
        }
        assert!(Instant::now() < deadline, "only {total} rows were written");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let got = usage(&app, all.clone()).await;
    assert_eq!(got, expected(&made, |_| true, MINUTE, None));
    assert_eq!(got.len(), 4, "four minutes hold verifications: {got:?}");
    for group in ["outcome", "keyId", "tag"] {
        let mut body = all.clone();
        body["groupBy"] = json!(group);
        assert_eq!(
            usage(&app, body).await,
            expected(&made, |_| true, MINUTE, Some(group)),
            "grouped by {group}"
        );
    }
    let hourly = usage(
        &app,
        json!({ "from": from, "to": to, "granularity": "hour", "groupBy": "outcome" }),
    )
    .await;
    assert_eq!(
        hourly,
        expected(&made, |_| true, 60 * MINUTE, Some("outcome"))
    );

    // Filters.
    let mut body = all.clone();
    body["apiId"] = json!(api_a);
    assert_eq!(
        usage(&app, body).await,
        expected(&made, |m| m.api == api_a, MINUTE, None)
    );
    let mut body = all.clone();
    body["keyId"] = json!(other);
    body["groupBy"] = json!("tag");
    assert_eq!(
        usage(&app, body).await,
        expected(&made, |m| m.key == other, MINUTE, Some("tag"))
    );
    let mut body = all.clone();
    body["externalId"] = json!("acme");
    body["groupBy"] = json!("outcome");
    assert_eq!(
        usage(&app, body).await,
        expected(&made, |m| m.acme, MINUTE, Some("outcome"))
    );
    // A range that starts and ends inside minutes: rows outside it are left out.
    let (from2, to2) = (START + 52_000, START + 2 * MINUTE + 3_000);
    let in_range = |m: &Made| m.time >= from2 && m.time < to2;
    let got = usage(
        &app,
        json!({ "from": from2, "to": to2, "granularity": "minute", "groupBy": "keyId" }),
    )
    .await;
    assert_eq!(got, expected(&made, in_range, MINUTE, Some("keyId")));
    assert!(!got.is_empty());
    let none = usage(
        &app,
        json!({ "from": to, "to": to + MINUTE, "granularity": "minute" }),
    )
    .await;
    assert!(none.is_empty(), "no verifications, no buckets: {none:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_needs_read_analytics_and_stays_in_its_workspace() {
    let app = TestApp::start().await;
    let api_a = app.create_api().await;
    let api_b = app.create_api().await;
    let (key_a, secret_a) = app.create_limited(&api_a, 10).await;
    let (key_b, _) = app.create_limited(&api_b, 10).await;
    app.verify(&secret_a, None).await;
    let now = SystemClock.now_ms();
    let range = json!({ "from": now - 3_600_000, "to": now + 3_600_000, "granularity": "hour" });

    let only_a = app
        .root_key(
            creditgate_server::DEFAULT_WORKSPACE,
            &[&format!("api.{api_a}.read_analytics")],
        )
        .await;
    let mut body = range.clone();
    body["apiId"] = json!(api_a);
    let (status, resp) = app
        .post_as(Some(&only_a), "/v2/analytics.getUsage", body)
        .await;
    assert_eq!(status, 200, "{resp}");
    let mut body = range.clone();
    body["keyId"] = json!(key_a);
    let (status, resp) = app
        .post_as(Some(&only_a), "/v2/analytics.getUsage", body)
        .await;
    assert_eq!(status, 200, "a key of the API it may read: {resp}");
    let (status, resp) = app
        .post_as(Some(&only_a), "/v2/analytics.getUsage", range.clone())
        .await;
    assert_error(status, &resp, 403, "/insufficient_permissions");
    let mut body = range.clone();
    body["keyId"] = json!(key_b);
    let (status, resp) = app
        .post_as(Some(&only_a), "/v2/analytics.getUsage", body)
        .await;
    assert_error(status, &resp, 403, "/insufficient_permissions");
    let verifier = app
        .root_key(creditgate_server::DEFAULT_WORKSPACE, &["api.*.verify_key"])
        .await;
    let (status, resp) = app
        .post_as(Some(&verifier), "/v2/analytics.getUsage", range.clone())
        .await;
    assert_error(status, &resp, 403, "/insufficient_permissions");

    // Another workspace sees none of this one's keys, APIs or rows.
    let stranger = app
        .root_key("ws_other", &["api.*.read_analytics", "api.*.create_api"])
        .await;
    let mut body = range.clone();
    body["keyId"] = json!(key_a);
    let (status, resp) = app
        .post_as(Some(&stranger), "/v2/analytics.getUsage", body)
        .await;
    assert_error(status, &resp, 404, "key_not_found");
    let mut body = range.clone();
    body["apiId"] = json!(api_a);
    let (status, resp) = app
        .post_as(Some(&stranger), "/v2/analytics.getUsage", body)
        .await;
    assert_error(status, &resp, 404, "api_not_found");
    let (status, resp) = app
        .post_as(Some(&stranger), "/v2/analytics.getUsage", range.clone())
        .await;
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["data"]["buckets"], json!([]), "{resp}");
    let mut body = range.clone();
    body["keyId"] = json!(key_a);
    body["apiId"] = json!(api_b);
    let (status, resp) = app.post("/v2/analytics.getUsage", body).await;
    assert_eq!(status, 422, "a key and an API it is not of: {resp}");
    assert_eq!(
        resp["error"]["errors"][0]["location"], "body.keyId",
        "{resp}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_usage_queries_name_the_field() {
    let app = TestApp::start().await;
    let ok = json!({ "from": START, "to": START + MINUTE, "granularity": "minute" });
    let (status, resp) = app.post("/v2/analytics.getUsage", ok.clone()).await;
    assert_eq!(status, 200, "{resp}");
    // Each field wrong on its own: 400 naming it.
    let cases: [(&str, Value, &str); 7] = [
        ("granularity", json!("week"), "body.granularity"),
        ("groupBy", json!("node"), "body.groupBy"),
        ("from", json!(-1), "body.from"),
        ("to", json!(0), "body.to"),
        ("to", json!(i64::MAX), "body.to"),
        ("keyId", json!(""), "body.keyId"),
        ("externalId", json!(""), "body.externalId"),
    ];
    for (field, value, location) in cases {
        let mut body = ok.clone();
        body[field] = value;
        let (status, resp) = app.post("/v2/analytics.getUsage", body).await;
        assert_bad_request(status, &resp, location);
    }
    // Each field valid, the range they make not served: 422 naming the field to change.
    let ranges: [(i64, &str, &str); 4] = [
        (START, "minute", "body.to"),
        (START - 1, "minute", "body.to"),
        (START + 401 * 86_400_000, "day", "body.to"),
        (START + 2 * 86_400_000, "minute", "body.granularity"),
    ];
    for (to, granularity, location) in ranges {
        let body = json!({ "from": START, "to": to, "granularity": granularity });
        let (status, resp) = app.post("/v2/analytics.getUsage", body).await;
        assert_eq!(status, 422, "{resp}");
        assert_eq!(
            resp["error"]["type"],
            "https://creditgate.dev/docs/errors/application/unprocessable"
        );
        let first = &resp["error"]["errors"][0];
        assert_eq!(first["location"], location, "{resp}");
        assert!(
            first["fix"].as_str().is_some_and(|f| !f.is_empty()),
            "{resp}"
        );
    }
    let mut body = ok.clone();
    body["bucket"] = json!("minute");
    let (status, resp) = app.post("/v2/analytics.getUsage", body).await;
    assert_eq!(status, 400, "an unknown field: {resp}");
    let mut body = ok.clone();
    body["granularity"] = json!("day");
    body["to"] = json!(START + 400 * 86_400_000);
    let (status, resp) = app.post("/v2/analytics.getUsage", body).await;
    assert_eq!(status, 200, "400 days of days is within bounds: {resp}");
    let mut body = ok.clone();
    body["keyId"] = json!("key_none");
    let (status, resp) = app.post("/v2/analytics.getUsage", body).await;
    assert_error(status, &resp, 404, "key_not_found");
}
