local id = redis.call('XADD', KEYS[1], ARGV[1], 'e', ARGV[2])
local cut = nil
local max_len = tonumber(ARGV[3])
local len = redis.call('XLEN', KEYS[1])
if len > max_len + tonumber(ARGV[4]) then
  local gone = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', len - max_len)
  cut = gone[#gone][1]
  redis.call('XTRIM', KEYS[1], 'MAXLEN', '=', max_len)
end
local max_age = tonumber(ARGV[5])
if max_age > 0 then
  local t = redis.call('TIME')
  local min_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - max_age
  if min_ms > 0 then
    local min_id = string.format('%.0f', min_ms)
    -- Probe forwards first: an XREVRANGE whose end is older than every entry
    -- walks the whole stream backwards (Redis 7.0), on almost every publish.
    if redis.call('XRANGE', KEYS[1], '-', '(' .. min_id, 'COUNT', 1)[1] then
      -- Everything the length trim removed is older than what is left.
      cut = redis.call('XREVRANGE', KEYS[1], '(' .. min_id, '-', 'COUNT', 1)[1][1]
      redis.call('XTRIM', KEYS[1], 'MINID', '=', min_id)
    end
  end
end
if cut then redis.call('SET', KEYS[3], cut) end
redis.call(ARGV[6], KEYS[2], id .. '\n' .. ARGV[2])
return id
