-- Shared helpers for the algorithm scripts. The loader concatenates:
--   _prelude.lua, fixed_window.lua, sliding_window_log.lua, sliding_window_counter.lua,
--   token_bucket.lua, gcra.lua, _main.lua
-- into ONE script, so a request's levels, whatever their algorithms, are checked in one call.
-- Units everywhere: time in integer microseconds (Lua doubles hold them exactly below 2^53),
-- counts in request units, TTLs in milliseconds.
--
-- ALGORITHMS[code] has three functions, each given the key and the level's figures:
--   evaluate(key, now, limit, window, capacity, cost) -> allowed, available, retry,
--     reset on commit, reset kept, then up to four values for commit (reads only)
--   commit(key, margin, ...those values) writes the new state and its TTL
--   refund(key, now, limit, window, capacity, amount)
--
-- Each algorithm's file is the body of its loader, LOADERS[code] (_scripts.py wraps it
-- so): its functions are made the first time this call needs them, not on every
-- call for all five.
local LOADERS = {}
local ALGORITHMS = setmetatable({}, {
  __index = function(algorithms, code)
    LOADERS[code]()
    return rawget(algorithms, code)
  end,
})
-- Library functions as locals: a global's lookup costs two table reads per call, and this
-- script runs for every request.
local call, format, match = redis.call, string.format, string.match
local floor, ceil, max, min = math.floor, math.ceil, math.max, math.min
local tonumber = tonumber

-- Integers are stored with format('%d', x) (plain digits); floats so that they read back
-- bit-for-bit (17 significant digits).
local function float_str(x)
  return format('%.17g', x)
end

-- A key's TTL: the time its state can still matter, plus the margin. Never below 1 ms.
local function ttl_ms(us, margin_ms)
  local ms = ceil(us / 1000)
  if ms < 0 then ms = 0 end
  return ms + margin_ms
end
