--! uses: clock session
-- Take the session's write lease.  ARGV: owner, ttl (ms), now.
-- Returns {token, until (ms, server clock)} | {-9, holder, ms left} another
-- owner holds it | {-1} | {-2} | {-8, field} | {-11} the lease key is damaged.
-- Free (no key: never taken, released, or expired by PX): a new token, one
-- more than the session's `fence`. Held by the same owner: renewed, same token.
local r = redis.call('HMGET', REC, 'head', 'deleted', 'expires_at', 'fence')
local why = hidden(r, ARGV[3])
if why then return why end
if r[4] and bad_count(r[4]) then return {-8, 'fence'} end
local held = redis.call('GET', LEASE)
local token
if held then
  local t, owner = holder(held)
  if not owner then return {-11} end
  if owner ~= ARGV[1] then return {-9, owner, redis.call('PTTL', LEASE)} end
  token = t
else
  token = whole(redis.call('HINCRBY', REC, 'fence', 1))
end
return grant(token, ARGV[1], ARGV[2])
