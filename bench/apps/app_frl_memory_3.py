"""``frl-memory-3``: fastapi_ratelimit, memory backend, global + IP + endpoint levels."""

import os

from fastapi import FastAPI

from fastapi_ratelimit import MemoryBackend, RateLimiter, RateLimitMiddleware

HIGH = "1000000000/minute"

limiter = RateLimiter(
    backend=MemoryBackend(),
    global_limit=HIGH,
    ip_limit=HIGH,
    endpoint_limits={"GET /hello": HIGH},
)

if os.environ.get("BENCH_GENERAL") == "1":
    # The "-general" variants: the same app with the express path off (express.py), as the
    # library was before it, for a before-and-after in one run.
    from fastapi_ratelimit.express import Express

    Express.applies = staticmethod(lambda limiter: False)  # type: ignore[method-assign]

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter)

if os.environ.get("BENCH_METRICS") == "1":
    # The "-metrics" variants: the same app with Prometheus metrics on (and served).
    from fastapi_ratelimit.metrics import RateLimitMetrics

    app.add_route("/metrics", RateLimitMetrics(limiter).endpoint)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
