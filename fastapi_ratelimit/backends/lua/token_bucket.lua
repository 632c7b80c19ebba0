-- Token bucket with variable cost. Twin of fastapi_ratelimit/algorithms/token_bucket.py.
-- Capacity = burst; refill = limit / window tokens per microsecond. Time in microseconds.
-- Storage: hash {t = tokens (float, 17 digits), u = last update}; no key = a full bucket.
-- TTL = time to refill completely + margin.
local function tb_refill(key, now, limit, window, capacity)
  local raw = redis.call('HMGET', key, 't', 'u')
  if not raw[1] then return capacity, now, false end
  local tokens, updated = tonumber(raw[1]), tonumber(raw[2])
  local rate = limit / window
  -- A clock that steps back must not refill twice later: keep the newest timestamp.
  local elapsed = math.max(0, now - updated)
  return math.min(capacity, tokens + elapsed * rate), math.max(now, updated), true
end

ALGORITHMS['tb'] = {
  evaluate = function(key, now, limit, window, capacity, cost)
    local tokens, updated = tb_refill(key, now, limit, window, capacity)
    local rate = limit / window
    local allowed = cost <= tokens
    local retry = 0
    if not allowed then retry = math.max(1, math.ceil((cost - tokens) / rate)) end
    local left = tokens - cost
    local reset_commit = math.max(0, math.ceil((capacity - left) / rate))
    local reset_keep = math.max(0, math.ceil((capacity - tokens) / rate))
    local commit = function(margin)
      redis.call('HSET', key, 't', float_str(left), 'u', int_str(updated))
      redis.call('PEXPIRE', key, ttl_ms(reset_commit, margin))
    end
    return allowed, tokens, retry, reset_commit, reset_keep, commit
  end,
  refund = function(key, now, limit, window, capacity, amount)
    local tokens, updated, exists = tb_refill(key, now, limit, window, capacity)
    if exists then
      redis.call('HSET', key, 't', float_str(math.min(capacity, tokens + amount)),
        'u', int_str(updated))
    end
  end,
}
