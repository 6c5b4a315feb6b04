//! Holds on real processes: the embedded default through a `kill -9` of the node that
//! made them, and three nodes on Redis + Postgres — concurrent reserves that hold
//! exactly what the balance covers, settles and releases on random nodes, a `kill -9`
//! of the node that made the holds (settled after its restart, or expired on the
//! others), a graceful restart, and 1,000 short holds that all expire in time.

use std::time::{Duration, Instant};

use creditgate_testkit::{Cluster, Node, Provision, Remote};
use serde_json::{json, Value};

use crate::support::BIN;

const ROOT: &str = "cg_root_holds_test_secret_0123456789";

/// `keys.reserveCredits`, expecting 200; returns `data`.
async fn reserve_on(node: &Remote, root: &str, key: &str, amount: u64, ttl_ms: u64) -> Value {
    let (status, body) = node
        .call(
            "keys.reserveCredits",
            root,
            json!({ "key": key, "amount": amount, "ttlMs": ttl_ms }),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    body["data"].clone()
}

async fn reserve(node: &Node, root: &str, key: &str, amount: u64, ttl_ms: u64) -> Value {
    reserve_on(&node.remote(), root, key, amount, ttl_ms).await
}

fn hold_id(v: &Value) -> String {
    v["holdId"]
        .as_str()
        .unwrap_or_else(|| panic!("no holdId in {v}"))
        .to_owned()
}

/// Waits (bounded) until `node` reports `want` as the key's balance.
async fn wait_balance(node: &Node, root: &str, key_id: &str, want: u64, bound: Duration) {
    let started = Instant::now();
    loop {
        let now = node.remaining(root, key_id).await;
        if now == Some(want) {
            return;
        }
        assert!(
            started.elapsed() < bound,
            "balance {now:?}, expected {want} within {bound:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_holds_survive_a_kill9_of_their_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::embedded(BIN, dir.path(), Some(ROOT)).await;
    let api = node.create_api(ROOT, "holds").await;
    let (key_id, key) = node.create_key(ROOT, &api, 1_000).await;
    let long = hold_id(&reserve(&node, ROOT, &key, 100, 3_600_000).await);
    let short = hold_id(&reserve(&node, ROOT, &key, 50, 1_500).await);
    node.kill9().await;
    drop(node);

    let node = Node::embedded(BIN, dir.path(), Some(ROOT)).await;
    let g = node
        .ok("keys.getHold", ROOT, json!({ "holdId": long }))
        .await;
    assert_eq!(
        (g["state"].clone(), g["amount"].clone()),
        (json!("open"), json!(100)),
        "{g}"
    );
    let s = node
        .ok(
            "keys.settleCredits",
            ROOT,
            json!({ "holdId": long, "cost": 40 }),
        )
        .await;
    assert_eq!(s["spent"], 40, "{s}");
    // The short hold of the dead node expires on the new one and returns its 50.
    wait_balance(&node, ROOT, &key_id, 960, Duration::from_secs(3)).await;
    let g = node
        .ok("keys.getHold", ROOT, json!({ "holdId": short }))
        .await;
    assert_eq!(g["state"], "expired", "{g}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_hold_exactly_what_the_balance_covers() {
    let mut cluster = Cluster::builder()
        .nodes(3)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(BIN)
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let root = cluster.root_key.clone();

    // Holds outlive the node that made them: a graceful restart of node 2 …
    let (kept_id, kept) = cluster.key(1_000).await;
    let graceful = hold_id(&reserve(&cluster.nodes[2], &root, &kept, 30, 3_600_000).await);
    cluster.restart_node(2).await.expect("restart node 2");
    let s = cluster.nodes[2]
        .ok(
            "keys.settleCredits",
            &root,
            json!({ "holdId": graceful, "cost": 20 }),
        )
        .await;
    assert_eq!(
        (s["code"].clone(), s["spent"].clone()),
        (json!("VALID"), json!(20)),
        "{s}"
    );
    // … and a kill -9 of node 1 (below): a long hold is settled after its restart, a
    // short one expires on the other nodes.
    let long = hold_id(&reserve(&cluster.nodes[1], &root, &kept, 100, 3_600_000).await);
    let short = hold_id(&reserve(&cluster.nodes[1], &root, &kept, 50, 1_500).await);

    let (key_id, key) = cluster.key(1_000).await;

    // 200 concurrent reserves of 10 across the nodes: exactly 100 hold.
    let mut tasks = Vec::new();
    for i in 0..200usize {
        let (node, root, key) = (cluster.nodes[i % 3].remote(), root.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            reserve_on(&node, &root, &key, 10, 60_000).await
        }));
    }
    let mut holds = Vec::new();
    for t in tasks {
        let r = t.await.expect("task");
        match r["code"].as_str() {
            Some("VALID") => holds.push(hold_id(&r)),
            Some("USAGE_EXCEEDED") => {}
            other => panic!("{other:?}: {r}"),
        }
    }
    assert_eq!(holds.len(), 100, "1,000 credits hold exactly 100 × 10");

    // The node that made a third of them dies; the others settle and release them all.
    cluster.nodes[1].kill9().await;
    let mut tasks = Vec::new();
    for (i, h) in holds.iter().cloned().enumerate() {
        let node = cluster.nodes[if i % 2 == 0 { 0 } else { 2 }].remote();
        let root = root.clone();
        tasks.push(tokio::spawn(async move {
            if i % 5 == 0 {
                let (status, body) = node
                    .call("keys.releaseCredits", &root, json!({ "holdId": h }))
                    .await;
                assert_eq!(status, 200, "{body}");
                return 0;
            }
            let cost = u64::try_from(i * 7 % 16).expect("small");
            let (status, body) = node
                .call(
                    "keys.settleCredits",
                    &root,
                    json!({ "holdId": h, "cost": cost }),
                )
                .await;
            assert_eq!(status, 200, "{body}");
            if body["data"]["code"] == "VALID" {
                assert_eq!(body["data"]["spent"], cost, "{body}");
                return cost;
            }
            // Above the hold, and the balance outside holds could not cover the rest.
            let (status, body) = node
                .call("keys.releaseCredits", &root, json!({ "holdId": h }))
                .await;
            assert_eq!(status, 200, "{body}");
            0
        }));
    }
    let mut spent = 0;
    for t in tasks {
        spent += t.await.expect("task");
    }
    assert!(spent <= 1_000, "spent {spent}");
    // The dead node's short hold expires on the others and returns its 50.
    wait_balance(
        &cluster.nodes[0],
        &root,
        &kept_id,
        880,
        Duration::from_secs(5),
    )
    .await;
    let g = cluster.nodes[2]
        .ok("keys.getHold", &root, json!({ "holdId": short }))
        .await;
    assert_eq!(g["state"], "expired", "{g}");
    cluster.restart_node(1).await.expect("restart node 1");
    let converged = cluster
        .assert_converged(&key_id, Duration::from_secs(5))
        .await;
    assert_eq!(converged, 1_000 - spent, "every credit spent or back");
    let s = cluster.nodes[1]
        .ok(
            "keys.settleCredits",
            &root,
            json!({ "holdId": long, "cost": 40 }),
        )
        .await;
    assert_eq!(
        (s["code"].clone(), s["spent"].clone()),
        (json!("VALID"), json!(40)),
        "{s}"
    );
    let converged = cluster
        .assert_converged(&kept_id, Duration::from_secs(5))
        .await;
    assert_eq!(
        converged,
        1_000 - 20 - 40,
        "the kept key: two settles, one expiry"
    );

    // 1,000 holds of 1 with a 200 ms ttl under verification load: all back in time.
    let (key_id, key) = cluster.key(2_000).await;
    // Reserves of one key take its lock in turn: 20 workers of 50 each.
    let mut tasks = Vec::new();
    for w in 0..20usize {
        let (node, root, key) = (cluster.nodes[w % 3].remote(), root.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..50 {
                let r = reserve_on(&node, &root, &key, 1, 200).await;
                assert_eq!(r["code"], "VALID", "{r}");
                last = r["expiresAt"].as_i64().expect("expiresAt");
            }
            last
        }));
    }
    let mut last_expiry = 0;
    for t in tasks {
        last_expiry = last_expiry.max(t.await.expect("task"));
    }
    let mut verified = 0;
    let deadline = last_expiry + 1_000;
    loop {
        let node = &cluster.nodes[verified % 3];
        let v = node.verify(&root, &key, 1).await;
        assert_eq!(v["code"], "VALID", "{v}");
        verified += 1;
        let now = now_ms();
        if node.remaining(&root, &key_id).await
            == Some(2_000 - u64::try_from(verified).expect("small"))
        {
            assert!(
                now <= deadline,
                "back {} ms after the last expiry",
                now - last_expiry
            );
            break;
        }
        assert!(
            now <= deadline,
            "holds not all back within 1 s of their expiry"
        );
    }
    let converged = cluster
        .assert_converged(&key_id, Duration::from_secs(5))
        .await;
    assert_eq!(converged, 2_000 - u64::try_from(verified).expect("small"));
    cluster.shutdown().await.expect("shutdown");
}

fn now_ms() -> i64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970");
    i64::try_from(d.as_millis()).expect("in range")
}
