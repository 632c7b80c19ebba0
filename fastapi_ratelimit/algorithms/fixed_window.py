"""Fixed window counter.

Windows are aligned to the epoch: ``start = floor(now / window) * window``. State is
``(start_us, count)``; a state from an older window counts as empty. Twin: ``fixed_window.lua``.
"""

from __future__ import annotations

import math

from ._base import Evaluation, new_evaluation

State = tuple[int, int]


def evaluate(state: State | None, now: int, limit: int, window: int, cost: int) -> Evaluation:
    start = math.floor(now / window) * window
    count = state[1] if state is not None and state[0] == start else 0
    available = limit - count
    ends_in = start + window - now
    allowed = cost <= available
    return new_evaluation(
        (
            allowed,
            available,
            0 if allowed else max(1, ends_in),
            ends_in,
            ends_in if count > 0 else 0,
            (start, count + cost),
            ends_in,
        )
    )


def refund(state: State | None, now: int, window: int, amount: int) -> State | None:
    start = math.floor(now / window) * window
    if state is None or state[0] != start:
        return state
    return (start, max(0, state[1] - amount))
