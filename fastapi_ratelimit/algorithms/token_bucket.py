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
    rate = limit / window
    # A clock that steps back must not refill twice later: keep the newest timestamp.
    elapsed = max(0, now - updated)
    return min(float(capacity), tokens + elapsed * rate), max(now, updated)


def evaluate(
    state: State | None, now: int, limit: int, window: int, capacity: int, cost: int
) -> Evaluation:
    tokens, updated = refill(state, now, limit, window, capacity)
    rate = limit / window
    allowed = cost <= tokens
    retry = 0 if allowed else max(1, math.ceil((cost - tokens) / rate))
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
