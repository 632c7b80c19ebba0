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
    local stored = call('GET', key)
    local backlog = 0.0
    if stored then backlog = max(tonumber(stored) - now, 0.0) end
    local diff = backlog + cost * interval
    local allowed = diff <= tau + GCRA_SLACK_US
    local retry = 0
    if not allowed then retry = max(1, ceil(diff - tau - GCRA_SLACK_US)) end
    local reset_commit = ceil(diff)
    return allowed, (tau - backlog) / interval, retry, reset_commit, ceil(backlog),
      now + diff, reset_commit
  end,
  commit = function(key, margin, tat, reset_commit)
    call('SET', key, float_str(tat), 'PX', ttl_ms(reset_commit, margin))
  end,
  refund = function(key, now, limit, window, capacity, amount)
    local stored = call('GET', key)
    if stored then
      local backlog = max(tonumber(stored) - now, 0.0) - amount * (window / limit)
      call('SET', key, float_str(now + max(backlog, 0.0)), 'KEEPTTL')
    end
  end,
}
