--! uses: clock session
-- Delete commit: remove the session's keys, or keep a tombstone while it has forks.
-- ARGV: now, stamp, t, deadline, change id.
-- Returns {0, parent id} removed | {1} made a tombstone (also when a call sent
-- again finds the tombstone it made) | {-1} | {-2} | {-6} too late |
-- {-7} another incarnation holds the id now | {-8, field}
local r = redis.call('HMGET', REC, 'head', 'deleted', 'expires_at', 'stamp', 'parent_id', 'change')
if not r[1] then return absent('head') end
if r[2] == '1' then
  if r[4] == ARGV[2] and r[6] == ARGV[5] then return {1} end
  return {-1}
end
if bad_time(r[3]) then return {-8, 'expires_at'} end
if expired(r[3], ARGV[1]) then return {-2} end
if r[4] ~= ARGV[2] then return {-7} end
if late(ARGV[3], ARGV[4]) then return {-6} end
if remove_or_keep() then
  redis.call('HSET', REC, 'change', ARGV[5])
  return {1}
end
return {0, r[5] or ''}
