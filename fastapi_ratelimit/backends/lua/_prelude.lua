-- Shared helpers for the algorithm scripts. The loader concatenates:
--   _prelude.lua, fixed_window.lua, sliding_window_log.lua, sliding_window_counter.lua,
--   token_bucket.lua, gcra.lua, _main.lua
-- into ONE script, so a request's levels, whatever their algorithms, are checked in one call.
-- Units everywhere: time in integer microseconds (Lua doubles hold them exactly below 2^53),
-- counts in request units, TTLs in milliseconds.
local ALGORITHMS = {}

-- Integers as plain digits, floats so that they read back bit-for-bit (17 significant digits).
local function int_str(x)
  return string.format('%d', x)
end
local function float_str(x)
  return string.format('%.17g', x)
end

-- A key's TTL: the time its state can still matter, plus the margin. Never below 1 ms.
local function ttl_ms(us, margin_ms)
  local ms = math.ceil(us / 1000)
  if ms < 0 then ms = 0 end
  return ms + margin_ms
end

-- Refund for the windowed counters (fixed window, sliding window counter): both keep the
-- current window's start in field 's' and its count in field 'c'; a refund only touches the
-- current window.
local function refund_window_count(key, now, window, amount)
  local start = math.floor(now / window) * window
  local raw = redis.call('HMGET', key, 's', 'c')
  if raw[1] and tonumber(raw[1]) == start then
    redis.call('HSET', key, 'c', int_str(math.max(0, tonumber(raw[2]) - amount)))
  end
end
