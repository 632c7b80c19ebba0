-- Fixed window counter. Twin of fastapi_ratelimit/algorithms/fixed_window.py.
-- Time in microseconds; windows aligned to the epoch.
-- Storage: hash {s = window start, c = count}; TTL = rest of the window + margin.
ALGORITHMS['fw'] = {
  evaluate = function(key, now, limit, window, capacity, cost)
    local start = floor(now / window) * window
    local raw = call('HMGET', key, 's', 'c')
    local count = 0
    if raw[1] and tonumber(raw[1]) == start then count = tonumber(raw[2]) end
    local available = limit - count
    local ends_in = start + window - now
    local allowed = cost <= available
    local retry = 0
    if not allowed then retry = max(1, ends_in) end
    local reset_keep = 0
    if count > 0 then reset_keep = ends_in end
    return allowed, available, retry, ends_in, reset_keep, start, count + cost, ends_in
  end,
  commit = function(key, margin, start, count, ends_in)
    call('HSET', key, 's', format('%d', start), 'c', format('%d', count))
    call('PEXPIRE', key, ttl_ms(ends_in, margin))
  end,
  refund = function(key, now, limit, window, capacity, amount)
    -- Only the current window: a past one no longer counts.
    local start = floor(now / window) * window
    local raw = call('HMGET', key, 's', 'c')
    if raw[1] and tonumber(raw[1]) == start then
      call('HSET', key, 'c', format('%d', max(0, tonumber(raw[2]) - amount)))
    end
  end,
}
