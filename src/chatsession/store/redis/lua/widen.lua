--! uses: clock index
-- Update step 1 (and delete step 1, with no keys): mark M as changing and add
-- it to the indexes its new version needs (the old ones stay until PLACE).
-- ARGV: member, created_at, expires_at, grace.  Returns {t, due}
local t = clock()
local due = arm(t, ARGV[4])
local info = entry()
if info and #KEYS > 3 then
  local have = {}
  for _, k in ipairs(info.idx) do have[k] = true end
  for i = 4, #KEYS do
    redis.call('ZADD', KEYS[i], ARGV[2], M)
    if not have[KEYS[i]] then info.idx[#info.idx + 1] = KEYS[i] end
  end
  if ARGV[3] ~= '' then redis.call('ZADD', EXPIRY, 'LT', ARGV[3], M) end
  save(info)
end
return {num(t), due}
