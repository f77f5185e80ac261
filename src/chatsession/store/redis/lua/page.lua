-- KEYS: an index.  ARGV: cursor score, cursor id .. '#' ('' for the first
-- page), n, and optionally 'joined'.  Returns the next n members (flat:
-- member, score, ...) after the cursor in (score, member) descending order,
-- in one atomic step so that concurrent inserts and removals never shift the
-- window. Members are ID#STAMP and '#' sorts before every character an id
-- may hold, so the member order is the id order. 'joined' (a walk over a
-- whole index, one reply item per page): {the members joined by spaces, how
-- many, the last one's score, the last one} ({'', 0} for none).
local key, n = KEYS[1], tonumber(ARGV[3])
local start = 0
local function before(a, b)  -- byte order, as Redis sorts equal scores
  local len = math.min(#a, #b)
  for i = 1, len do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
if ARGV[2] ~= '' then
  local s, m = ARGV[1], ARGV[2]
  start = redis.call('ZCOUNT', key, '(' .. s, '+inf')
  local off, done = 0, false
  while not done do
    local ties = redis.call('ZRANGE', key, s, s, 'BYSCORE', 'REV', 'LIMIT', off, 200)
    for _, t in ipairs(ties) do
      if before(t, m) then done = true break end
      start = start + 1
    end
    if #ties < 200 then done = true end
    off = off + 200
  end
end
if ARGV[4] == 'joined' then
  local members = redis.call('ZRANGE', key, start, start + n - 1, 'REV')
  if #members == 0 then return {'', 0} end
  local last = members[#members]
  return {table.concat(members, ' '), #members, redis.call('ZSCORE', key, last), last}
end
return redis.call('ZRANGE', key, start, start + n - 1, 'REV', 'WITHSCORES')
