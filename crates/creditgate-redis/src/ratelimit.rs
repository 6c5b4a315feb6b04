//! [`RedisRateLimiter`]: the fixed-window rule of `creditgate_limiter::ratelimit` as one
//! Lua script per call, on Redis's own clock (`TIME`), so every node counts in the same
//! windows and every check is one atomic step. All checks of a call are decided and
//! counted in that one script (all or nothing).
//!
//! Each counter is a hash `{e: end of its window, n: count}` that expires at the end
//! of its window. When Redis loses its data (a restart without persistence, a flush),
//! the first node that had used it notices the missing marker; windows that began
//! before the loss then count as full until they end (see `LIMIT`).
//!
//! On a Redis Cluster every counter and the marker carry the hash tag `{cg:rl}`, so the
//! checks of one call stay one atomic script on one slot: exact, all or nothing, with
//! all rate limits on one shard (they do not scale out with the cluster; the credits
//! do).

use crate::conn::{invoke, Call, Conn, Lua, Target};
use crate::{RedisError, RedisOptions};
use async_trait::async_trait;
use creditgate_limiter::ports::HotError;
use creditgate_limiter::{LimitCheck, LimitError, LimitState, RateLimiter};

/// Mirrors `creditgate_limiter::ratelimit::decide`: read every counter of the current
/// window, checks of one call counting one after the other, pass only if every check
/// fits, then count every check.
///
/// `KEYS[1]` is the marker `since:lost` (Redis milliseconds when this Redis's counters
/// began; `lost` 1 when they began after a data loss); `ARGV[1]` the marker this node
/// last saw (empty before its first call). A missing marker that the node had seen
/// means Redis lost its data: the counts of windows that began before are unknown, so
/// those windows count as full until they end — nothing passes more than `limit` in a
/// window, a loss included.
const LIMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local known = ARGV[1]
local m = redis.call('GET', KEYS[1])
if not m then
  if known ~= '' then m = now .. ':1' else m = now .. ':0' end
  redis.call('SET', KEYS[1], m)
elseif known ~= '' and m ~= known and string.sub(m, -2) == ':0' then
  m = string.sub(m, 1, -3) .. ':1'
  redis.call('SET', KEYS[1], m)
end
local sep = string.find(m, ':', 1, true)
local since = tonumber(string.sub(m, 1, sep - 1))
local lost = string.sub(m, sep + 1) == '1'
local ends, stored, counted, fits, pending, ok = {}, {}, {}, {}, {}, true
for i = 2, #KEYS do
  local a = 3 * (i - 1) - 1
  local limit, dur, cost = tonumber(ARGV[a]), tonumber(ARGV[a+1]), tonumber(ARGV[a+2])
  local e = (math.floor(now / dur) + 1) * dur
  local v = redis.call('HMGET', KEYS[i], 'e', 'n')
  local n = 0
  if v[1] and tonumber(v[1]) == e then
    n = tonumber(v[2])
  elseif lost and e - dur < since then
    n = limit
  end
  local before = pending[KEYS[i]] or n
  ends[i], stored[i], counted[i] = e, n, before + cost
  fits[i] = counted[i] <= limit
  pending[KEYS[i]] = counted[i]
  if not fits[i] then ok = false end
end
local out = {ok and 1 or 0, since, lost and 1 or 0}
for i = 2, #KEYS do
  local n = stored[i]
  if ok then
    n = counted[i]
    redis.call('HSET', KEYS[i], 'e', ends[i], 'n', n)
    redis.call('PEXPIREAT', KEYS[i], ends[i])
  end
  out[#out + 1] = n
  out[#out + 1] = ends[i]
  out[#out + 1] = fits[i] and 1 or 0
end
return out
";

/// Rate limits on Redis (multi-node mode). Cheap to share behind an `Arc`.
pub struct RedisRateLimiter {
    conn: Conn,
    /// `cg:rl:` on one Redis, `{cg:rl}:` on a cluster (one slot for all).
    prefix: &'static str,
    script: Lua,
    /// The marker this node last saw (`since:lost`), empty before its first call.
    known: std::sync::Mutex<String>,
}

impl RedisRateLimiter {
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, RedisError> {
        Self::connect_to(&Target::Single(url.to_owned()), options).await
    }

    pub async fn connect_to(target: &Target, options: RedisOptions) -> Result<Self, RedisError> {
        let conn =
            Conn::connect(target, options.response_timeout, options.connection_timeout).await?;
        let prefix = if target.is_cluster() {
            "{cg:rl}:"
        } else {
            "cg:rl:"
        };
        // A node that starts after others knows the marker they made from the outset.
        let known: Option<String> = redis::cmd("GET")
            .arg(format!("{prefix}since"))
            .query_async(&mut conn.clone())
            .await
            .map_err(|e| RedisError::Connect(format!("reading the rate limit marker: {e}")))?;
        Ok(Self {
            conn,
            prefix,
            script: Lua::new(LIMIT),
            known: std::sync::Mutex::new(known.unwrap_or_default()),
        })
    }
}

/// The Redis key of a counter. Counter names are built by the service from validated
/// parts; braces are escaped so a name never picks a hash tag of its own.
fn counter_key(prefix: &str, counter: &str) -> String {
    format!(
        "{prefix}{}",
        counter.replace('{', "%7B").replace('}', "%7D")
    )
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn limit(&self, checks: &[LimitCheck]) -> Result<(bool, Vec<LimitState>), LimitError> {
        let known = self
            .known
            .lock()
            .map_err(|_| LimitError::Other("rate limit marker poisoned".into()))?
            .clone();
        let mut call = Call::new(&self.script);
        call.key(format!("{}since", self.prefix)).arg(known);
        for c in checks {
            call.key(counter_key(self.prefix, &c.counter))
                .arg(c.limit)
                .arg(c.duration_ms.max(1))
                .arg(c.cost);
        }
        let reply: Vec<u64> = invoke(&self.conn, &call).await.map_err(|e| match e {
            HotError::Unreachable(s) => LimitError::Unavailable(s),
            HotError::Ambiguous(s) => LimitError::Ambiguous(s),
            other => LimitError::Other(other.to_string()),
        })?;
        if reply.len() != 3 + 3 * checks.len() {
            return Err(LimitError::Other(format!(
                "unexpected reply to the rate limit script: {reply:?}"
            )));
        }
        let marker = format!("{}:{}", reply[1], reply[2]);
        if let Ok(mut known) = self.known.lock() {
            if *known != marker {
                if reply[2] == 1 {
                    tracing::warn!(
                        since_ms = reply[1],
                        "the rate limit counters of Redis were lost: windows that began \
                         before count as full until they end"
                    );
                }
                *known = marker;
            }
        }
        let states = checks
            .iter()
            .zip(reply[3..].chunks_exact(3))
            .map(|(c, r)| LimitState {
                limit: c.limit,
                remaining: c.limit.saturating_sub(r[0]),
                reset_ms: r[1],
                passed: r[2] == 1,
            })
            .collect();
        Ok((reply[0] == 1, states))
    }
}
