//! The Lua scripts of the hot store: one script per `HotStore` operation, each touching
//! only the keys of one creditgate key, which share one hash tag (`cg:{<key>}:…`) and so
//! one Redis Cluster slot.
//!
//! Layout per creditgate key `k`:
//! * `cg:{k}:e` — hash: `epoch`, `bal`, `unalloc`, `uvalid`, `version`, `gen`, `fgen`
//!   (last fenced generation), `fd_amount` / `fd_spent` / `fd_gen` (what that fence
//!   drained), `spent` (spent since the last report), `last_ms` (last spend or credit,
//!   Redis `TIME`).
//! * `cg:{k}:m:<transfer id>` — write-once string with a TTL: `c:<spent>` (credited),
//!   `r` (refused), `d:<amount>:<spent>:<generation>` (drained).
//! * `cg:{k}:lock` — the refill lock, `SET NX PX <token>`.
//!
//! Every entry script gets `KEYS[1]` = the entry (`KEYS[2]` = a mark, where used), the
//! epoch marker as its **last** key (`cg:epoch` on one Redis, `cg:{<slot tag>}:epoch`,
//! in the entry's own slot, on a cluster), and the common arguments `ARGV[1..4]` = the
//! epoch the node believes current, the TTL of an entry holding nothing (ms), the TTL
//! of a mark (ms), and `overwrite` (0/1); its own arguments follow from `ARGV[5]`.
//!
//! **Epoch check.** Before anything else each entry script compares that epoch with the
//! server's own: `<marker>:<master_replid>`, read in the script (`GET` of the marker,
//! `INFO replication`). If they differ it answers `{-2}` and does nothing; the node
//! re-reads the epoch and calls again. So a node never acts on a stale epoch: after a
//! flush (marker gone), a restart without data (new marker and replid) or a failover
//! (the promoted replica has a new `master_replid`, whatever writes it missed), every
//! entry of the old epoch is treated as absent from the first call on.
//!
//! An entry of another epoch is treated as absent. The scripts that would overwrite
//! such an entry (credit, fence, resolve) first answer `{-1}` unless `overwrite` is 1,
//! so the caller re-reads the epoch before replacing it.
//!
//! An entry that holds credits (`bal > 0` or unreported `spent > 0`) has no TTL; one
//! that holds nothing expires after its last write. Numbers are exact up to 2^53 - 1
//! (`Credits::MAX`).

use crate::conn::Lua;

/// Helpers every entry script starts with: the common arguments, the epoch check,
/// number checks and formatting, the server's clock. (The spend scripts need no more;
/// the others also get [`PRELUDE`]. A script defines its helpers again on every call:
/// those of `PRELUDE` cost about a microsecond.)
const BASE: &str = r#"
local E = KEYS[1]
local EPOCH = ARGV[1]
local EMPTY_TTL = ARGV[2]
local MARK_TTL = ARGV[3]
local OVERWRITE = ARGV[4] == '1'
local MAXN = 9007199254740991
local call, tonumber, format, floor, min = redis.call, tonumber, string.format, math.floor, math.min

-- The node's epoch is the server's: `<marker>:<master_replid>`. (The field is found
-- by a plain search and read with an anchored pattern: a pattern searched through the
-- whole section cost about a microsecond more, on every call.)
local function epoch_ok()
  local m = call('GET', KEYS[#KEYS])
  if not m then return false end
  local info = call('INFO', 'replication')
  local at = string.find(info, 'master_replid:', 1, true)
  if not at then return false end
  return EPOCH == m .. ':' .. string.match(info, '^%w*', at + 14)
end

local function int(n) return format('%d', n) end

local function uint(i, what)
  local n = tonumber(ARGV[i])
  if n == nil or n ~= n or n < 0 or n > MAXN or n ~= floor(n) then
    error({err = 'ERR creditgate: ' .. what .. ' must be an integer in 0..2^53-1, got ' .. tostring(ARGV[i])})
  end
  return n
end

local function now_ms()
  local t = call('TIME')
  return tonumber(t[1]) * 1000 + floor(tonumber(t[2]) / 1000)
end
"#;

/// The entry helpers of the scripts other than the spends: read, create, write and
/// expire a whole entry, move its balance out, set a mark.
const PRELUDE: &str = r#"
local FIELDS = {'epoch', 'bal', 'unalloc', 'uvalid', 'version', 'gen', 'fgen',
                'fd_amount', 'fd_spent', 'fd_gen', 'spent', 'last_ms',
                'rpend', 'rnonce', 'ra', 'rs', 'rg'}

-- The entry of the current epoch, or nil (missing, or left by an epoch whose data is
-- written off). The second value is true for an entry of another epoch that the caller
-- must not overwrite before re-reading its epoch.
local function load()
  local v = redis.call('HMGET', E, unpack(FIELDS))
  if v[1] ~= EPOCH then return nil, (v[1] ~= false and not OVERWRITE) end
  local e = {}
  for i = 2, #FIELDS do e[FIELDS[i]] = tonumber(v[i]) or 0 end
  return e
end

local function fresh(gen, now)
  return {bal = 0, unalloc = 0, uvalid = 0, version = 0, gen = gen, fgen = 0,
          fd_amount = 0, fd_spent = 0, fd_gen = 0, spent = 0, last_ms = now,
          rpend = 0, rnonce = 0, ra = 0, rs = 0, rg = 0}
end

-- Credits are never lost to expiry: only an entry holding nothing gets a TTL.
local function expiry(e)
  if e.bal > 0 or e.spent > 0 or e.rpend == 1 then
    redis.call('PERSIST', E)
  else
    redis.call('PEXPIRE', E, EMPTY_TTL)
  end
end

local function save(e)
  redis.call('HSET', E, 'epoch', EPOCH, 'bal', int(e.bal), 'unalloc', int(e.unalloc),
    'uvalid', int(e.uvalid), 'version', int(e.version), 'gen', int(e.gen),
    'fgen', int(e.fgen), 'fd_amount', int(e.fd_amount), 'fd_spent', int(e.fd_spent),
    'fd_gen', int(e.fd_gen), 'spent', int(e.spent), 'last_ms', int(e.last_ms),
    'rpend', int(e.rpend), 'rnonce', int(e.rnonce), 'ra', int(e.ra), 'rs', int(e.rs),
    'rg', int(e.rg))
  expiry(e)
end

-- Moves the balance out; the snapshot grows by it so bal + unalloc stays exact.
local function take_balance(e)
  local d = {e.bal, e.spent, e.gen}
  e.unalloc = math.min(e.unalloc + e.bal, MAXN)
  e.bal = 0
  e.spent = 0
  return d
end

local function mark_set(value)
  redis.call('SET', KEYS[2], value, 'PX', MARK_TTL, 'NX')
end
"#;

/// The spends of several callers in one call: `KEYS[i]` is the entry of item `i`,
/// `ARGV[3 + 2i]` its cost and `ARGV[4 + 2i]` its deadline in Redis `TIME` milliseconds
/// (0: none). Every argument is checked before anything is written, so a bad one fails
/// the whole call with nothing spent. Returns three numbers per item, in order: `{0, 0,
/// 0}` miss, `{1, remaining, bal}` valid, `{2, remaining, 0}` exceeded, `{3, bal,
/// generation}` low, `{4, 0, 0}` too late (nothing done). A key may appear more than
/// once; its spends apply in order.
///
/// The deadline makes a late delivery a no-op: a spend whose caller has stopped waiting
/// (and answered that it does not know the outcome) cannot be applied when a link that
/// held its bytes heals.
///
/// Consecutive spends of one key (a run) read its entry once and write it once, when
/// the run ends: a hot key's spends of one batch cost one read and one write in all,
/// not one of each per spend (the script runs alone, so nothing sees the entry in
/// between). Runs are as the caller orders the items.
///
/// The run's entry is written without `expiry`: an entry that could pay a positive cost
/// held credits, so it has no TTL, and keeps holding them (as `spent` until reported);
/// a zero cost changes neither number, so it leaves the TTL as it was.
///
/// Written for the interpreter's costs (a script call of a few keys is mostly Lua, not
/// the commands it runs): locals rather than global lookups, no table per item, the
/// replies written straight into the answer.
const SPEND_MANY: &str = r#"
if not epoch_ok() then return {-2} end
local n = #KEYS - 1
local costs, deadlines = {}, {}
for i = 1, n do
  costs[i] = uint(3 + 2 * i, 'cost')
  deadlines[i] = uint(4 + 2 * i, 'deadline')
end
local now = now_ms()
local out = {}
-- The run: its entry's name, whether it is of this epoch, its numbers, and whether a
-- spend changed them.
local run, ok, changed = nil, false, false
local bal, unalloc, uvalid, gen, spent = 0, 0, false, 0, 0
for i = 1, n do
  local cost, j = costs[i], 3 * i - 2
  local deadline = deadlines[i]
  if deadline > 0 and now > deadline then
    out[j], out[j + 1], out[j + 2] = 4, 0, 0
  else
    local e = KEYS[i]
    if e ~= run then
      if changed then
        call('HSET', run, 'bal', int(bal), 'spent', int(spent), 'last_ms', int(now))
      end
      local v = call('HMGET', e, 'epoch', 'bal', 'unalloc', 'uvalid', 'gen', 'spent')
      run, ok, changed = e, v[1] == EPOCH, false
      bal, unalloc = tonumber(v[2]) or 0, tonumber(v[3]) or 0
      uvalid, gen, spent = tonumber(v[4]) == 1, tonumber(v[5]) or 0, tonumber(v[6]) or 0
    end
    if not ok then
      out[j], out[j + 1], out[j + 2] = 0, 0, 0
    elseif bal >= cost and uvalid then
      -- Only a valid snapshot lets the hot store state the exact remaining balance.
      bal = bal - cost
      spent = min(spent + cost, MAXN)
      changed = true
      out[j], out[j + 1], out[j + 2] = 1, min(bal + unalloc, MAXN), bal
    else
      local total = min(bal + unalloc, MAXN)
      if uvalid and total < cost then
        out[j], out[j + 1], out[j + 2] = 2, total, 0
      else
        out[j], out[j + 1], out[j + 2] = 3, bal, gen
      end
    end
  end
end
if changed then
  call('HSET', run, 'bal', int(bal), 'spent', int(spent), 'last_ms', int(now))
end
return out
"#;

/// `HotStore::spend_all`: `KEYS` are distinct entries; ARGV[5] the cost, ARGV[6] 1 to
/// decide without spending, ARGV[7] the deadline (as in [`SPEND_MANY`]). Every entry is
/// decided before anything is written; the cost leaves all of them or none. Returns
/// `{spent}` then three numbers per entry as [`SPEND_MANY`] answers (`{1, remaining, bal}`
/// for an entry that can pay, after the spend if it happened), or `{4}` too late.
const SPEND_ALL: &str = r#"
local cost = uint(5, 'cost')
local probe = ARGV[6] == '1'
local deadline = uint(7, 'deadline')
if not epoch_ok() then return {-2} end
local now = now_ms()
if deadline > 0 and now > deadline then return {4} end
local n = #KEYS - 1
local replies, entries, all = {}, {}, true
for i = 1, n do
  local v = redis.call('HMGET', KEYS[i], 'epoch', 'bal', 'unalloc', 'uvalid', 'gen', 'spent')
  if v[1] ~= EPOCH then
    replies[i] = {0, 0, 0}
    all = false
  else
    local e = {bal = tonumber(v[2]) or 0, unalloc = tonumber(v[3]) or 0,
               uvalid = tonumber(v[4]) == 1, gen = tonumber(v[5]) or 0,
               spent = tonumber(v[6]) or 0}
    entries[i] = e
    local total = math.min(e.bal + e.unalloc, MAXN)
    if e.bal >= cost and e.uvalid then
      replies[i] = {1, total, e.bal}
    else
      all = false
      if e.uvalid and total < cost then replies[i] = {2, total, 0}
      else replies[i] = {3, e.bal, e.gen} end
    end
  end
end
local spend = all and not probe
local out = {spend and 1 or 0}
for i = 1, n do
  local r = replies[i]
  if spend then
    local e = entries[i]
    E = KEYS[i]
    e.bal = e.bal - cost
    e.spent = math.min(e.spent + cost, MAXN)
    -- No `expiry`, as in `SPEND_MANY`.
    redis.call('HSET', E, 'bal', int(e.bal), 'spent', int(e.spent), 'last_ms', int(now))
    r = {1, math.min(e.bal + e.unalloc, MAXN), e.bal}
  end
  out[#out + 1] = r[1]
  out[#out + 1] = r[2]
  out[#out + 1] = r[3]
end
return out
"#;

/// KEYS[2]: mark. ARGV[5..8]: generation, amount, unalloc, version.
/// Returns `{0, spent}` credited, `{1}` duplicate, `{2}` refused, `{-1}` stale epoch.
const CREDIT: &str = r#"
local gen = uint(5, 'generation')
local amount = uint(6, 'amount')
local unalloc = uint(7, 'unalloc')
local version = uint(8, 'version')
if not epoch_ok() then return {-2} end
local now = now_ms()
local e, stale = load()
if stale then return {-1} end
if e == nil then
  e = fresh(gen, now)
  save(e)
end
local mark = redis.call('GET', KEYS[2])
if mark then
  if string.sub(mark, 1, 1) == 'c' then return {1} end
  return {2}
end
if e.gen ~= gen then
  mark_set('r')
  return {2}
end
e.bal = math.min(e.bal + amount, MAXN)
if version > e.version then
  e.unalloc = unalloc
  e.version = version
  e.uvalid = 1
end
e.last_ms = now
local spent = e.spent
e.spent = 0
mark_set('c:' .. int(spent))
save(e)
return {0, spent}
"#;

/// ARGV[5..7]: known (0 = unknown), unalloc, version.
const SYNC_UNALLOC: &str = r#"
local known = uint(5, 'known')
local unalloc = uint(6, 'unalloc')
local version = uint(7, 'version')
if not epoch_ok() then return {-2} end
local e = load()
if e == nil then return {0} end
if known == 0 then
  redis.call('HSET', E, 'uvalid', '0')
elseif version >= e.version then
  redis.call('HSET', E, 'unalloc', int(unalloc), 'version', int(version), 'uvalid', '1')
end
return {0}
"#;

/// KEYS[2]: mark. ARGV[5]: min idle ms. Returns `{amount, spent, generation}`.
const DRAIN: &str = r#"
local min_idle = uint(5, 'min_idle_ms')
if not epoch_ok() then return {-2} end
local e = load()
if e == nil then return {0, 0, 0} end
local mark = redis.call('GET', KEYS[2])
if mark and string.sub(mark, 1, 2) == 'd:' then
  local a, s, g = string.match(mark, '^d:(%d+):(%d+):(%d+)$')
  return {tonumber(a), tonumber(s), tonumber(g)}
end
local idle = math.max(now_ms() - e.last_ms, 0)
if idle < min_idle or (e.bal == 0 and e.spent == 0) or e.rpend == 1 then
  return {0, 0, e.gen}
end
local d = take_balance(e)
mark_set('d:' .. int(d[1]) .. ':' .. int(d[2]) .. ':' .. int(d[3]))
-- A drain-<nonce> transfer stays recorded until the ledger has it (RETURNED).
local nonce = tonumber(string.match(KEYS[2], ':m:drain%-(%d+)$'))
if nonce then
  e.rpend = 1
  e.rnonce = nonce
  e.ra = d[1]
  e.rs = d[2]
  e.rg = d[3]
end
save(e)
return d
"#;

/// Returns `{nonce, amount, spent, generation}` of the drain whose ledger step is not
/// confirmed, `{}` when none.
const PENDING_RETURN: &str = r#"
if not epoch_ok() then return {-2} end
local e = load()
if e == nil or e.rpend ~= 1 then return {} end
return {e.rnonce, e.ra, e.rs, e.rg}
"#;

/// ARGV[5]: the nonce of a drain the ledger has. Forgets its record.
const RETURNED: &str = r#"
local nonce = uint(5, 'nonce')
if not epoch_ok() then return {-2} end
local e = load()
if e ~= nil and e.rpend == 1 and e.rnonce == nonce then
  e.rpend = 0
  save(e)
end
return {0}
"#;

/// ARGV[5]: generation. Returns `{amount, spent, generation}`, `{-1}` stale epoch.
const FENCE: &str = r#"
local gen = uint(5, 'generation')
if not epoch_ok() then return {-2} end
local e, stale = load()
if stale then return {-1} end
if e == nil then
  e = fresh(0, now_ms())
  save(e)
end
if e.fgen == gen then return {e.fd_amount, e.fd_spent, e.fd_gen} end
if e.fgen > gen or e.gen > gen then return {0, 0, e.gen} end
local d = take_balance(e)
e.gen = gen
e.fgen = gen
e.fd_amount = d[1]
e.fd_spent = d[2]
e.fd_gen = d[3]
e.uvalid = 0
save(e)
return d
"#;

/// KEYS[2]: mark. ARGV[5]: generation.
/// Returns `{0, spent}` credited, `{1}` refused, `{-1}` stale epoch.
const RESOLVE: &str = r#"
local gen = uint(5, 'generation')
if not epoch_ok() then return {-2} end
local e, stale = load()
if stale then return {-1} end
if e == nil then save(fresh(gen, now_ms())) end
local mark = redis.call('GET', KEYS[2])
if mark and string.sub(mark, 1, 2) == 'c:' then
  return {0, tonumber(string.sub(mark, 3))}
end
mark_set('r')
return {1}
"#;

/// Returns `{}` (no entry) or `{bal, unalloc, uvalid, generation, spent, idle_ms}`.
const PEEK: &str = r#"
if not epoch_ok() then return {-2} end
local e = load()
if e == nil then return {} end
return {e.bal, e.unalloc, e.uvalid, e.gen, e.spent, math.max(now_ms() - e.last_ms, 0)}
"#;

/// Reads the epoch, creating the marker when missing (first writer wins; a read-only
/// replica can read an existing one). `KEYS[1]`:
/// the marker; `ARGV[1]`: a new random marker. Returns `{marker, master_replid,
/// seconds, microseconds}` (the last two: the server's `TIME`).
const EPOCH: &str = r#"
local m = redis.call('GET', KEYS[1])
if not m then
  redis.call('SET', KEYS[1], ARGV[1], 'NX')
  m = redis.call('GET', KEYS[1])
end
local r = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)')
local t = redis.call('TIME')
return {m, tostring(r), t[1], t[2]}
"#;

/// KEYS: lock. ARGV: token, ttl ms. Returns `{1}` taken, `{0, pttl}` held.
const LOCK: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1} end
return {0, redis.call('PTTL', KEYS[1])}
"#;

/// KEYS: lock. ARGV: token. Compare-and-delete.
const UNLOCK: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// The scripts, hashed once; [`crate::conn::invoke`] calls them by SHA (`EVALSHA`, and
/// `EVAL` where a node lacks one, e.g. after a restart or a failover).
pub(crate) struct Scripts {
    pub spend_many: Lua,
    pub credit: Lua,
    pub sync_unalloc: Lua,
    pub drain: Lua,
    pub fence: Lua,
    pub resolve: Lua,
    pub peek: Lua,
    pub pending_return: Lua,
    pub returned: Lua,
    pub spend_all: Lua,
    pub lock: Lua,
    pub unlock: Lua,
    pub epoch: Lua,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let entry = |body: &str| Lua::new(&format!("{BASE}{PRELUDE}{body}"));
        let spend = |body: &str| Lua::new(&format!("{BASE}{body}"));
        Self {
            spend_many: spend(SPEND_MANY),
            credit: entry(CREDIT),
            sync_unalloc: entry(SYNC_UNALLOC),
            drain: entry(DRAIN),
            fence: entry(FENCE),
            resolve: entry(RESOLVE),
            peek: entry(PEEK),
            pending_return: entry(PENDING_RETURN),
            returned: entry(RETURNED),
            spend_all: spend(SPEND_ALL),
            lock: Lua::new(LOCK),
            unlock: Lua::new(UNLOCK),
            epoch: Lua::new(EPOCH),
        }
    }

    pub(crate) fn all(&self) -> [&Lua; 13] {
        [
            &self.spend_many,
            &self.credit,
            &self.sync_unalloc,
            &self.drain,
            &self.fence,
            &self.resolve,
            &self.peek,
            &self.pending_return,
            &self.returned,
            &self.spend_all,
            &self.lock,
            &self.unlock,
            &self.epoch,
        ]
    }
}
