"""fastapi_ratelimit: rate limiting and throttling for FastAPI and Starlette.

The public API is re-exported here; each name lives in the module that owns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .backends.base import Backend, Check
from .backends.memory import MemoryBackend
from .clock import Clock, FakeClock, SystemClock
from .decision import Decision, Verdict
from .errors import BackendError, ConfigurationError, RateLimitError
from .keys import KeyBuilder
from .policy import Algorithm, Policy, Scope
from .rate import Rate, parse_rate

if TYPE_CHECKING:
    from .backends.redis import RedisBackend

__version__ = "0.1.0"

__all__ = [
    "Algorithm",
    "Backend",
    "BackendError",
    "Check",
    "Clock",
    "ConfigurationError",
    "Decision",
    "FakeClock",
    "KeyBuilder",
    "MemoryBackend",
    "Policy",
    "Rate",
    "RateLimitError",
    "RedisBackend",
    "Scope",
    "SystemClock",
    "Verdict",
    "__version__",
    "parse_rate",
]


def __getattr__(name: str) -> Any:
    # RedisBackend needs the optional `redis` package: import it only when asked for.
    if name == "RedisBackend":
        from .backends.redis import RedisBackend

        return RedisBackend
    raise AttributeError(f"module 'fastapi_ratelimit' has no attribute {name!r}")
