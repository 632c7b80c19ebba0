-- Sliding window counter. Twin of fastapi_ratelimit/algorithms/sliding_window_counter.py.
-- estimate = previous * (window - elapsed) / window + current. Time in microseconds.
-- Storage: hash {s = current window start, c = current count, p = previous count};
-- TTL = time until both windows stop weighing (2 * window - elapsed) + margin.
ALGORITHMS['sc'] = {
  evaluate = function(key, now, limit, window, capacity, cost)
    local start = floor(now / window) * window
    local raw = call('HMGET', key, 's', 'c', 'p')
    local cur, prev = 0, 0
    if raw[1] then
      local s = tonumber(raw[1])
      if s == start then
        cur = tonumber(raw[2]); prev = tonumber(raw[3])
      elseif s == start - window then
        prev = tonumber(raw[2])
      end
    end
    local elapsed = now - start
    local weight = (window - elapsed) / window
    local estimate = prev * weight + cur
    local available = limit - estimate
    local allowed = cost <= available
    local retry = 0
    if not allowed then
      if cur + cost <= limit then
        local need = window - (limit - cur - cost) * window / prev
        retry = ceil(need - elapsed)
      elseif cost <= limit then
        local need = window - (limit - cost) * window / cur
        retry = ceil((window - elapsed) + max(0, need))
      else
        retry = 2 * window - elapsed
      end
      retry = max(1, retry)
    end
    local reset_keep = 0
    if cur > 0 then
      reset_keep = 2 * window - elapsed
    elseif prev > 0 then
      reset_keep = window - elapsed
    end
    local horizon = 2 * window - elapsed
    return allowed, available, retry, horizon, reset_keep, start, cur + cost, prev, horizon
  end,
  commit = function(key, margin, start, count, prev, horizon)
    call('HSET', key, 's', format('%d', start), 'c', format('%d', count), 'p', format('%d', prev))
    call('PEXPIRE', key, ttl_ms(horizon, margin))
  end,
  refund = function(key, now, limit, window, capacity, amount)
    refund_window_count(key, now, window, amount)
  end,
}
