-- KEYS: where, due, expiry.  ARGV: before, n, offset.
-- Returns {member, score, where or '', marked ('1' if a change is under way), ...}
local got = redis.call('ZRANGE', KEYS[3], '-inf', ARGV[1], 'BYSCORE', 'LIMIT',
  tonumber(ARGV[3]), tonumber(ARGV[2]), 'WITHSCORES')
local out = {}
for i = 1, #got, 2 do
  out[#out + 1] = got[i]
  out[#out + 1] = got[i + 1]
  out[#out + 1] = redis.call('HGET', KEYS[1], got[i]) or ''
  out[#out + 1] = redis.call('ZSCORE', KEYS[2], got[i]) and '1' or ''
end
return out
