"""Token bucket with variable cost.

Capacity ``C`` (the burst), refilled at ``limit / window`` tokens per microsecond. State is
``(tokens, updated_us)``; a missing state is a full bucket. Twin: ``token_bucket.lua``.
"""

from __future__ import annotations

import math

from ._base import Evaluation, new_evaluation

State = tuple[float, int]


def refill(state: State | None, now: int, limit: int, window: int, capacity: int) -> State:
    if state is None:
        return float(capacity), now
    tokens, updated = state
    # A clock that steps back must not refill twice later: keep the newest timestamp.
    elapsed = max(0, now - updated)
    # Multiply, then divide: exact whenever the product is (54e6 us of 1000/hour is 15
    # tokens, where 54e6 * (1000 / 3.6e9) is 14.999999999999998).
    return min(float(capacity), tokens + elapsed * limit / window), max(now, updated)


def evaluate(
    state: State | None, now: int, limit: int, window: int, capacity: int, cost: int
) -> Evaluation:
    tokens, updated = refill(state, now, limit, window, capacity)
    rate = limit / window
    allowed = cost <= tokens
    retry = 0 if allowed else max(1, math.ceil((cost - tokens) * window / limit))
    if not allowed and state is not None and cost <= capacity:
        # Float rounding can leave the bucket a hair short at exactly now + retry. The wait
        # announced must be one after which the same request passes: check it with the
        # refill that will run then, and lengthen it (by 1, 2, 4 ... us) until it does.
        stored, at = state
        step = 1
        while (
            step < 1 << 62
            and min(float(capacity), stored + max(0, now + retry - at) * limit / window) < cost
        ):
            retry += step
            step *= 2
    left = tokens - cost
    reset_commit = max(0, math.ceil((capacity - left) / rate))
    return new_evaluation(
        (
            allowed,
            tokens,
            retry,
            reset_commit,
            max(0, math.ceil((capacity - tokens) / rate)),
            (left, updated),
            reset_commit,
        )
    )


def refund(
    state: State | None, now: int, limit: int, window: int, capacity: int, amount: int
) -> State | None:
    if state is None:
        return None
    tokens, updated = refill(state, now, limit, window, capacity)
    return min(float(capacity), tokens + amount), updated
