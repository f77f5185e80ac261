--! uses: clock session
-- Upgrade of a record from layout 1 (no figures): set its figures, counted by
-- the caller from its own events up to `head`, unless it has them already.
-- ARGV: stamp, head, messages, tokens, bytes.
-- Returns {1} set | {0} it has them (or is another incarnation, or gone) |
-- {-3, head} the head moved since the caller read the events: count again
local r = redis.call('HMGET', REC, 'stamp', 'head', 'counted')
if r[1] ~= ARGV[1] or r[3] then return {0} end
if r[2] ~= ARGV[2] then return {-3, r[2] or ''} end
redis.call('HSET', REC, 'messages', ARGV[3], 'tokens', ARGV[4], 'bytes', ARGV[5], 'counted', '1')
return {1}
