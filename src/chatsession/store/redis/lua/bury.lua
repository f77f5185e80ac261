--! uses: clock index
-- M is a tombstone now: out of the listings, due for a check of its forks.
-- ARGV: member, parent id.  KEYS[4..]: the keys its entry may list.
-- Returns {1} | {-1, keys}
local info = entry() or {idx = {}, v = 0, parent = ARGV[2]}
local ask = missing(info.idx)
if ask then return ask end
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], M) end
redis.call('ZREM', EXPIRY, M)
info.idx, info.cur, info.exp, info.tomb = {}, {}, '', 1
save(info)
redis.call('ZADD', DUE, num(clock()), M)
return {1}
