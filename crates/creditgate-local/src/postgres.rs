//! A throw-away Postgres cluster (`initdb` + `postgres`) on a free loopback port.
//!
//! Binaries come from `$CREDITGATE_PG_BINDIR`, else the newest
//! `/usr/lib/postgresql/<v>/bin` (Debian), else `PATH`. Postgres refuses to run as root,
//! so when run as root, `initdb` and `postgres` run as the `postgres` system
//! user (the uid/gid are set directly, like `runuser -u postgres --` but keeping the
//! server's pid, so signals reach the postmaster) in a directory under `/tmp` owned by it.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::process::{
    free_port, run_bounded, running_as_root, user_ids, with_retries, Supervisor, STOP_TIMEOUT,
};
use crate::valid_identifier;

const INITDB_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on startup, including retries while a killed postmaster's backends still exit.
const START_TIMEOUT: Duration = Duration::from_secs(30);
const PSQL_TIMEOUT: Duration = Duration::from_secs(30);

/// A throw-away Postgres server: trust authentication for `postgres` on 127.0.0.1,
/// `fsync`, `synchronous_commit` and `full_page_writes` off (its data is disposable),
/// stopped on drop (immediate shutdown). Every method takes `&self`, so one instance can
/// be shared; use [`Postgres::create_database`] per user for isolation, and a private
/// instance to stop or kill.
pub struct Postgres {
    // Declared first: the process stops before its directory is removed.
    process: Supervisor,
    port: u16,
    bin_dir: PathBuf,
    data_dir: PathBuf,
    /// `(uid, gid)` of the `postgres` user when running as root.
    run_as: Option<(u32, u32)>,
    dir: TempDir,
}

impl std::fmt::Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres")
            .field("url", &self.url())
            .field("data_dir", &self.data_dir)
            .field("pid", &self.process.pid())
            .finish()
    }
}

impl Postgres {
    /// `initdb` (≤ 120 s) and start (≤ 30 s) a server; waits until `SELECT 1` works.
    pub fn start() -> Result<Self> {
        let bin_dir = bin_dir()?;
        let run_as = if running_as_root() {
            Some(user_ids("postgres").context(
                "running as root: Postgres needs the `postgres` system user (apt's postgresql package creates it)",
            )?)
        } else {
            None
        };
        let mut builder = tempfile::Builder::new();
        builder.prefix("creditgate-pg-");
        // The `postgres` user cannot enter root's $TMPDIR if it points somewhere private.
        let dir = if run_as.is_some() {
            builder.tempdir_in("/tmp")
        } else {
            builder.tempdir()
        }
        .context("create temp dir")?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .with_context(|| format!("chown {} to postgres", dir.path().display()))?;
        }
        let data_dir = dir.path().join("data");
        let log = dir.path().join("postgres.log");
        let mut initdb = Command::new(bin_dir.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data_dir)
            .args([
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .arg("--no-sync")
            .current_dir(dir.path());
        if let Some((uid, gid)) = run_as {
            initdb.uid(uid).gid(gid);
        }
        let out = run_bounded(&mut initdb, INITDB_TIMEOUT)?;
        if !out.status.success() {
            bail!(
                "initdb failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut server = Self {
            process: Supervisor::new("postgres", dir.path(), log, Vec::new(), "QUIT", true),
            port: 0,
            bin_dir,
            data_dir,
            run_as,
            dir,
        };
        with_retries("postgres", || {
            server.port = free_port()?;
            // One try per port: a port taken by someone else fails fast, then a fresh one.
            server.launch(false)
        })?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        self.database_url("postgres")
    }

    /// URL of a database on this server (it is not created).
    pub fn database_url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Pid of the postmaster, if running.
    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// `CREATE DATABASE <name>` (letters, digits, `_`; see [`crate::unique_name`]) and
    /// its URL.
    pub fn create_database(&self, name: &str) -> Result<String> {
        valid_identifier(name)?;
        self.query("postgres", &format!("CREATE DATABASE \"{name}\""))?;
        Ok(self.database_url(name))
    }

    /// Runs SQL with `psql` in `database`; returns the rows unaligned, `|`-separated,
    /// one per line, without headers (`psql -XAt`).
    pub fn query(&self, database: &str, sql: &str) -> Result<String> {
        let port = self.port.to_string();
        let out = run_bounded(
            Command::new(self.bin_dir.join("psql"))
                .args(["-XAtq", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1"])
                .args(["-p", &port, "-U", "postgres", "-d", database, "-c", sql])
                .env("PGCONNECT_TIMEOUT", "3"),
            PSQL_TIMEOUT,
        )?;
        if !out.status.success() {
            bail!(
                "psql failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim_end().to_owned())
    }

    /// Fast shutdown (SIGINT: clients are disconnected, a checkpoint is written), bounded.
    pub fn stop(&self) -> Result<()> {
        self.process.stop_with("INT", STOP_TIMEOUT).map(drop)
    }

    /// SIGKILL of the postmaster (a crash); backends exit when they notice.
    pub fn kill9(&self) -> Result<()> {
        self.process.kill9()
    }

    /// Starts again on the same port and data after `stop` / `kill9`; no-op when running.
    /// Bounded by 30 s (after `kill9` it retries until the old backends are gone).
    pub fn start_again(&self) -> Result<()> {
        if self.process.is_running() {
            return Ok(());
        }
        self.launch(true)
    }

    /// `stop` then `start_again`.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.launch(true)
    }

    /// The tail of the server's log.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    /// Directory of the cluster's files.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Starts the postmaster and waits for `SELECT 1`; with `persist`, an early exit is
    /// retried until the deadline (after `kill9` the old backends may still hold the
    /// shared memory or the port for a moment).
    fn launch(&self, persist: bool) -> Result<()> {
        let deadline = std::time::Instant::now() + START_TIMEOUT;
        loop {
            let mut cmd = Command::new(self.bin_dir.join("postgres"));
            cmd.arg("-D")
                .arg(&self.data_dir)
                .args(["-p", &self.port.to_string()])
                .arg("-k")
                .arg(self.dir.path())
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-c", "fsync=off"])
                .args(["-c", "synchronous_commit=off"])
                .args(["-c", "full_page_writes=off"])
                .args(["-c", "max_connections=300"])
                .current_dir(self.dir.path());
            if let Some((uid, gid)) = self.run_as {
                cmd.uid(uid).gid(gid);
            }
            self.process.spawn(&mut cmd)?;
            let remaining = deadline.saturating_duration_since(std::time::Instant::now());
            let ready = self
                .process
                .wait_ready(remaining, || self.query("postgres", "SELECT 1").map(drop));
            match ready {
                Ok(()) => return Ok(()),
                Err(_)
                    if persist
                        && !self.process.is_running()
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    let _ = self.process.kill9();
                    return Err(e);
                }
            }
        }
    }
}

/// `$CREDITGATE_PG_BINDIR`, the newest `/usr/lib/postgresql/<v>/bin`, or the directory of
/// `initdb` on `PATH`.
fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CREDITGATE_PG_BINDIR") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("postgres").is_file().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Ok(bin);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if dir.join("initdb").is_file() && dir.join("postgres").is_file() {
            return Ok(dir);
        }
    }
    bail!("no Postgres binaries: install the `postgresql` package (scripts/install-deps) or set CREDITGATE_PG_BINDIR")
}
