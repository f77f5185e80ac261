--! uses: clock index
-- Update step 1 (and delete step 1, with no keys): mark M as changing and add
-- it to the indexes its new version needs (the old ones stay until PLACE).
-- ARGV: member, expires_at, grace, one score per key of KEYS[4..].
-- Returns {t, due}
-- Scores only grow here (GT): a live set's score (expires_at) may only be too
-- late until PLACE makes it exact, so a limit never undercounts.
local t = clock()
local due = arm(t, ARGV[3])
local info = entry()
if info and #KEYS > 3 then
  local have = {}
  for _, k in ipairs(info.idx) do have[k] = true end
  for i = 4, #KEYS do
    redis.call('ZADD', KEYS[i], 'GT', ARGV[i], M)
    if not have[KEYS[i]] then info.idx[#info.idx + 1] = KEYS[i] end
  end
  if ARGV[2] ~= '' then redis.call('ZADD', EXPIRY, 'LT', ARGV[2], M) end
  save(info)
end
return {num(t), due}
