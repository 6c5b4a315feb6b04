//! Per-request context: the request id (`req_…`) every response carries in
//! `meta.requestId`, and the workspace the root key belongs to (for analytics). The
//! middleware opens the scope; handlers, extractors and errors read it.

use std::sync::{Arc, OnceLock};

use creditgate_domain::new_id;

tokio::task_local! {
    static CONTEXT: RequestContext;
}

/// What one request carries through its handler.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: RequestId,
    workspace: Arc<OnceLock<Arc<str>>>,
}

impl RequestContext {
    pub fn new() -> Self {
        Self {
            request_id: RequestId::new(),
            workspace: Arc::new(OnceLock::new()),
        }
    }

    /// Runs `f` with this context current.
    pub async fn scope<F: std::future::Future>(self, f: F) -> F::Output {
        CONTEXT.scope(self, f).await
    }

    pub fn workspace(&self) -> Option<&Arc<str>> {
        self.workspace.get()
    }

    /// Records the caller's workspace (first write wins).
    pub fn set_workspace(workspace: Arc<str>) {
        let _ = CONTEXT.try_with(|c| c.workspace.set(workspace));
    }
}

impl Default for RequestContext {
    fn default() -> Self {
        Self::new()
    }
}

/// A request id: `req_<base58>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub Arc<str>);

impl RequestId {
    pub fn new() -> Self {
        Self(new_id("req").into())
    }

    /// The current request's id (shared), or a fresh one outside a request.
    pub fn current() -> Arc<str> {
        CONTEXT
            .try_with(|c| c.request_id.0.clone())
            .unwrap_or_else(|_| new_id("req").into())
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}
