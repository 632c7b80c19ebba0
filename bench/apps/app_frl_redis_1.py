"""``frl-redis-1``: fastapi_ratelimit, Redis backend, the IP level only."""

import os

from fastapi import FastAPI

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware, RedisBackend

limiter = RateLimiter(
    backend=RedisBackend.from_url(os.environ["BENCH_REDIS_URL"]),
    ip_limit="1000000000/minute",
)

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
