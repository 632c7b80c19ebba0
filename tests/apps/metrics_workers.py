"""An app for tests/test_metrics_workers.py: one Redis-backed limit and Prometheus metrics in
multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` is set by the test), served by several
uvicorn workers. Each answer names the worker's pid."""

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware, RedisBackend
from fastapi_ratelimit.metrics import RateLimitMetrics

limiter = RateLimiter(
    backend=RedisBackend.from_url(os.environ["TEST_REDIS_URL"], timeout=5.0),
    ip_limit="40/minute",
)
metrics = RateLimitMetrics(limiter)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    metrics.close()  # this worker's last counts, before it stops
    await limiter.aclose()


app = FastAPI(lifespan=lifespan)
app.add_middleware(RateLimitMiddleware, limiter=limiter)
app.add_route("/metrics", metrics.endpoint)


@app.middleware("http")
async def name_the_worker(request: Request, call_next: Any) -> Any:
    response = await call_next(request)
    response.headers["x-pid"] = str(os.getpid())
    return response


@app.get("/hello")
async def hello() -> dict[str, int]:
    # Blocks this worker's loop on purpose, so the test's connections reach both workers.
    time.sleep(0.01)  # noqa: ASYNC251
    return {"pid": os.getpid()}


@app.get("/health")
async def health() -> dict[str, int]:
    time.sleep(0.01)  # noqa: ASYNC251
    return {"pid": os.getpid()}
