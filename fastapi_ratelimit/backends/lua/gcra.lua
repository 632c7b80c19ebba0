-- GCRA with variable cost. Twin of fastapi_ratelimit/algorithms/gcra.py.
-- One stored value per key: the theoretical arrival time (microseconds, float, 17 digits).
-- T = window / limit; tau = capacity * T; pass when max(tat, now) + cost*T - now <= tau.
-- TTL = new_tat - now + margin.
ALGORITHMS['gc'] = {
  evaluate = function(key, now, limit, window, capacity, cost)
    local interval = window / limit
    local tau = capacity * interval
    local stored = redis.call('GET', key)
    local tat = now
    if stored then tat = math.max(tonumber(stored), now) end
    local new_tat = tat + cost * interval
    local diff = new_tat - now
    local allowed = diff <= tau
    local retry = 0
    if not allowed then retry = math.max(1, math.ceil(diff - tau)) end
    local reset_commit = math.ceil(diff)
    local commit = function(margin)
      redis.call('SET', key, float_str(new_tat), 'PX', ttl_ms(reset_commit, margin))
    end
    return allowed, (tau - (tat - now)) / interval, retry, reset_commit, math.ceil(tat - now), commit
  end,
  refund = function(key, now, limit, window, capacity, amount)
    local stored = redis.call('GET', key)
    if stored then
      local tat = math.max(now, tonumber(stored) - amount * (window / limit))
      redis.call('SET', key, float_str(tat), 'KEEPTTL')
    end
  end,
}
