-- Token bucket with variable cost. Twin of fastapi_ratelimit/algorithms/token_bucket.py.
-- Capacity = burst; refill = limit / window tokens per microsecond. Time in microseconds.
-- Storage: hash {t = tokens (float, 17 digits), u = last update}; no key = a full bucket.
-- TTL = time to refill completely + margin.
local function tb_refill(key, now, limit, window, capacity)
  local raw = call('HMGET', key, 't', 'u')
  if not raw[1] then return capacity, now, false end
  local tokens, updated = tonumber(raw[1]), tonumber(raw[2])
  -- A clock that steps back must not refill twice later: keep the newest timestamp.
  local elapsed = max(0, now - updated)
  -- Multiply, then divide, as token_bucket.py: exact whenever the product is.
  return min(capacity, tokens + elapsed * limit / window), max(now, updated), true, tokens,
    updated
end

ALGORITHMS['tb'] = {
  evaluate = function(key, now, limit, window, capacity, cost)
    local tokens, updated, exists, stored, at = tb_refill(key, now, limit, window, capacity)
    local rate = limit / window
    local allowed = cost <= tokens
    local retry = 0
    if not allowed then
      retry = max(1, ceil((cost - tokens) * window / limit))
      if exists and cost <= capacity then
        -- As token_bucket.py: the wait announced must be one after which the request passes.
        local step = 1
        while step < 4611686018427387904
          and min(capacity, stored + max(0, now + retry - at) * limit / window) < cost do
          retry = retry + step
          step = step * 2
        end
      end
    end
    local left = tokens - cost
    local reset_commit = max(0, ceil((capacity - left) / rate))
    local reset_keep = max(0, ceil((capacity - tokens) / rate))
    return allowed, tokens, retry, reset_commit, reset_keep, left, updated, reset_commit
  end,
  commit = function(key, margin, left, updated, reset_commit)
    call('HSET', key, 't', float_str(left), 'u', format('%d', updated))
    call('PEXPIRE', key, ttl_ms(reset_commit, margin))
  end,
  refund = function(key, now, limit, window, capacity, amount)
    local tokens, updated, exists = tb_refill(key, now, limit, window, capacity)
    if exists then
      call('HSET', key, 't', float_str(min(capacity, tokens + amount)),
        'u', format('%d', updated))
    end
  end,
}
