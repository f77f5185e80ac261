--! uses: clock session
-- A fork of this session went away.  ARGV: the fork's incarnation ('' to only check).
-- Returns {0} | {1, parent id, stamp}: the session was a tombstone kept for
-- its forks and is gone now (its own parent must be released in turn).
if ARGV[1] ~= '' then redis.call('ZREM', FORKS, ARGV[1]) end
if redis.call('ZCARD', FORKS) > 0 then return {0} end
local r = redis.call('HMGET', REC, 'deleted', 'expires_at', 'parent_id', 'stamp')
if r[1] == '1' then
  redis.call('UNLINK', REC, EV, BLOB, FORKS, LEASE, SNAP)
  return {1, r[3] or '', r[4] or ''}
end
local at = ms(r[2])
if at then
  for _, k in ipairs(DATA) do redis.call('PEXPIREAT', k, at) end
  cap_lease(at)
end
return {0}
