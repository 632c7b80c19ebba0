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
