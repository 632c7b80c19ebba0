"""``slowapi-redis-1``: slowapi's ``@limiter.limit`` (one limit), Redis storage."""

import os

from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, storage_uri=os.environ["BENCH_REDIS_URL"])

app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


@app.get("/hello")
@limiter.limit("1000000000/minute")
async def hello(request: Request) -> dict[str, str]:
    return {"hello": "world"}
