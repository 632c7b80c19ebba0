"""Sliding window counter: ``estimate = previous * (window - elapsed) / window + current``.

State is ``(start_us, current, previous)`` for the epoch-aligned window starting at ``start``.
Twin: ``sliding_window_counter.lua``.
"""

from __future__ import annotations

import math

from ._base import Evaluation, new_evaluation

State = tuple[int, int, int]


def evaluate(state: State | None, now: int, limit: int, window: int, cost: int) -> Evaluation:
    start = math.floor(now / window) * window
    # Inline rather than a helper: this runs per level per request.
    if state is None:
        cur = prev = 0
    elif state[0] == start:
        cur, prev = state[1], state[2]
    elif state[0] == start - window:
        cur, prev = 0, state[1]
    else:
        cur = prev = 0
    elapsed = now - start
    weight = (window - elapsed) / window
    estimate = prev * weight + cur
    available = limit - estimate
    allowed = cost <= available
    retry = 0
    if not allowed:
        if cur + cost <= limit:
            # Only the previous window's weight is in the way: wait until it has decayed enough.
            need = window - float(limit - cur - cost) * window / prev
            retry = math.ceil(need - elapsed)
        elif cost <= limit:
            # Wait for the next window, where this window's count becomes the weighted one.
            need = window - float(limit - cost) * window / cur
            retry = math.ceil((window - elapsed) + max(0.0, need))
        else:
            retry = 2 * window - elapsed
        retry = max(1, retry)
    if cur > 0:
        reset_keep = 2 * window - elapsed
    elif prev > 0:
        reset_keep = window - elapsed
    else:
        reset_keep = 0
    return new_evaluation(
        (
            allowed,
            available,
            retry,
            2 * window - elapsed,
            reset_keep,
            (start, cur + cost, prev),
            2 * window - elapsed,
        )
    )


def refund(state: State | None, now: int, window: int, amount: int) -> State | None:
    start = math.floor(now / window) * window
    if state is None or state[0] != start:
        return state
    return (start, max(0, state[1] - amount), state[2])
