--! uses: clock session
-- Create/fork commit, on the new session: write its record unless the id is taken.
-- ARGV: t (when the operation began), deadline (seconds), expires_ms, stamp,
-- field, value, ... (the stamp among them).
-- Returns {1} created (also when a call sent again finds the record it
-- wrote: same stamp) | {0} the id is taken | {-6} too late: nothing written
if redis.call('EXISTS', REC) == 1 then
  if redis.call('HGET', REC, 'stamp') == ARGV[4] then return {1} end
  return {0}
end
if late(ARGV[1], ARGV[2]) then return {-6} end
redis.call('UNLINK', EV, BLOB, FORKS, LEASE, SNAP)
redis.call('HSET', REC, unpack(ARGV, 5))
if ARGV[3] ~= '' then redis.call('PEXPIREAT', REC, ARGV[3]) end
return {1}
