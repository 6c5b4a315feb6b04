//! The connection the hot store and the rate limiter talk through: one Redis (a
//! `ConnectionManager` that reconnects by itself) or a Redis Cluster (the redis crate's
//! cluster client, which follows the slot map and its changes), and the slot arithmetic
//! the cluster needs (each call's keys must share one hash slot).

use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, ProtocolVersion, RedisFuture, Value};

use crate::error::RedisError;
use crate::hot::{client, manager_config};

/// Where the hot store lives.
#[derive(Debug, Clone)]
pub enum Target {
    /// One Redis (`redis://…`).
    Single(String),
    /// A Redis Cluster, reached through these seed nodes.
    Cluster(Vec<String>),
}

impl Target {
    /// `--redis-url` or `--redis-cluster` (comma-separated seeds).
    pub fn cluster_from_list(list: &str) -> Result<Self, RedisError> {
        let seeds: Vec<String> = list
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        if seeds.is_empty() {
            return Err(RedisError::InvalidUrl(
                "the Redis Cluster seed list is empty; give one or more redis:// URLs, comma-separated".into(),
            ));
        }
        for s in &seeds {
            s.parse::<redis::ConnectionInfo>()
                .map_err(|e| RedisError::InvalidUrl(format!("{s}: {e}")))?;
        }
        Ok(Self::Cluster(seeds))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }
}

/// A connection to one Redis or to a cluster. Cheap to clone; clones share the
/// underlying connections.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    /// Connects. The cluster client never retries a command on its own after an I/O
    /// error (a script whose connection broke may have run: running it again could
    /// spend twice); redirections are followed by [`crate::hot`]'s callers, which
    /// retry what the server certainly did not run.
    pub(crate) async fn connect(
        target: &Target,
        response_timeout: Duration,
        connection_timeout: Duration,
    ) -> Result<Self, RedisError> {
        match target {
            Target::Single(url) => ConnectionManager::new_with_config(
                client(url)?,
                manager_config(response_timeout, connection_timeout),
            )
            .await
            .map(Conn::Single)
            .map_err(|e| RedisError::Connect(e.to_string())),
            Target::Cluster(seeds) => {
                let client = ClusterClientBuilder::new(seeds.clone())
                    .use_protocol(ProtocolVersion::RESP3)
                    .retries(0)
                    .response_timeout(response_timeout)
                    .connection_timeout(connection_timeout)
                    .build()
                    .map_err(|e| RedisError::InvalidUrl(e.to_string()))?;
                client
                    .get_async_connection()
                    .await
                    .map(Conn::Cluster)
                    .map_err(|e| RedisError::Connect(e.to_string()))
            }
        }
    }

    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Conn::Cluster(_))
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: u16 = 16384;

/// CRC-16/XMODEM, the checksum Redis Cluster places keys with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key whose hash tag is `tag` (`cg:{tag}:…`).
pub(crate) fn slot_of_tag(tag: &str) -> u16 {
    crc16(tag.as_bytes()) % SLOTS
}

/// For every slot, a short hash tag that maps to it, so a key can be placed in a slot
/// of our choosing (the epoch marker of each slot).
pub(crate) fn tag_of_slot(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut n: u64 = 0;
        while missing > 0 {
            let tag = format!("s{n}");
            let t = &mut tags[usize::from(slot_of_tag(&tag))];
            if t.is_empty() {
                *t = tag;
                missing -= 1;
            }
            n += 1;
        }
        tags
    });
    &tags[usize::from(slot % SLOTS)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of_tag("foo"), 12182);
        assert_eq!(slot_of_tag("bar"), 5061);
    }

    #[test]
    fn every_slot_has_a_tag() {
        for slot in [0, 1, 5061, 12182, SLOTS - 1] {
            assert_eq!(slot_of_tag(tag_of_slot(slot)), slot);
        }
    }

    #[test]
    fn seed_lists_are_checked() {
        assert!(Target::cluster_from_list(" , ").is_err());
        assert!(Target::cluster_from_list("redis://127.0.0.1:1,nope://x").is_err());
        let t = Target::cluster_from_list("redis://127.0.0.1:1, redis://127.0.0.1:2").unwrap();
        assert!(matches!(t, Target::Cluster(ref s) if s.len() == 2));
    }
}
