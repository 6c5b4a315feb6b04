//! `keys.rerollKey` (a new secret for the same key: balance, limits and identity stay;
//! the old secret verifies through its grace period and not after) and
//! `keys.migrateKeys` (keys imported by the SHA-256 of their secret, which then
//! verify with their credits and limits; a hash already known fails alone).

use std::sync::Arc;

use creditgate_domain::ManualClock;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::support::{assert_bad_request, assert_error, assert_verdict, TestApp};

const T0: i64 = 1_700_000_000_000;

fn sha256(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Standard base64 with padding, as many exporters write SHA-256 hashes.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn key_count(app: &TestApp, api: &str) -> usize {
    app.ok("/v2/apis.listKeys", json!({ "apiId": api }))
        .await
        .as_array()
        .map_or(0, Vec::len)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rerolled_key_keeps_everything_but_its_secret() {
    let clock = Arc::new(ManualClock::new(T0));
    let app = TestApp::start_with_clock(clock.clone()).await;
    let api = app.create_api().await;
    let (key_id, old) = app
        .create_key_with(json!({
            "apiId": api, "prefix": "sk_live", "externalId": "acme",
            "credits": { "remaining": 10 },
            "ratelimits": [{ "name": "requests", "limit": 100, "duration": 60_000, "autoApply": true }],
        }))
        .await;
    assert_verdict(&app.verify(&old, None).await, "VALID", Some(9));
    let before = app.get_key(&key_id).await;

    let data = app
        .ok(
            "/v2/keys.rerollKey",
            json!({ "keyId": key_id, "expiration": 60_000 }),
        )
        .await;
    assert_eq!(data["keyId"], key_id.as_str());
    let new = data["key"].as_str().expect("key").to_owned();
    assert!(new.starts_with("sk_live_") && new != old, "{new}");
    let after = app.get_key(&key_id).await;
    assert_eq!(after["start"], new[..12].to_owned(), "{after}");
    for field in ["credits", "identity", "ratelimits", "createdAt", "enabled"] {
        assert_eq!(after[field], before[field], "{field} stays: {after}");
    }

    // One balance, either secret during the grace period.
    let d = app.verify(&new, None).await;
    assert_verdict(&d, "VALID", Some(8));
    assert_eq!(d["keyId"], key_id.as_str());
    assert_eq!(d["identity"]["externalId"], "acme");
    assert_eq!(
        d["ratelimits"][0]["remaining"], 98,
        "the same counters: {d}"
    );
    assert_verdict(&app.verify(&old, None).await, "VALID", Some(7));
    clock.set(T0 + 60_000);
    assert_verdict(&app.verify(&old, None).await, "NOT_FOUND", None);
    assert_verdict(&app.verify(&new, None).await, "VALID", Some(6));

    // expiration 0: the secret before stops at once.
    let newest = app
        .ok(
            "/v2/keys.rerollKey",
            json!({ "keyId": key_id, "expiration": 0 }),
        )
        .await["key"]
        .as_str()
        .expect("key")
        .to_owned();
    assert_verdict(&app.verify(&new, None).await, "NOT_FOUND", None);
    assert_verdict(&app.verify(&newest, None).await, "VALID", Some(5));
    let (status, body) = app.post("/v2/keys.whoami", json!({ "key": newest })).await;
    assert_eq!((status, &body["data"]["keyId"]), (200, &json!(key_id)));

    // Bad input and unknown keys change nothing.
    for (body, location) in [
        (
            json!({ "keyId": key_id, "expiration": -1 }),
            "body.expiration",
        ),
        (
            json!({ "keyId": key_id, "expiration": 31_536_000_001_i64 }),
            "body.expiration",
        ),
        (json!({ "keyId": "", "expiration": 0 }), "body.keyId"),
    ] {
        let (status, resp) = app.post("/v2/keys.rerollKey", body).await;
        assert_bad_request(status, &resp, location);
    }
    let (status, resp) = app
        .post(
            "/v2/keys.rerollKey",
            json!({ "keyId": "key_missing", "expiration": 0 }),
        )
        .await;
    assert_error(status, &resp, 404, "key_not_found");
    let verifier = app
        .root_key(creditgate_server::DEFAULT_WORKSPACE, &["api.*.verify_key"])
        .await;
    let (status, resp) = app
        .post_as(
            Some(&verifier),
            "/v2/keys.rerollKey",
            json!({ "keyId": key_id, "expiration": 0 }),
        )
        .await;
    assert_error(status, &resp, 403, "/insufficient_permissions");
    assert_verdict(&app.verify(&newest, None).await, "VALID", Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrated_keys_verify_with_their_old_secrets() {
    let app = TestApp::start().await;
    let api = app.create_api().await;
    let hex_hash = hex::encode(sha256("legacy_one"));
    let b64_hash = base64(&sha256("legacy_two"));
    assert_eq!(b64_hash.len(), 44);
    let data = app
        .ok(
            "/v2/keys.migrateKeys",
            json!({ "migrationId": "from-legacy", "apiId": api, "keys": [
                { "hash": hex_hash, "name": "one", "externalId": "acme",
                  "credits": { "remaining": 3 } },
                { "hash": b64_hash, "enabled": true,
                  "ratelimits": [{ "name": "requests", "limit": 1, "duration": 60_000, "autoApply": true }] },
            ] }),
        )
        .await;
    let migrated = data["migrated"].as_array().expect("migrated");
    assert_eq!(migrated.len(), 2, "{data}");
    assert_eq!(data["failed"], json!([]));
    assert_eq!(migrated[0]["hash"], hex_hash.as_str());
    assert_eq!(migrated[1]["hash"], b64_hash.as_str());
    let one_id = migrated[0]["keyId"].as_str().expect("keyId").to_owned();

    let d = app.verify("legacy_one", None).await;
    assert_verdict(&d, "VALID", Some(2));
    assert_eq!(d["keyId"], one_id.as_str());
    assert_eq!(d["name"], "one");
    assert_eq!(d["identity"]["externalId"], "acme");
    assert_verdict(&app.verify("legacy_two", None).await, "VALID", None);
    assert_verdict(&app.verify("legacy_two", None).await, "RATE_LIMITED", None);
    let got = app.get_key(&one_id).await;
    assert_eq!(got["start"], "", "the secret is not known: {got}");

    // Known hashes fail alone (in either encoding, or twice in one call).
    let three = hex::encode(sha256("legacy_three"));
    let data = app
        .ok(
            "/v2/keys.migrateKeys",
            json!({ "migrationId": "again", "apiId": api, "keys": [
                { "hash": hex_hash.to_uppercase() },
                { "hash": three },
                { "hash": three },
            ] }),
        )
        .await;
    assert_eq!(
        data["failed"],
        json!([hex_hash.to_uppercase(), three.clone()])
    );
    assert_eq!(data["migrated"].as_array().map(Vec::len), Some(1), "{data}");
    assert_verdict(&app.verify("legacy_one", None).await, "VALID", Some(1));
    assert_eq!(key_count(&app, &api).await, 3);

    // Bad input anywhere: a 400 naming the key's field, and no key is created.
    let four = hex::encode(sha256("legacy_four"));
    let bad: Vec<(Value, &str)> = vec![
        (
            json!([{ "hash": four }, { "hash": "abc" }]),
            "body.keys[1].hash",
        ),
        (json!([{ "hash": four, "name": "" }]), "body.keys[0].name"),
        (
            json!([{ "hash": four, "credits": { "remaining": -1 } }]),
            "body.keys[0].credits.remaining",
        ),
        (
            json!([{ "hash": four, "ratelimits": [{ "name": "r", "limit": 0, "duration": 1000 }] }]),
            "body.keys[0].ratelimits[0].limit",
        ),
        (json!([]), "body.keys"),
    ];
    for (keys, location) in bad {
        let (status, resp) = app
            .post(
                "/v2/keys.migrateKeys",
                json!({ "migrationId": "bad", "apiId": api, "keys": keys }),
            )
            .await;
        assert_bad_request(status, &resp, location);
    }
    let (status, resp) = app
        .post(
            "/v2/keys.migrateKeys",
            json!({ "migrationId": "", "apiId": api, "keys": [{ "hash": four }] }),
        )
        .await;
    assert_bad_request(status, &resp, "body.migrationId");
    assert_eq!(key_count(&app, &api).await, 3);
    assert_verdict(&app.verify("legacy_four", None).await, "NOT_FOUND", None);
}
