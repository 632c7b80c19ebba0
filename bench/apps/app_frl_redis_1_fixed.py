"""``frl-redis-1-fixed``: fastapi_ratelimit, Redis backend, the IP level only, with the fixed
window algorithm (``app_frl_redis_1.py`` uses the default, the sliding window counter)."""

import os

from fastapi import FastAPI

from fastapi_ratelimit import Algorithm, RateLimiter, RateLimitMiddleware, RedisBackend

limiter = RateLimiter(
    backend=RedisBackend.from_url(
        os.environ["BENCH_REDIS_URL"],
        timeout=float(os.environ.get("BENCH_REDIS_TIMEOUT", "0.05")),
    ),
    ip_limit="1000000000/minute",
    algorithm=Algorithm.FIXED_WINDOW,
)

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
