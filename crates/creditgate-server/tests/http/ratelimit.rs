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

fn set_override(ns: &str, identifier: &str, limit: u64) -> Value {
    json!({ "namespace": ns, "identifier": identifier, "limit": limit, "duration": LONG })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_replace_the_limit_of_matching_identifiers() {
    let app = TestApp::start().await;
    // Emails: a pattern for the domain, an exact override for one address.
    let domain = app
        .ok(
            "/v2/ratelimit.setOverride",
            set_override("api", "*@acme.com", 3),
        )
        .await["overrideId"]
        .as_str()
        .expect("overrideId")
        .to_owned();
    assert!(domain.starts_with("rlo_"), "{domain}");
    let ceo = app
        .ok(
            "/v2/ratelimit.setOverride",
            set_override("api", "ceo@acme.com", 5),
        )
        .await["overrideId"]
        .as_str()
        .expect("overrideId")
        .to_owned();
    // A more specific pattern wins over a shorter one.
    let team = app
        .ok(
            "/v2/ratelimit.setOverride",
            set_override("api", "*@team.acme.com", 1),
        )
        .await["overrideId"]
        .as_str()
        .expect("overrideId")
        .to_owned();

    let d = app
        .ok("/v2/ratelimit.limit", check("api", "ann@acme.com", 100, 1))
        .await;
    assert_eq!(
        (&d["limit"], &d["remaining"], &d["overrideId"]),
        (&json!(3), &json!(2), &json!(domain)),
        "{d}"
    );
    let d = app
        .ok("/v2/ratelimit.limit", check("api", "ceo@acme.com", 100, 1))
        .await;
    assert_eq!((&d["limit"], &d["overrideId"]), (&json!(5), &json!(ceo)));
    let d = app
        .ok(
            "/v2/ratelimit.limit",
            check("api", "bo@team.acme.com", 100, 1),
        )
        .await;
    assert_eq!((&d["limit"], &d["overrideId"]), (&json!(1), &json!(team)));
    // No match, another namespace: the request's own limit, no overrideId.
    for (ns, id) in [("api", "ann@other.com"), ("web", "ann@acme.com")] {
        let d = app.ok("/v2/ratelimit.limit", check(ns, id, 100, 1)).await;
        assert_eq!(d["limit"], 100, "{d}");
        assert!(d.get("overrideId").is_none(), "{d}");
    }
    // The override's limit is what passes: 3 for ann (1 used above).
    let mut passed = 1;
    for _ in 0..5 {
        let d = app
            .ok("/v2/ratelimit.limit", check("api", "ann@acme.com", 100, 1))
            .await;
        passed += u32::from(d["success"] == json!(true));
    }
    assert_eq!(passed, 3);
    // multiLimit answers the override of each check.
    let d = app
        .ok(
            "/v2/ratelimit.multiLimit",
            json!([
                check("api", "zed@acme.com", 100, 1),
                check("api", "x", 100, 1)
            ]),
        )
        .await;
    assert_eq!(d["limits"][0]["overrideId"], json!(domain), "{d}");
    assert!(d["limits"][1].get("overrideId").is_none(), "{d}");

    // Setting it again changes the limit and keeps the id; a limit of 0 blocks.
    let again = app
        .ok(
            "/v2/ratelimit.setOverride",
            set_override("api", "*@acme.com", 0),
        )
        .await;
    assert_eq!(again["overrideId"], json!(domain));
    let d = app
        .ok("/v2/ratelimit.limit", check("api", "new@acme.com", 100, 1))
        .await;
    assert_eq!((&d["success"], &d["limit"]), (&json!(false), &json!(0)));

    // get, list (pages), delete.
    let got = app
        .ok(
            "/v2/ratelimit.getOverride",
            json!({ "namespace": "api", "identifier": "*@acme.com" }),
        )
        .await;
    assert_eq!(
        got,
        json!({ "overrideId": domain, "duration": LONG, "identifier": "*@acme.com", "limit": 0 })
    );
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut body = json!({ "namespace": "api", "limit": 2 });
        if let Some(c) = &cursor {
            body["cursor"] = json!(c);
        }
        let (status, page) = app.post("/v2/ratelimit.listOverrides", body).await;
        assert_eq!(status, 200, "{page}");
        for o in page["data"].as_array().expect("data") {
            seen.push(o["overrideId"].as_str().expect("id").to_owned());
        }
        match page["pagination"]["cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    let mut want = vec![domain.clone(), ceo.clone(), team.clone()];
    want.sort();
    assert_eq!(seen, want);
    app.ok(
        "/v2/ratelimit.deleteOverride",
        json!({ "namespace": "api", "identifier": "*@acme.com" }),
    )
    .await;
    let d = app
        .ok("/v2/ratelimit.limit", check("api", "new@acme.com", 100, 1))
        .await;
    assert_eq!((&d["success"], &d["limit"]), (&json!(true), &json!(100)));
    for path in ["/v2/ratelimit.getOverride", "/v2/ratelimit.deleteOverride"] {
        let (status, body) = app
            .post(
                path,
                json!({ "namespace": "api", "identifier": "*@acme.com" }),
            )
            .await;
        assert_error(status, &body, 404, "ratelimit_override_not_found");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrides_need_their_permissions_and_bad_input_changes_nothing() {
    let app = TestApp::start().await;
    let limiter = app
        .root_key(creditgate_server::DEFAULT_WORKSPACE, &["ratelimit.*.limit"])
        .await;
    for (path, body, permission) in [
        (
            "/v2/ratelimit.setOverride",
            set_override("api", "u", 1),
            "ratelimit.*.set_override",
        ),
        (
            "/v2/ratelimit.getOverride",
            json!({ "namespace": "api", "identifier": "u" }),
            "ratelimit.*.read_override",
        ),
        (
            "/v2/ratelimit.listOverrides",
            json!({ "namespace": "api" }),
            "ratelimit.*.read_override",
        ),
        (
            "/v2/ratelimit.deleteOverride",
            json!({ "namespace": "api", "identifier": "u" }),
            "ratelimit.*.delete_override",
        ),
    ] {
        let (status, resp) = app.post_as(Some(&limiter), path, body).await;
        assert_error(status, &resp, 403, "/insufficient_permissions");
        assert!(
            resp["error"]["detail"]
                .as_str()
                .unwrap_or("")
                .contains(permission),
            "{resp}"
        );
    }
    // Another workspace's overrides do not apply.
    let other = app
        .root_key(
            "ws_other",
            &["ratelimit.*.limit", "ratelimit.*.set_override"],
        )
        .await;
    let (status, _) = app
        .post_as(
            Some(&other),
            "/v2/ratelimit.setOverride",
            set_override("api", "u", 1),
        )
        .await;
    assert_eq!(status, 200);
    let d = app.ok("/v2/ratelimit.limit", check("api", "u", 7, 1)).await;
    assert_eq!(d["limit"], 7, "{d}");

    for (body, location) in [
        (set_override("", "u", 1), "body.namespace"),
        (set_override("has space", "u", 1), "body.namespace"),
        (set_override("api", "", 1), "body.identifier"),
        (set_override("api", "tab\there", 1), "body.identifier"),
        (set_override("api", &"x".repeat(256), 1), "body.identifier"),
        (
            json!({ "namespace": "api", "identifier": "u", "limit": -1, "duration": LONG }),
            "body.limit",
        ),
        (
            json!({ "namespace": "api", "identifier": "u", "limit": 1, "duration": 999 }),
            "body.duration",
        ),
    ] {
        let (status, resp) = app.post("/v2/ratelimit.setOverride", body).await;
        assert_bad_request(status, &resp, location);
    }
    let (status, resp) = app
        .post(
            "/v2/ratelimit.listOverrides",
            json!({ "namespace": "api", "limit": 0 }),
        )
        .await;
    assert_bad_request(status, &resp, "body.limit");
    let (status, page) = app
        .post("/v2/ratelimit.listOverrides", json!({ "namespace": "api" }))
        .await;
    assert_eq!(status, 200);
    assert_eq!(page["data"], json!([]), "nothing was set: {page}");
    assert_eq!(page["pagination"]["hasMore"], false, "{page}");
}
