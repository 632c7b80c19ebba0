from __future__ import annotations

import fastapi_ratelimit


def test_public_api() -> None:
    assert set(fastapi_ratelimit.__all__) == {
        "DEFAULT_TIERS",
        "ClientIP",
        "CompositeLimit",
        "CostTable",
        "HeaderStyle",
        "RateLimit",
        "RateLimitExceeded",
        "RateLimitMiddleware",
        "RateLimiter",
        "RequestContext",
        "Tier",
        "TrustedProxies",
        "rate_limit",
        "rate_limit_exceeded_handler",
        "report_cost",
        "Algorithm",
        "Backend",
        "BackendError",
        "Check",
        "CircuitBreaker",
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
    }
    for name in fastapi_ratelimit.__all__:
        assert getattr(fastapi_ratelimit, name) is not None


def test_backends_satisfy_the_protocol() -> None:
    assert isinstance(fastapi_ratelimit.MemoryBackend(), fastapi_ratelimit.Backend)
    assert issubclass(fastapi_ratelimit.ConfigurationError, ValueError)
    assert issubclass(fastapi_ratelimit.BackendError, fastapi_ratelimit.RateLimitError)
