"""Sliding window log (exact).

State is a list of timestamps, oldest first; a request of cost N appends N copies of its time,
so N counts as N requests and entries need no unique member names. An entry counts while
``now - ts < window``. At most ``limit`` entries are ever stored. Twin: ``sliding_window_log.lua``.
"""

from __future__ import annotations

from collections import deque

from ._base import Evaluation, new_evaluation

State = deque[int]


def trim(log: State, now: int, window: int) -> None:
    """Drop expired entries in place (neutral: they no longer count)."""
    cutoff = now - window
    while log and log[0] <= cutoff:
        log.popleft()


def evaluate(log: State, now: int, limit: int, window: int, cost: int) -> Evaluation:
    """``log`` must already be trimmed with :func:`trim`; it is not modified."""
    count = len(log)
    available = limit - count
    allowed = cost <= available
    if allowed:
        retry = 0
    else:
        # The k oldest entries must expire first; when cost > limit it can never pass and the
        # best answer is "when the log is empty".
        k = count + cost - limit
        oldest_needed = log[k - 1] if k <= count else (log[-1] if count else now)
        retry = max(1, oldest_needed + window - now)
    return new_evaluation(
        (
            allowed,
            available,
            retry,
            window,
            (log[-1] + window - now) if count else 0,
            cost,  # the caller appends `cost` entries stamped `now`
            window,
        )
    )


def refund(log: State, amount: int) -> None:
    """Give back ``amount`` units by dropping the oldest live entries, in place (``log``
    trimmed with :func:`trim`). The refunded request's own time is not known; dropping the
    newest instead could let a later request through while an older one still counts (more
    than ``limit`` in a window), where dropping the oldest can only hold a unit a little
    longer than it should."""
    for _ in range(min(amount, len(log))):
        log.popleft()
