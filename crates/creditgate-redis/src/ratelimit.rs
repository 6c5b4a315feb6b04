//! [`RedisRateLimiter`]: the fixed-window rule of `creditgate_limiter::ratelimit` as one
//! Lua script per call, on Redis's own clock (`TIME`), so every node counts in the same
//! windows and every check is one atomic step. All checks of a call are decided and
//! counted in that one script (all or nothing).
//!
//! Each counter is a hash `{e: end of its window, n: count}` that expires at the end
//! of its window. A Redis restart without persistence forgets the current windows.

use async_trait::async_trait;
use creditgate_limiter::ports::HotError;
use creditgate_limiter::{LimitCheck, LimitError, LimitState, RateLimiter};
use redis::aio::ConnectionManager;
use redis::Script;

use crate::error::classify;
use crate::hot::{client, manager_config};
use crate::{RedisError, RedisOptions};

/// Mirrors `creditgate_limiter::ratelimit::decide`: read every counter of the current
/// window, checks of one call counting one after the other, pass only if every check
/// fits, then count every check.
const LIMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ends, stored, counted, fits, pending, ok = {}, {}, {}, {}, {}, true
for i = 1, #KEYS do
  local limit, dur, cost = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local e = (math.floor(now / dur) + 1) * dur
  local v = redis.call('HMGET', KEYS[i], 'e', 'n')
  local n = 0
  if v[1] and tonumber(v[1]) == e then n = tonumber(v[2]) end
  local before = pending[KEYS[i]] or n
  ends[i], stored[i], counted[i] = e, n, before + cost
  fits[i] = counted[i] <= limit
  pending[KEYS[i]] = counted[i]
  if not fits[i] then ok = false end
end
local out = {ok and 1 or 0}
for i = 1, #KEYS do
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
    conn: ConnectionManager,
    script: Script,
}

impl RedisRateLimiter {
    pub async fn connect(url: &str, options: RedisOptions) -> Result<Self, RedisError> {
        let conn = ConnectionManager::new_with_config(
            client(url)?,
            manager_config(options.response_timeout, options.connection_timeout),
        )
        .await
        .map_err(|e| RedisError::Connect(e.to_string()))?;
        Ok(Self {
            conn,
            script: Script::new(LIMIT),
        })
    }
}

/// The Redis key of a counter. Counter names are built by the service from validated
/// parts; braces are escaped so a name never picks a hash tag of its own.
fn counter_key(counter: &str) -> String {
    format!("cg:rl:{}", counter.replace('{', "%7B").replace('}', "%7D"))
}

#[async_trait]
impl RateLimiter for RedisRateLimiter {
    async fn limit(&self, checks: &[LimitCheck]) -> Result<(bool, Vec<LimitState>), LimitError> {
        let mut call = self.script.prepare_invoke();
        for c in checks {
            call.key(counter_key(&c.counter))
                .arg(c.limit)
                .arg(c.duration_ms.max(1))
                .arg(c.cost);
        }
        let mut conn = self.conn.clone();
        let reply: Vec<u64> =
            call.invoke_async(&mut conn)
                .await
                .map_err(|e| match classify(&e) {
                    HotError::Unreachable(s) => LimitError::Unavailable(s),
                    HotError::Ambiguous(s) => LimitError::Ambiguous(s),
                    other => LimitError::Other(other.to_string()),
                })?;
        if reply.len() != 1 + 3 * checks.len() {
            return Err(LimitError::Other(format!(
                "unexpected reply to the rate limit script: {reply:?}"
            )));
        }
        let states = checks
            .iter()
            .zip(reply[1..].chunks_exact(3))
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
