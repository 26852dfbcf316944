//! The Lua scripts: one per store method, each one atomic step on the server, with the
//! server's clock (`TIME`), touching the keys of one hash slot.

/// Shared by the spend scripts. KEYS[1] the owner's spend hash (`window`, `spent`,
/// `reserved`), KEYS[2] its reservations (id -> amount), KEYS[3] their leases (id -> expiry,
/// ms). `now` in ms of server time; `reclaim` gives back every lease that has ended; `roll`
/// starts a new window (booked spend from zero, open reservations carried over).
const SPEND_PRELUDE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function reclaim()
  local gone = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
  for _, id in ipairs(gone) do
    local a = tonumber(redis.call('HGET', KEYS[2], id) or '0')
    redis.call('HDEL', KEYS[2], id)
    redis.call('HINCRBY', KEYS[1], 'reserved', -a)
  end
  if #gone > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
end
local function roll(window_ms)
  local w = math.floor(now / window_ms)
  if tonumber(redis.call('HGET', KEYS[1], 'window') or '-1') ~= w then
    redis.call('HSET', KEYS[1], 'window', w, 'spent', 0)
  end
end
local function keep(ttl_ms)
  for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl_ms) end
end
local function status()
  local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
  local reserved = tonumber(redis.call('HGET', KEYS[1], 'reserved') or '0')
  return spent, reserved
end
"#;

/// ARGV: lease id, amount, cap, window ms, lease ms. Returns `{granted, spent, reserved}`.
const RESERVE: &str = r#"
local id, amount, cap = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local window_ms, lease_ms = tonumber(ARGV[4]), tonumber(ARGV[5])
reclaim()
roll(window_ms)
local spent, reserved = status()
if spent + reserved + amount > cap then return {0, spent, reserved} end
redis.call('HINCRBY', KEYS[2], id, amount)
redis.call('HINCRBY', KEYS[1], 'reserved', amount)
redis.call('ZADD', KEYS[3], now + lease_ms, id)
keep(window_ms + lease_ms)
return {1, spent, reserved + amount}
"#;

/// ARGV: lease id, amount, window ms, lease ms. Takes `amount` off the reservation.
const RELEASE: &str = r#"
local id, amount = ARGV[1], tonumber(ARGV[2])
local window_ms, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
reclaim()
roll(window_ms)
local held = tonumber(redis.call('HGET', KEYS[2], id) or '0')
local d = math.min(held, amount)
if d > 0 then
  if held - d <= 0 then
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[3], id)
  else
    redis.call('HINCRBY', KEYS[2], id, -d)
  end
  redis.call('HINCRBY', KEYS[1], 'reserved', -d)
end
keep(window_ms + lease_ms)
return d
"#;

/// ARGV: lease id, charged, window ms, lease ms. Closes the reservation (if its lease has not
/// been reclaimed already) and books `charged`.
const SETTLE: &str = r#"
local id, charged = ARGV[1], tonumber(ARGV[2])
local window_ms, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
reclaim()
roll(window_ms)
local held = redis.call('HGET', KEYS[2], id)
if held then
  redis.call('HDEL', KEYS[2], id)
  redis.call('ZREM', KEYS[3], id)
  redis.call('HINCRBY', KEYS[1], 'reserved', -tonumber(held))
end
redis.call('HINCRBY', KEYS[1], 'spent', charged)
keep(window_ms + lease_ms)
return held and 1 or 0
"#;

/// ARGV: refund, charge, window ms, lease ms. Corrects booked spend.
const ADJUST: &str = r#"
local refund, charge = tonumber(ARGV[1]), tonumber(ARGV[2])
local window_ms, lease_ms = tonumber(ARGV[3]), tonumber(ARGV[4])
roll(window_ms)
local spent = tonumber(redis.call('HGET', KEYS[1], 'spent') or '0')
spent = math.max(0, spent - refund) + charge
redis.call('HSET', KEYS[1], 'spent', spent)
keep(window_ms + lease_ms)
return spent
"#;

/// ARGV: window ms. Returns `{spent, reserved}`.
const STATUS: &str = r#"
reclaim()
roll(tonumber(ARGV[1]))
local spent, reserved = status()
return {spent, reserved}
"#;

/// The generic cell rate over every bucket in KEYS, all or nothing. ARGV: per bucket, the time
/// one unit uses (µs, fractional), its capacity and the cost. Each key holds its theoretical
/// arrival time in µs of server time. Returns `{granted, wait µs}`.
pub(super) const TAKE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local wait, next = 0, {}
for i, key in ipairs(KEYS) do
  local per = tonumber(ARGV[3 * i - 2])
  local cap = tonumber(ARGV[3 * i - 1])
  local cost = math.min(tonumber(ARGV[3 * i]), cap)
  local tat = math.max(tonumber(redis.call('GET', key) or '0'), now)
  local new = tat + per * cost
  local ahead = new - now
  local tolerance = per * cap
  if ahead > tolerance then wait = math.max(wait, ahead - tolerance) end
  next[i] = new
end
if wait > 0 then return {0, math.ceil(wait)} end
for i, key in ipairs(KEYS) do
  local ttl = math.ceil((next[i] - now) / 1000) + 1000
  redis.call('SET', key, string.format('%.3f', next[i]), 'PX', ttl)
end
return {1, 0}
"#;

/// KEYS: the answer's hash, its lock. ARGV: the claimant's token, the lock's ms. Returns
/// `{1, status, headers, body, digest}` for a kept answer, `{2}` when the lock is taken for
/// the token, `{3}` when another holds it.
const CACHE_CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then
  local v = redis.call('HMGET', KEYS[1], 'status', 'headers', 'body', 'digest')
  return {1, v[1], v[2], v[3], v[4]}
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2} end
return {3}
"#;

/// KEYS: the answer's hash, its lock. ARGV: token, ttl ms, status, headers, body, digest.
/// Keeps the answer only while the token still holds the lock.
const CACHE_FILL: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[3], 'headers', ARGV[4], 'body', ARGV[5], 'digest', ARGV[6])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[2])
return 1
"#;

/// KEYS: the lock. ARGV: token. Lets go of the lock the token holds.
const CACHE_RELEASE: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"#;

/// One exchange of a replica's breaker with the fleet. KEYS: the route's state hash (`state`
/// closed|open|half_open, `until` ms, `trips`), its window's successes and failures (hashes of
/// bucket -> count), its probe slots (zset member -> expiry ms). ARGV: replica, successes,
/// failures, tripped ms (0: no trip), closed (0/1), probes wanted, probes released,
/// threshold (-1: no rate rule), min calls, window ms, buckets, probes at most, probe ttl ms,
/// open ms. Returns `{state 0|1|2, ms left open, slots granted}`.
const HEALTH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local replica = ARGV[1]
local ok, failed = tonumber(ARGV[2]), tonumber(ARGV[3])
local tripped, closed = tonumber(ARGV[4]), tonumber(ARGV[5])
local want, release = tonumber(ARGV[6]), tonumber(ARGV[7])
local threshold, min_calls = tonumber(ARGV[8]), tonumber(ARGV[9])
local window_ms, buckets = tonumber(ARGV[10]), math.max(1, tonumber(ARGV[11]))
local max_probes, probe_ttl, open_ms = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local untl = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
local trips = tonumber(redis.call('HGET', KEYS[1], 'trips') or '0')
local function clear_window() redis.call('DEL', KEYS[2], KEYS[3]) end
local function open(ms)
  state = 'open'
  untl = math.max(untl, now + ms)
  trips = trips + 1
  redis.call('DEL', KEYS[4])
  clear_window()
end
-- Slots whose holder never gave them back, and the ones given back now.
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
if release > 0 then
  for _, m in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
    if release == 0 then break end
    if string.sub(m, 1, #replica + 1) == replica .. ':' then
      redis.call('ZREM', KEYS[4], m)
      release = release - 1
    end
  end
end
if closed == 1 and state ~= 'closed' and tripped == 0 then
  state = 'closed'
  untl = 0
  trips = 0
  redis.call('DEL', KEYS[4])
  clear_window()
end
if tripped > 0 then open(tripped) end
-- The window, in buckets of server time.
local width = math.max(1, math.floor(window_ms / buckets))
local b = math.floor(now / width)
if state == 'closed' then
  if ok > 0 then redis.call('HINCRBY', KEYS[2], b, ok) end
  if failed > 0 then redis.call('HINCRBY', KEYS[3], b, failed) end
  local calls, fails = 0, 0
  for i = 2, 3 do
    local kv = redis.call('HGETALL', KEYS[i])
    for j = 1, #kv, 2 do
      local bucket, n = tonumber(kv[j]), tonumber(kv[j + 1])
      if bucket <= b - buckets then
        redis.call('HDEL', KEYS[i], kv[j])
      else
        calls = calls + n
        if i == 3 then fails = fails + n end
      end
    end
  end
  if threshold >= 0 and calls >= min_calls and calls > 0 and fails / calls >= threshold then
    open(open_ms)
  end
end
if state == 'open' and now >= untl then state = 'half_open' end
local granted = 0
if state == 'half_open' and want > 0 then
  local held = redis.call('ZCARD', KEYS[4])
  granted = math.max(0, math.min(want, max_probes - held))
  for i = 1, granted do
    redis.call('ZADD', KEYS[4], now + probe_ttl, replica .. ':' .. now .. ':' .. i .. ':' .. held)
  end
end
redis.call('HSET', KEYS[1], 'state', state, 'until', untl, 'trips', trips)
local keep = window_ms * 2 + probe_ttl + 60000
for i = 1, 4 do redis.call('PEXPIRE', KEYS[i], keep) end
local code = 0
if state == 'open' then code = 1 elseif state == 'half_open' then code = 2 end
return {code, math.max(0, untl - now), granted}
"#;

/// The deferred-record scripts share their keys: KEYS[1] the due records (zset id -> due at,
/// ms), KEYS[2] the stream of records handed to workers (consumer group `workers`; an entry
/// stays pending until its replay has ended), KEYS[3] the records (id -> metadata JSON),
/// KEYS[4] their bodies, KEYS[5] their statuses, KEYS[6] answered records (id -> when, ms),
/// KEYS[7] the stream of dead letters. Times are the workers' (ARGV), not the server's, so
/// that a record is due by the clock that wrote its due time.
///
/// ARGV: id, metadata, body, due at. Keeps a record until it is due.
const DEFER_PUT: &str = r#"
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[4], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[5], ARGV[1], 'waiting')
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
return 1
"#;

/// Whether stream entry `eid` is pending for `worker` (false when the group is gone: the
/// server lost its data).
const DEFER_OWNS: &str = r#"
local function owns(eid, worker)
  local ok, p = pcall(redis.call, 'XPENDING', KEYS[2], 'workers', eid, eid, 1)
  return ok and #p > 0 and p[1][2] == worker
end
"#;

/// ARGV: worker, now, max, claim after (ms). Moves due records onto the stream, then hands
/// `worker` up to `max` entries: first those whose worker stopped renewing them, then new
/// ones. Returns `{entry id, record id, metadata, body}` per entry.
const DEFER_TAKE: &str = r#"
local worker, now, max, idle = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
-- BUSYGROUP when the group exists: nothing to do.
redis.pcall('XGROUP', 'CREATE', KEYS[2], 'workers', '0', 'MKSTREAM')
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 100)) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('XADD', KEYS[2], '*', 'id', id)
end
local out = {}
local function hand(entry)
  if not entry then return end
  local eid, fields = entry[1], entry[2]
  local id = fields and fields[2]
  local meta = id and redis.call('HGET', KEYS[3], id)
  if not meta then
    redis.call('XACK', KEYS[2], 'workers', eid)
    redis.call('XDEL', KEYS[2], eid)
    return
  end
  redis.call('HSET', KEYS[5], id, 'replaying')
  out[#out + 1] = {eid, id, meta, redis.call('HGET', KEYS[4], id) or ''}
end
local claimed = redis.call('XAUTOCLAIM', KEYS[2], 'workers', worker, idle, '0-0', 'COUNT', max)
for _, e in ipairs(claimed[2]) do hand(e) end
if #out < max then
  local r = redis.call('XREADGROUP', 'GROUP', 'workers', worker, 'COUNT', max - #out,
    'STREAMS', KEYS[2], '>')
  if r then for _, e in ipairs(r[1][2]) do hand(e) end end
end
return out
"#;

/// ARGV: entry id, worker. Renews the lease (resets the entry's idle time) if `worker`
/// still holds it: 1, else 0.
const DEFER_RENEW: &str = r#"
if not owns(ARGV[1], ARGV[2]) then return 0 end
redis.call('XCLAIM', KEYS[2], 'workers', ARGV[2], 0, ARGV[1], 'JUSTID')
return 1
"#;

/// ARGV: entry id, worker, record id, end (`answered`, `deferred`, `dead`), now, retention
/// (ms), metadata and due at (for `deferred`), reason (for `dead`). Ends the lease — the
/// entry acknowledged and deleted in the same step as the record's new state — if `worker`
/// still holds it: 1, else 0.
const DEFER_FINISH: &str = r#"
local eid, worker, id, kind, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
if not owns(eid, worker) then return 0 end
redis.call('XACK', KEYS[2], 'workers', eid)
redis.call('XDEL', KEYS[2], eid)
if kind == 'deferred' then
  redis.call('HSET', KEYS[3], id, ARGV[7])
  redis.call('HSET', KEYS[5], id, 'waiting')
  redis.call('ZADD', KEYS[1], ARGV[8], id)
  return 1
end
if kind == 'answered' then
  redis.call('HDEL', KEYS[3], id)
  redis.call('HDEL', KEYS[4], id)
  redis.call('HSET', KEYS[5], id, 'answered')
  redis.call('ZADD', KEYS[6], now, id)
else
  -- A dead letter keeps its record, for a person to look at.
  redis.call('HSET', KEYS[5], id, 'dead:' .. ARGV[9])
  redis.call('XADD', KEYS[7], '*', 'id', id, 'reason', ARGV[9])
end
-- The status of an answered record is kept for the retention, then forgotten.
local old = redis.call('ZRANGEBYSCORE', KEYS[6], '-inf', now - tonumber(ARGV[6]), 'LIMIT', 0, 100)
for _, o in ipairs(old) do redis.call('HDEL', KEYS[5], o) end
if #old > 0 then redis.call('ZREM', KEYS[6], unpack(old)) end
return 1
"#;

/// ARGV: record id. Returns `{status, metadata}` (either may be missing), and the earliest
/// due time.
const DEFER_STATUS: &str = r#"
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {redis.call('HGET', KEYS[5], ARGV[1]) or '', redis.call('HGET', KEYS[3], ARGV[1]) or '',
  first[2] or ''}
"#;

/// A script with its SHA-1, sent by `EVALSHA` and, when the server does not have it yet,
/// by `EVAL` (which also caches it).
pub(super) struct Lua {
    pub(super) source: String,
    pub(super) sha: String,
}

impl Lua {
    fn new(source: String) -> Self {
        let sha = ::redis::Script::new(&source).get_hash().to_owned();
        Self { source, sha }
    }
}

/// The spend scripts, each with the shared prelude.
pub(super) struct Scripts {
    pub(super) reserve: Lua,
    pub(super) release: Lua,
    pub(super) settle: Lua,
    pub(super) adjust: Lua,
    pub(super) status: Lua,
    pub(super) take: Lua,
    pub(super) cache_claim: Lua,
    pub(super) cache_fill: Lua,
    pub(super) cache_release: Lua,
    pub(super) health: Lua,
    pub(super) defer_put: Lua,
    pub(super) defer_take: Lua,
    pub(super) defer_renew: Lua,
    pub(super) defer_finish: Lua,
    pub(super) defer_status: Lua,
}

impl Scripts {
    pub(super) fn new() -> Self {
        let spend = |body: &str| Lua::new(format!("{SPEND_PRELUDE}{body}"));
        Self {
            reserve: spend(RESERVE),
            release: spend(RELEASE),
            settle: spend(SETTLE),
            adjust: spend(ADJUST),
            status: spend(STATUS),
            take: Lua::new(TAKE.to_owned()),
            cache_claim: Lua::new(CACHE_CLAIM.to_owned()),
            cache_fill: Lua::new(CACHE_FILL.to_owned()),
            cache_release: Lua::new(CACHE_RELEASE.to_owned()),
            health: Lua::new(HEALTH.to_owned()),
            defer_put: Lua::new(DEFER_PUT.to_owned()),
            defer_take: Lua::new(DEFER_TAKE.to_owned()),
            defer_renew: Lua::new(format!("{DEFER_OWNS}{DEFER_RENEW}")),
            defer_finish: Lua::new(format!("{DEFER_OWNS}{DEFER_FINISH}")),
            defer_status: Lua::new(DEFER_STATUS.to_owned()),
        }
    }
}
