-- GCRA with variable cost. Twin of fastapi_ratelimit/algorithms/gcra.py.
-- One stored value per key: the theoretical arrival time (microseconds, float, 17 digits).
-- T = window / limit; tau = capacity * T; backlog = max(tat - now, 0);
-- pass when backlog + cost*T <= tau (+ SLACK_US for the rounding of the stored tat).
-- The maths runs on the small backlog, never on absolute times (a double's step there is
-- 0.25 us). TTL = backlog after this request + margin.
local GCRA_SLACK_US = 1.0

ALGORITHMS['gc'] = {
  evaluate = function(key, now, limit, window, capacity, cost)
    local interval = window / limit
    local tau = capacity * interval
    local stored = redis.call('GET', key)
    local backlog = 0.0
    if stored then backlog = math.max(tonumber(stored) - now, 0.0) end
    local diff = backlog + cost * interval
    local allowed = diff <= tau + GCRA_SLACK_US
    local retry = 0
    if not allowed then retry = math.max(1, math.ceil(diff - tau - GCRA_SLACK_US)) end
    local reset_commit = math.ceil(diff)
    local commit = function(margin)
      redis.call('SET', key, float_str(now + diff), 'PX', ttl_ms(reset_commit, margin))
    end
    return allowed, (tau - backlog) / interval, retry, reset_commit, math.ceil(backlog), commit
  end,
  refund = function(key, now, limit, window, capacity, amount)
    local stored = redis.call('GET', key)
    if stored then
      local backlog = math.max(tonumber(stored) - now, 0.0) - amount * (window / limit)
      redis.call('SET', key, float_str(now + math.max(backlog, 0.0)), 'KEEPTTL')
    end
  end,
}
