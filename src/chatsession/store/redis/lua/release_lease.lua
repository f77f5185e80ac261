--! uses: clock session
-- Give a lease up if it is still this one.  ARGV: token, 'TOKEN OWNER'.
-- Returns {1} released | {0} not this lease: nothing changed.
-- `fence` moves on, so the released lease can no longer be renewed.
local held = redis.call('GET', LEASE)
if held ~= ARGV[2] and (held or redis.call('HGET', REC, 'fence') ~= ARGV[1]) then
  return {0}
end
redis.call('DEL', LEASE)
local fence = redis.call('HGET', REC, 'fence')
if fence and not bad_count(fence) then redis.call('HINCRBY', REC, 'fence', 1) end
return {1}
