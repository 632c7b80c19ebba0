-- Sliding window counter. Twin of fastapi_ratelimit/algorithms/sliding_window_counter.py.
-- estimate = previous * (window - elapsed) / window + current. Time in microseconds.
-- Storage: hash {s = current window start, c = current count, p = previous count};
-- TTL = time until both windows stop weighing (2 * window - elapsed) + margin.
-- The estimate evaluate makes at time t of the state read at start (see the retry below).
local function sc_estimate(t, start, cur, prev, window)
  local at = floor(t / window) * window
  local c, p = 0, 0
  if at == start then
    c, p = cur, prev
  elseif at == start + window then
    p = cur
  end
  return p * (window - (t - at)) / window + c
end

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
    local estimate = prev * (window - elapsed) / window + cur
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
      if cost <= limit then
        -- As sliding_window_counter.py: the wait announced must be one after which the
        -- request passes.
        local step = 1
        while step < 4611686018427387904
          and cost > limit - sc_estimate(now + retry, start, cur, prev, window) do
          retry = retry + step
          step = step * 2
        end
      end
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
    -- As sliding_window_counter.py: the current window first, then the previous one.
    local start = floor(now / window) * window
    local raw = call('HMGET', key, 's', 'c', 'p')
    if not raw[1] then return end
    local s = tonumber(raw[1])
    if s == start then
      local cur, prev = tonumber(raw[2]), tonumber(raw[3])
      local taken = min(cur, amount)
      call('HSET', key, 'c', format('%d', cur - taken),
        'p', format('%d', max(0, prev - (amount - taken))))
    elseif s == start - window then
      call('HSET', key, 'c', format('%d', max(0, tonumber(raw[2]) - amount)))
    end
  end,
}
