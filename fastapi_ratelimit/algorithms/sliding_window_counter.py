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
    # Multiply, then divide: exact whenever the product is (75 * 680000 / 1e6 is 51, where
    # 75 * 0.68 is 51.00000000000001), so that exact figures give exact answers.
    estimate = prev * (window - elapsed) / window + cur
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
        if cost <= limit:
            # Float rounding can leave the estimate a hair high at exactly now + retry. The
            # wait announced must be one after which the same request passes: check it as
            # evaluate will then, and lengthen it (by 1, 2, 4 ... us) until it does.
            step = 1
            while step < 1 << 62 and cost > limit - _estimate(
                now + retry, start, cur, prev, window
            ):
                retry += step
                step *= 2
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


def _estimate(t: int, start: int, cur: int, prev: int, window: int) -> float:
    """The estimate :func:`evaluate` makes at time ``t`` of the state read at ``start``."""
    at = math.floor(t / window) * window
    if at == start:
        c, p = cur, prev
    elif at == start + window:
        c, p = 0, cur
    else:
        c = p = 0
    return p * (window - (t - at)) / window + c


def refund(state: State | None, now: int, window: int, amount: int) -> State | None:
    """Give ``amount`` back: from the current window first, then from the previous one,
    where a request charged before the window turned sits (and weighs) now."""
    if state is None:
        return None
    start = math.floor(now / window) * window
    if state[0] == start:
        cur, prev = state[1], state[2]
        taken = min(cur, amount)
        return (start, cur - taken, max(0, prev - (amount - taken)))
    if state[0] == start - window:
        # Stored as the current window of its time: its count is the previous one now.
        return (state[0], max(0, state[1] - amount), state[2])
    return state
