"""Generic cell rate algorithm (GCRA) with variable cost.

One stored value per key: the theoretical arrival time ``tat`` (microseconds, a float). The
emission interval is ``T = window / limit`` and the tolerance ``tau = capacity * T``: a request
of cost N passes when ``backlog + N*T <= tau``, where ``backlog = max(tat - now, 0)``.
Retry-after is exact: ``backlog + N*T - tau``. Twin: ``gcra.lua``.

The maths runs on the backlog, a small number, never on absolute times: at today's epoch in
microseconds (about 1.8e15) a double's step is 0.25 us, enough to refuse the very first
request of a burst of one. ``SLACK_US`` absorbs the rounding of the stored ``tat``.
"""

from __future__ import annotations

import math

from ._base import Evaluation, new_evaluation

State = float

#: Tolerance for float rounding of the stored tat (a quarter microsecond at most).
SLACK_US = 1.0


def evaluate(
    state: State | None, now: int, limit: int, window: int, capacity: int, cost: int
) -> Evaluation:
    interval = window / limit
    tau = capacity * interval
    backlog = 0.0 if state is None else max(state - now, 0.0)
    diff = backlog + cost * interval
    allowed = diff <= tau + SLACK_US
    return new_evaluation(
        (
            allowed,
            (tau - backlog) / interval,
            0 if allowed else max(1, math.ceil(diff - tau - SLACK_US)),
            math.ceil(diff),
            math.ceil(backlog),
            now + diff,
            math.ceil(diff),
        )
    )


def refund(state: State | None, now: int, limit: int, window: int, amount: int) -> State | None:
    if state is None:
        return None
    backlog = max(state - now, 0.0) - amount * (window / limit)
    return now + max(backlog, 0.0)
