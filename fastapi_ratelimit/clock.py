"""Time sources.

Backends work in integer microseconds since the Unix epoch. The Redis backend takes its time
from ``redis.call('TIME')`` so that clock skew between app servers cannot change a decision;
a :class:`Clock` is only handed to it by tests. The memory backend always uses a clock.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "FakeClock", "SystemClock"]


@runtime_checkable
class Clock(Protocol):
    """Anything that tells the current time in integer microseconds since the epoch."""

    def now_us(self) -> int: ...


class SystemClock:
    """The wall clock (``time.time_ns``), in microseconds."""

    __slots__ = ()

    def now_us(self) -> int:
        return time.time_ns() // 1000


class FakeClock:
    """A clock that moves only when told to. For tests and simulations."""

    __slots__ = ("_now_us",)

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self._now_us = round(start * 1_000_000)

    def now_us(self) -> int:
        return self._now_us

    def advance(self, seconds: float) -> None:
        """Move the clock forward by ``seconds`` (which must not be negative)."""
        if seconds < 0:
            raise ValueError("FakeClock cannot go backwards")
        self._now_us += round(seconds * 1_000_000)

    def advance_us(self, microseconds: int) -> None:
        """Move the clock forward by a whole number of microseconds."""
        if microseconds < 0:
            raise ValueError("FakeClock cannot go backwards")
        self._now_us += microseconds
