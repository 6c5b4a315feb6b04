//! [`Node`]: one creditgate node of a test, in this process or a child process
//! ([`NodeProcess`]), with the HTTP calls tests make. A process node's stdout and stderr
//! are printed when a test panics while it is alive.

use std::path::Path;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use creditgate_local::{NodeOptions, NodeProcess};
use creditgate_server::{App, ServeConfig};
use serde_json::{json, Value};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Bound on one HTTP call of a test.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on an in-process node's graceful stop.
const IN_PROCESS_STOP_TIMEOUT: Duration = Duration::from_secs(20);

enum Running {
    InProcess {
        config: Box<ServeConfig>,
        stop: Option<oneshot::Sender<()>>,
        task: Option<JoinHandle<Result<()>>>,
    },
    Process(Arc<NodeProcess>),
}

/// One node.
pub struct Node {
    pub url: String,
    pub node_id: String,
    running: Running,
    client: reqwest::Client,
}

/// A node's URL and an HTTP client: cloneable, for calls from spawned tasks.
#[derive(Debug, Clone)]
pub struct Remote {
    pub url: String,
    client: reqwest::Client,
}

impl Remote {
    /// `POST /v2/<route>` with a bearer `root` key; returns (HTTP status, body).
    pub async fn call(&self, route: &str, root: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}/v2/{route}", self.url))
            .bearer_auth(root)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{route} on {}: {e}", self.url));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_else(|e| panic!("{route}: {e}"));
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{route}: {status} body is not JSON ({e}): {text}"));
        (status, value)
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .build()
        .unwrap_or_else(|e| panic!("building the HTTP client: {e}"))
}

impl Node {
    /// `App` on a listener on port 0 in this process; waits for liveness.
    pub async fn in_process(config: ServeConfig) -> Result<Node> {
        let node_id = config.node_id.clone().unwrap_or_default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding 127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = App::build(config.clone(), node_id.clone())
            .await
            .context("building the node")?;
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(app.serve(listener, async move {
            let _ = stopped.await;
        }));
        let node = Node {
            url,
            node_id,
            running: Running::InProcess {
                config: Box::new(config),
                stop: Some(stop),
                task: Some(task),
            },
            client: client(),
        };
        node.wait_live().await?;
        Ok(node)
    }

    /// A `creditgate serve` child process (see [`NodeProcess::start`]).
    pub async fn process(options: NodeOptions) -> Result<Node> {
        let node_id = options.node_id.clone().unwrap_or_default();
        let process = tokio::task::spawn_blocking(move || NodeProcess::start(options))
            .await
            .context("the node start task failed")??;
        Ok(Node {
            url: process.url(),
            node_id,
            running: Running::Process(Arc::new(process)),
            client: client(),
        })
    }

    /// A process node on the embedded default in `data_dir` (panics with the log when it
    /// does not start).
    pub async fn embedded(binary: &str, data_dir: &Path, root_key: Option<&str>) -> Node {
        Self::embedded_with(binary, data_dir, root_key, Vec::new()).await
    }

    /// [`Node::embedded`] with extra `serve` arguments.
    pub async fn embedded_with(
        binary: &str,
        data_dir: &Path,
        root_key: Option<&str>,
        args: Vec<String>,
    ) -> Node {
        let mut options = NodeOptions::new(binary, data_dir);
        options.root_key = root_key.map(str::to_owned);
        options.args = args;
        Self::process(options)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"))
    }

    async fn wait_live(&self) -> Result<()> {
        let deadline = tokio::time::Instant::now() + creditgate_local::NODE_START_TIMEOUT;
        loop {
            let probe = self
                .client
                .get(format!("{}/v2/liveness", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if probe.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            anyhow::ensure!(
                tokio::time::Instant::now() < deadline,
                "no liveness at {} within {:?}",
                self.url,
                creditgate_local::NODE_START_TIMEOUT
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The child process (process nodes only).
    pub fn child(&self) -> Option<&NodeProcess> {
        match &self.running {
            Running::Process(p) => Some(p),
            Running::InProcess { .. } => None,
        }
    }

    /// The node's data directory (its SQLite files on the embedded default).
    pub fn data_dir(&self) -> &Path {
        match &self.running {
            Running::Process(p) => p.data_dir(),
            Running::InProcess { config, .. } => &config.data_dir,
        }
    }

    /// Starts a node like this one (same configuration, a new port). Stop this one first.
    pub(crate) async fn start_again(&self) -> Result<Node> {
        match &self.running {
            Running::Process(p) => Node::process(p.options().clone()).await,
            Running::InProcess { config, .. } => Node::in_process((**config).clone()).await,
        }
    }

    /// Everything a process node wrote to stdout (empty for in-process nodes).
    pub fn stdout(&self) -> String {
        self.child().map(NodeProcess::stdout).unwrap_or_default()
    }

    /// Everything a process node wrote to stderr, its log (empty for in-process nodes).
    pub fn stderr(&self) -> String {
        self.child().map(NodeProcess::stderr).unwrap_or_default()
    }

    /// Graceful stop, bounded: SIGTERM for a process node (its exit status), the shutdown
    /// future for an in-process one (`None`).
    pub async fn stop(&mut self, bound: Duration) -> Result<Option<ExitStatus>> {
        match &mut self.running {
            Running::Process(p) => {
                if p.pid().is_none() {
                    return Ok(None);
                }
                let p = p.clone();
                let status = tokio::task::spawn_blocking(move || p.sigterm(bound))
                    .await
                    .context("the stop task failed")??;
                Ok(Some(status))
            }
            Running::InProcess { stop, task, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(task) = task.take() {
                    tokio::time::timeout(bound.min(IN_PROCESS_STOP_TIMEOUT), task)
                        .await
                        .with_context(|| {
                            format!("node {} did not stop within {bound:?}", self.url)
                        })?
                        .context("the node task failed")??;
                }
                Ok(None)
            }
        }
    }

    /// SIGTERM and the exit status; panics when the node does not exit within `bound`.
    pub async fn sigterm(&mut self, bound: Duration) -> ExitStatus {
        match self.stop(bound).await {
            Ok(Some(status)) => status,
            Ok(None) => panic!("sigterm needs a running process node"),
            Err(e) => panic!("{e:#}"),
        }
    }

    /// `kill -9` of a process node (panics for in-process nodes).
    pub async fn kill9(&self) {
        let p = match &self.running {
            Running::Process(p) => p.clone(),
            Running::InProcess { .. } => panic!("kill -9 needs a process node"),
        };
        tokio::task::spawn_blocking(move || p.kill9())
            .await
            .expect("the kill task failed")
            .unwrap_or_else(|e| panic!("kill -9: {e:#}"));
    }

    /// `POST /v2/<route>` with a bearer `root` key; returns (HTTP status, body).
    pub async fn call(&self, route: &str, root: &str, body: Value) -> (u16, Value) {
        self.remote().call(route, root, body).await
    }

    /// A cheap handle for calls from spawned tasks (the node itself stays here).
    pub fn remote(&self) -> Remote {
        Remote {
            url: self.url.clone(),
            client: self.client.clone(),
        }
    }

    /// `call` that must answer 200; returns `data`.
    pub async fn ok(&self, route: &str, root: &str, body: Value) -> Value {
        let (status, v) = self.call(route, root, body).await;
        assert_eq!(status, 200, "{route} on {}: {v}", self.url);
        v["data"].clone()
    }

    pub async fn create_api(&self, root: &str, name: &str) -> String {
        let d = self
            .ok("apis.createApi", root, json!({ "name": name }))
            .await;
        d["apiId"].as_str().expect("apiId").to_owned()
    }

    /// Creates a key with `credits` remaining; returns (keyId, key).
    pub async fn create_key(&self, root: &str, api_id: &str, credits: u64) -> (String, String) {
        let d = self
            .ok(
                "keys.createKey",
                root,
                json!({ "apiId": api_id, "credits": { "remaining": credits } }),
            )
            .await;
        (
            d["keyId"].as_str().expect("keyId").to_owned(),
            d["key"].as_str().expect("key").to_owned(),
        )
    }

    /// `keys.verifyKey` with `credits.cost = cost`; returns `data`.
    pub async fn verify(&self, root: &str, key: &str, cost: u64) -> Value {
        self.ok(
            "keys.verifyKey",
            root,
            json!({ "key": key, "credits": { "cost": cost } }),
        )
        .await
    }

    /// `keys.getKey` → `credits.remaining`.
    pub async fn remaining(&self, root: &str, key_id: &str) -> Option<u64> {
        let d = self
            .ok("keys.getKey", root, json!({ "keyId": key_id }))
            .await;
        d["credits"]["remaining"].as_u64()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        match &mut self.running {
            Running::InProcess { stop, task, .. } => {
                if let Some(stop) = stop.take() {
                    let _ = stop.send(());
                }
                if let Some(task) = task.take() {
                    task.abort();
                }
            }
            Running::Process(p) => {
                if std::thread::panicking() {
                    eprintln!(
                        "--- node {} (data dir {}) stdout ---\n{}\n--- stderr ---\n{}",
                        self.url,
                        p.data_dir().display(),
                        p.stdout(),
                        p.stderr()
                    );
                }
                // The process is killed when the last handle drops.
            }
        }
    }
}

/// The credits the engine logged as written off (`lost=<n>` on a "hot store lost its
/// data" line, pretty or JSON logs) across `logs`.
pub fn reported_lost(logs: &str) -> u64 {
    logs.lines()
        .filter(|l| l.contains("hot store lost its data"))
        .filter_map(|l| {
            let i = l
                .find("lost=")
                .map(|i| i + 5)
                .or_else(|| l.find("\"lost\":").map(|i| i + 7))?;
            l[i..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect::<String>()
                .parse::<u64>()
                .ok()
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_lost_sums_pretty_and_json_lines() {
        let logs = "ERROR hot store lost its data key_id=k1 lost=12\n\
                    INFO something else lost=99\n\
                    {\"fields\":{\"message\":\"hot store lost its data\",\"lost\":3}}\n";
        assert_eq!(reported_lost(logs), 15);
    }
}
