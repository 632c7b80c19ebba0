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

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter)

if os.environ.get("BENCH_METRICS") == "1":
    # The "-metrics" variants: the same app with Prometheus metrics on (and served).
    from fastapi_ratelimit.metrics import RateLimitMetrics

    app.add_route("/metrics", RateLimitMetrics(limiter).endpoint)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
