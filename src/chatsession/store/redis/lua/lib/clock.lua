-- The server's clock, in seconds (with microseconds) and in whole milliseconds.
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function clock_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
-- a number as text for the client (a Lua number in a reply is cut to an integer)
local function num(x) return string.format('%.17g', x) end
local function whole(x) return string.format('%d', x) end
