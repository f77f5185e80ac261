--! uses: clock session
-- Extend a lease still held.  ARGV: token, 'TOKEN OWNER', owner, ttl (ms), now.
-- Returns {token, until} | {-10, why} | {-1} | {-2} | {-8, field}.
-- A lease whose key expired is renewed while `fence` is still its token
-- (nobody took the session since, and it was not released: release moves it).
local r = redis.call('HMGET', REC, 'head', 'deleted', 'expires_at', 'fence')
local why = hidden(r, ARGV[5])
if why then return why end
local held = redis.call('GET', LEASE)
if held ~= ARGV[2] and (held or r[4] ~= ARGV[1]) then
  return {-10, 'it was taken over or released'}
end
return grant(ARGV[1], ARGV[3], ARGV[4])
