"""``fastapi-limiter-redis``: fastapi-limiter's ``RateLimiter`` dependency on Redis.

fastapi-limiter 0.2 no longer talks to Redis itself (``FastAPILimiter.init(redis)`` is gone):
the dependency wraps a ``pyrate_limiter.Limiter``, and Redis comes from pyrate-limiter's
``RedisBucket`` (a sorted-set log, one Lua call per acquire) on a ``redis.asyncio`` client.
``RedisBucket.init`` is a coroutine (it loads the script), so the ``Limiter`` is built in the
lifespan and set on the dependency, which the route needs at import time. (No placeholder
``Limiter``: an in-memory one would start pyrate-limiter's leak thread in the server.)
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi_limiter.depends import RateLimiter
from pyrate_limiter import Duration, Limiter, Rate, RedisBucket
from redis.asyncio import Redis

RATES = [Rate(1_000_000_000, Duration.MINUTE)]

dependency = RateLimiter(limiter=None)  # type: ignore[arg-type]  # set in the lifespan


@asynccontextmanager
async def lifespan(_: FastAPI) -> AsyncIterator[None]:
    client = Redis.from_url(os.environ["BENCH_REDIS_URL"])
    bucket = await RedisBucket.init(RATES, client, "bench-fastapi-limiter")
    dependency.limiter = Limiter(bucket)
    try:
        yield
    finally:
        await client.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/hello", dependencies=[Depends(dependency)])
async def hello() -> dict[str, str]:
    return {"hello": "world"}
