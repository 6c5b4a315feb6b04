//! `creditgate loadtest`, run as the real binary: against a local 3-node cluster it starts
//! itself (`--spawn 3`, own Redis, Postgres and ClickHouse), against one embedded node,
//! and failing on a dead node when no error is allowed.
//!
//! Every run is bounded; a failing test prints the command's stdout and stderr.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use creditgate_testkit::Node;
use serde_json::{json, Value};

use crate::support::{run_bounded, tokio_command, BIN};

const ROOT: &str = "cg_root_loadtest_test_secret_0123456789";
/// Bound on one `creditgate loadtest` run (cluster start, 10 s of load, teardown).
const RUN_BOUND: Duration = Duration::from_secs(120);

async fn loadtest(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = tokio_command();
    cmd.current_dir(dir).arg("loadtest").args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = run_bounded(cmd, RUN_BOUND, &format!("creditgate loadtest {args:?}")).await;
    eprintln!(
        "--- loadtest {args:?}: {} ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_of(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

fn u(v: &Value, name: &str) -> u64 {
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {name} in the JSON"))
}

/// The API id from the `created API … and …` line on stderr.
fn created_api(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr);
    stderr
        .lines()
        .find_map(|l| l.strip_prefix("created API "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no 'created API' line in {stderr}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawned_three_node_cluster_spends_exactly_the_credits() {
    let dir = tempfile::tempdir().unwrap();
    let out = loadtest(
        dir.path(),
        &[
            "--spawn",
            "3",
            "--credits",
            "1000",
            "--cost",
            "1",
            "--load",
            "2.0",
            "--duration",
            "10",
            "--json",
            "out.json",
            "--report",
            "out.html",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "exit status {}", out.status);

    let v = json_of(&dir.path().join("out.json"));
    let requests = u(&v, "requests");
    // 1000 credits in 10 s at load 2: 200 requests a second.
    assert_eq!(requests, 2000, "{}", v["scenario"]);
    assert_eq!(u(&v, "valid"), 1000);
    assert_eq!(u(&v, "expected_valid"), 1000);
    assert_eq!(u(&v, "usage_exceeded"), requests - 1000);
    assert_eq!(u(&v, "over_spend"), 0);
    assert_eq!(u(&v, "final_remaining"), 0, "keys.getKey after the run");
    assert_eq!(v["errors"], json!({}));
    let nodes = v["nodes"].as_object().expect("nodes");
    assert_eq!(nodes.len(), 3, "{nodes:?}");
    for (url, n) in nodes {
        assert!(n.as_u64().unwrap_or(0) > 0, "node {url} got no traffic");
    }
    for p in ["p50", "p95", "p99", "max"] {
        let ms = v["latency_ms"][p].as_f64().expect(p);
        assert!(ms > 0.0, "latency {p} = {ms}");
    }
    assert!(v["rps"].as_f64().expect("rps") > 0.0);

    let stdout = String::from_utf8_lossy(&out.stdout);
    for row in [
        "USAGE_EXCEEDED",
        "expected VALID",
        "over-spend",
        "final remaining",
        "PASS",
    ] {
        assert!(stdout.contains(row), "{row} missing from the table");
    }
    let html = std::fs::read_to_string(dir.path().join("out.html")).expect("out.html");
    for id in creditgate_loadgen::html::PLOT_IDS {
        assert!(html.contains(&format!("<svg id=\"{id}\"")), "{id} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drives_an_embedded_node_over_two_keys_and_deletes_its_api() {
    let data = tempfile::tempdir().unwrap();
    let node = Node::embedded(BIN, data.path(), Some(ROOT)).await;
    let dir = tempfile::tempdir().unwrap();
    // 2 keys × 150 credits at cost 3: 100 verifications can pass. The rate spends all
    // 300 credits in 4 s at load 1.5: ceil(25 × 1.5) = 38/s, 152 requests, 76 per key.
    let out = loadtest(
        dir.path(),
        &[
            "--nodes",
            &node.url,
            "--root-key",
            ROOT,
            "--keys",
            "2",
            "--credits",
            "150",
            "--cost",
            "3",
            "--load",
            "1.5",
            "--duration",
            "4",
            "--json",
            "out.json",
        ],
        &[],
    )
    .await;
    assert!(out.status.success(), "exit status {}", out.status);
    let v = json_of(&dir.path().join("out.json"));
    assert_eq!(u(&v, "requests"), 152);
    assert_eq!(u(&v, "valid"), 100);
    assert_eq!(u(&v, "expected_valid"), 100);
    assert_eq!(u(&v, "usage_exceeded"), 52);
    assert_eq!(u(&v, "over_spend"), 0);
    assert_eq!(u(&v, "final_remaining"), 0);
    assert_eq!(v["nodes"][&node.url], 152);

    let api = created_api(&out);
    let (status, body) = node
        .call("apis.getApi", ROOT, json!({ "apiId": api }))
        .await;
    assert_eq!(status, 404, "the API is deleted after the run: {body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_fails_the_run_when_no_error_is_allowed() {
    let data = tempfile::tempdir().unwrap();
    let node = Node::embedded(BIN, data.path(), Some(ROOT)).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let dir = tempfile::tempdir().unwrap();
    let out = loadtest(
        dir.path(),
        &[
            "--nodes",
            &format!("{},{dead}", node.url),
            "--credits",
            "50",
            "--duration",
            "2",
            "--max-error-rate",
            "0",
            "--keep",
            "--json",
            "out.json",
        ],
        &[("CREDITGATE_ROOT_KEY", ROOT)],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "exit status {}", out.status);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("FAIL: error rate"), "{stderr}");

    let v = json_of(&dir.path().join("out.json"));
    assert!(u(&v["errors"], "connect") > 0, "{}", v["errors"]);
    assert!(u(&v["nodes"], &dead) > 0, "{}", v["nodes"]);
    assert_eq!(v["passed"], false);
    assert_eq!(u(&v, "over_spend"), 0);

    // --keep: the API is still there.
    let api = created_api(&out);
    let (status, body) = node
        .call("apis.getApi", ROOT, json!({ "apiId": api }))
        .await;
    assert_eq!(status, 200, "--keep keeps the API: {body}");
}
