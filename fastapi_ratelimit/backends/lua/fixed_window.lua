-- Fixed window counter. Twin of fastapi_ratelimit/algorithms/fixed_window.py.
-- Time in microseconds; windows aligned to the epoch.
-- Storage: hash {s = window start, c = count}; TTL = rest of the window + margin.
ALGORITHMS['fw'] = {
  evaluate = function(key, now, limit, window, capacity, cost)
    local start = math.floor(now / window) * window
    local raw = redis.call('HMGET', key, 's', 'c')
    local count = 0
    if raw[1] and tonumber(raw[1]) == start then count = tonumber(raw[2]) end
    local available = limit - count
    local ends_in = start + window - now
    local allowed = cost <= available
    local retry = 0
    if not allowed then retry = math.max(1, ends_in) end
    local reset_keep = 0
    if count > 0 then reset_keep = ends_in end
    local commit = function(margin)
      redis.call('HSET', key, 's', int_str(start), 'c', int_str(count + cost))
      redis.call('PEXPIRE', key, ttl_ms(ends_in, margin))
    end
    return allowed, available, retry, ends_in, reset_keep, commit
  end,
  refund = function(key, now, limit, window, capacity, amount)
    refund_window_count(key, now, window, amount)
  end,
}
