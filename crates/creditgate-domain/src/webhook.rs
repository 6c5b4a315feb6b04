//! Webhook endpoints: where a workspace wants to hear of its customers' balances (low,
//! exhausted, refilled) and of expired holds. The URL's safety checks live in the
//! service (they need a URL parser); this module holds the records and the names.

use crate::WorkspaceId;

/// An event an endpoint can subscribe to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WebhookEvent {
    /// A spend took a balance from at or above one of its thresholds to below it.
    CreditsLow,
    /// A balance reached 0, or a spend was refused for the first time since a top-up.
    CreditsExhausted,
    /// A refill, increment or set lifted a balance over a threshold again.
    CreditsRefilled,
    /// A hold expired unsettled.
    HoldExpired,
}

impl WebhookEvent {
    pub const ALL: [WebhookEvent; 4] = [
        WebhookEvent::CreditsLow,
        WebhookEvent::CreditsExhausted,
        WebhookEvent::CreditsRefilled,
        WebhookEvent::HoldExpired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WebhookEvent::CreditsLow => "credits.low",
            WebhookEvent::CreditsExhausted => "credits.exhausted",
            WebhookEvent::CreditsRefilled => "credits.refilled",
            WebhookEvent::HoldExpired => "hold.expired",
        }
    }

    pub fn parse(s: &str) -> Option<WebhookEvent> {
        WebhookEvent::ALL.into_iter().find(|e| e.as_str() == s)
    }
}

/// A workspace's webhook endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookEndpoint {
    /// `whe_…`.
    pub id: String,
    pub workspace_id: WorkspaceId,
    pub url: String,
    /// Distinct, in [`WebhookEvent::ALL`] order.
    pub events: Vec<WebhookEvent>,
    pub description: Option<String>,
    /// The signing secret, `whsec_<base64 of 24 random bytes>` as the Standard Webhooks
    /// scheme has it. Kept in clear (signing needs it); shown to the caller once.
    pub secret: String,
    pub created_at: i64,
}

/// One event's delivery to one endpoint, as `webhooks.listDeliveries` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookDelivery {
    /// The event's id: the `webhook-id` of every attempt.
    pub event_id: String,
    pub event_type: String,
    /// `pending`, `delivered` or `failed` (given up after the retry window).
    pub state: String,
    /// When the next attempt is due (pending) or the last one was made.
    pub next_attempt_at: i64,
    pub last_status: Option<u16>,
    pub last_error: Option<String>,
    pub delivered_at: Option<i64>,
    pub created_at: i64,
    pub attempts: Vec<WebhookAttempt>,
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookAttempt {
    /// 1, 2, …
    pub attempt: u64,
    pub at: i64,
    /// The receiver's status; `None` when no answer came (`error` says why).
    pub status: Option<u16>,
    pub latency_ms: u64,
    pub error: Option<String>,
    /// When the next attempt was scheduled; `None` after the last.
    pub next_retry_at: Option<i64>,
}

/// A new signing secret: `whsec_` and the base64 of 24 random bytes.
pub fn new_webhook_secret() -> String {
    use base64::Engine as _;
    let bytes: [u8; 24] = rand::random();
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_parse_back() {
        for e in WebhookEvent::ALL {
            assert_eq!(WebhookEvent::parse(e.as_str()), Some(e));
        }
        assert_eq!(WebhookEvent::parse("credits.Low"), None);
    }

    #[test]
    fn secrets_are_24_random_bytes_in_base64() {
        use base64::Engine as _;
        let a = new_webhook_secret();
        let b = new_webhook_secret();
        assert_ne!(a, b);
        let body = a.strip_prefix("whsec_").expect("prefix");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(body)
            .expect("base64");
        assert_eq!(bytes.len(), 24);
    }
}
