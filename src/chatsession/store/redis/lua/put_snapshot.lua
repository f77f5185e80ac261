--! uses: clock session
-- Keep a snapshot unless a later one is kept.  ARGV: now, seq, data.
-- Returns {1} kept | {0} one at a higher seq is kept | {-4, head} seq is past
-- the head | {-1} | {-2} | {-8, field}
local r = redis.call('HMGET', REC, 'head', 'deleted', 'expires_at')
local why = hidden(r, ARGV[1])
if why then return why end
local seq = tonumber(ARGV[2])
if seq > tonumber(r[1]) then return {-4, r[1]} end
local kept = tonumber(redis.call('HGET', SNAP, 'seq'))
if kept and kept > seq then return {0} end
redis.call('HSET', SNAP, 'seq', ARGV[2], 'data', ARGV[3])
follow_record(SNAP)
return {1}
