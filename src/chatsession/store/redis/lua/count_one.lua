-- stats(): what one session counts, in one short reply (read only).
-- KEYS: the session's record (only that key: the session's slot).
-- ARGV: the stamp its index member names, the client's now (compared with
-- expires_at, client time too), idle_before ('' for none).
-- Replies:
--   0             not counted: missing, another incarnation, or a tombstone
--   {-8, field}   a damaged record: `field` is missing or unreadable
--   1             past its expires_at, not yet removed: counts as expired only
--   'STATE M T B U A NAMES'   visible: its state (active turned idle when
--                 updated_at < idle_before), its figures messages, tokens,
--                 bytes as stored, the byte lengths of its user and agent
--                 ('-' for None), then the user and the agent, back to back.
local f = redis.call('HMGET', KEYS[1], 'stamp', 'deleted', 'expires_at', 'state',
  'updated_at', 'user_id', 'agent_id', 'unset', 'messages', 'tokens', 'bytes')
if f[1] ~= ARGV[1] or f[2] == '1' then return 0 end
local expires, state, updated = f[3], f[4], f[5]
if expires and expires ~= '' and not tonumber(expires) then return {-8, 'expires_at'} end
if state ~= 'active' and state ~= 'idle' and state ~= 'archived' and state ~= 'expired' then
  return {-8, 'state'}
end
if not updated or not tonumber(updated) then return {-8, 'updated_at'} end
local figures = {'messages', 'tokens', 'bytes'}
for i = 9, 11 do
  if not f[i] then
    f[i] = '0'
  elseif not string.match(f[i], '^[+-]?%d+$') then
    return {-8, figures[i - 8]}
  end
end
if expires and expires ~= '' and tonumber(expires) <= tonumber(ARGV[2]) then return 1 end
-- user_id / agent_id as records.who_field reads them: None when missing,
-- named in `unset` (names joined by spaces), or '' in a record written
-- before `unset`
local unset = f[8] and (' ' .. f[8] .. ' ')
local function who(name, v)
  if not v then return nil end
  if not unset then
    if v == '' then return nil end
    return v
  end
  if string.find(unset, name, 1, true) then return nil end
  return v
end
local user, agent = who(' user_id ', f[6]), who(' agent_id ', f[7])
if state == 'active' and ARGV[3] ~= '' and tonumber(updated) < tonumber(ARGV[3]) then
  state = 'idle'
end
return table.concat({state, f[9], f[10], f[11], user and #user or '-', agent and #agent or '-',
  (user or '') .. (agent or '')}, ' ')
