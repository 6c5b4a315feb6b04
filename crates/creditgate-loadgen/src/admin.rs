//! Setting up and tearing down a run through the public API: APIs and keys.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

/// Bound on one admin call.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Bodies quoted in errors are cut to this many bytes.
const BODY_EXCERPT_BYTES: usize = 2048;

/// Admin calls with a root key against one node.
#[derive(Debug, Clone)]
pub struct Admin {
    pub base_url: String,
    pub root_key: String,
    client: reqwest::Client,
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("request to {route} failed: {message}")]
    Transport { route: String, message: String },
    #[error("{route} answered HTTP {status}: {body}")]
    Status {
        route: String,
        status: u16,
        body: String,
    },
    /// HTTP 200, but not the answer the route promises.
    #[error("{route} answered HTTP 200 with an unexpected body ({message}): {body}")]
    BadBody {
        route: String,
        message: String,
        body: String,
    },
}

#[derive(Deserialize)]
struct Envelope<T> {
    data: T,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatedApi {
    api_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreatedKey {
    key_id: String,
    key: String,
}

#[derive(Deserialize)]
struct KeyData {
    #[serde(default)]
    credits: Option<KeyCredits>,
}

#[derive(Deserialize)]
struct KeyCredits {
    /// `null`: unlimited.
    remaining: Option<u64>,
}

impl Admin {
    pub fn new(base_url: &str, root_key: &str) -> Self {
        let client = reqwest::Client::builder()
            .timeout(ADMIN_TIMEOUT)
            .build()
            .unwrap_or_default();
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            root_key: root_key.to_owned(),
            client,
        }
    }

    /// Creates an API; returns its id.
    pub async fn create_api(&self, name: &str) -> Result<String, AdminError> {
        let created: CreatedApi = self.call("apis.createApi", json!({ "name": name })).await?;
        Ok(created.api_id)
    }

    /// Creates a key with `credits` (`None`: unlimited); returns (key id, secret).
    pub async fn create_key(
        &self,
        api_id: &str,
        credits: Option<u64>,
    ) -> Result<(String, String), AdminError> {
        let mut body = json!({ "apiId": api_id });
        if let Some(remaining) = credits {
            body["credits"] = json!({ "remaining": remaining });
        }
        let created: CreatedKey = self.call("keys.createKey", body).await?;
        Ok((created.key_id, created.key))
    }

    /// `keys.getKey` → `credits.remaining` (`None`: unlimited).
    pub async fn remaining(&self, key_id: &str) -> Result<Option<u64>, AdminError> {
        let key: KeyData = self.call("keys.getKey", json!({ "keyId": key_id })).await?;
        Ok(key.credits.and_then(|c| c.remaining))
    }

    pub async fn delete_api(&self, api_id: &str) -> Result<(), AdminError> {
        let _: Value = self
            .call("apis.deleteApi", json!({ "apiId": api_id }))
            .await?;
        Ok(())
    }

    /// `POST /v2/<route>` with the root key; the `data` of a 200 answer.
    async fn call<T: DeserializeOwned>(&self, route: &str, body: Value) -> Result<T, AdminError> {
        let transport = |e: reqwest::Error| AdminError::Transport {
            route: route.to_owned(),
            message: e.to_string(),
        };
        let answer = self
            .client
            .post(format!("{}/v2/{route}", self.base_url))
            .bearer_auth(&self.root_key)
            .json(&body)
            .send()
            .await
            .map_err(transport)?;
        let status = answer.status().as_u16();
        let bytes = answer.bytes().await.map_err(transport)?;
        if status != 200 {
            return Err(AdminError::Status {
                route: route.to_owned(),
                status,
                body: excerpt(&bytes),
            });
        }
        serde_json::from_slice::<Envelope<T>>(&bytes)
            .map(|e| e.data)
            .map_err(|e| AdminError::BadBody {
                route: route.to_owned(),
                message: e.to_string(),
                body: excerpt(&bytes),
            })
    }
}

/// The start of a body, for messages.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    if text.len() <= BODY_EXCERPT_BYTES {
        return text.into_owned();
    }
    let mut end = BODY_EXCERPT_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}
