--! uses: clock session
-- Purge step 2, on one session.  ARGV: stamp, before, t (the claim's), deadline.
-- Returns {0} that incarnation is gone | {1, parent id} removed now |
-- {2} made a tombstone now | {3} a tombstone already | {4, expires_at} not
-- expired | {-6} too late (the claim's mark is due: cleanup finishes it) |
-- {-8, field} a damaged record
local r = redis.call('HMGET', REC, 'stamp', 'deleted', 'expires_at', 'parent_id')
if r[1] ~= ARGV[1] then return {0} end
if r[2] == '1' then return {3} end
if bad_time(r[3]) then return {-8, 'expires_at'} end
if not expired(r[3], ARGV[2]) then return {4, r[3] or ''} end
if late(ARGV[3], ARGV[4]) then return {-6} end
if remove_or_keep() then return {2} end
return {1, r[4] or ''}
