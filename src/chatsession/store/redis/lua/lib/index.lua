-- Index scripts get the index slot's where, due and expiry keys, then listing indexes;
-- ARGV[1] is the incarnation being changed (ID#STAMP).
local WHERE, DUE, EXPIRY, M = KEYS[1], KEYS[2], KEYS[3], ARGV[1]
local function entry()
  local w = redis.call('HGET', WHERE, M)
  if not w then return nil end
  local ok, info = pcall(cjson.decode, w)
  if not ok or type(info) ~= 'table' then info = {} end
  if type(info.idx) ~= 'table' then info.idx = {} end
  if type(info.cur) ~= 'table' then info.cur = {} end
  return info
end
local function save(info) redis.call('HSET', WHERE, M, cjson.encode(info)) end
-- {-1, keys} when `list` names an index key this call was not given
local function missing(list)
  local have = {}
  for i = 4, #KEYS do have[KEYS[i]] = true end
  for _, k in ipairs(list) do
    if not have[k] then return {-1, cjson.encode(list)} end
  end
  return nil
end
local function arm(t, grace)
  local due = num(t + tonumber(grace))
  redis.call('ZADD', DUE, 'GT', due, M)
  return due
end
-- clear our mark on M, unless a later change marked it again
local function disarm(due)
  local s = redis.call('ZSCORE', DUE, M)
  if s and due ~= '' and tonumber(s) == tonumber(due) then
    redis.call('ZREM', DUE, M)
    return true
  end
  return false
end
