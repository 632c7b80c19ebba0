"""``frl-redis-1``: fastapi_ratelimit, Redis backend, the IP level only."""

import os

from fastapi import FastAPI

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware, RedisBackend

limiter = RateLimiter(
    backend=RedisBackend.from_url(
        os.environ["BENCH_REDIS_URL"],
        timeout=float(os.environ.get("BENCH_REDIS_TIMEOUT", "0.05")),
        # BENCH_MULTIPLEX=0: redis-py's ordinary connection pool instead of the pipe
        multiplex=os.environ.get("BENCH_MULTIPLEX", "1") == "1",
    ),
    ip_limit="1000000000/minute",
)

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
