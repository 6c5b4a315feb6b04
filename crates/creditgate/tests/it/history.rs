//! Credit history on real processes: 2 nodes on their own Redis and Postgres. A key's
//! balance changes through both nodes, verifications on both, then Redis loses its data
//! (`FLUSHALL`): the reconciler writes off what it held, and the history read from either
//! node chains without a gap and replays to exactly the balance every node reports.

use std::time::Duration;

use creditgate_testkit::{Cluster, Provision};
use serde_json::{json, Value};

use crate::support::BIN;

fn int(e: &Value, field: &str) -> i64 {
    e[field]
        .as_i64()
        .unwrap_or_else(|| panic!("{field} in {e}"))
}

/// The whole history of `key_id` through `node`, `limit` per page, oldest first; checks
/// seqs without gaps and the chain rule.
async fn history(c: &Cluster, node: usize, key_id: &str, limit: u64) -> Vec<Value> {
    let mut newest_first: Vec<Value> = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut body = json!({ "keyId": key_id, "limit": limit });
        if let Some(cur) = &cursor {
            body["cursor"] = json!(cur);
        }
        let (status, page) = c.nodes[node]
            .call("keys.getCreditHistory", &c.root_key, body)
            .await;
        assert_eq!(status, 200, "{page}");
        newest_first.extend(page["data"].as_array().expect("a list").iter().cloned());
        match page["pagination"]["cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    let entries: Vec<Value> = newest_first.into_iter().rev().collect();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(int(e, "seq"), i64::try_from(i + 1).unwrap(), "{entries:#?}");
    }
    for pair in entries.windows(2) {
        let spent = int(&pair[1], "spentTotal") - int(&pair[0], "spentTotal");
        assert_eq!(
            int(&pair[1], "balanceBefore"),
            int(&pair[0], "balanceAfter") - spent,
            "the chain breaks: {pair:#?}"
        );
    }
    entries
}

/// `n` verifications of cost 1 on `node` from the exact balance `from`, each answering
/// the balance after it; returns the balance after the last.
async fn verify_n(c: &Cluster, node: usize, key: &str, from: i64, n: i64) -> i64 {
    for i in 1..=n {
        let d = c.nodes[node].verify(&c.root_key, key, 1).await;
        assert_eq!(d["code"], "VALID", "{d}");
        assert_eq!(int(&d, "credits"), from - i, "{d}");
    }
    from - n
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn history_replays_to_the_balance_after_redis_loses_its_data() {
    let c = Cluster::builder()
        .nodes(2)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(BIN)
        // Balances stay in Redis until it loses them.
        .node_args([
            "--idle-return-ms",
            "600000",
            "--reconcile-interval-ms",
            "100",
        ])
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let (key_id, key) = c.key(100).await;
    let root = &c.root_key;
    let update = |node: usize, op: &'static str, value: i64| {
        let (c, key_id) = (&c, &key_id);
        async move {
            c.nodes[node]
                .ok(
                    "keys.updateCredits",
                    root,
                    json!({ "keyId": key_id, "operation": op, "value": value }),
                )
                .await
        }
    };
    let balance = verify_n(&c, 0, &key, 100, 5).await;
    let balance = verify_n(&c, 1, &key, balance, 5).await;
    update(0, "increment", 10).await;
    let balance = verify_n(&c, 1, &key, balance + 10, 4).await;
    update(1, "decrement", 20).await;
    let balance = verify_n(&c, 0, &key, balance - 20, 3).await;
    let balance = verify_n(&c, 1, &key, balance, 3).await;
    assert_eq!(balance, 70);

    // Redis loses every balance: the reconciler writes off what it held, once.
    c.redis().expect("own redis").flushall().expect("flushall");
    let mut written_off = None;
    for _ in 0..100 {
        let (_, page) = c.nodes[0]
            .call(
                "keys.getCreditHistory",
                root,
                json!({ "keyId": key_id, "limit": 1 }),
            )
            .await;
        if page["data"][0]["kind"] == "write_off" {
            written_off = Some(page["data"][0].clone());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written_off = written_off.expect("a write_off entry within 10 s of the FLUSHALL");
    let after_loss = int(&written_off, "balanceAfter");
    assert!(after_loss < 70, "Redis held credits: {written_off}");
    let now = verify_n(&c, 0, &key, after_loss, 2).await;
    let now = verify_n(&c, 1, &key, now, 2).await;

    let entries = history(&c, 0, &key_id, 2).await;
    assert_eq!(
        entries,
        history(&c, 1, &key_id, 100).await,
        "both nodes read the same"
    );
    let kinds: Vec<&str> = entries
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        ["create", "increment", "decrement", "write_off"],
        "{entries:#?}"
    );
    let exact = |e: &Value| {
        (
            e["balanceBefore"].as_i64(),
            int(e, "balanceAfter"),
            e["exact"].clone(),
        )
    };
    assert_eq!(exact(&entries[0]), (None, 100, json!(true)));
    assert_eq!(exact(&entries[1]), (Some(90), 100, json!(true)));
    assert_eq!(exact(&entries[2]), (Some(96), 76, json!(true)));
    // The replay ends at the balance every node reports.
    assert_eq!(int(&entries[3], "balanceAfter") - 4, now);
    for remaining in c.remaining_on_every_node(&key_id).await {
        assert_eq!(remaining, u64::try_from(now).ok());
    }
    c.destroy().await.expect("destroy");
}
