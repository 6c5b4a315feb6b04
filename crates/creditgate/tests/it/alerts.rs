//! Balance alerts on real processes: 3 nodes on Redis + Postgres, a key of 1,000 credits
//! with thresholds 500 and 100, 1,200 concurrent verifications spread over the nodes.
//! Exactly one `credits.low` per threshold and one `credits.exhausted` are sent, whichever
//! node made the crossing spend; the receiver answers 500 for its first 30 s, so each is
//! retried (every attempt recorded) until it answers 200, signed as Standard Webhooks
//! says (checked by the testkit's own HMAC), with one id per event.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use creditgate_testkit::webhooks::{
    assert_spent_past_500_and_100_to_0, signed_by, Answer, Receiver,
};
use creditgate_testkit::{Cluster, Provision};
use serde_json::{json, Value};

use crate::support::BIN;

const FAILING: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_send_one_event_per_crossing_through_30s_of_500s() {
    let receiver =
        Receiver::start(|_, since| Answer::Status(if since < FAILING { 500 } else { 200 })).await;
    let c = Cluster::builder()
        .nodes(3)
        .services(Provision::Own, Provision::Shared, Provision::Shared)
        .process_nodes(BIN)
        .node_args([
            "--webhook-allow-private",
            "--webhook-first-retry-ms",
            "1000",
        ])
        .start()
        .await
        .unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    let (root, n0) = (&c.root_key, &c.nodes[0]);
    let endpoint = n0
        .ok(
            "webhooks.createEndpoint",
            root,
            json!({
                "url": receiver.url,
                "events": ["credits.low", "credits.exhausted", "credits.refilled"]
            }),
        )
        .await;
    let secret = endpoint["secret"].as_str().expect("secret").to_owned();
    let endpoint_id = endpoint["endpointId"].as_str().expect("id").to_owned();
    let api = n0.create_api(root, "alerts").await;
    let created = n0
        .ok(
            "keys.createKey",
            root,
            json!({
                "apiId": api,
                "credits": { "remaining": 1000, "alerts": [{ "threshold": 500 }, { "threshold": 100 }] }
            }),
        )
        .await;
    let key_id = created["keyId"].as_str().expect("keyId").to_owned();
    let key = created["key"].as_str().expect("key").to_owned();

    // 1,200 verifications at once, request i on node i % 3.
    let mut tasks = Vec::new();
    for i in 0..1200usize {
        let node = c.nodes[i % 3].remote();
        let (root, key) = (root.clone(), key.clone());
        tasks.push(tokio::spawn(async move {
            let (status, body) = node
                .call("keys.verifyKey", &root, json!({ "key": key }))
                .await;
            assert_eq!(status, 200, "{body}");
            body["data"]["code"] == "VALID"
        }));
    }
    let mut valid = 0;
    for t in tasks {
        valid += u32::from(t.await.expect("task"));
    }
    assert_eq!(valid, 1000, "exactly the balance passes");

    // Every event is delivered once the receiver answers 200.
    let deadline = Instant::now() + FAILING + Duration::from_secs(60);
    let got = loop {
        let got = receiver.got();
        let delivered: BTreeSet<&str> = got
            .iter()
            // Answered 200: the receiver's script, from its start.
            .filter(|r| r.at.duration_since(receiver.started) >= FAILING)
            .map(|r| r.id.as_str())
            .collect();
        let ids: BTreeSet<&str> = got.iter().map(|r| r.id.as_str()).collect();
        if !ids.is_empty() && delivered == ids {
            break got;
        }
        assert!(
            Instant::now() < deadline,
            "delivered {delivered:?} of {ids:?} ({} requests)",
            got.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let got_after = receiver.got();
    assert_eq!(got_after.len(), got.len(), "nothing sent after a 200");

    // One id per event, the same body on every attempt of it, each signed.
    let mut by_id: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for r in &got {
        assert!(signed_by(r, &secret), "a valid signature: {r:?}");
        by_id.entry(r.id.clone()).or_default().push(r.body.clone());
    }
    let mut events: Vec<(String, Value)> = Vec::new();
    for (id, bodies) in &by_id {
        assert!(bodies.iter().all(|b| b == &bodies[0]), "{id}: {bodies:?}");
        assert!(bodies.len() >= 2, "{id} was refused at least once");
        let body: Value = serde_json::from_str(&bodies[0]).expect("JSON");
        events.push((
            body["type"].as_str().expect("type").to_owned(),
            body["data"].clone(),
        ));
    }
    assert_spent_past_500_and_100_to_0(&key_id, events);

    // Every attempt is recorded: 500s with a next retry, then the 200.
    let page = n0
        .ok(
            "webhooks.listDeliveries",
            root,
            json!({ "endpointId": endpoint_id }),
        )
        .await;
    let deliveries = page.as_array().expect("list");
    assert_eq!(deliveries.len(), 3, "{page}");
    for d in deliveries {
        assert_eq!(d["state"], "delivered", "{d}");
        let attempts = d["attempts"].as_array().expect("attempts");
        let id = d["eventId"].as_str().expect("eventId");
        assert_eq!(attempts.len(), by_id[id].len(), "{d}");
        let (last, failed) = attempts.split_last().expect("attempts");
        assert_eq!(last["status"], 200, "{d}");
        assert!(last.get("nextRetryAt").is_none(), "{d}");
        for a in failed {
            assert_eq!(a["status"], 500, "{d}");
            assert!(a["nextRetryAt"].as_i64().is_some(), "{d}");
        }
    }
    c.destroy().await.expect("destroy");
}
