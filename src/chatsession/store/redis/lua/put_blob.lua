--! uses: clock session
-- Keep a blob (by its content hash: writing it twice changes nothing).
-- ARGV: now, blob id, bytes.  Returns {1} | {-1} | {-2} | {-8, field}
local r = redis.call('HMGET', REC, 'head', 'deleted', 'expires_at')
local why = hidden(r, ARGV[1])
if why then return why end
redis.call('HSETNX', BLOB, ARGV[2], ARGV[3])
follow_record(BLOB)
return {1}
