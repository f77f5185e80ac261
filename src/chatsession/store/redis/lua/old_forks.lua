--! uses: clock session
-- Cleanup of a tombstone.  ARGV: grace, n.
-- Returns {number of forks, member, score, ...}: up to n forks that began more
-- than `grace` seconds ago, continuing (in rotation) after the last call's |
-- {-1} not a tombstone.
if redis.call('HGET', REC, 'deleted') ~= '1' then return {-1} end
local n = tonumber(ARGV[2])
local from = redis.call('HGET', REC, 'checked_to')
if not from or from == '' then from = '-inf' else from = '(' .. from end
local upto = num(clock() - tonumber(ARGV[1]))
local got = redis.call('ZRANGE', FORKS, from, upto, 'BYSCORE', 'LIMIT', 0, n, 'WITHSCORES')
redis.call('HSET', REC, 'checked_to', #got < 2 * n and '' or got[#got])
local out = {redis.call('ZCARD', FORKS)}
for _, x in ipairs(got) do out[#out + 1] = x end
return out
