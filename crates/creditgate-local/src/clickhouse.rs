//! A `clickhouse-server` on free loopback ports with a generated minimal configuration.
//!
//! The configuration is the least that ClickHouse 18.16 (Debian's package) needs and that
//! newer servers still accept: `<yandex>` root, HTTP and native ports, `listen_host`,
//! every path under the temp dir, file logs, and a `users.xml` with a password-less
//! `default` user allowed from loopback, a `default` profile and quota. 18.16 runs as
//! root without complaint. The binary is `$CREDITGATE_CLICKHOUSE_BIN`, else
//! `clickhouse-server` (PATH, `/usr/sbin`, `/usr/bin`), else `clickhouse server`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::process::{free_port, http, with_retries, Supervisor, STOP_TIMEOUT};
use crate::valid_identifier;

/// Bound on startup (until `GET /ping` answers `Ok.`).
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one HTTP request of the launcher (`query`, `ping`).
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// A throw-away ClickHouse server, stopped (SIGKILL) on drop. Every method takes `&self`,
/// so one instance can be shared; isolate its users with
/// [`ClickHouse::create_database`] or table prefixes, and use a private instance for
/// whoever stops, kills or pauses it.
pub struct ClickHouse {
    // Declared first: the process stops before its directory is removed.
    process: Supervisor,
    http_port: u16,
    tcp_port: u16,
    program: (PathBuf, Option<&'static str>),
    config: PathBuf,
    dir: TempDir,
}

impl std::fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouse")
            .field("url", &self.url())
            .field("tcp_port", &self.tcp_port)
            .field("dir", &self.dir.path())
            .field("pid", &self.process.pid())
            .finish()
    }
}

impl ClickHouse {
    /// Starts a server and waits (≤ 60 s) until `GET /ping` answers `Ok.`.
    pub fn start() -> Result<Self> {
        let program = program()?;
        with_retries("clickhouse-server", || {
            let dir = tempfile::Builder::new()
                .prefix("creditgate-clickhouse-")
                .tempdir()
                .context("create temp dir")?;
            let logs = vec![
                dir.path().join("clickhouse-server.err.log"),
                dir.path().join("clickhouse-server.log"),
            ];
            let process = Supervisor::new(
                "clickhouse-server",
                dir.path(),
                dir.path().join("stdout.log"),
                logs,
                "TERM",
                false,
            );
            let server = Self {
                process,
                http_port: free_port()?,
                tcp_port: free_port()?,
                program: program.clone(),
                config: dir.path().join("config.xml"),
                dir,
            };
            server.write_config()?;
            server.launch()?;
            Ok(server)
        })
    }

    /// `http://127.0.0.1:<http_port>` — what `--clickhouse-url` takes.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The native-protocol port (for `clickhouse-client --port`).
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    /// Runs SQL over HTTP (POST, `wait_end_of_query=1` so errors are never hidden behind a
    /// `200`) and returns the body, e.g. `"3\n"` for `SELECT count() FROM t`. Errors carry
    /// ClickHouse's message.
    pub fn query(&self, sql: &str) -> Result<String> {
        self.query_in(None, sql)
    }

    /// [`ClickHouse::query`] with `database` as the default database.
    pub fn query_in(&self, database: Option<&str>, sql: &str) -> Result<String> {
        let mut target = String::from("/?wait_end_of_query=1");
        if let Some(db) = database {
            valid_identifier(db)?;
            target.push_str("&database=");
            target.push_str(db);
        }
        let (status, body) = http(
            self.http_port,
            HTTP_TIMEOUT,
            "POST",
            &target,
            sql.as_bytes(),
        )?;
        if status != 200 {
            bail!("ClickHouse answered HTTP {status}: {}", body.trim());
        }
        Ok(body)
    }

    /// `CREATE DATABASE IF NOT EXISTS <name>` (letters, digits, `_`; see
    /// [`crate::unique_name`]); returns `http://127.0.0.1:<port>?database=<name>`.
    pub fn create_database(&self, name: &str) -> Result<String> {
        valid_identifier(name)?;
        self.query(&format!("CREATE DATABASE IF NOT EXISTS `{name}`"))?;
        Ok(format!("{}?database={name}", self.url()))
    }

    /// SIGKILL; the data directory stays for [`ClickHouse::start_again`].
    pub fn kill9(&self) -> Result<()> {
        self.process.kill9()
    }

    /// Graceful stop (SIGTERM, bounded).
    pub fn stop(&self) -> Result<()> {
        self.process.stop(STOP_TIMEOUT)
    }

    /// Starts again on the same ports and data after `stop` / `kill9`; no-op when running.
    pub fn start_again(&self) -> Result<()> {
        if self.process.is_running() {
            return Ok(());
        }
        self.launch()
    }

    /// `stop` then start on the same ports and data.
    pub fn restart(&self) -> Result<()> {
        self.stop()?;
        self.launch()
    }

    /// SIGSTOP: connections are accepted by the kernel but nothing answers.
    pub fn pause(&self) -> Result<()> {
        self.process.pause()
    }

    /// SIGCONT after [`ClickHouse::pause`].
    pub fn resume(&self) -> Result<()> {
        self.process.resume()
    }

    /// Tails of the server's error log, log and stdout/stderr.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }

    fn launch(&self) -> Result<()> {
        let (program, subcommand) = &self.program;
        let mut cmd = Command::new(program);
        if let Some(sub) = subcommand {
            cmd.arg(sub);
        }
        cmd.arg(format!("--config-file={}", self.config.display()))
            .current_dir(self.dir.path());
        self.process.spawn(&mut cmd)?;
        let ready = self.process.wait_ready(START_TIMEOUT, || {
            let (status, body) = http(self.http_port, HTTP_TIMEOUT, "GET", "/ping", b"")?;
            if status == 200 && body.trim() == "Ok." {
                Ok(())
            } else {
                bail!("/ping answered HTTP {status}: {body:?}")
            }
        });
        if ready.is_err() {
            let _ = self.process.kill9();
        }
        ready
    }

    fn write_config(&self) -> Result<()> {
        let dir = self.dir.path();
        for sub in ["data", "tmp", "user_files", "format_schemas"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let p = |sub: &str| xml_path(&dir.join(sub));
        let config = format!(
            r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>{log}</log>
        <errorlog>{errorlog}</errorlog>
        <size>100M</size>
        <count>1</count>
    </logger>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <listen_host>127.0.0.1</listen_host>
    <path>{data}/</path>
    <tmp_path>{tmp}/</tmp_path>
    <user_files_path>{user_files}/</user_files_path>
    <format_schema_path>{format_schemas}/</format_schema_path>
    <users_config>{users}</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <max_concurrent_queries>100</max_concurrent_queries>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
    <keep_alive_timeout>3</keep_alive_timeout>
</yandex>
"#,
            log = p("clickhouse-server.log"),
            errorlog = p("clickhouse-server.err.log"),
            http_port = self.http_port,
            tcp_port = self.tcp_port,
            data = p("data"),
            tmp = p("tmp"),
            user_files = p("user_files"),
            format_schemas = p("format_schemas"),
            users = p("users.xml"),
        );
        let users = r#"<?xml version="1.0"?>
<yandex>
    <profiles>
        <default>
            <max_memory_usage>2000000000</max_memory_usage>
        </default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default>
            <interval>
                <duration>3600</duration>
                <queries>0</queries>
                <errors>0</errors>
                <result_rows>0</result_rows>
                <read_rows>0</read_rows>
                <execution_time>0</execution_time>
            </interval>
        </default>
    </quotas>
</yandex>
"#;
        std::fs::write(&self.config, config).context("write config.xml")?;
        std::fs::write(dir.join("users.xml"), users).context("write users.xml")?;
        Ok(())
    }
}

fn xml_path(path: &Path) -> String {
    path.display()
        .to_string()
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The server binary and, for the single `clickhouse` binary, its `server` subcommand.
fn program() -> Result<(PathBuf, Option<&'static str>)> {
    if let Some(bin) = std::env::var_os("CREDITGATE_CLICKHOUSE_BIN") {
        let bin = PathBuf::from(bin);
        let single = bin.file_name().is_some_and(|n| n == "clickhouse");
        return Ok((bin, single.then_some("server")));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin"].map(PathBuf::from))
        .collect();
    for dir in &dirs {
        let bin = dir.join("clickhouse-server");
        if bin.is_file() {
            return Ok((bin, None));
        }
    }
    for dir in &dirs {
        let bin = dir.join("clickhouse");
        if bin.is_file() {
            return Ok((bin, Some("server")));
        }
    }
    bail!("no clickhouse-server binary: install the `clickhouse-server` package (scripts/install-deps) or set CREDITGATE_CLICKHOUSE_BIN")
}
