-- Entry point: checks every level of one request, all-or-nothing.
-- KEYS[i]: the key of level i.
-- ARGV[1]: one string of space-separated fields (one argument keeps the client's packing
--          cheap: redis-py encodes every argument separately):
--   mode        'h' hit (consume if every level passes), 'p' peek, 'r' refund
--   now         '-' to read the time from redis.call('TIME') (production), else a
--               microsecond timestamp (test-only clock override)
--   margin      TTL margin in milliseconds
--   then, for each level: algorithm code, limit, window (us), capacity, cost
-- Returns one string, four integers per level separated by spaces:
--   allowed (0/1), remaining, reset_after (us), retry_after (us)
-- (one bulk string parses far faster on the client than an array of integers).
--
-- Redis runs this for every request, so its cost is Redis CPU per request: one pattern
-- match per level (not one iterator step per field), no closure or table per level, and
-- library functions as locals (see _prelude.lua).
local arg = ARGV[1]
local mode, clock, margin, pos = match(arg, '^(%S+) (%S+) (%S+)()')
local now = tonumber(clock)
if not now then
  local t = call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
margin = tonumber(margin)
local n = #KEYS

-- The next level's fields, in order: the i-th call reads level i.
local function next_level()
  local code, limit, window, capacity, cost, after =
    match(arg, '^ (%S+) (%S+) (%S+) (%S+) (%S+)()', pos)
  pos = after
  return ALGORITHMS[code], tonumber(limit), tonumber(window), tonumber(capacity), tonumber(cost)
end

if mode == 'r' then
  for i = 1, n do
    local algorithm, limit, window, capacity, cost = next_level()
    algorithm.refund(KEYS[i], now, limit, window, capacity, cost)
  end
  return ''
end

-- Every level's outcome in one flat table, ROW slots a level: algorithm, allowed,
-- available, cost, retry, reset on commit, reset kept, then the (up to four) values the
-- algorithm's commit takes.
local ROW = 11
local rows = {}
local all_allowed = true
for i = 1, n do
  local algorithm, limit, window, capacity, cost = next_level()
  local ok, avail, retry, reset_commit, reset_keep, c1, c2, c3, c4 =
    algorithm.evaluate(KEYS[i], now, limit, window, capacity, cost)
  local b = (i - 1) * ROW
  rows[b + 1], rows[b + 2], rows[b + 3], rows[b + 4] = algorithm, ok, avail, cost
  rows[b + 5], rows[b + 6], rows[b + 7] = retry, reset_commit, reset_keep
  rows[b + 8], rows[b + 9], rows[b + 10], rows[b + 11] = c1, c2, c3, c4
  if not ok then all_allowed = false end
end

local consume = all_allowed and mode == 'h'
local out = {}
for i = 1, n do
  local b = (i - 1) * ROW
  local remaining, reset
  if consume then
    rows[b + 1].commit(KEYS[i], margin, rows[b + 8], rows[b + 9], rows[b + 10], rows[b + 11])
    remaining, reset = floor(rows[b + 3] - rows[b + 4]), rows[b + 6]
  else
    remaining, reset = floor(rows[b + 3]), rows[b + 7]
  end
  if remaining < 0 then remaining = 0 end
  out[i] = format('%d %d %d %d', rows[b + 2] and 1 or 0, remaining, reset, rows[b + 5])
end
return table.concat(out, ' ')
