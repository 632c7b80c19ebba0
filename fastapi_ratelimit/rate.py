"""The :class:`Rate` value type and the ``"100/minute"`` parser.

A rate is *limit* units per *period* seconds, with an optional *burst*. Rates are parsed once,
when the limiter is configured, never per request; invalid input raises
:class:`~fastapi_ratelimit.errors.ConfigurationError` naming the field and the bad value.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .errors import ConfigurationError

__all__ = ["Rate", "parse_rate"]

#: Largest count or burst accepted. Lua numbers are doubles: keeping every count well below 2**53
#: keeps Redis and the in-memory reference bit-for-bit identical.
MAX_COUNT = 10**12
#: Longest period accepted (ten years); shortest is one millisecond.
MAX_PERIOD = 10 * 366 * 86400.0
MIN_PERIOD = 0.001

_UNITS: dict[str, float] = {}
for _seconds, _names in (
    (1.0, ("s", "sec", "secs", "second", "seconds")),
    (60.0, ("m", "min", "mins", "minute", "minutes")),
    (3600.0, ("h", "hr", "hrs", "hour", "hours")),
    (86400.0, ("d", "day", "days")),
):
    for _name in _names:
        _UNITS[_name] = _seconds

_RATE_RE = re.compile(
    r"""
    ^\s*(?P<count>[^/\s]+)\s*           # 100
    (?:/|\s+per\s+)\s*                  # "/" or " per "
    (?P<multiple>[0-9]*\.?[0-9]+)?\s*   # optional 5 in "2/5 seconds"
    (?P<unit>[A-Za-z]+)\s*$             # minute
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` units per ``period`` seconds, with an optional ``burst`` capacity.

    ``burst`` only matters to the token bucket and GCRA algorithms, where it is the bucket
    capacity (it defaults to ``limit``). Build one from code (``Rate(100, 60)``,
    ``Rate.per_minute(100, burst=200)``) or from text with :meth:`parse`.
    """

    limit: int
    period: float
    burst: int | None = None
    #: The period in whole microseconds, the unit every backend works in.
    period_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_count("rate.limit", self.limit)
        if self.burst is not None:
            _check_count("rate.burst", self.burst)
        period = self.period
        if isinstance(period, bool) or not isinstance(period, (int, float)):
            raise ConfigurationError("rate.period", period, "must be a number of seconds")
        if not math.isfinite(period) or period <= 0:
            raise ConfigurationError("rate.period", period, "must be a finite number > 0")
        if not MIN_PERIOD <= period <= MAX_PERIOD:
            raise ConfigurationError(
                "rate.period", period, f"must be between {MIN_PERIOD} and {MAX_PERIOD:.0f} seconds"
            )
        object.__setattr__(self, "period", float(period))
        object.__setattr__(self, "period_us", round(period * 1_000_000))

    @property
    def capacity(self) -> int:
        """The most units that can be spent at once: ``burst`` if set, else ``limit``."""
        return self.limit if self.burst is None else self.burst

    @classmethod
    def parse(cls, text: str) -> Rate:
        """Parse ``"100/minute"``, ``"2/5 seconds"``, ``"10 per second"`` or
        ``"100/minute;burst=200"``."""
        return parse_rate(text)

    @classmethod
    def per_second(cls, limit: int, *, burst: int | None = None) -> Rate:
        return cls(limit, 1.0, burst)

    @classmethod
    def per_minute(cls, limit: int, *, burst: int | None = None) -> Rate:
        return cls(limit, 60.0, burst)

    @classmethod
    def per_hour(cls, limit: int, *, burst: int | None = None) -> Rate:
        return cls(limit, 3600.0, burst)

    @classmethod
    def per_day(cls, limit: int, *, burst: int | None = None) -> Rate:
        return cls(limit, 86400.0, burst)

    def __str__(self) -> str:
        period = f"{self.period:g} seconds" if self.period != 1 else "second"
        for seconds, name in ((86400.0, "day"), (3600.0, "hour"), (60.0, "minute")):
            if self.period == seconds:
                period = name
        text = f"{self.limit}/{period}"
        return text if self.burst is None else f"{text};burst={self.burst}"


def parse_rate(text: str, *, field_name: str = "rate") -> Rate:
    """Parse a rate string; see :meth:`Rate.parse`. ``field_name`` is used in error messages."""
    if not isinstance(text, str):
        raise ConfigurationError(field_name, text, "must be a string such as '100/minute'")
    head, *params = text.split(";")
    if not head.strip():
        raise ConfigurationError(field_name, text, "is empty; expected e.g. '100/minute'")
    match = _RATE_RE.match(head)
    if match is None:
        raise ConfigurationError(
            field_name, text, "is not a rate; expected '<count>/<unit>' such as '100/minute'"
        )
    limit = _parse_int(f"{field_name}.limit", match["count"], text)
    unit = match["unit"].lower()
    if unit not in _UNITS:
        raise ConfigurationError(
            f"{field_name}.unit",
            text,
            f"unknown unit {match['unit']!r}; use second, minute, hour or day",
        )
    multiple = 1.0
    if match["multiple"] is not None:
        multiple = float(match["multiple"])
        if not multiple > 0:
            raise ConfigurationError(f"{field_name}.period", text, "the period must be > 0")
    burst: int | None = None
    for param in params:
        name, sep, value = param.partition("=")
        name = name.strip().lower()
        if not sep or name != "burst":
            raise ConfigurationError(
                field_name, text, f"unknown parameter {param.strip()!r}; only 'burst=<n>' is known"
            )
        if burst is not None:
            raise ConfigurationError(f"{field_name}.burst", text, "burst is given twice")
        burst = _parse_int(f"{field_name}.burst", value.strip(), text)
    try:
        return Rate(limit, multiple * _UNITS[unit], burst)
    except ConfigurationError as exc:
        # Re-label with the caller's field name and the whole text, which is what the user wrote.
        raise ConfigurationError(
            exc.field.replace("rate", field_name, 1), text, exc.reason
        ) from None


def _parse_int(field_name: str, raw: str, text: str) -> int:
    if not re.fullmatch(r"[+-]?[0-9]+", raw.strip()):
        raise ConfigurationError(field_name, text, f"{raw!r} is not a whole number > 0")
    value = int(raw)
    _check_count(field_name, value, text)
    return value


def _check_count(field_name: str, value: object, shown: object = None) -> None:
    shown = value if shown is None else shown
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(field_name, shown, "must be a whole number > 0")
    if value <= 0:
        raise ConfigurationError(field_name, shown, "must be > 0")
    if value > MAX_COUNT:
        raise ConfigurationError(field_name, shown, f"must be at most {MAX_COUNT}")
