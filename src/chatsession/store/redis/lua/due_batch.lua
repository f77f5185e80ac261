--! uses: clock
-- KEYS: where, due, expiry.  ARGV: n.  The marks due now (server time).
-- Returns {member, score, where or '', ...}
local got = redis.call('ZRANGE', KEYS[2], '-inf', num(clock()), 'BYSCORE', 'LIMIT', 0,
  tonumber(ARGV[1]), 'WITHSCORES')
local out = {}
for i = 1, #got, 2 do
  out[#out + 1] = got[i]
  out[#out + 1] = got[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], got[i]) or ''
end
return out
