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
local fields = {}
for word in string.gmatch(ARGV[1], '%S+') do fields[#fields + 1] = word end
local mode = fields[1]
local now = tonumber(fields[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local margin = tonumber(fields[3])
local n = #KEYS

local function level(i)
  local b = 3 + (i - 1) * 5
  return ALGORITHMS[fields[b + 1]], tonumber(fields[b + 2]), tonumber(fields[b + 3]),
    tonumber(fields[b + 4]), tonumber(fields[b + 5])
end

if mode == 'r' then
  for i = 1, n do
    local algorithm, limit, window, capacity, cost = level(i)
    algorithm.refund(KEYS[i], now, limit, window, capacity, cost)
  end
  return ''
end

local oks, avails, costs, retries, resets_commit, resets_keep, commits = {}, {}, {}, {}, {}, {}, {}
local all_allowed = true
for i = 1, n do
  local algorithm, limit, window, capacity, cost = level(i)
  local ok, avail, retry, reset_commit, reset_keep, commit =
    algorithm.evaluate(KEYS[i], now, limit, window, capacity, cost)
  oks[i], avails[i], costs[i], retries[i] = ok, avail, cost, retry
  resets_commit[i], resets_keep[i], commits[i] = reset_commit, reset_keep, commit
  if not ok then all_allowed = false end
end

local consume = all_allowed and mode == 'h'
local out = {}
for i = 1, n do
  local remaining, reset
  if consume then
    commits[i](margin)
    remaining, reset = math.floor(avails[i] - costs[i]), resets_commit[i]
  else
    remaining, reset = math.floor(avails[i]), resets_keep[i]
  end
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = string.format('%d %d %d %d', oks[i] and 1 or 0, remaining, reset, retries[i])
end
return table.concat(out, ' ')
