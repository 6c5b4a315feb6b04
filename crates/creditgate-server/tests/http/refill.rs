//! Daily and monthly refills, driven by a manual clock: once per period, on the first
//! verification of the period, to `amount` when the balance is below it.

use std::sync::Arc;

use creditgate_domain::ManualClock;
use serde_json::json;

use crate::support::{assert_verdict, TestApp};

// UTC instants in Unix ms (checked with Python's calendar.timegm).
const MAR_10_1200: i64 = 1_741_608_000_000; // 2025-03-10 12:00:00
const MAR_11_0000_01: i64 = 1_741_651_201_000; // 2025-03-11 00:00:01
const MAR_11_2359_59: i64 = 1_741_737_599_000; // 2025-03-11 23:59:59
const MAR_12_0000: i64 = 1_741_737_600_000; // 2025-03-12 00:00:00
const JUN_01_1000: i64 = 1_748_772_000_000; // 2025-06-01 10:00:00
const JUN_29_2359_59: i64 = 1_751_241_599_000; // 2025-06-29 23:59:59
const JUN_30_0000_01: i64 = 1_751_241_601_000; // 2025-06-30 00:00:01
const JUL_01_0800: i64 = 1_751_356_800_000; // 2025-07-01 08:00:00
const JUL_30_2300: i64 = 1_753_916_400_000; // 2025-07-30 23:00:00
const JUL_31_0000: i64 = 1_753_920_000_000; // 2025-07-31 00:00:00
const SECOND: i64 = 1_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daily_refill_once_per_utc_day() {
    let clock = Arc::new(ManualClock::new(MAR_10_1200));
    let mut app = TestApp::start_with_clock(clock.clone()).await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key(
            &api,
            json!({ "remaining": 2, "refill": { "interval": "daily", "amount": 10 } }),
        )
        .await;
    // A balance above the amount is not cut down by a refill.
    let (rich_id, rich) = app
        .create_key(
            &api,
            json!({ "remaining": 50, "refill": { "interval": "daily", "amount": 10 } }),
        )
        .await;

    assert_verdict(&app.verify(&key, None).await, "VALID", Some(1));
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(0));
    assert_verdict(&app.verify(&key, None).await, "USAGE_EXCEEDED", Some(0));
    // Still the day of creation.
    clock.set(MAR_11_0000_01 - 2 * SECOND);
    assert_verdict(&app.verify(&key, None).await, "USAGE_EXCEEDED", Some(0));

    clock.set(MAR_11_0000_01);
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(9));
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(8));
    assert_eq!(app.balance(&key_id).await, Some(8));
    assert_verdict(&app.verify(&rich, None).await, "VALID", Some(49));
    assert_eq!(app.balance(&rich_id).await, Some(49));

    // A restart within the same day must not refill again.
    app.restart().await;
    assert_eq!(app.balance(&key_id).await, Some(8));
    clock.set(MAR_11_2359_59);
    assert_verdict(&app.verify(&key, Some(8)).await, "VALID", Some(0));
    assert_verdict(&app.verify(&key, None).await, "USAGE_EXCEEDED", Some(0));

    clock.set(MAR_12_0000);
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(9));
    assert_eq!(app.balance(&key_id).await, Some(9));
    // Several days later: one refill, not one per missed day.
    clock.set(MAR_12_0000 + 5 * 86_400_000);
    assert_verdict(&app.verify(&key, Some(0)).await, "VALID", Some(10));
    assert_eq!(app.balance(&key_id).await, Some(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monthly_refill_day_31_falls_on_the_30th_in_june() {
    let clock = Arc::new(ManualClock::new(JUN_01_1000));
    let app = TestApp::start_with_clock(clock.clone()).await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key(
            &api,
            json!({ "remaining": 1,
                "refill": { "interval": "monthly", "amount": 50, "refillDay": 31 } }),
        )
        .await;
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(0));

    clock.set(JUN_29_2359_59);
    assert_verdict(&app.verify(&key, None).await, "USAGE_EXCEEDED", Some(0));

    clock.set(JUN_30_0000_01);
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(49));
    assert_eq!(app.balance(&key_id).await, Some(49));

    // July 1st is not a refill day for refillDay 31.
    clock.set(JUL_01_0800);
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(48));
    clock.set(JUL_30_2300);
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(47));

    clock.set(JUL_31_0000);
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(49));
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(48));
    assert_eq!(
        app.get_key(&key_id).await["credits"],
        json!({ "remaining": 48,
            "refill": { "interval": "monthly", "amount": 50, "refillDay": 31 } })
    );
}

/// A due refill is part of the balance a client reads, before any verification.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_show_a_due_refill_before_the_first_verification() {
    let clock = Arc::new(ManualClock::new(MAR_10_1200));
    let app = TestApp::start_with_clock(clock.clone()).await;
    let api = app.create_api().await;
    let (key_id, key) = app
        .create_key(
            &api,
            json!({ "remaining": 1, "refill": { "interval": "daily", "amount": 10 } }),
        )
        .await;
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(0));
    clock.set(MAR_11_0000_01);
    // The next verification will answer VALID with 9 left: the balance is 10 now.
    assert_eq!(
        app.balance(&key_id).await,
        Some(10),
        "getKey after midnight"
    );
    let me = app.ok("/v2/keys.whoami", json!({ "key": key })).await;
    assert_eq!(
        me["credits"]["remaining"], 10,
        "whoami after midnight: {me}"
    );
    assert_verdict(&app.verify(&key, None).await, "VALID", Some(9));
    assert_eq!(app.balance(&key_id).await, Some(9));
}
