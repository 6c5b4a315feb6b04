//! A `creditgate serve` child process on a free loopback port, with its stdout and stderr
//! captured to files (printed when a test fails), stopped by SIGTERM or SIGKILL, killed on
//! drop.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_creditgate");

/// How long a node may take to answer its liveness probe.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Options of one start.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// `CREDITGATE_ROOT_KEY`; `None`: the variable is not set.
    pub root_key: Option<String>,
    /// Extra `serve` arguments.
    pub args: Vec<String>,
}

/// One running (or stopped) node.
pub struct Node {
    child: Child,
    exited: Option<ExitStatus>,
    pub url: String,
    pub data_dir: PathBuf,
    logs: tempfile::TempDir,
    client: reqwest::Client,
}

/// A command for the binary with every inherited `CREDITGATE_*` variable removed, so the
/// environment of whoever runs the tests cannot change what they test.
pub fn command() -> Command {
    let mut cmd = Command::new(BIN);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("CREDITGATE_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("NO_COLOR", "1");
    cmd
}

/// The same as [`command`] for `tokio::process`.
pub fn tokio_command() -> tokio::process::Command {
    let mut cmd = tokio::process::Command::from(command());
    cmd.kill_on_drop(true);
    cmd
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("binding a free port");
    l.local_addr().expect("local addr").port()
}

impl Node {
    /// Starts a node on `data_dir` with `CREDITGATE_ROOT_KEY=root_key` (unset if `None`).
    pub async fn start(data_dir: &Path, root_key: Option<&str>) -> Node {
        Self::start_with(
            data_dir,
            NodeOptions {
                root_key: root_key.map(str::to_owned),
                args: Vec::new(),
            },
        )
        .await
    }

    /// Starts a node and waits (bounded) until `GET /v2/liveness` answers 200.
    pub async fn start_with(data_dir: &Path, opts: NodeOptions) -> Node {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(15))
            .build()
            .expect("http client");
        // A port picked free can be taken before the child binds it: retry a few times.
        for attempt in 1..=5 {
            let port = free_port();
            let logs = tempfile::tempdir().expect("log dir");
            let stdout = File::create(logs.path().join("stdout.log")).expect("stdout log");
            let stderr = File::create(logs.path().join("stderr.log")).expect("stderr log");
            let mut cmd = command();
            cmd.arg("serve")
                .arg("--listen")
                .arg(format!("127.0.0.1:{port}"))
                .arg("--data-dir")
                .arg(data_dir)
                .args(&opts.args)
                .stdin(Stdio::null())
                .stdout(stdout)
                .stderr(stderr);
            if let Some(root) = &opts.root_key {
                cmd.env("CREDITGATE_ROOT_KEY", root);
            }
            let child = cmd.spawn().expect("spawning creditgate serve");
            let mut node = Node {
                child,
                exited: None,
                url: format!("http://127.0.0.1:{port}"),
                data_dir: data_dir.to_owned(),
                logs,
                client: client.clone(),
            };
            match node.wait_live().await {
                Ok(()) => return node,
                Err(status) => {
                    let err = node.stderr();
                    if err.contains("binding") && attempt < 5 {
                        eprintln!("port {port} was taken ({status}), retrying");
                        continue;
                    }
                    panic!(
                        "creditgate serve did not start ({status})\n--- stdout ---\n{}\n--- stderr ---\n{err}",
                        node.stdout()
                    );
                }
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    async fn wait_live(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return Err(format!("exited early with {status}"));
            }
            let probe = self
                .client
                .get(format!("{}/v2/liveness", self.url))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if let Ok(r) = probe {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!("no liveness within {START_TIMEOUT:?}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the node wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stdout.log")).unwrap_or_default()
    }

    /// Everything the node wrote to stderr (its log) so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stderr.log")).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(sig)
            .arg(self.pid().to_string())
            .status()
            .expect("running kill");
        assert!(status.success(), "kill {sig} {} failed", self.pid());
    }

    /// Waits at most `bound` for the process to exit.
    pub async fn wait_exit(&mut self, bound: Duration) -> Option<ExitStatus> {
        if let Some(s) = self.exited {
            return Some(s);
        }
        let deadline = Instant::now() + bound;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                self.exited = Some(status);
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// `kill -TERM`, then waits at most `bound` for the exit. Panics (the node's logs are
    /// printed on drop) when it does not exit in time.
    pub async fn sigterm(&mut self, bound: Duration) -> ExitStatus {
        let started = Instant::now();
        self.signal("-TERM");
        match self.wait_exit(bound).await {
            Some(status) => {
                eprintln!(
                    "node {} exited with {status} {:?} after SIGTERM",
                    self.url,
                    started.elapsed()
                );
                status
            }
            None => panic!("node did not exit within {bound:?} of SIGTERM"),
        }
    }

    /// `kill -9` and reaps the process.
    pub async fn kill9(&mut self) {
        self.signal("-KILL");
        self.wait_exit(Duration::from_secs(10))
            .await
            .expect("a SIGKILLed process exits");
    }

    /// `POST /v2/<route>` with a bearer `root` key; returns (HTTP status, body).
    pub async fn call(&self, route: &str, root: &str, body: Value) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}/v2/{route}", self.url))
            .bearer_auth(root)
            .json(&body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{route}: {e}"));
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_else(|e| panic!("{route}: {e}"));
        let value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{route}: {status} body is not JSON ({e}): {text}"));
        (status, value)
    }

    /// `call` that must answer 200; returns `data`.
    pub async fn ok(&self, route: &str, root: &str, body: Value) -> Value {
        let (status, v) = self.call(route, root, body).await;
        assert_eq!(status, 200, "{route}: {v}");
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
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- node {} (data dir {}) stdout ---\n{}\n--- stderr ---\n{}",
                self.url,
                self.data_dir.display(),
                self.stdout(),
                self.stderr()
            );
        }
    }
}

/// The SQLite file of the embedded default in `data_dir`.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("creditgate.db")
}

/// `(remaining, hot_allocated)` of one key, read straight from the SQLite ledger.
pub async fn sql_key_balance(data_dir: &Path, key_id: &str) -> (Option<i64>, i64) {
    use sqlx::Row;
    let url = format!("sqlite:{}", db_path(data_dir).display());
    let store = creditgate_sql::SqlStore::connect(&url)
        .await
        .expect("opening the SQLite file");
    let row = sqlx::query("SELECT remaining, hot_allocated FROM keys WHERE id = ?")
        .bind(key_id)
        .fetch_one(store.pool())
        .await
        .expect("reading the key row");
    let out = (
        row.try_get::<Option<i64>, _>("remaining")
            .expect("remaining"),
        row.try_get::<i64, _>("hot_allocated")
            .expect("hot_allocated"),
    );
    store.close().await;
    out
}

/// One scalar count from the SQLite file.
pub async fn sql_count(data_dir: &Path, sql: &str) -> i64 {
    let url = format!("sqlite:{}", db_path(data_dir).display());
    let store = creditgate_sql::SqlStore::connect(&url)
        .await
        .expect("opening the SQLite file");
    let n: i64 = sqlx::query_scalar(sql)
        .fetch_one(store.pool())
        .await
        .expect("count query");
    store.close().await;
    n
}

/// Runs a one-shot command with a bound; returns its output (kills it on timeout).
pub async fn run_bounded(
    mut cmd: tokio::process::Command,
    bound: Duration,
    what: &str,
) -> std::process::Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    match tokio::time::timeout(bound, cmd.output()).await {
        Ok(out) => out.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => panic!("{what} did not finish within {bound:?}"),
    }
}
