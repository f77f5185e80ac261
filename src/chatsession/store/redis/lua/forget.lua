--! uses: clock index
-- Remove M from the index slot entirely.  ARGV: member.
-- KEYS[4..]: the keys its entry may list.  Returns {1} | {0} no entry | {-1, keys}
local info = entry()
if info then
  local ask = missing(info.idx)
  if ask then return ask end
end
for i = 4, #KEYS do redis.call('ZREM', KEYS[i], M) end
redis.call('ZREM', EXPIRY, M)
redis.call('ZREM', DUE, M)
redis.call('HDEL', WHERE, M)
return {info and 1 or 0}
