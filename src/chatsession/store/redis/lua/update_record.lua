--! uses: clock session
-- Update commit: check the version and write.
-- ARGV: now, expected version, stamp, t, deadline, expires_ms, change id,
-- field, value, ...
-- Returns {version} | {-1} | {-2} | {-3, version} | {-6} | {-8, field}.
-- The change id is kept in the record: a call sent again after its reply was
-- lost finds it there (with the version it wrote) and answers that version.
local r = redis.call('HMGET', REC, 'version', 'deleted', 'expires_at', 'stamp', 'change')
if not r[1] or r[2] == '1' or r[4] ~= ARGV[3] then return {-1} end
if bad_count(r[1]) then return {-8, 'version'} end
local version = tonumber(r[1])
if r[5] == ARGV[7] and version == tonumber(ARGV[2]) + 1 then return {version} end
if bad_time(r[3]) then return {-8, 'expires_at'} end
if expired(r[3], ARGV[1]) then return {-2} end
if version ~= tonumber(ARGV[2]) then return {-3, r[1]} end
if late(ARGV[4], ARGV[5]) then return {-6} end
redis.call('HSET', REC, 'version', version + 1, 'change', ARGV[7], unpack(ARGV, 8))
if redis.call('ZCARD', FORKS) == 0 then
  for _, k in ipairs(DATA) do
    if ARGV[6] ~= '' then redis.call('PEXPIREAT', k, ARGV[6]) else redis.call('PERSIST', k) end
  end
  if ARGV[6] ~= '' then cap_lease(ARGV[6]) end
end
return {version + 1}
