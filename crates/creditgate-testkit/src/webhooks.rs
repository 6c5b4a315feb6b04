//! A webhook receiver for tests: a real local HTTP server that records every request
//! and answers as the test scripts it (a status, or hanging), and a check of the
//! Standard Webhooks signature written out here (HMAC-SHA256 per RFC 2104 over
//! `"<webhook-id>.<webhook-timestamp>.<body>"`), independent of the server's code.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use base64::Engine as _;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: String,
    /// When it arrived.
    pub at: Instant,
}

impl Received {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).expect("a JSON body")
    }
}

/// What the receiver does with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    Status(u16),
    /// Never answers (the sender's timeout ends it).
    Hang,
}

type Script = dyn Fn(usize, Duration) -> Answer + Send + Sync;

/// A local HTTP receiver at `url` (path `/hook`).
pub struct Receiver {
    pub url: String,
    /// When it started: the script's `since_start` is a request's `at` less this.
    pub started: Instant,
    got: Arc<Mutex<Vec<Received>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Receiver {
    /// A receiver answering each request as `script(n, since_start)` says (`n`: how
    /// many requests came before this one).
    pub async fn start(script: impl Fn(usize, Duration) -> Answer + Send + Sync + 'static) -> Self {
        let script: Arc<Script> = Arc::new(script);
        let got = Arc::new(Mutex::new(Vec::new()));
        let started = Instant::now();
        let g = got.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: String| {
                let (g, script) = (g.clone(), script.clone());
                async move {
                    let h = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let at = Instant::now();
                    let n = {
                        let mut g = g.lock().expect("log");
                        g.push(Received {
                            id: h("webhook-id"),
                            timestamp: h("webhook-timestamp"),
                            signature: h("webhook-signature"),
                            body,
                            at,
                        });
                        g.len() - 1
                    };
                    match script(n, at.duration_since(started)) {
                        Answer::Status(s) => axum::http::StatusCode::from_u16(s).expect("a status"),
                        Answer::Hang => {
                            std::future::pending::<()>().await;
                            unreachable!("pending never resolves")
                        }
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a receiver");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver {
            url: format!("http://{addr}/hook"),
            started,
            got,
            server,
        }
    }

    /// A receiver answering the `statuses` in turn, then 200.
    pub async fn scripted(statuses: Vec<u16>) -> Self {
        Self::start(move |n, _| Answer::Status(statuses.get(n).copied().unwrap_or(200))).await
    }

    pub fn got(&self) -> Vec<Received> {
        self.got.lock().expect("log").clone()
    }

    /// Waits up to `within` until `n` requests came; panics with the count otherwise.
    pub async fn wait_for(&self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        loop {
            let got = self.got();
            if got.len() >= n {
                return got;
            }
            assert!(
                Instant::now() < deadline,
                "the receiver got {} requests in {within:?}, expected {n}",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// Checks `events` (the type and data of each distinct event) are what spending a key of
/// 1,000 credits with thresholds 500 and 100 to 0, one credit at a time, tells: one
/// `credits.low` per threshold and one `credits.exhausted`. The spend to 0 and the first
/// refusal after it race to record the exhaustion, so it may say either `refused`.
pub fn assert_spent_past_500_and_100_to_0(key_id: &str, mut events: Vec<(String, Value)>) {
    events.sort_by_key(|(t, d)| (t.clone(), d["threshold"].as_i64()));
    let refused = events
        .first()
        .and_then(|(_, d)| d["refused"].as_bool())
        .unwrap_or_else(|| panic!("no credits.exhausted first: {events:?}"));
    let want = vec![
        (
            "credits.exhausted".to_owned(),
            json!({ "keyId": key_id, "remaining": 0, "cost": 1, "refused": refused }),
        ),
        (
            "credits.low".to_owned(),
            json!({ "keyId": key_id, "threshold": 100, "remaining": 99, "cost": 1 }),
        ),
        (
            "credits.low".to_owned(),
            json!({ "keyId": key_id, "threshold": 500, "remaining": 499, "cost": 1 }),
        ),
    ];
    assert_eq!(events, want);
}

/// HMAC-SHA256 written out (RFC 2104), independent of the server's `hmac` crate.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.iter().map(|b| b ^ byte).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Whether `r` carries a valid Standard Webhooks signature for `secret` (`whsec_…`).
pub fn signed_by(r: &Received, secret: &str) -> bool {
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64
        .decode(secret.strip_prefix("whsec_").expect("whsec_"))
        .expect("base64 secret");
    let mac = hmac_sha256(
        &key,
        format!("{}.{}.{}", r.id, r.timestamp, r.body).as_bytes(),
    );
    let want = format!("v1,{}", b64.encode(mac));
    r.signature.split(' ').any(|s| s == want)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
