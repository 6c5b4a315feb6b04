//! [`NodeProcess`]: one `creditgate serve` child process on a free loopback port, its
//! stdout and stderr in files, started until its liveness probe answers (bounded, with a
//! fresh port when the first is taken), stopped by SIGTERM or SIGKILL, killed on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::cluster::ServiceUrls;
use crate::process::{free_port, http, Supervisor};

/// Bound on one start (until `GET /v2/liveness` answers 200).
pub const NODE_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one liveness probe.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Starts tried with fresh ports when the port was taken before the node bound it.
const START_ATTEMPTS: u32 = 5;

/// How to run one node.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// The `creditgate` executable.
    pub binary: PathBuf,
    /// `--data-dir` (the embedded default's SQLite files live here).
    pub data_dir: PathBuf,
    /// `--node-id` (default: the server's own choice).
    pub node_id: Option<String>,
    /// `CREDITGATE_ROOT_KEY`; `None`: the variable is not set.
    pub root_key: Option<String>,
    /// Redis, Postgres and ClickHouse of the multi-node mode; `None`: the embedded default.
    pub services: Option<ServiceUrls>,
    /// Further `serve` arguments (`--log-format json`, …).
    pub args: Vec<String>,
}

impl NodeOptions {
    /// A node on the embedded default in `data_dir`, no root key, no extra arguments.
    pub fn new(binary: impl Into<PathBuf>, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            data_dir: data_dir.into(),
            node_id: None,
            root_key: None,
            services: None,
            args: Vec::new(),
        }
    }
}

/// A running (or stopped) `creditgate serve`. Every method takes `&self`.
pub struct NodeProcess {
    // Declared first: the process stops before its log directory is removed.
    process: Supervisor,
    port: u16,
    options: NodeOptions,
    logs: TempDir,
}

impl std::fmt::Debug for NodeProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeProcess")
            .field("url", &self.url())
            .field("node_id", &self.options.node_id)
            .field("data_dir", &self.options.data_dir)
            .field("pid", &self.process.pid())
            .finish()
    }
}

impl NodeProcess {
    /// Starts the node and waits (≤ 30 s per attempt) until `GET /v2/liveness` answers
    /// 200. A port taken by someone else between picking and binding it costs one
    /// attempt; any other failure is returned at once with the node's log tail.
    pub fn start(options: NodeOptions) -> Result<Self> {
        let mut attempt = 1;
        loop {
            let logs = tempfile::Builder::new()
                .prefix("creditgate-node-")
                .tempdir()
                .context("create the node's log directory")?;
            let process = Supervisor::new(
                "creditgate serve",
                logs.path(),
                logs.path().join("stdout.log"),
                Vec::new(),
                "TERM",
                false,
            )
            .with_stderr_log(logs.path().join("stderr.log"));
            let node = Self {
                process,
                port: free_port()?,
                options: options.clone(),
                logs,
            };
            match node.launch() {
                Ok(()) => return Ok(node),
                Err(e) if attempt < START_ATTEMPTS && node.stderr().contains("binding") => {
                    tracing::warn!(port = node.port, attempt, error = %format!("{e:#}"), "node port taken; retrying on a fresh one");
                    attempt += 1;
                }
                Err(e) => {
                    return Err(e.context(format!(
                        "starting {} serve (data dir {})",
                        options.binary.display(),
                        options.data_dir.display()
                    )))
                }
            }
        }
    }

    fn launch(&self) -> Result<()> {
        let o = &self.options;
        let mut cmd = Command::new(&o.binary);
        // The environment of whoever starts the node must not change what it runs.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("CREDITGATE_") {
                cmd.env_remove(name);
            }
        }
        cmd.env("NO_COLOR", "1")
            .arg("serve")
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--data-dir")
            .arg(&o.data_dir);
        if let Some(id) = &o.node_id {
            cmd.arg("--node-id").arg(id);
        }
        if let Some(key) = &o.root_key {
            cmd.env("CREDITGATE_ROOT_KEY", key);
        }
        if let Some(s) = &o.services {
            match &s.redis_cluster {
                Some(seeds) => cmd.arg("--redis-cluster").arg(seeds),
                None => cmd.arg("--redis-url").arg(&s.redis_url),
            };
            cmd.arg("--database-url").arg(&s.database_url);
            cmd.arg("--clickhouse-url").arg(&s.clickhouse_url);
        }
        cmd.args(&o.args);
        self.process.spawn(&mut cmd)?;
        let ready = self.process.wait_ready(NODE_START_TIMEOUT, || {
            let (status, body) = http(self.port, PROBE_TIMEOUT, "GET", "/v2/liveness", b"")?;
            if status == 200 {
                Ok(())
            } else {
                bail!("/v2/liveness answered HTTP {status}: {body:?}")
            }
        });
        if ready.is_err() {
            let _ = self.process.kill9();
        }
        ready
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Pid of the running node, if any.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// What the node was started with (start another one like it with
    /// `NodeProcess::start(node.options().clone())`).
    pub fn options(&self) -> &NodeOptions {
        &self.options
    }

    pub fn node_id(&self) -> Option<&str> {
        self.options.node_id.as_deref()
    }

    pub fn data_dir(&self) -> &Path {
        &self.options.data_dir
    }

    /// Directory of `stdout.log` and `stderr.log` (removed on drop).
    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// Everything the node wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stdout.log")).unwrap_or_default()
    }

    /// Everything the node wrote to stderr (its log) so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.logs.path().join("stderr.log")).unwrap_or_default()
    }

    /// The exit status once the node has exited on its own.
    pub fn exited(&self) -> Option<ExitStatus> {
        self.process.exited()
    }

    /// SIGTERM and waits ≤ `timeout` for the exit (the node drains its hot balances and
    /// analytics first). A node that does not exit in time is killed and an error
    /// returned.
    pub fn sigterm(&self, timeout: Duration) -> Result<ExitStatus> {
        match self.process.stop_with("TERM", timeout)? {
            Some(status) => Ok(status),
            None => bail!(
                "node {} did not exit within {timeout:?} of SIGTERM (killed){}",
                self.url(),
                self.process.log_tail()
            ),
        }
    }

    /// SIGKILL and reap: a crash, nothing is drained.
    pub fn kill9(&self) -> Result<()> {
        self.process.kill9()
    }

    /// The tails of stdout and stderr, for error messages.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}
