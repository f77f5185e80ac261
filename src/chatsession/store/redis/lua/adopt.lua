--! uses: clock index
-- Upgrade of a store from layout 1: put a live session of `version` into its
-- user's live set, unless a change is under way (that change places it).
-- ARGV: member, version, score.  KEYS[4]: the live set.
-- Returns {1} | {0} left alone (no entry, another version, changing, or in
-- the live set already)
local info = entry()
if not info or tonumber(info.v) ~= tonumber(ARGV[2]) or redis.call('ZSCORE', DUE, M) then
  return {0}
end
local listed = false
for _, k in ipairs(info.idx) do if k == KEYS[4] then listed = true end end
if listed and redis.call('ZSCORE', KEYS[4], M) then return {0} end
local function add(list)
  for _, k in ipairs(list) do if k == KEYS[4] then return end end
  list[#list + 1] = KEYS[4]
end
add(info.idx)
add(info.cur)
redis.call('ZADD', KEYS[4], ARGV[3], M)
save(info)
return {1}
