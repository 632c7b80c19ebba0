"""Structured log lines that repeat at most once a second per category.

An error that happens on every request (a failing refund, a shadow level denying a flood)
would otherwise write a line per request, and the log volume would grow with the attack. Each
category (a fixed string from the code) writes at most one line per ``interval``; the next
line says how many were left out. Fields go to loguru's ``extra`` (``logger.bind``), so a JSON
sink (``serialize=True``) gets them as fields; identities in them are masked
(:func:`~fastapi_ratelimit.masking.mask_identity`), never raw.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

__all__ = ["LogLimiter", "log_limited"]


class LogLimiter:
    """At most one line per category per ``interval`` seconds."""

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval = interval
        self._clock = clock
        # category -> (when its last line was written, lines left out since)
        self._state: dict[str, tuple[float, int]] = {}

    def log(self, level: str, category: str, message: str, *args: Any, **fields: Any) -> bool:
        """Write the line unless this category wrote one less than ``interval`` ago; returns
        whether it was written."""
        return self._log(2, level, category, message, args, fields)

    def _log(
        self,
        depth: int,
        level: str,
        category: str,
        message: str,
        args: tuple[Any, ...],
        fields: dict[str, Any],
    ) -> bool:
        now = self._clock()
        last, left_out = self._state.get(category, (-math.inf, 0))
        if now - last < self._interval:
            self._state[category] = (last, left_out + 1)
            return False
        self._state[category] = (now, 0)
        if left_out:
            message += f" ({left_out} more like it left out)"
        # The line names the caller, not this module.
        logger.bind(category=category, left_out=left_out, **fields).opt(depth=depth).log(
            level, message, *args
        )
        return True


_PROCESS = LogLimiter()


def log_limited(level: str, category: str, message: str, *args: Any, **fields: Any) -> bool:
    """:meth:`LogLimiter.log` on the process-wide limiter."""
    return _PROCESS._log(2, level, category, message, args, fields)
