"""``frl-memory-5``: fastapi_ratelimit, memory backend, five levels (global, IP, endpoint,
API key from ``X-API-Key``, user from ``X-User`` through a ``user_resolver``): the memory
twin of ``app_frl_redis_5.py``."""

import os

from fastapi import FastAPI

from fastapi_ratelimit import MemoryBackend, RateLimiter, RateLimitMiddleware

HIGH = "1000000000/minute"

limiter = RateLimiter(
    backend=MemoryBackend(),
    global_limit=HIGH,
    ip_limit=HIGH,
    endpoint_limits={"GET /hello": HIGH},
    api_key_limit=HIGH,
    user_limit=HIGH,
    user_resolver=lambda conn: conn.headers.get("x-user"),
)

if os.environ.get("BENCH_GENERAL") == "1":
    # The "-general" variants: the same app with the express path off (express.py), as the
    # library was before it, for a before-and-after in one run.
    from fastapi_ratelimit.express import Express

    Express.applies = staticmethod(lambda limiter: False)  # type: ignore[method-assign]

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
