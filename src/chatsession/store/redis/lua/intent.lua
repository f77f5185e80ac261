--! uses: clock index
-- Create/fork step 1: list the new incarnation and mark it due; with a limit,
-- only if its user has fewer live sessions than that (counted here, so
-- creates racing from any number of processes never pass the limit).
-- ARGV: member, expires_at, parent id, grace, limit ('' for none), now,
-- layout, n, then n scores (KEYS[4..3+n], in order).
-- KEYS[4..3+n]: the placement (listing indexes by created_at, the user's
-- live set by expires_at); KEYS[4+n]: meta; KEYS[5+n]: the live set to count
-- (with a limit).
-- Returns {t, due} | {-12, count, member, score, where, ...}: at the limit,
-- nothing written, with the user's live members whose marks are past due (a
-- change cut short that the caller may settle before it asks again).
-- A re-sent call (its entry is there already) is never refused: the first
-- send was admitted.
local n = tonumber(ARGV[8])
local META = KEYS[4 + n]
local info = entry()
if ARGV[5] ~= '' and not info then
  local live = KEYS[5 + n]
  local count = redis.call('ZCOUNT', live, '(' .. ARGV[6], '+inf')
  if count >= tonumber(ARGV[5]) then
    local out = {-12, count}
    local late = redis.call('ZRANGE', DUE, '-inf', num(clock()), 'BYSCORE', 'LIMIT', 0, 50)
    for _, m in ipairs(late) do
      if redis.call('ZSCORE', live, m) then
        out[#out + 1] = m
        out[#out + 1] = redis.call('ZSCORE', DUE, m)
        out[#out + 1] = redis.call('HGET', WHERE, m) or ''
      end
    end
    return out
  end
end
if redis.call('EXISTS', WHERE) == 0 then  -- nothing listed yet: a new store's layout
  redis.call('HSETNX', META, 'layout', ARGV[7])
end
local t = clock()
local keys = {}
for i = 1, n do
  keys[#keys + 1] = KEYS[3 + i]
  redis.call('ZADD', KEYS[3 + i], ARGV[8 + i], M)
end
save({idx = keys, cur = keys, v = 1, exp = ARGV[2], parent = ARGV[3]})
if ARGV[2] ~= '' then redis.call('ZADD', EXPIRY, ARGV[2], M) end
return {num(t), arm(t, ARGV[4])}
