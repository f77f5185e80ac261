--! uses: clock index
-- Create/fork step 1: list the new incarnation and mark it due.
-- ARGV: member, created_at, expires_at, parent id, grace.
-- KEYS[4..]: the listing indexes.  Returns {t, due}
local t = clock()
local keys = {}
for i = 4, #KEYS do
  keys[#keys + 1] = KEYS[i]
  redis.call('ZADD', KEYS[i], ARGV[2], M)
end
save({idx = keys, cur = keys, v = 1, exp = ARGV[3], parent = ARGV[4]})
if ARGV[3] ~= '' then redis.call('ZADD', EXPIRY, ARGV[3], M) end
return {num(t), arm(t, ARGV[5])}
