--! uses: clock index
-- Update step 3, and cleanup of a live session: record the placement of
-- `version` (if newer than the one recorded) and, when no other change is
-- under way, make the entry exact (drop index memberships it no longer needs,
-- and give the placement of the recorded version its exact scores).
-- ARGV: member, version, expires_at, due ('' = none of ours), n, then n
-- scores (of KEYS[4..3+n], in order).
-- KEYS[4..3+n]: the placement; after them, other keys the entry may list.
-- Returns {1} | {0} no entry (deleted) | {-1, keys}
local info = entry()
if not info then disarm(ARGV[4]) return {0} end
local ask = missing(info.idx)
if ask then return ask end
local n = tonumber(ARGV[5])
local version = tonumber(ARGV[2])
if version > (tonumber(info.v) or 0) then
  local have = {}
  for _, k in ipairs(info.idx) do have[k] = true end
  local cur = {}
  for i = 4, 3 + n do
    cur[#cur + 1] = KEYS[i]
    redis.call('ZADD', KEYS[i], 'GT', ARGV[2 + i], M)
    if not have[KEYS[i]] then info.idx[#info.idx + 1] = KEYS[i] end
  end
  info.cur, info.v, info.exp = cur, version, ARGV[3]
  if ARGV[3] ~= '' then redis.call('ZADD', EXPIRY, 'LT', ARGV[3], M) end
end
if disarm(ARGV[4]) then
  local keep = {}
  for _, k in ipairs(info.cur) do keep[k] = true end
  for _, k in ipairs(info.idx) do
    if not keep[k] then redis.call('ZREM', k, M) end
  end
  info.idx = info.cur
  if version == tonumber(info.v) then
    for i = 4, 3 + n do redis.call('ZADD', KEYS[i], ARGV[2 + i], M) end
  end
  if info.exp and info.exp ~= '' then
    redis.call('ZADD', EXPIRY, info.exp, M)
  else
    redis.call('ZREM', EXPIRY, M)
  end
end
save(info)
return {1}
