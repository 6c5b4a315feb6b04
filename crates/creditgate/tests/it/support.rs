//! What the binary's tests share besides the testkit: the binary under test, commands
//! for it with a clean environment, bounded one-shot runs, and reads of the embedded
//! default's SQLite file.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_creditgate");

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
