"""An app for tests/test_workers.py: one Redis-backed limit, served by several uvicorn workers.
Each answer names the worker's pid, so the test can see that both workers served."""

import os
import time
from typing import Any

from fastapi import FastAPI, Request

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware, RedisBackend

limiter = RateLimiter(
    backend=RedisBackend.from_url(os.environ["TEST_REDIS_URL"], timeout=5.0),
    ip_limit=os.environ.get("TEST_IP_LIMIT", "10/minute"),
)

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter)


@app.middleware("http")
async def name_the_worker(request: Request, call_next: Any) -> Any:
    # Outside the limiter: 429s name their worker too.
    response = await call_next(request)
    response.headers["x-pid"] = str(os.getpid())
    return response


@app.get("/hello")
async def hello() -> dict[str, int]:
    # Blocks this worker's event loop on purpose: while it does, only the other worker can
    # accept connections, so the test's requests reach both.
    time.sleep(0.01)  # noqa: ASYNC251
    return {"pid": os.getpid()}


@app.get("/health")
async def health() -> dict[str, int]:
    # Exempt (a default): the test polls it until both workers answer, at no cost in quota.
    time.sleep(0.01)  # noqa: ASYNC251
    return {"pid": os.getpid()}
