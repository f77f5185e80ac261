--! uses: clock session
-- Fork step 2, on the parent: hold the fork, so the parent's events stay.
-- ARGV: now, at_seq, the fork's incarnation.
-- Returns {head, when the fork began} | {-1} | {-2} | {-4, head} bad fork point |
-- {-8, field}.  Repeating it changes nothing (the fork is one member of the
-- set, stamped once).
local r = redis.call('HMGET', REC, 'head', 'deleted', 'expires_at')
local why = hidden(r, ARGV[1])
if why then return why end
local head = tonumber(r[1])
if tonumber(ARGV[2]) > head then return {-4, r[1]} end
redis.call('ZADD', FORKS, 'NX', num(clock()), ARGV[3])
for _, k in ipairs(DATA) do redis.call('PERSIST', k) end
return {head, redis.call('ZSCORE', FORKS, ARGV[3])}
