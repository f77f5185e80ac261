-- stats(): add counts per user and per agent to the call's tallies.
-- KEYS: the call's two tallies (users, agents), both in the index slot.
-- ARGV: seconds they live should the call stop half way, how many user
-- pairs follow, the user pairs (name, count), then the agent pairs.
-- Not safe to send twice (it adds): the client never re-sends it.
local users = 2 + 2 * tonumber(ARGV[2])
for i = 3, users, 2 do redis.call('ZINCRBY', KEYS[1], ARGV[i + 1], ARGV[i]) end
for i = users + 1, #ARGV, 2 do redis.call('ZINCRBY', KEYS[2], ARGV[i + 1], ARGV[i]) end
for _, k in ipairs(KEYS) do
  if redis.call('EXISTS', k) == 1 then redis.call('EXPIRE', k, ARGV[1]) end
end
return {(#ARGV - 2) / 2}
