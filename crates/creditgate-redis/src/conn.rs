//! The connection the hot store and the rate limiter talk through: one Redis (a
//! `ConnectionManager` that reconnects by itself) or a Redis Cluster (the redis crate's
//! cluster client, which follows the slot map and its changes), and the slot arithmetic
//! the cluster needs (each call's keys must share one hash slot).

use std::sync::OnceLock;
use std::time::Duration;

use creditgate_limiter::ports::HotError;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    Cmd, ErrorKind, FromRedisValue, Pipeline, ProtocolVersion, RedisFuture, RedisResult,
    ToRedisArgs, Value,
};

use crate::error::{classify, not_sent, RedisError};
use crate::hot::{client, manager_config};
use crate::metrics as m;

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

    /// Sends `cmd`; on a cluster to the node a redirection named (`ASK`: preceded by
    /// `ASKING` on the same connection), else where the slot map says.
    async fn send(&mut self, cmd: &Cmd, to: Option<&Redirect>) -> RedisResult<Value> {
        let (Conn::Cluster(c), Some(to)) = (&mut *self, to) else {
            return cmd.query_async(self).await;
        };
        let route = SingleNodeRoutingInfo::ByAddress {
            host: to.host.clone(),
            port: to.port,
        };
        if to.ask {
            let mut pipe = redis::pipe();
            pipe.cmd("ASKING").add_command(cmd.clone());
            let mut replies = c.route_pipeline(&pipe, 0, 2, route).await?;
            return replies.pop().ok_or_else(|| {
                redis::RedisError::from((ErrorKind::ClientError, "no reply after ASKING"))
            });
        }
        c.route_command(cmd, RoutingInfo::SingleNode(route)).await
    }
}

/// Where a cluster redirected a call.
#[derive(Debug, Clone)]
struct Redirect {
    host: String,
    port: u16,
    ask: bool,
}

impl Redirect {
    fn of(e: &redis::RedisError) -> Option<Self> {
        let (addr, _slot) = e.redirect_node()?;
        let (host, port) = addr.rsplit_once(':')?;
        Some(Self {
            host: host.to_owned(),
            port: port.parse().ok()?,
            ask: e.kind() == ErrorKind::Ask,
        })
    }
}

/// A Lua script: its source (to load it where it is missing) and its SHA-1.
pub(crate) struct Lua {
    script: redis::Script,
    source: String,
}

impl Lua {
    pub(crate) fn new(source: &str) -> Self {
        Self {
            script: redis::Script::new(source),
            source: source.to_owned(),
        }
    }

    /// `SCRIPT LOAD` (on a cluster, on every master the client knows of).
    pub(crate) async fn load(&self, conn: &Conn) -> RedisResult<()> {
        let mut conn = conn.clone();
        let _: Value = redis::cmd("SCRIPT")
            .arg("LOAD")
            .arg(&self.source)
            .query_async(&mut conn)
            .await?;
        Ok(())
    }
}

/// One call of a [`Lua`] script: its keys and arguments.
pub(crate) struct Call<'a> {
    lua: &'a Lua,
    keys: Vec<Vec<u8>>,
    args: Vec<Vec<u8>>,
}

impl<'a> Call<'a> {
    pub(crate) fn new(lua: &'a Lua) -> Self {
        Self {
            lua,
            keys: Vec::new(),
            args: Vec::new(),
        }
    }

    pub(crate) fn key<T: ToRedisArgs>(&mut self, key: T) -> &mut Self {
        key.write_redis_args(&mut self.keys);
        self
    }

    pub(crate) fn arg<T: ToRedisArgs>(&mut self, arg: T) -> &mut Self {
        arg.write_redis_args(&mut self.args);
        self
    }

    /// The call in RESP, as `EVALSHA` or (`eval`) as `EVAL` with the script's source.
    pub(crate) fn write_resp(&self, eval: bool, out: &mut Vec<u8>) {
        let (verb, script): (&[u8], &str) = if eval {
            (b"EVAL", &self.lua.source)
        } else {
            (b"EVALSHA", self.lua.script.get_hash())
        };
        crate::link::header(out, b'*', 3 + self.keys.len() + self.args.len());
        crate::link::bulk(out, verb);
        crate::link::bulk(out, script.as_bytes());
        crate::link::bulk_number(out, self.keys.len());
        for part in self.keys.iter().chain(&self.args) {
            crate::link::bulk(out, part);
        }
    }

    fn command(&self, verb: &str, script: &str) -> Cmd {
        let mut cmd = redis::cmd(verb);
        cmd.arg(script).arg(self.keys.len());
        for k in &self.keys {
            cmd.arg(k.as_slice());
        }
        for a in &self.args {
            cmd.arg(a.as_slice());
        }
        cmd
    }
}

/// Calls a cluster refused with a redirection or "try again" (not run) are sent again
/// this many times at most.
const ATTEMPTS: u32 = 8;

/// Runs one script call. What the server certainly did not run is sent again: a call
/// that never left (refused connection, a reconnect that had failed before it) once;
/// one a cluster redirected (`MOVED`, `ASK`: straight to the node it named) or refused
/// for now (`TRYAGAIN`, `CLUSTERDOWN`, no connection to the slot's node: after a few
/// milliseconds) up to [`ATTEMPTS`] times; a script missing on the node (after a
/// failover or restart) is loaded there and the call sent again. A call that may have
/// run (its connection broke, no answer in time) never is.
pub(crate) async fn invoke<T: FromRedisValue>(conn: &Conn, call: &Call<'_>) -> Result<T, HotError> {
    let mut cmd = call.command("EVALSHA", call.lua.script.get_hash());
    let mut conn = conn.clone();
    let mut to: Option<Redirect> = None;
    let mut attempt = 0;
    loop {
        attempt += 1;
        let result = conn.send(&cmd, to.as_ref()).await;
        let e = match result {
            Ok(v) => return T::from_redis_value(&v).map_err(|e| fail(&e)),
            Err(e) => e,
        };
        if attempt >= ATTEMPTS {
            return Err(fail(&e));
        }
        match e.kind() {
            // Missing on that node (a restart, a failover): from now on `EVAL`, which
            // also loads it there.
            ErrorKind::NoScriptError => cmd = call.command("EVAL", &call.lua.source),
            ErrorKind::Moved | ErrorKind::Ask => match Redirect::of(&e) {
                Some(r) => to = Some(r),
                None => return Err(fail(&e)),
            },
            ErrorKind::TryAgain
            | ErrorKind::ClusterDown
            | ErrorKind::MasterDown
            | ErrorKind::ClusterConnectionNotFound => {
                to = None;
                tokio::time::sleep(std::time::Duration::from_millis(2 << attempt.min(3))).await;
            }
            // A redirection to a node the client has no connection to (a replica
            // still naming the master that just died): back to the slot map.
            ErrorKind::ClientError if to.is_some() => {
                to = None;
                tokio::time::sleep(std::time::Duration::from_millis(2 << attempt.min(3))).await;
            }
            _ if not_sent(&e) && attempt == 1 => {}
            _ => return Err(fail(&e)),
        }
    }
}

/// Counts a failed call by kind and classifies it.
pub(crate) fn fail(e: &redis::RedisError) -> HotError {
    let err = classify(e);
    let kind = match err {
        HotError::Unreachable(_) => "unreachable",
        HotError::Ambiguous(_) => "ambiguous",
        HotError::Other(_) => "other",
    };
    metrics::counter!(m::ERRORS, "kind" => kind).increment(1);
    err
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
