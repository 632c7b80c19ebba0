"""Generic cell rate algorithm (GCRA) with variable cost.

One stored value per key: the theoretical arrival time ``tat`` (microseconds, a float). The
emission interval is ``T = window / limit`` and the tolerance ``tau = capacity * T``: a request
of cost N passes when ``max(tat, now) + N*T - now <= tau``. Retry-after is exact:
``new_tat - now - tau``. Twin: ``gcra.lua``.
"""

from __future__ import annotations

import math

from ._base import Evaluation

State = float


def evaluate(
    state: State | None, now: int, limit: int, window: int, capacity: int, cost: int
) -> Evaluation:
    interval = window / limit
    tau = capacity * interval
    tat = now if state is None else max(state, now)
    new_tat = tat + cost * interval
    diff = new_tat - now
    allowed = diff <= tau
    return Evaluation(
        allowed,
        (tau - (tat - now)) / interval,
        0 if allowed else max(1, math.ceil(diff - tau)),
        math.ceil(diff),
        math.ceil(tat - now),
        new_tat,
        math.ceil(diff),
    )


def refund(state: State | None, now: int, limit: int, window: int, amount: int) -> State | None:
    if state is None:
        return None
    return max(float(now), state - amount * (window / limit))
