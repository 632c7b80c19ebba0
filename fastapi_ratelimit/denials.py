"""Denials, logged as a count per interval rather than a line per denied request.

A flood from clients that are over their limit is exactly when one log line per 429 hurts
most: the log volume grows with the attack. So denials are counted by endpoint (a route
template) and policy names (configuration), both bounded sets, and written as one DEBUG line
at most once per ``interval``. No identity (IP, key, user) is ever logged.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable

from loguru import logger

__all__ = ["DenialLog"]

#: Distinct (endpoint, policies) pairs counted between two lines. Both parts come from
#: configuration and route templates, but an app with many routes must still stay bounded.
_MAX_PAIRS = 1024
#: Pairs named in one line; the rest are summed into "others".
_SHOWN = 5


class DenialLog:
    """Counts denials and logs one line per ``interval`` seconds while they go on."""

    __slots__ = ("_clock", "_counts", "_interval", "_last_line", "_since", "_total")

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        self._counts: Counter[tuple[str, str]] = Counter()
        self._total = 0
        #: When the first denial not yet logged happened.
        self._since: float | None = None
        #: When the last line was written: the first denial of all is logged at once, so
        #: an operator watching sees a flood start.
        self._last_line = -math.inf

    def record(self, endpoint: str, policies: str) -> None:
        """Count one denied request; write the line when the interval has passed."""
        now = self._clock()
        if self._since is None:
            self._since = now
        self._total += 1
        pair = (endpoint, policies)
        if pair in self._counts or len(self._counts) < _MAX_PAIRS:
            self._counts[pair] += 1
        if now - self._last_line >= self._interval:
            self._flush(now, self._since)

    def _flush(self, now: float, since: float) -> None:
        shown = self._counts.most_common(_SHOWN)
        others = self._total - sum(n for _, n in shown)
        parts = [f"{endpoint} ({policies}) x{n}" for (endpoint, policies), n in shown]
        if others:
            parts.append(f"others x{others}")
        logger.debug(
            "rate limit exceeded {} time(s) in {:.1f}s: {}",
            self._total,
            now - since,
            ", ".join(parts),
        )
        self._counts.clear()
        self._total = 0
        self._since = None
        self._last_line = now
