--! uses: clock session
-- Append events if the head is still the expected one and this writer may write.
-- ARGV: expected head, now, the first event's id ('' for none), lease token
-- ('' for none), the lease key's value for it ('TOKEN OWNER'), the messages,
-- tokens and bytes the events add to the session's figures, entries...
-- Returns {head} | {-1} not found | {-2} expired | {-3, head} conflict |
-- {-5, head, length, parent_seq} the event list does not end at the head |
-- {-13} the session is archived (read-only: nothing written) | {-8, field} a
-- damaged record field (also a figure that is there but not a count) |
-- {-9, holder, ms left} another writer holds a live lease (no lease given) |
-- {-10, why} the lease given is not the live current one | {-11} the lease
-- key is damaged.
-- The figures (messages, tokens, bytes) grow by HINCRBY in this same step, up
-- to FIGURE_MAX each (never past it: HINCRBY cannot fail after the push). A
-- record of layout 1 has none yet: HINCRBY starts them, and the layout
-- upgrade (recount.lua) sets them from the events once.
-- The list must hold exactly the events after the fork point: a stray or
-- missing item would put the new events at the wrong seqs.
-- An append sent again after its reply was lost: when the event stored at
-- expected head + 1 carries the first event's id, it answers
-- {expected head + n} and writes nothing. (The id closes the event's header,
-- ,"ID"], which no header without an id can end with.)
local r = redis.call('HMGET', REC, 'head', 'deleted', 'expires_at', 'parent_seq', 'fence', 'state',
  'messages', 'tokens', 'bytes')
local why = hidden(r, ARGV[2])
if why then return why end
if bad_count(r[4]) then return {-8, 'parent_seq'} end
local head, base, expected = tonumber(r[1]), tonumber(r[4]), tonumber(ARGV[1])
local n = #ARGV - 8
if head ~= expected then
  local id = ARGV[3]
  if id ~= '' and expected < head and expected >= base then
    local item = redis.call('LINDEX', EV, expected - base)
    local cut = item and string.find(item, '\n', 1, true)
    local tail = ',"' .. id .. '"]'
    if cut and cut > #tail and string.sub(item, cut - #tail, cut - 1) == tail then
      return {expected + n}
    end
  end
  return {-3, r[1]}
end
local length = redis.call('LLEN', EV)
if length ~= head - base then return {-5, r[1], length, r[4]} end
if r[6] == 'archived' then return {-13} end
local figures = {'messages', 'tokens', 'bytes'}
local adds = {}
for i, name in ipairs(figures) do  -- none yet: a record of layout 1
  if r[6 + i] and bad_figure(r[6 + i]) then return {-8, name} end
  if bad_figure(ARGV[5 + i]) then return redis.error_reply('bad figure ' .. name) end
  adds[i] = math.min(tonumber(ARGV[5 + i]), FIGURE_MAX - (tonumber(r[6 + i]) or 0))
end
local held = redis.call('GET', LEASE)
if ARGV[4] ~= '' then
  if held ~= ARGV[5] then
    if not held and r[5] == ARGV[4] then return {-10, 'it expired'} end
    return {-10, 'it was taken over or released'}
  end
elseif held then
  local _, owner = holder(held)
  if not owner then return {-11} end
  return {-9, owner, redis.call('PTTL', LEASE)}
end
for i = 9, #ARGV, 1000 do
  redis.call('RPUSH', EV, unpack(ARGV, i, math.min(i + 999, #ARGV)))
end
redis.call('HSET', REC, 'head', head + n, 'updated_at', ARGV[2])
for i, name in ipairs(figures) do
  if adds[i] > 0 then redis.call('HINCRBY', REC, name, whole(adds[i])) end
end
follow_record(EV)
return {head + n}
