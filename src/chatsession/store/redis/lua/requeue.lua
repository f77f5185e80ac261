--! uses: clock index
-- Look at M again later.  ARGV: member, score seen, in how many seconds.
local s = redis.call('ZSCORE', DUE, M)
if not s or tonumber(s) ~= tonumber(ARGV[2]) then return {0} end
redis.call('ZADD', DUE, num(clock() + tonumber(ARGV[3])), M)
return {1}
