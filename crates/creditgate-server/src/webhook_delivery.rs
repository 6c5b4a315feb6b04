//! The webhook delivery worker, one per node: every 250 ms, and at once whenever a
//! delivery in flight finishes (so a backlog drains as fast as endpoints answer), it
//! claims due deliveries
//! from the SQL outbox (a 60 s lease, so no other node sends them meanwhile), posts
//! each one signed as the Standard Webhooks scheme has it (`webhook-id`,
//! `webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of
//! "<id>.<timestamp>.<body>">`), and records the attempt. A 2xx delivers; anything else
//! (another status, a timeout after 10 s, a refused connection) is retried with
//! exponential backoff and jitter (`--webhook-first-retry-ms`, 5 s by default, doubling
//! to 1 h) for 25 h, then given up. At most
//! 4 deliveries per endpoint and 64 in all are in flight, so a slow or dead endpoint
//! holds only its own slots; verifications never wait on any of this.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use creditgate_domain::Clock;
use creditgate_service::private_ip;
use creditgate_sql::{AttemptOutcome, DueDelivery, SqlStore};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const POLL: Duration = Duration::from_millis(250);
const LEASE_MS: i64 = 60_000;
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const PER_ENDPOINT: usize = 4;
const MAX_IN_FLIGHT: usize = 64;
const MAX_RETRY_MS: i64 = 3_600_000;
/// Retries stop this long after the event: at least the 24 h promised.
pub const RETRY_WINDOW_MS: i64 = 25 * 3_600_000;

pub struct DeliveryWorker {
    sql: SqlStore,
    clock: Arc<dyn Clock>,
    client: reqwest::Client,
    allow_private: bool,
    /// Deliveries in flight per endpoint.
    in_flight: Mutex<BTreeMap<String, usize>>,
    /// Woken when a delivery finishes: its slot is free.
    finished: tokio::sync::Notify,
    /// The wait before the first retry (ms).
    first_retry_ms: i64,
}

impl DeliveryWorker {
    pub fn new(
        sql: SqlStore,
        clock: Arc<dyn Clock>,
        allow_private: bool,
        first_retry_ms: u64,
    ) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            // A redirect could lead anywhere, private hosts included: not followed.
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()?;
        Ok(Self {
            sql,
            clock,
            client,
            allow_private,
            in_flight: Mutex::new(BTreeMap::new()),
            finished: tokio::sync::Notify::new(),
            first_retry_ms: i64::try_from(first_retry_ms).unwrap_or(i64::MAX),
        })
    }

    /// Claims and sends due deliveries until `stop` resolves.
    pub async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        let mut tasks = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                () = &mut stop => break,
                () = tokio::time::sleep(POLL) => {}
                () = self.finished.notified() => {}
            }
            while tasks.try_join_next().is_some() {}
            let in_flight = self.lock().clone();
            let total: usize = in_flight.values().sum();
            let room = MAX_IN_FLIGHT.saturating_sub(total);
            if room == 0 {
                continue;
            }
            let now = self.clock.now_ms();
            let claimed = match self
                .sql
                .claim_deliveries(now, LEASE_MS, room, &in_flight, PER_ENDPOINT)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "claiming webhook deliveries failed");
                    continue;
                }
            };
            for d in claimed {
                *self.lock().entry(d.endpoint_id.clone()).or_default() += 1;
                let worker = self.clone();
                tasks.spawn(async move {
                    let endpoint = d.endpoint_id.clone();
                    worker.deliver(d).await;
                    let mut map = worker.lock();
                    if let Some(n) = map.get_mut(&endpoint) {
                        *n -= 1;
                        if *n == 0 {
                            map.remove(&endpoint);
                        }
                    }
                    drop(map);
                    worker.finished.notify_one();
                });
            }
        }
        // Deliveries in flight are dropped, not awaited: their leases lapse and they are
        // sent again (at least once), so shutdown does not wait on a slow receiver.
        tasks.shutdown().await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, usize>> {
        self.in_flight.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One attempt of `d`, recorded.
    async fn deliver(&self, d: DueDelivery) {
        let started = Instant::now();
        let timestamp = self.clock.now_ms().div_euclid(1000);
        let result = self.post(&d, timestamp).await;
        let now = self.clock.now_ms();
        let (status, error) = match result {
            Ok(status) => (Some(status), None),
            Err(e) => (None, Some(e)),
        };
        let delivered = status.is_some_and(|s| (200..300).contains(&s));
        let attempt = d.attempts.saturating_add(1);
        let next_attempt_at = if delivered || now.saturating_sub(d.created_at) > RETRY_WINDOW_MS {
            None
        } else {
            Some(now.saturating_add(backoff_ms(self.first_retry_ms, attempt)))
        };
        let outcome = AttemptOutcome {
            status,
            latency_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            error: error.clone(),
            next_attempt_at,
        };
        metrics::counter!("creditgate_webhook_attempts_total",
            "result" => if delivered { "delivered" } else { "failed" })
        .increment(1);
        if !delivered {
            tracing::info!(event_id = %d.event_id, endpoint_id = %d.endpoint_id, attempt,
                status, error = error.as_deref().unwrap_or(""), "webhook attempt failed");
        }
        if let Err(e) = self.sql.finish_attempt(&d, &outcome, now).await {
            // The lease lapses and the delivery is sent again: at least once.
            tracing::warn!(event_id = %d.event_id, error = %e, "recording a webhook attempt failed");
        }
    }

    async fn post(&self, d: &DueDelivery, timestamp: i64) -> Result<u16, String> {
        let url = url::Url::parse(&d.url).map_err(|e| format!("invalid URL: {e}"))?;
        if !self.allow_private {
            // Checked again here, after DNS: a name may resolve to a private address.
            let host = url.host_str().unwrap_or_default().to_owned();
            let port = url.port_or_known_default().unwrap_or(443);
            let addrs = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| format!("resolving {host}: {e}"))?;
            for a in addrs {
                if private_ip(a.ip()) {
                    return Err(format!("{host} resolves to a private address; not sent"));
                }
            }
        }
        let signature = sign(&d.secret, &d.event_id, timestamp, &d.payload)
            .ok_or_else(|| "the endpoint's secret is not whsec_<base64>".to_owned())?;
        let response = self
            .client
            .post(url)
            .header("content-type", "application/json")
            .header("webhook-id", &d.event_id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(d.payload.clone())
            .send()
            .await
            .map_err(|e| error_chain(&e.without_url()))?;
        Ok(response.status().as_u16())
    }
}

/// `v1,<base64 HMAC-SHA256 of "<id>.<timestamp>.<body>">` keyed with the secret's
/// bytes (`whsec_<base64>`), as the Standard Webhooks scheme has it.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Option<String> {
    let engine = base64::engine::general_purpose::STANDARD;
    let key = engine.decode(secret.strip_prefix("whsec_")?).ok()?;
    let mut mac = Hmac::<Sha256>::new_from_slice(&key).ok()?;
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body.as_bytes());
    Some(format!("v1,{}", engine.encode(mac.finalize().into_bytes())))
}

/// The wait before attempt `attempt + 1`: `first_ms` doubling per attempt, at most 1 h,
/// ±25 %.
fn backoff_ms(first_ms: i64, attempt: u64) -> i64 {
    let doublings = u32::try_from(attempt.saturating_sub(1).min(20)).unwrap_or(20);
    let base = first_ms.saturating_mul(1i64 << doublings).min(MAX_RETRY_MS);
    let quarter = base / 4;
    base - quarter + rand::random_range(0..=2 * quarter)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_stops_growing_at_an_hour() {
        for (attempt, base) in [
            (1, 5_000),
            (2, 10_000),
            (3, 20_000),
            (12, 3_600_000),
            (40, 3_600_000),
        ] {
            for _ in 0..50 {
                let b = backoff_ms(5_000, attempt);
                assert!((base * 3 / 4..=base * 5 / 4).contains(&b), "{attempt}: {b}");
            }
        }
    }

    #[test]
    fn signatures_follow_the_standard_webhooks_example() {
        // The example of the Standard Webhooks specification.
        let sig = sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
        assert_eq!(sign("not-a-secret", "id", 1, "{}"), None);
    }
}
