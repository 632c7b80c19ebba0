"""fastapi_ratelimit: rate limiting and throttling for FastAPI and Starlette.

The public API is re-exported here; each name lives in the module that owns it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loguru import logger

from .backends.base import Backend, Check
from .backends.memory import MemoryBackend
from .breaker import CircuitBreaker
from .clock import Clock, FakeClock, SystemClock
from .context import RequestContext, report_cost
from .costs import CostTable
from .decision import Decision, Verdict
from .decorators import rate_limit
from .dependencies import RateLimit
from .errors import BackendError, ConfigurationError, RateLimitError
from .headers import HeaderStyle
from .identity import ClientIP, TrustedProxies
from .keys import KeyBuilder
from .limiter import CompositeLimit, RateLimiter
from .middleware import RateLimitMiddleware
from .policy import Algorithm, Policy, Scope
from .rate import Rate, parse_rate
from .route_limits import RateLimitExceeded, rate_limit_exceeded_handler
from .tiers import DEFAULT_TIERS, Tier

if TYPE_CHECKING:
    from .backends.redis import RedisBackend

__version__ = "0.1.0"

# Loguru's advice for libraries: silent until the application opts in with
# logger.enable("fastapi_ratelimit") (see the README's "Logging").
logger.disable("fastapi_ratelimit")

__all__ = [
    "DEFAULT_TIERS",
    "Algorithm",
    "Backend",
    "BackendError",
    "Check",
    "CircuitBreaker",
    "ClientIP",
    "Clock",
    "CompositeLimit",
    "ConfigurationError",
    "CostTable",
    "Decision",
    "FakeClock",
    "HeaderStyle",
    "KeyBuilder",
    "MemoryBackend",
    "Policy",
    "Rate",
    "RateLimit",
    "RateLimitError",
    "RateLimitExceeded",
    "RateLimitMiddleware",
    "RateLimiter",
    "RedisBackend",
    "RequestContext",
    "Scope",
    "SystemClock",
    "Tier",
    "TrustedProxies",
    "Verdict",
    "__version__",
    "parse_rate",
    "rate_limit",
    "rate_limit_exceeded_handler",
    "report_cost",
]


def __getattr__(name: str) -> Any:
    # RedisBackend needs the optional `redis` package: import it only when asked for.
    if name == "RedisBackend":
        from .backends.redis import RedisBackend

        return RedisBackend
    raise AttributeError(f"module 'fastapi_ratelimit' has no attribute {name!r}")
