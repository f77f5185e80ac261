--! uses: clock session
-- The kept snapshot.  ARGV: now.
-- Returns {1, seq, data (nil: damaged), head} | {0} none | {-1} | {-2} | {-8, field}
local r = redis.call('HMGET', REC, 'head', 'deleted', 'expires_at')
local why = hidden(r, ARGV[1])
if why then return why end
local s = redis.call('HMGET', SNAP, 'seq', 'data')
if not s[1] then return {0} end
return {1, s[1], s[2] or false, r[1]}
