-- Session scripts get the session's six keys, in this order; all share its hash tag.
local REC, EV, BLOB, FORKS, LEASE, SNAP = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6]
-- The keys that carry the session's native expiry. FORKS exists only while
-- the session has forks, and then it has no native expiry; LEASE expires on
-- its own (PX), no later than the session.
local DATA = {REC, EV, BLOB, SNAP}
-- Sessions expiring from the year 10000 on get no native expiry (the same
-- number as NATIVE_EXPIRY_LIMIT in scripts.py).
local NATIVE_LIMIT = 253402300800.0
-- {-1} when the record is missing, {-8, field} when it exists without
-- `field` (a damaged record)
local function absent(field)
  if redis.call('EXISTS', REC) == 1 then return {-8, field} end
  return {-1}
end
-- damaged record fields: a count (head, version, parent_seq) that is missing
-- or not a whole number >= 0; a time (expires_at) that is missing or neither
-- '' nor a number
local function bad_count(v)
  local n = v and tonumber(v)
  return not n or n < 0 or math.floor(n) ~= n
end
local function bad_time(v)
  return not v or (v ~= '' and tonumber(v) == nil)
end
local function expired(v, at)
  return v and v ~= '' and tonumber(v) <= tonumber(at)
end
-- the record's visibility at `at` (client time, as expires_at is): nil when
-- visible, else the reply that says why not. r: HMGET of head, deleted, expires_at.
local function hidden(r, at)
  if not r[1] then return absent('head') end
  if r[2] == '1' then return {-1} end
  if bad_count(r[1]) then return {-8, 'head'} end
  if bad_time(r[3]) then return {-8, 'expires_at'} end
  if expired(r[3], at) then return {-2} end
  return nil
end
-- more than `limit` seconds since `t` (both server time): too late to commit
local function late(t, limit)
  return clock() - tonumber(t) > tonumber(limit)
end
-- expires_at (seconds) as PEXPIREAT milliseconds, or nil when it is past
-- NATIVE_LIMIT: no native expiry then (the store still hides the session)
local function ms(v)
  local n = tonumber(v)
  if not n or n >= NATIVE_LIMIT then return nil end
  return string.format('%d', math.floor(n * 1000))
end
-- give `key` (just written) the record's native expiry, if it has one
local function follow_record(key)
  local at = redis.call('PEXPIRETIME', REC)
  if at > 0 then redis.call('PEXPIREAT', key, at) end
end
-- the lease and the snapshot go with the session; keep a tombstone while forks
-- still read the events (returns true), else remove every key (false)
local function remove_or_keep()
  redis.call('UNLINK', LEASE, SNAP)
  if redis.call('ZCARD', FORKS) > 0 then
    redis.call('HSET', REC, 'deleted', '1')
    return true
  end
  redis.call('UNLINK', REC, EV, BLOB, FORKS)
  return false
end
-- the lease key holds 'TOKEN OWNER'
local function holder(value)
  local token, owner = string.match(value, '^(%d+) (.+)$')
  return token, owner
end
-- the lease key ends no later than `at` (ms): the session's native expiry
local function cap_lease(at)
  local t = redis.call('PEXPIRETIME', LEASE)
  if t > 0 and t > tonumber(at) then redis.call('PEXPIREAT', LEASE, at) end
end
-- hand the lease to `token` held by `owner` for `ttl` ms (no longer than the
-- session lives); returns {token, until (ms, server clock)}
local function grant(token, owner, ttl)
  local untilms = clock_ms() + tonumber(ttl)
  redis.call('SET', LEASE, token .. ' ' .. owner, 'PX', ttl)
  local at = redis.call('PEXPIRETIME', REC)
  if at > 0 then cap_lease(at) end
  return {token, whole(untilms)}
end
-- a per-session figure for stats() (messages, tokens, bytes): a whole number
-- of at most 15 digits, so that sums stay exact in Lua and HINCRBY never fails
local FIGURE_MAX = 999999999999999
local function bad_figure(v)
  return not v or not string.match(v, '^%d+$') or #v > 15
end
