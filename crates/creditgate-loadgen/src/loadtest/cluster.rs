//! The local cluster of `--spawn N`.

use anyhow::{ensure, Context, Result};
use creditgate_testkit::{Backends, Cluster, ClusterOptions, NodeKind};

use super::args::MAX_SPAWNED_NODES;

/// Starts a local `nodes`-node cluster with its own Redis, Postgres and ClickHouse; the
/// nodes are child processes of the running executable, which must be the `creditgate`
/// binary. `root_key`: the cluster's root key (default: a fresh one).
pub async fn start_cluster(nodes: usize, root_key: Option<String>) -> Result<Cluster> {
    ensure!(
        (1..=MAX_SPAWNED_NODES).contains(&nodes),
        "the node count must be between 1 and {MAX_SPAWNED_NODES}, not {nodes}"
    );
    let binary = std::env::current_exe().context("locating the creditgate binary")?;
    let mut options = ClusterOptions::new(nodes, Backends::Own);
    options.kind = NodeKind::Process { binary };
    if let Some(key) = root_key {
        options.root_key = key;
    }
    Cluster::start(options)
        .await
        .context("starting the local cluster")
}
