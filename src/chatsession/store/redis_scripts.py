"""The Lua scripts of the Redis store, one atomic step each.

Every script touches only the keys it is given in ``KEYS``, and all of them
share one hash tag, so each call runs on one Redis Cluster hash slot. No
script builds a key name. There are two families:

*Session scripts* get one session's keys (``PREFIX{ID}:rec``, ``:ev``,
``:blob``, ``:forks``, in that order, or the first ones of them). They decide:
whether an append, a fork of the session, a create, an update or a delete
happens at all.

*Index scripts* get ``PREFIX{idx}:where``, ``:due``, ``:expiry`` and then
listing indexes (``:all``, ``:user:U``, ...). ``ARGV[1]`` is always the
*incarnation* being changed: ``ID#STAMP``, a session id with the random stamp
its ``create`` or ``fork`` gave it, so that a leftover of a deleted session
never gets mixed up with a new session of the same id. When a script needs
to change an index key it was not given (``where`` lists more than the
client knew), it changes nothing and answers ``{-1, json list of keys}``;
the client calls again with them.

Session scripts answer ``{-8, field}`` when the record's ``field`` is
missing or not a number where one is needed (a damaged record: the client
reports it as such), never a Lua error.

Times of steps (``t``, ``due``, the scores of ``:forks`` and ``:due``) come
from the server's clock (``TIME``), never from the client's; ``NOW`` and
``before`` arguments are client time, compared with ``expires_at`` (which is
client time too). Numbers go back to the client as strings (a Lua number
would be cut to an integer).

The helpers at the end read the formats these scripts write (members,
``where`` entries). See the module docstring of :mod:`chatsession.store.redis`
for how the steps are put together and why that is safe.
"""

from __future__ import annotations

import json
from typing import Any

__all__ = [
    "MARK",
    "NATIVE_EXPIRY_LIMIT",
    "SCRIPTS",
    "key_list",
    "member_of",
    "split_member",
    "where_entry",
]

#: Sessions expiring at or after this (Unix seconds: the year 10000) get no
#: native Redis expiry: their keys stay until ``purge_expired`` removes them
#: (they are invisible from ``expires_at`` on all the same).
NATIVE_EXPIRY_LIMIT = 253_402_300_800.0

#: Between an id and its stamp in index members; sorts before every character
#: an id may hold, so members sort as their ids do.
MARK = "#"

_CLOCK = """
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(x) return string.format('%.17g', x) end
"""

_SESSION = (
    _CLOCK
    + f"""
local NATIVE_LIMIT = {NATIVE_EXPIRY_LIMIT!r}
-- with KEYS[1] the record: {{-1}} when it is missing, {{-8, field}} when it
-- exists without `field` (a damaged record)
local function absent(field)
  if redis.call('EXISTS', KEYS[1]) == 1 then return {{-8, field}} end
  return {{-1}}
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
-- with KEYS rec, ev, blob, forks: keep a tombstone while forks still read the
-- events (returns true), else remove every key of the session (false)
local function remove_or_keep()
  if redis.call('ZCARD', KEYS[4]) > 0 then
    redis.call('HSET', KEYS[1], 'deleted', '1')
    return true
  end
  redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  return false
end
"""
)

# KEYS: rec, ev.  ARGV: expected head, now, entries...
# returns {head} | {-1} not found | {-2} expired | {-3, head} conflict |
# {-5, head, length, parent_seq} the event list does not end at the head (nothing
# written) |
# {-8, field} a damaged record field.  The list must hold exactly the events
# after the fork point: a stray or missing item would put the new events at
# the wrong seqs.
_APPEND = (
    _SESSION
    + """
local r = redis.call('HMGET', KEYS[1], 'head', 'deleted', 'expires_at', 'parent_seq')
if not r[1] then return absent('head') end
if r[2] == '1' then return {-1} end
if bad_count(r[1]) then return {-8, 'head'} end
if bad_time(r[3]) then return {-8, 'expires_at'} end
if bad_count(r[4]) then return {-8, 'parent_seq'} end
if expired(r[3], ARGV[2]) then return {-2} end
local head = tonumber(r[1])
if head ~= tonumber(ARGV[1]) then return {-3, r[1]} end
local length = redis.call('LLEN', KEYS[2])
if length ~= head - tonumber(r[4]) then return {-5, r[1], length, r[4]} end
local n = #ARGV - 2
for i = 3, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[2], unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HSET', KEYS[1], 'head', head + n, 'updated_at', ARGV[2])
local at = redis.call('PEXPIRETIME', KEYS[1])
if at > 0 then redis.call('PEXPIREAT', KEYS[2], at) end
return {head + n}
"""
)

# KEYS: rec, blob.  ARGV: now, blob id, bytes.  returns {1} | {-1} | {-2} | {-8, field}
_PUT_BLOB = (
    _SESSION
    + """
local r = redis.call('HMGET', KEYS[1], 'head', 'deleted', 'expires_at')
if not r[1] then return absent('head') end
if r[2] == '1' then return {-1} end
if bad_time(r[3]) then return {-8, 'expires_at'} end
if expired(r[3], ARGV[1]) then return {-2} end
redis.call('HSETNX', KEYS[2], ARGV[2], ARGV[3])
local at = redis.call('PEXPIRETIME', KEYS[1])
if at > 0 then redis.call('PEXPIREAT', KEYS[2], at) end
return {1}
"""
)

# Fork step 1, on the parent.  KEYS: parent rec, ev, blob, forks.
# ARGV: now, at_seq, the fork's incarnation.
# returns {head, t} | {-1} | {-2} | {-4, head} bad fork point | {-8, field}.  Repeating it
# changes nothing (the fork is one member of the set, stamped once).
_HOLD = (
    _SESSION
    + """
local r = redis.call('HMGET', KEYS[1], 'head', 'deleted', 'expires_at')
if not r[1] then return absent('head') end
if r[2] == '1' then return {-1} end
if bad_count(r[1]) then return {-8, 'head'} end
if bad_time(r[3]) then return {-8, 'expires_at'} end
if expired(r[3], ARGV[1]) then return {-2} end
local head = tonumber(r[1])
if tonumber(ARGV[2]) > head then return {-4, r[1]} end
redis.call('ZADD', KEYS[4], 'NX', num(clock()), ARGV[3])
for i = 1, 3 do redis.call('PERSIST', KEYS[i]) end
return {head, redis.call('ZSCORE', KEYS[4], ARGV[3])}
"""
)

# Create/fork step 3, on the new session.  KEYS: rec, ev, blob, forks.
# ARGV: t (when the operation began), deadline (seconds), expires_ms, field, value, ...
# returns {1} created | {0} the id is taken | {-6} too late: nothing written
_CREATE_RECORD = (
    _SESSION
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return {0} end
if late(ARGV[1], ARGV[2]) then return {-6} end
redis.call('UNLINK', KEYS[2], KEYS[3], KEYS[4])
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
if ARGV[3] ~= '' then redis.call('PEXPIREAT', KEYS[1], ARGV[3]) end
return {1}
"""
)

# KEYS: rec, ev, blob, forks.  ARGV: now, expected version, stamp, t, deadline,
# expires_ms, field, value, ...
# returns {version} | {-1} | {-2} | {-3, version} | {-6} | {-8, field}
_UPDATE_RECORD = (
    _SESSION
    + """
local r = redis.call('HMGET', KEYS[1], 'version', 'deleted', 'expires_at', 'stamp')
if not r[1] or r[2] == '1' or r[4] ~= ARGV[3] then return {-1} end
if bad_count(r[1]) then return {-8, 'version'} end
if bad_time(r[3]) then return {-8, 'expires_at'} end
if expired(r[3], ARGV[1]) then return {-2} end
local version = tonumber(r[1])
if version ~= tonumber(ARGV[2]) then return {-3, r[1]} end
if late(ARGV[4], ARGV[5]) then return {-6} end
redis.call('HSET', KEYS[1], 'version', version + 1, unpack(ARGV, 7))
if redis.call('ZCARD', KEYS[4]) == 0 then
  for i = 1, 3 do
    if ARGV[6] ~= '' then redis.call('PEXPIREAT', KEYS[i], ARGV[6]) else redis.call('PERSIST', KEYS[i]) end
  end
end
return {version + 1}
"""
)

# KEYS: rec, ev, blob, forks.  ARGV: now, stamp, t, deadline.
# returns {0, parent id} removed | {1} made a tombstone (it has forks) | {-1} |
# {-2} | {-6} too late | {-7} another incarnation holds the id now | {-8, field}
_DELETE_RECORD = (
    _SESSION
    + """
local r = redis.call('HMGET', KEYS[1], 'head', 'deleted', 'expires_at', 'stamp', 'parent_id')
if not r[1] then return absent('head') end
if r[2] == '1' then return {-1} end
if bad_time(r[3]) then return {-8, 'expires_at'} end
if expired(r[3], ARGV[1]) then return {-2} end
if r[4] ~= ARGV[2] then return {-7} end
if late(ARGV[3], ARGV[4]) then return {-6} end
if remove_or_keep() then return {1} end
return {0, r[5] or ''}
"""
)

# Purge, on one session.  KEYS: rec, ev, blob, forks.  ARGV: stamp, before.
# returns {0} that incarnation is gone | {1, parent id} removed now |
# {2} made a tombstone now | {3} a tombstone already | {4, expires_at} not expired |
# {-8, field} a damaged record
_EXPIRE = (
    _SESSION
    + """
local r = redis.call('HMGET', KEYS[1], 'stamp', 'deleted', 'expires_at', 'parent_id')
if r[1] ~= ARGV[1] then return {0} end
if r[2] == '1' then return {3} end
if bad_time(r[3]) then return {-8, 'expires_at'} end
if not expired(r[3], ARGV[2]) then return {4, r[3] or ''} end
if remove_or_keep() then return {2} end
return {1, r[4] or ''}
"""
)

# A fork of this session went away.  KEYS: rec, ev, blob, forks.
# ARGV: the fork's incarnation ('' to only check).
# returns {0} | {1, parent id, stamp}: the session was a tombstone kept for
# its forks and is gone now (its own parent must be released in turn).
_RELEASE = (
    _SESSION
    + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[4], ARGV[1]) end
if redis.call('ZCARD', KEYS[4]) > 0 then return {0} end
local r = redis.call('HMGET', KEYS[1], 'deleted', 'expires_at', 'parent_id', 'stamp')
if r[1] == '1' then
  redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
  return {1, r[3] or '', r[4] or ''}
end
local at = ms(r[2])
if at then
  for i = 1, 3 do redis.call('PEXPIREAT', KEYS[i], at) end
end
return {0}
"""
)

# Cleanup of a tombstone.  KEYS: rec, forks.  ARGV: grace, n.
# returns {number of forks, member, score, ...}: up to n forks that began more
# than `grace` seconds ago, continuing (in rotation) after the last call's.
_OLD_FORKS = (
    _CLOCK
    + """
if redis.call('HGET', KEYS[1], 'deleted') ~= '1' then return {-1} end
local n = tonumber(ARGV[2])
local from = redis.call('HGET', KEYS[1], 'checked_to')
if not from or from == '' then from = '-inf' else from = '(' .. from end
local upto = num(clock() - tonumber(ARGV[1]))
local got = redis.call('ZRANGE', KEYS[2], from, upto, 'BYSCORE', 'LIMIT', 0, n, 'WITHSCORES')
redis.call('HSET', KEYS[1], 'checked_to', #got < 2 * n and '' or got[#got])
local out = {redis.call('ZCARD', KEYS[2])}
for _, x in ipairs(got) do out[#out + 1] = x end
return out
"""
)

_INDEX = (
    _CLOCK
    + """
local WHERE, DUE, EXPIRY, M = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local function entry()
  local w = redis.call('HGET', WHERE, M)
  if not w then return nil end
  local ok, info = pcall(cjson.decode, w)
  if not ok or type(info) ~= 'table' then info = {} end
  if type(info.idx) ~= 'table' then info.idx = {} end
  if type(info.cur) ~= 'table' then info.cur = {} end
  return info
end
local function save(info) redis.call('HSET', WHERE, M, cjson.encode(info)) end
-- {-1, keys} when `list` names an index key this call was not given
local function missing(list)
  local have = {}
  for i = 4, #KEYS do have[KEYS[i]] = true end
  for _, k in ipairs(list) do
    if not have[k] then return {-1, cjson.encode(list)} end
  end
  return nil
end
local function arm(t, grace)
  local due = num(t + tonumber(grace))
  redis.call('ZADD', DUE, 'GT', due, M)
  return due
end
-- clear our mark on M, unless a later change marked it again
local function disarm(due)
  local s = redis.call('ZSCORE', DUE, M)
  if s and due ~= '' and tonumber(s) == tonumber(due) then
    redis.call('ZREM', DUE, M)
    return true
  end
  return false
end
"""
)

# Create/fork step 2.  ARGV: member, created_at, expires_at, parent id, grace.
# KEYS[4..]: the listing indexes.  returns {t, due}
_INTENT = (
    _INDEX
    + """
local t = clock()
local keys = {}
for i = 4, #KEYS do
  keys[#keys + 1] = KEYS[i]
  redis.call('ZADD', KEYS[i], ARGV[2], M)
end
save({idx = keys, cur = keys, v = 1, exp = ARGV[3], parent = ARGV[4]})
if ARGV[3] ~= '' then redis.call('ZADD', EXPIRY, ARGV[3], M) end
return {num(t), arm(t, ARGV[5])}
"""
)

# Update step 1 (and delete step 1, with no keys): mark M as changing and add
# it to the indexes its new version needs (the old ones stay until PLACE).
# ARGV: member, created_at, expires_at, grace.  returns {t, due}
_WIDEN = (
    _INDEX
    + """
local t = clock()
local due = arm(t, ARGV[4])
local info = entry()
if info and #KEYS > 3 then
  local have = {}
  for _, k in ipairs(info.idx) do have[k] = true end
  for i = 4, #KEYS do
    redis.call('ZADD', KEYS[i], ARGV[2], M)
    if not have[KEYS[i]] then info.idx[#info.idx + 1] = KEYS[i] end
  end
  if ARGV[3] ~= '' then redis.call('ZADD', EXPIRY, 'LT', ARGV[3], M) end
  save(info)
end
return {num(t), due}
"""
)

# Update step 3, and cleanup of a live session: record the placement of
# `version` (if newer than the one recorded) and, when no other change is under
# way, make the entry exact (drop index memberships it no longer needs).
# ARGV: member, version, created_at, expires_at, due ('' = none of ours), n.
# KEYS[4..3+n]: the placement; after them, other keys the entry may list.
# returns {1} | {0} no entry (deleted) | {-1, keys}
_PLACE = (
    _INDEX
    + """
local info = entry()
if not info then disarm(ARGV[5]) return {0} end
local ask = missing(info.idx)
if ask then return ask end
local n = tonumber(ARGV[6])
if tonumber(ARGV[2]) > (tonumber(info.v) or 0) then
  local have = {}
  for _, k in ipairs(info.idx) do have[k] = true end
  local cur = {}
  for i = 4, 3 + n do
    cur[#cur + 1] = KEYS[i]
    redis.call('ZADD', KEYS[i], ARGV[3], M)
    if not have[KEYS[i]] then info.idx[#info.idx + 1] = KEYS[i] end
  end
  info.cur, info.v, info.exp = cur, tonumber(ARGV[2]), ARGV[4]
  if ARGV[4] ~= '' then redis.call('ZADD', EXPIRY, 'LT', ARGV[4], M) end
end
if disarm(ARGV[5]) then
  local keep = {}
  for _, k in ipairs(info.cur) do keep[k] = true end
  for _, k in ipairs(info.idx) do
    if not keep[k] then redis.call('ZREM', k, M) end
  end
  info.idx = info.cur
  if info.exp and info.exp ~= '' then
    redis.call('ZADD', EXPIRY, info.exp, M)
  else
    redis.call('ZREM', EXPIRY, M)
  end
end
save(info)
return {1}
"""
)

# Clear the mark of a finished create or fork.  ARGV: member, due.  returns {0|1}
_DISARM = (
    _INDEX
    + """
return {disarm(ARGV[2]) and 1 or 0}
"""
)

# Remove M from the index slot entirely.  ARGV: member.
# KEYS[4..]: the keys its entry may list.  returns {1} | {0} no entry | {-1, keys}
_FORGET = (
    _INDEX
    + """
local info = entry()
if info then
  local ask = missing(info.idx)
  if ask then return ask end
end
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], M) end
redis.call('ZREM', EXPIRY, M)
redis.call('ZREM', DUE, M)
redis.call('HDEL', WHERE, M)
return {info and 1 or 0}
"""
)

# M is a tombstone now: out of the listings, due for a check of its forks.
# ARGV: member, parent id.  KEYS[4..]: the keys its entry may list.
# returns {1} | {-1, keys}
_BURY = (
    _INDEX
    + """
local info = entry() or {idx = {}, v = 0, parent = ARGV[2]}
local ask = missing(info.idx)
if ask then return ask end
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], M) end
redis.call('ZREM', EXPIRY, M)
info.idx, info.cur, info.exp, info.tomb = {}, {}, '', 1
save(info)
redis.call('ZADD', DUE, num(clock()), M)
return {1}
"""
)

# Look at M again later.  ARGV: member, score seen, in how many seconds.
_REQUEUE = (
    _INDEX
    + """
local s = redis.call('ZSCORE', DUE, M)
if not s or tonumber(s) ~= tonumber(ARGV[2]) then return {0} end
redis.call('ZADD', DUE, num(clock() + tonumber(ARGV[3])), M)
return {1}
"""
)

# Purge of a session that is not expired (any more).  ARGV: member, score
# seen, its expires_at ('' for none).
_RESCHEDULE = (
    _INDEX
    + """
local s = redis.call('ZSCORE', EXPIRY, M)
if not s or tonumber(s) ~= tonumber(ARGV[2]) then return {0} end
if ARGV[3] ~= '' then redis.call('ZADD', EXPIRY, ARGV[3], M) else redis.call('ZREM', EXPIRY, M) end
return {1}
"""
)

# KEYS: where, due, expiry.  ARGV: before, n, offset.
# returns {member, score, where or '', marked ('1' if a change is under way), ...}
_EXPIRY_BATCH = """
local got = redis.call('ZRANGE', KEYS[3], '-inf', ARGV[1], 'BYSCORE', 'LIMIT',
  tonumber(ARGV[3]), tonumber(ARGV[2]), 'WITHSCORES')
local out = {}
for i = 1, #got, 2 do
  out[#out + 1] = got[i]
  out[#out + 1] = got[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], got[i]) or ''
  out[#out + 1] = redis.call('ZSCORE', KEYS[2], got[i]) and '1' or ''
end
return out
"""

# KEYS: where, due, expiry.  ARGV: n.  The marks due now (server time).
# returns {member, score, where or '', ...}
_DUE_BATCH = (
    _CLOCK
    + """
local got = redis.call('ZRANGE', KEYS[2], '-inf', num(clock()), 'BYSCORE', 'LIMIT', 0,
  tonumber(ARGV[1]), 'WITHSCORES')
local out = {}
for i = 1, #got, 2 do
  out[#out + 1] = got[i]
  out[#out + 1] = got[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], got[i]) or ''
end
return out
"""
)

# KEYS: an index.  ARGV: cursor score, cursor id .. '#' ('' for the first
# page), n.  Returns the next n members (flat: member, score, ...) after the
# cursor in (score, member) descending order, in one atomic step so that
# concurrent inserts and removals never shift the window. Members are
# ``ID#STAMP`` and '#' sorts before every character an id may hold, so the
# member order is the id order.
_PAGE = """
local key, n = KEYS[1], tonumber(ARGV[3])
local start = 0
local function before(a, b)  -- byte order, as Redis sorts equal scores
  local len = math.min(#a, #b)
  for i = 1, len do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
if ARGV[2] ~= '' then
  local s, m = ARGV[1], ARGV[2]
  start = redis.call('ZCOUNT', key, '(' .. s, '+inf')
  local off, done = 0, false
  while not done do
    local ties = redis.call('ZRANGE', key, s, s, 'BYSCORE', 'REV', 'LIMIT', off, 200)
    for _, t in ipairs(ties) do
      if before(t, m) then done = true break end
      start = start + 1
    end
    if #ties < 200 then done = true end
    off = off + 200
  end
end
return redis.call('ZRANGE', key, start, start + n - 1, 'REV', 'WITHSCORES')
"""

#: Every script by name; the store registers them all.
SCRIPTS = {
    "append": _APPEND,
    "put_blob": _PUT_BLOB,
    "hold": _HOLD,
    "create_record": _CREATE_RECORD,
    "update_record": _UPDATE_RECORD,
    "delete_record": _DELETE_RECORD,
    "expire": _EXPIRE,
    "release": _RELEASE,
    "old_forks": _OLD_FORKS,
    "intent": _INTENT,
    "widen": _WIDEN,
    "place": _PLACE,
    "disarm": _DISARM,
    "forget": _FORGET,
    "bury": _BURY,
    "requeue": _REQUEUE,
    "reschedule": _RESCHEDULE,
    "expiry_batch": _EXPIRY_BATCH,
    "due_batch": _DUE_BATCH,
    "page": _PAGE,
}


def member_of(session_id: str, stamp: str) -> str:
    """The index member naming one incarnation of a session: ``ID#STAMP``."""
    return f"{session_id}{MARK}{stamp}"


def split_member(member: bytes | str) -> tuple[str, str]:
    """``(session id, stamp)`` of an ``ID#STAMP`` member."""
    text = member.decode() if isinstance(member, bytes) else member
    session_id, _, stamp = text.partition(MARK)
    return session_id, stamp


def key_list(raw: Any) -> list[str]:
    """The index keys in a JSON list from a script (Lua writes an empty list as ``{}``)."""
    try:
        keys = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return []
    return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


def where_entry(raw: bytes | str) -> tuple[str, list[str]]:
    """The parent id and the index keys of a ``where`` entry ('' and [] if unreadable)."""
    try:
        info = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):  # a damaged entry: cleanup re-derives it
        info = {}
    if not isinstance(info, dict):
        return "", []
    parent, idx = info.get("parent"), info.get("idx")
    keys = [k for k in idx if isinstance(k, str)] if isinstance(idx, list) else []
    return (parent if isinstance(parent, str) else ""), keys
