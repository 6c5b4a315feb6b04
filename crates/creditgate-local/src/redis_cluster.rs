//! A Redis Cluster on loopback: `masters` masters with `replicas` replicas each, every
//! node a [`RedisServer`] with `--cluster-enabled yes` on free ports (its cluster bus on
//! a free port of its own, `--cluster-port`), joined by `redis-cli --cluster create`.
//! Tests can kill a master (its replica takes over after the node timeout) or fail one
//! over on purpose (`CLUSTER FAILOVER` on a replica), or move a slot to another master
//! (`CLUSTER SETSLOT` + `MIGRATE`, as `redis-cli --cluster reshard` does).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::process::free_port;
use crate::RedisServer;

/// How long a master may be unreachable before its replica is promoted.
pub const CLUSTER_NODE_TIMEOUT_MS: u64 = 2_000;
/// Bound on the cluster's creation and on waiting for `cluster_state:ok`.
const FORM_TIMEOUT: Duration = Duration::from_secs(60);

/// The cluster's nodes; dropping it stops them all.
#[derive(Debug)]
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

/// `redis-cli -p <port> <args…>` with a bound; its standard output.
fn cli(port: u16, args: &[&str]) -> Result<String> {
    let out = Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .context("running redis-cli")?;
    if !out.status.success() {
        bail!(
            "redis-cli {args:?} on port {port} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl RedisCluster {
    /// Starts `masters × (1 + replicas)` nodes, creates the cluster, and waits until
    /// every node reports `cluster_state:ok` with all 16,384 slots served.
    pub fn start(masters: usize, replicas: usize) -> Result<Self> {
        if masters < 3 {
            bail!("Redis Cluster needs at least 3 masters, asked for {masters}");
        }
        let mut nodes = Vec::new();
        for _ in 0..masters * (1 + replicas) {
            let bus = free_port()?.to_string();
            let timeout = CLUSTER_NODE_TIMEOUT_MS.to_string();
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-port",
                &bus,
                "--cluster-node-timeout",
                &timeout,
                "--cluster-config-file",
                "nodes.conf",
            ];
            nodes.push(RedisServer::start_with(
                args.iter().map(|a| (*a).to_owned()).collect(),
            )?);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let replicas = replicas.to_string();
        let mut args = vec!["--cluster", "create"];
        args.extend(addresses.iter().map(String::as_str));
        args.extend(["--cluster-replicas", &replicas, "--cluster-yes"]);
        let created = cli(nodes[0].port(), &args)?;
        if !created.contains("All 16384 slots covered") {
            bail!("redis-cli --cluster create did not cover every slot:\n{created}");
        }
        let cluster = Self { nodes };
        cluster.wait_ok(FORM_TIMEOUT)?;
        cluster.wait_replicas_synced(FORM_TIMEOUT)?;
        Ok(cluster)
    }

    /// Every node, in start order.
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// `redis://127.0.0.1:<port>` of every node: seeds for a cluster client.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The role a node reports (`master` or `slave`), `None` when it does not answer.
    pub fn role(&self, node: usize) -> Option<String> {
        let info = cli(self.nodes[node].port(), &["INFO", "replication"]).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("role:"))
            .map(|r| r.trim().to_owned())
    }

    /// Indices of the nodes that are masters now.
    pub fn masters(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.role(i).as_deref() == Some("master"))
            .collect()
    }

    /// `CLUSTER FAILOVER` on replica `node`, then waits until it is a master and the
    /// cluster is whole again.
    pub fn failover(&self, node: usize) -> Result<()> {
        let info = cli(self.nodes[node].port(), &["INFO", "replication"])?;
        let old_master = info
            .lines()
            .find_map(|l| l.strip_prefix("master_port:"))
            .and_then(|p| p.trim().parse::<u16>().ok())
            .and_then(|p| self.nodes.iter().position(|n| n.port() == p));
        let reply = cli(self.nodes[node].port(), &["CLUSTER", "FAILOVER"])?;
        if reply.trim() != "OK" {
            bail!("CLUSTER FAILOVER on node {node} answered {reply:?}");
        }
        let started = Instant::now();
        // Promoted, and the old master knows it is a replica now.
        while self.role(node).as_deref() != Some("master")
            || old_master.is_some_and(|m| self.role(m).as_deref() == Some("master"))
        {
            if started.elapsed() > FORM_TIMEOUT {
                bail!("node {node} was not promoted within {FORM_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_ok(FORM_TIMEOUT)
    }

    /// Waits until every running node reports `cluster_state:ok`.
    pub fn wait_ok(&self, bound: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let states: Vec<bool> = self
                .nodes
                .iter()
                .filter(|n| n.pid().is_some())
                .map(|n| {
                    cli(n.port(), &["CLUSTER", "INFO"])
                        .is_ok_and(|i| i.contains("cluster_state:ok"))
                })
                .collect();
            if states.iter().all(|ok| *ok) {
                return Ok(());
            }
            if started.elapsed() > bound {
                bail!("the cluster did not reach cluster_state:ok within {bound:?}: {states:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every running replica's link to its master is up (the first sync
    /// done), so that writes reach it.
    pub fn wait_replicas_synced(&self, bound: Duration) -> Result<()> {
        let started = Instant::now();
        loop {
            let pending: Vec<usize> = (0..self.nodes.len())
                .filter(|&i| self.nodes[i].pid().is_some())
                .filter(|&i| {
                    cli(self.nodes[i].port(), &["INFO", "replication"]).is_ok_and(|info| {
                        info.contains("role:slave") && !info.contains("master_link_status:up")
                    })
                })
                .collect();
            if pending.is_empty() {
                return Ok(());
            }
            if started.elapsed() > bound {
                bail!("replicas {pending:?} did not sync within {bound:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The node serving `key`'s slot as a master now, asked of any running node.
    pub fn master_of(&self, key: &str) -> Result<usize> {
        let slot = self.slot_of(key)?;
        for i in self.masters() {
            let nodes = cli(self.nodes[i].port(), &["CLUSTER", "NODES"])?;
            let mine = nodes.lines().find(|l| l.contains("myself"));
            let serves = mine.is_some_and(|l| {
                l.split_whitespace().skip(8).any(|range| {
                    let mut bounds = range.split('-').filter_map(|b| b.parse::<u16>().ok());
                    match (bounds.next(), bounds.next()) {
                        (Some(a), Some(b)) => (a..=b).contains(&slot),
                        (Some(a), None) => a == slot,
                        _ => false,
                    }
                })
            });
            if serves {
                return Ok(i);
            }
        }
        bail!("no master serves slot {slot} of {key:?}")
    }

    /// `redis-cli` on node `node`: its whole standard output.
    pub fn cli(&self, node: usize, args: &[&str]) -> Result<String> {
        cli(self.nodes[node].port(), args)
    }

    /// The slot of `key`, as the cluster computes it.
    pub fn slot_of(&self, key: &str) -> Result<u16> {
        let live = self
            .nodes
            .iter()
            .find(|n| n.pid().is_some())
            .context("no node of the cluster runs")?;
        cli(live.port(), &["CLUSTER", "KEYSLOT", key])?
            .trim()
            .parse()
            .context("CLUSTER KEYSLOT")
    }

    /// Moves `slot` from master `from` to master `to` with its keys, as `redis-cli
    /// --cluster reshard` does: `to` imports, `from` migrates, the keys move with
    /// `MIGRATE` in batches, then every master learns the slot's new owner. Clients see
    /// `ASK` for keys already moved while it runs, `MOVED` after.
    pub fn migrate_slot(&self, slot: u16, from: usize, to: usize) -> Result<()> {
        let id = |n: usize| -> Result<String> {
            Ok(cli(self.nodes[n].port(), &["CLUSTER", "MYID"])?
                .trim()
                .to_owned())
        };
        let (from_id, to_id) = (id(from)?, id(to)?);
        let slot_s = slot.to_string();
        let (src, dst) = (self.nodes[from].port(), self.nodes[to].port());
        cli(dst, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &from_id])?;
        cli(src, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &to_id])?;
        let dst_s = dst.to_string();
        loop {
            let keys = cli(src, &["CLUSTER", "GETKEYSINSLOT", &slot_s, "100"])?;
            let keys: Vec<&str> = keys
                .lines()
                .map(str::trim)
                .filter(|k| !k.is_empty())
                .collect();
            if keys.is_empty() {
                break;
            }
            let mut args = vec!["MIGRATE", "127.0.0.1", &dst_s, "", "0", "5000", "KEYS"];
            args.extend(keys);
            let reply = cli(src, &args)?;
            if !reply.trim().starts_with("OK") && !reply.trim().starts_with("NOKEY") {
                bail!("MIGRATE of slot {slot} answered {reply:?}");
            }
        }
        for n in self.masters() {
            cli(
                self.nodes[n].port(),
                &["CLUSTER", "SETSLOT", &slot_s, "NODE", &to_id],
            )?;
        }
        Ok(())
    }
}
