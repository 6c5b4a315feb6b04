//! Standalone rate limits over HTTP: `ratelimit.limit` passes exactly `limit` per window
//! under concurrency, `reset` is the end of the window, `ratelimit.multiLimit` counts
//! all checks or none, namespaces are per workspace, and bad input is a 400.

use serde_json::{json, Value};

use crate::support::{assert_bad_request, assert_error, TestApp};

/// 30 days: no window ends while a test runs (windows end at multiples of it).
const LONG: u64 = 2_592_000_000;

fn now_ms() -> u64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    u64::try_from(d.as_millis()).expect("in range")
}

fn check(ns: &str, id: &str, limit: u64, cost: u64) -> Value {
    json!({ "namespace": ns, "identifier": id, "limit": limit, "duration": LONG, "cost": cost })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_passes_exactly_its_limit() {
    let app = TestApp::start().await;
    let mut tasks = Vec::new();
    for _ in 0..60 {
        let c = app.client();
        tasks.push(tokio::spawn(async move {
            c.ok("/v2/ratelimit.limit", check("sms.sign_up", "user_1", 25, 1))
                .await
        }));
    }
    let mut successes = 0;
    let mut remaining = Vec::new();
    for t in tasks {
        let d = t.await.expect("task");
        assert_eq!(d["limit"], 25, "{d}");
        let reset = d["reset"].as_u64().expect("reset");
        assert!(reset > now_ms() && reset % LONG == 0, "{d}");
        if d["success"] == json!(true) {
            successes += 1;
            remaining.push(d["remaining"].as_u64().expect("remaining"));
        } else {
            assert_eq!(d["remaining"], 0, "{d}");
        }
    }
    assert_eq!(successes, 25);
    remaining.sort_unstable();
    assert_eq!(
        remaining,
        (0..25).collect::<Vec<_>>(),
        "each success its own count"
    );

    // Another identifier, and another namespace, count apart; cost 0 only reads.
    let d = app
        .ok("/v2/ratelimit.limit", check("sms.sign_up", "user_2", 25, 5))
        .await;
    assert_eq!(
        (d["success"].clone(), d["remaining"].clone()),
        (json!(true), json!(20))
    );
    let d = app
        .ok("/v2/ratelimit.limit", check("email", "user_1", 25, 0))
        .await;
    assert_eq!(
        (d["success"].clone(), d["remaining"].clone()),
        (json!(true), json!(25))
    );
    // The default cost is 1.
    let d = app
        .ok(
            "/v2/ratelimit.limit",
            json!({ "namespace": "email", "identifier": "user_1", "limit": 2, "duration": LONG }),
        )
        .await;
    assert_eq!(d["remaining"], 1, "{d}");

    // Another workspace has its own counters.
    let other = app.root_key("ws_other", &["ratelimit.*.limit"]).await;
    let (status, body) = app
        .post_as(
            Some(&other),
            "/v2/ratelimit.limit",
            check("sms.sign_up", "user_1", 25, 1),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["remaining"], 24, "{body}");
    // A root key without the permission is refused, and counts nothing.
    let verifier = app
        .root_key(creditgate_server::DEFAULT_WORKSPACE, &["api.*.verify_key"])
        .await;
    let (status, body) = app
        .post_as(
            Some(&verifier),
            "/v2/ratelimit.limit",
            check("email", "user_9", 1, 1),
        )
        .await;
    assert_error(status, &body, 403, "/insufficient_permissions");
    assert!(
        body["error"]["detail"]
            .as_str()
            .unwrap_or("")
            .contains("ratelimit.*.limit"),
        "{body}"
    );
    let d = app
        .ok("/v2/ratelimit.limit", check("email", "user_9", 1, 1))
        .await;
    assert_eq!(d["success"], true, "{d}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_limit_counts_all_checks_or_none() {
    let app = TestApp::start().await;
    let d = app
        .ok("/v2/ratelimit.limit", check("api", "org_1", 1, 1))
        .await;
    assert_eq!(d["success"], true, "{d}");

    // org_1 is exhausted: user_1 must not be counted.
    let (status, body) = app
        .post(
            "/v2/ratelimit.multiLimit",
            json!([check("api", "user_1", 3, 1), check("api", "org_1", 1, 1)]),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let d = &body["data"];
    assert_eq!(d["passed"], false, "{d}");
    assert_eq!(d["limits"][0]["passed"], true, "{d}");
    assert_eq!(d["limits"][0]["remaining"], 3, "{d}");
    assert_eq!(d["limits"][0]["identifier"], "user_1", "{d}");
    assert_eq!(d["limits"][1]["passed"], false, "{d}");

    // Both fit: both count.
    let d = app
        .ok(
            "/v2/ratelimit.multiLimit",
            json!([check("api", "user_1", 3, 2), check("api", "org_2", 1, 1)]),
        )
        .await;
    assert_eq!(d["passed"], true, "{d}");
    assert_eq!(d["limits"][0]["remaining"], 1, "{d}");
    assert_eq!(d["limits"][1]["remaining"], 0, "{d}");
    let d = app
        .ok("/v2/ratelimit.limit", check("api", "user_1", 3, 1))
        .await;
    assert_eq!(
        (d["success"].clone(), d["remaining"].clone()),
        (json!(true), json!(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_rate_limit_input_is_a_400_that_counts_nothing() {
    let app = TestApp::start().await;
    let with = |field: &str, value: Value| {
        let mut c = check("ns", "id", 1, 1);
        c[field] = value;
        c
    };
    let cases = [
        (
            "/v2/ratelimit.limit",
            with("namespace", json!("")),
            "body.namespace",
        ),
        (
            "/v2/ratelimit.limit",
            with("namespace", json!("has space")),
            "body.namespace",
        ),
        (
            "/v2/ratelimit.limit",
            with("identifier", json!("x".repeat(256))),
            "body.identifier",
        ),
        ("/v2/ratelimit.limit", with("limit", json!(0)), "body.limit"),
        (
            "/v2/ratelimit.limit",
            with("limit", json!(-5)),
            "body.limit",
        ),
        (
            "/v2/ratelimit.limit",
            with("duration", json!(999)),
            "body.duration",
        ),
        (
            "/v2/ratelimit.limit",
            with("duration", json!(2_592_000_001_i64)),
            "body.duration",
        ),
        ("/v2/ratelimit.limit", with("cost", json!(-1)), "body.cost"),
        ("/v2/ratelimit.multiLimit", json!([]), "body"),
        (
            "/v2/ratelimit.multiLimit",
            json!([check("ns", "id", 1, 1), with("limit", json!(0))]),
            "body[1].limit",
        ),
    ];
    for (route, body, location) in cases {
        let (status, answer) = app.post(route, body.clone()).await;
        assert_bad_request(status, &answer, location);
    }
    let many: Vec<Value> = (0..101)
        .map(|i| check("ns", &format!("id{i}"), 1, 1))
        .collect();
    let (status, answer) = app.post("/v2/ratelimit.multiLimit", json!(many)).await;
    assert_bad_request(status, &answer, "body");
    // Nothing was counted: the one unit of "ns"/"id" is still there.
    let d = app.ok("/v2/ratelimit.limit", check("ns", "id", 1, 1)).await;
    assert_eq!(d["success"], true, "{d}");
}
