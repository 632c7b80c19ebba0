"""Exceptions raised by fastapi_ratelimit.

The tree::

    RateLimitError                 base class for everything this library raises
    ├── ConfigurationError         bad configuration, raised at construction (also a ValueError)
    └── BackendError               the storage backend failed (connection, timeout, OOM, auth, ...)

A *denied request* is not an exception: backends return a :class:`~fastapi_ratelimit.Decision`
whose ``allowed`` is ``False``.
"""

from __future__ import annotations

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
