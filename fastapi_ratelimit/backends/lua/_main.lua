-- Entry point: checks every level of one request, all-or-nothing.
-- KEYS[i]: the key of level i.
-- ARGV[1]: mode: 'h' hit (consume if every level passes), 'p' peek, 'r' refund.
-- ARGV[2]: '' to read the time from redis.call('TIME') (production), else a microsecond
--          timestamp (test-only clock override, so one scenario runs on both backends).
-- ARGV[3]: TTL margin in milliseconds.
-- ARGV[4 + 5*(i-1) ...]: for level i: algorithm code, limit, window (us), capacity, cost.
-- Returns, per level: allowed (0/1), remaining, reset_after (us), retry_after (us).
local mode = ARGV[1]
local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local margin = tonumber(ARGV[3])
local n = #KEYS

if mode == 'r' then
  for i = 1, n do
    local b = 3 + (i - 1) * 5
    ALGORITHMS[ARGV[b + 1]].refund(KEYS[i], now, tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]),
      tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5]))
  end
  return {}
end

local oks, avails, costs, retries, resets_commit, resets_keep, commits = {}, {}, {}, {}, {}, {}, {}
local all_allowed = true
for i = 1, n do
  local b = 3 + (i - 1) * 5
  local cost = tonumber(ARGV[b + 5])
  local ok, avail, retry, reset_commit, reset_keep, commit = ALGORITHMS[ARGV[b + 1]].evaluate(
    KEYS[i], now, tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3]), tonumber(ARGV[b + 4]), cost)
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
  out[#out + 1] = oks[i] and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retries[i]
end
return out
