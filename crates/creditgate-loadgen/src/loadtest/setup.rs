//! Setting up a run (an API and its keys, through the public API), reading the balances
//! back, and tearing it down. Every call is bounded; calls run a few at a time.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::task::JoinSet;

use crate::{Admin, AdminError};

/// Bound on each setup and teardown call (create, `keys.getKey`, delete).
const ADMIN_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Setup and teardown calls in flight at once.
const ADMIN_PARALLELISM: usize = 16;

/// The API and keys a run created.
pub(super) struct Setup {
    pub(super) admin: Admin,
    pub(super) api_id: String,
    pub(super) key_ids: Vec<String>,
    pub(super) secrets: Vec<String>,
}

/// An admin call bounded by [`ADMIN_CALL_TIMEOUT`].
async fn bounded<T>(call: impl Future<Output = Result<T, AdminError>>) -> Result<T> {
    match tokio::time::timeout(ADMIN_CALL_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => bail!("no answer within {ADMIN_CALL_TIMEOUT:?}"),
    }
}

/// Creates the API on the first node that accepts it, then the keys there.
pub(super) async fn setup(
    nodes: &[String],
    root_key: &str,
    name: &str,
    keys: usize,
    credits: u64,
) -> Result<Setup> {
    let mut refused = Vec::new();
    for url in nodes {
        let admin = Admin::new(url, root_key);
        let api_id = match bounded(admin.create_api(name)).await {
            Ok(id) => id,
            Err(e) => {
                refused.push(format!("{url}: {e:#}"));
                continue;
            }
        };
        let mut setup = Setup {
            admin,
            api_id,
            key_ids: Vec::with_capacity(keys),
            secrets: Vec::with_capacity(keys),
        };
        match create_keys(&setup.admin, &setup.api_id, keys, credits).await {
            Ok(created) => {
                (setup.key_ids, setup.secrets) = created.into_iter().unzip();
                return Ok(setup);
            }
            Err(e) => {
                teardown(&setup, false).await;
                return Err(e.context(format!("creating keys through {url}")));
            }
        }
    }
    bail!("no node created the API:\n  {}", refused.join("\n  "))
}

async fn create_keys(
    admin: &Admin,
    api_id: &str,
    keys: usize,
    credits: u64,
) -> Result<Vec<(String, String)>> {
    let mut created = Vec::with_capacity(keys);
    let mut tasks = JoinSet::new();
    for i in 0..keys {
        if tasks.len() >= ADMIN_PARALLELISM {
            if let Some(done) = tasks.join_next().await {
                created.push(done??);
            }
        }
        let (admin, api_id) = (admin.clone(), api_id.to_owned());
        tasks.spawn(async move {
            bounded(admin.create_key(&api_id, Some(credits)))
                .await
                .with_context(|| format!("key {i}"))
        });
    }
    while let Some(done) = tasks.join_next().await {
        created.push(done??);
    }
    Ok(created)
}

/// Sum of the keys' `credits.remaining` via `keys.getKey` (`None` if any is unknown).
pub(super) async fn final_remaining(setup: &Setup) -> Option<u64> {
    let mut tasks = JoinSet::new();
    let mut sum = Some(0u64);
    let mut add = |r: Result<Result<Option<u64>>, tokio::task::JoinError>| match r {
        Ok(Ok(Some(remaining))) => sum = sum.and_then(|s| s.checked_add(remaining)),
        Ok(Ok(None)) => sum = None,
        Ok(Err(e)) => {
            eprintln!("warning: keys.getKey: {e:#}");
            sum = None;
        }
        Err(e) => {
            eprintln!("warning: keys.getKey: {e}");
            sum = None;
        }
    };
    for key_id in &setup.key_ids {
        if tasks.len() >= ADMIN_PARALLELISM {
            if let Some(done) = tasks.join_next().await {
                add(done);
            }
        }
        let (admin, key_id) = (setup.admin.clone(), key_id.clone());
        tasks.spawn(async move {
            bounded(admin.remaining(&key_id))
                .await
                .with_context(|| format!("key {key_id}"))
        });
    }
    while let Some(done) = tasks.join_next().await {
        add(done);
    }
    sum
}

/// Deletes the API (and with it the keys) unless `keep`; failures are warnings.
pub(super) async fn teardown(setup: &Setup, keep: bool) {
    if keep {
        eprintln!(
            "kept API {} and its {} key(s): {}",
            setup.api_id,
            setup.key_ids.len(),
            setup.key_ids.join(", ")
        );
        return;
    }
    if let Err(e) = bounded(setup.admin.delete_api(&setup.api_id)).await {
        eprintln!("warning: deleting API {}: {e:#}", setup.api_id);
    }
}
