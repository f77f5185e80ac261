--! uses: clock
-- Purge step 1, in the index slot: claim a batch of expired members, so that
-- of several processes purging at once exactly one handles (and counts) each.
-- KEYS: where, due, expiry.  ARGV: before, n, offset, grace.
-- Each member of `expiry` scored up to `before` (from `offset` on, past the
-- ones left earlier) leaves `expiry` and gets a mark on `due` (cleanup finishes
-- it should the claimer stop half way); one a change is under way for is left.
-- Returns {t, due, members read, members left, member, score, where or '', ...}
local WHERE, DUE, EXPIRY = KEYS[1], KEYS[2], KEYS[3]
local t = clock()
local due = num(t + tonumber(ARGV[4]))
local got = redis.call('ZRANGE', EXPIRY, '-inf', ARGV[1], 'BYSCORE', 'LIMIT',
  tonumber(ARGV[3]), tonumber(ARGV[2]), 'WITHSCORES')
local out = {num(t), due, #got / 2, 0}
for i = 1, #got, 2 do
  local m = got[i]
  if redis.call('ZSCORE', DUE, m) then
    out[4] = out[4] + 1
  else
    redis.call('ZREM', EXPIRY, m)
    redis.call('ZADD', DUE, due, m)
    out[#out + 1] = m
    out[#out + 1] = got[i + 1]
    out[#out + 1] = redis.call('HGET', WHERE, m) or ''
  end
end
return out
