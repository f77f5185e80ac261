--! uses: clock index
-- Purge of a session that is not expired (any more): put M back on `expiry`
-- and clear the claim's mark.  ARGV: member, due, its expires_at ('' for none).
-- Returns {1} | {0} no entry (it went meanwhile)
local info = entry()
if not info then return {0} end
if ARGV[3] ~= '' then redis.call('ZADD', EXPIRY, 'LT', ARGV[3], M) end
disarm(ARGV[2])
return {1}
