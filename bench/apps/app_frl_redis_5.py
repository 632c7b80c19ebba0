"""``frl-redis-5``: fastapi_ratelimit, Redis backend, five levels (global, IP, endpoint,
API key from ``X-API-Key``, user from ``X-User``) in one ``EVALSHA`` per request."""

import os

from fastapi import FastAPI

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware, RedisBackend

HIGH = "1000000000/minute"

limiter = RateLimiter(
    backend=RedisBackend.from_url(
        os.environ["BENCH_REDIS_URL"],
        timeout=float(os.environ.get("BENCH_REDIS_TIMEOUT", "0.05")),
        # BENCH_MULTIPLEX=0: redis-py's ordinary connection pool instead of the pipe
        multiplex=os.environ.get("BENCH_MULTIPLEX", "1") == "1",
        # bench_flood.py: 0 turns the denial cache off, for comparison
        denial_cache=int(os.environ.get("BENCH_DENIAL_CACHE", "10000")),
    ),
    global_limit=HIGH,
    # bench_flood.py lowers it, so that every client is soon over its limit
    ip_limit=os.environ.get("BENCH_IP_LIMIT", HIGH),
    endpoint_limits={"GET /hello": HIGH},
    api_key_limit=HIGH,
    user_limit=HIGH,
    user_resolver=lambda conn: conn.headers.get("x-user"),
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
