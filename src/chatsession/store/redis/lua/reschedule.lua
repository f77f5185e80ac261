--! uses: clock index
-- Purge of a session that is not expired (any more).  ARGV: member, score
-- seen, its expires_at ('' for none).
local s = redis.call('ZSCORE', EXPIRY, M)
if not s or tonumber(s) ~= tonumber(ARGV[2]) then return {0} end
if ARGV[3] ~= '' then redis.call('ZADD', EXPIRY, ARGV[3], M) else redis.call('ZREM', EXPIRY, M) end
return {1}
