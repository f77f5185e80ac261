-- stats(): count one batch of visible sessions per user and per agent.
-- KEYS: the call's two tallies (users, agents), both in the index slot.
-- ARGV: seconds they live should the call stop half way, how many user
-- names follow, the user names, then the agent names (one per session).
-- Not safe to send twice (it adds): the client never re-sends it.
local users = tonumber(ARGV[2])
for i = 3, 2 + users do redis.call('ZINCRBY', KEYS[1], 1, ARGV[i]) end
for i = 3 + users, #ARGV do redis.call('ZINCRBY', KEYS[2], 1, ARGV[i]) end
for _, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then redis.call('EXPIRE', k, ARGV[1]) end
end
return {#ARGV - 2}
