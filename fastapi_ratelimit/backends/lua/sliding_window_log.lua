-- Sliding window log (exact). Twin of fastapi_ratelimit/algorithms/sliding_window_log.py.
-- Time in microseconds. Storage: a list of timestamps, oldest first; a request of cost N
-- appends N copies of its time, so list entries need no unique members. An entry counts
-- while now - ts < window. TTL = window + margin (the newest entry is always `now`).
local function sl_trim(key, now, window)
  local cutoff = now - window
  local count = call('LLEN', key)
  if count == 0 then return 0 end
  if tonumber(call('LINDEX', key, -1)) <= cutoff then
    call('DEL', key)
    return 0
  end
  if tonumber(call('LINDEX', key, 0)) > cutoff then return count end
  -- Binary search for the first live entry: ts[lo] <= cutoff < ts[hi].
  local lo, hi = 0, count - 1
  while hi - lo > 1 do
    local mid = floor((lo + hi) / 2)
    if tonumber(call('LINDEX', key, mid)) <= cutoff then lo = mid else hi = mid end
  end
  call('LTRIM', key, hi, -1)
  return count - hi
end

ALGORITHMS['sl'] = {
  evaluate = function(key, now, limit, window, capacity, cost)
    local count = sl_trim(key, now, window)
    local available = limit - count
    local allowed = cost <= available
    local retry = 0
    if not allowed then
      local k = count + cost - limit
      local oldest_needed = now
      if k <= count then
        oldest_needed = tonumber(call('LINDEX', key, k - 1))
      elseif count > 0 then
        oldest_needed = tonumber(call('LINDEX', key, -1))
      end
      retry = max(1, oldest_needed + window - now)
    end
    local reset_keep = 0
    if count > 0 then reset_keep = tonumber(call('LINDEX', key, -1)) + window - now end
    return allowed, available, retry, window, reset_keep, now, cost, window
  end,
  commit = function(key, margin, now, cost, window)
    local stamp = format('%d', now)
    local batch = {}
    for i = 1, cost do
      batch[#batch + 1] = stamp
      -- Lua's unpack has a stack limit: push in chunks.
      if #batch == 1000 or i == cost then
        call('RPUSH', key, unpack(batch))
        batch = {}
      end
    end
    call('PEXPIRE', key, ttl_ms(window, margin))
  end,
  refund = function(key, now, limit, window, capacity, amount)
    -- The oldest live entries, as sliding_window_log.py explains.
    local count = sl_trim(key, now, window)
    if count > 0 then call('LPOP', key, min(amount, count)) end
  end,
}
