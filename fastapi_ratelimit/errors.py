"""Exceptions raised by fastapi_ratelimit.

The tree::

    RateLimitError                 base class for everything this library raises
    ├── ConfigurationError         bad configuration, raised at construction (also a ValueError)
    └── BackendError               the storage backend failed (connection, timeout, OOM, auth, ...)

A *denied request* is not an exception: backends return a :class:`~fastapi_ratelimit.Decision`
whose ``allowed`` is ``False``.
"""

from __future__ import annotations

import math

__all__ = ["BackendError", "ConfigurationError", "RateLimitError"]


class RateLimitError(Exception):
    """Base class of every exception raised by fastapi_ratelimit."""


class ConfigurationError(RateLimitError, ValueError):
    """A configuration value is invalid.

    ``field`` names the offending setting and ``value`` holds what was given, so that the
    message points at the exact line of configuration to fix.
    """

    def __init__(self, field: str, value: object, reason: str) -> None:
        self.field = field
        self.value = value
        self.reason = reason
        super().__init__(f"{field}: {reason} (got {_short_repr(value)})")


class BackendError(RateLimitError):
    """The rate-limit storage could not answer.

    The original exception is chained as ``__cause__``. The message never contains
    credentials: it names the backend and the kind of failure only.
    """


def _short_repr(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: The longest TTL accepted anywhere (allow/block entries, stored tiers, overrides): ten
#: years. Beyond that a TTL is a mistake (or ``inf``), and an absurd expiry breaks whatever
#: later formats it; without a TTL an entry is permanent anyway.
MAX_TTL = 10 * 365 * 86400.0


def check_ttl(ttl: object, field: str = "ttl") -> float | None:
    """``ttl`` as seconds, or ``None`` (no expiry). Rejects (:class:`ConfigurationError`
    naming ``field``) anything but a finite number in ``(0, MAX_TTL]``: ``inf``, ``1e400``,
    NaN, zero, negatives, booleans, strings."""
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise ConfigurationError(field, ttl, "must be a number of seconds > 0 or None")
    try:
        seconds = float(ttl)
    except OverflowError:  # an int too large for a float
        seconds = math.inf
    if not math.isfinite(seconds):
        raise ConfigurationError(field, ttl, "must be a finite number of seconds")
    if seconds <= 0:
        raise ConfigurationError(field, ttl, "must be a number of seconds > 0 or None")
    if seconds > MAX_TTL:
        raise ConfigurationError(
            field, ttl, f"must be at most {MAX_TTL:.0f} seconds (10 years); omit it for no expiry"
        )
    return seconds
