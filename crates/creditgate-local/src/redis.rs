//! A `redis-server` on a free loopback port with no persistence.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::process::{free_port, with_retries, Supervisor, STOP_TIMEOUT};

/// Bound on startup (until `PING` answers `PONG`).
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound on one command sent by [`RedisServer::command`].
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// `redis-server --port P --bind 127.0.0.1 --save "" --appendonly no --dir <tmp>`,
/// plus any extra arguments, stopped (SIGKILL) on drop. Every method takes `&self`, so one
/// instance can be shared by many users; whoever kills or pauses it should own it.
pub struct RedisServer {
    // Declared first: the process stops before its directory is removed.
    process: Supervisor,
    port: u16,
    /// Extra `redis-server` arguments (`--maxmemory-policy allkeys-lru`, `--replicaof …`).
    extra_args: Vec<String>,
    dir: TempDir,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("url", &self.url())
            .field("dir", &self.dir.path())
            .field("pid", &self.process.pid())
            .finish()
    }
}

impl RedisServer {
    /// Starts a server and waits (≤ 15 s) until it answers `PING`.
    pub fn start() -> Result<Self> {
        Self::start_with(Vec::new())
    }

    /// [`RedisServer::start`] with extra `redis-server` arguments.
    pub fn start_with(extra_args: Vec<String>) -> Result<Self> {
        with_retries("redis-server", || {
            let dir = tempfile::Builder::new()
                .prefix("creditgate-redis-")
                .tempdir()
                .context("create temp dir")?;
            let process = Supervisor::new(
                "redis-server",
                dir.path(),
                dir.path().join("redis.log"),
                Vec::new(),
                "TERM",
                false,
            );
            let server = Self {
                process,
                port: free_port()?,
                extra_args: extra_args.clone(),
                dir,
            };
            server.launch()?;
            Ok(server)
        })
    }

    /// `redis://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Pid of the running server, if any.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// SIGKILL: the data is gone (no persistence), the port refuses connections.
    pub fn kill9(&self) -> Result<()> {
        self.process.kill9()
    }

    /// Graceful stop (SIGTERM, bounded).
    pub fn stop(&self) -> Result<()> {
        self.process.stop(STOP_TIMEOUT)
    }

    /// Starts again on the same port (empty), after `kill9` or `stop`; no-op when running.
    pub fn start_again(&self) -> Result<()> {
        if self.process.is_running() {
            return Ok(());
        }
        self.launch()
    }

    /// Kills the server if it runs, then starts an empty one on the same port.
    pub fn restart(&self) -> Result<()> {
        self.process.kill9()?;
        self.launch()
    }

    /// SIGSTOP: connections stay open but nothing answers (a hung Redis).
    pub fn pause(&self) -> Result<()> {
        self.process.pause()
    }

    /// SIGCONT after [`RedisServer::pause`].
    pub fn resume(&self) -> Result<()> {
        self.process.resume()
    }

    /// `FLUSHALL`.
    pub fn flushall(&self) -> Result<()> {
        let reply = self.command(&["FLUSHALL"])?;
        if reply != "+OK" {
            bail!("FLUSHALL answered {reply:?}");
        }
        Ok(())
    }

    /// Sends one command and returns the first line of the reply (`+PONG`, `:1`, `$3`…).
    /// Enough for health checks and simple assertions; use a real client for more.
    pub fn command(&self, args: &[&str]) -> Result<String> {
        command(self.port, args)
    }

    /// The tail of the server's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Starts the server on its port with an empty data set (a replica may have written
    /// an RDB file, which a restarted server must not load).
    fn launch(&self) -> Result<()> {
        let dump = self.dir.path().join("dump.rdb");
        if dump.exists() {
            std::fs::remove_file(&dump).with_context(|| format!("remove {}", dump.display()))?;
        }
        let port = self.port.to_string();
        self.process.spawn(
            Command::new("redis-server")
                .args(["--port", &port, "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .arg("--dir")
                .arg(self.dir.path())
                .arg("--logfile")
                .arg(self.dir.path().join("redis.log"))
                .args(&self.extra_args)
                .current_dir(self.dir.path()),
        )?;
        self.process.wait_ready(START_TIMEOUT, || {
            let reply = command(self.port, &["PING"])?;
            if reply == "+PONG" {
                Ok(())
            } else {
                bail!("PING answered {reply:?}")
            }
        })
    }
}

fn command(port: u16, args: &[&str]) -> Result<String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = TcpStream::connect_timeout(&addr, COMMAND_TIMEOUT)
        .with_context(|| format!("connect to redis on port {port}"))?;
    stream.set_read_timeout(Some(COMMAND_TIMEOUT))?;
    stream.set_write_timeout(Some(COMMAND_TIMEOUT))?;
    let mut request = format!("*{}\r\n", args.len());
    for arg in args {
        request.push_str(&format!("${}\r\n{arg}\r\n", arg.len()));
    }
    stream.write_all(request.as_bytes())?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .context("read redis reply")?;
    if line.is_empty() {
        bail!("redis closed the connection");
    }
    Ok(line.trim_end().to_owned())
}
