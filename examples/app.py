"""The seed document's OCR API, rate limited with fastapi_ratelimit.

Run it with the README's first command (in-memory backend, no Redis needed):

    pip install -e '.[example]' && python examples/app.py

or on Redis: ``REDIS_URL=redis://127.0.0.1:6379/0 python examples/app.py``.

What it shows:
- one ``RateLimiter`` shared by the middleware, a ``@rate_limit`` decorator and a guard;
- levels: global, per IP, per endpoint, per API key, per user with the seed's tiers
  (Free/Basic/Pro/Enterprise), all checked in one backend call;
- the seed's costs: upload 5, OCR process 10, OCR batch 50, everything else 1;
- failed logins only count (``refund_when``), and an endpoint that reports its real cost.

Authentication is a toy: ``Authorization: Bearer <user>:<tier>`` (tier optional).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.middleware.cors import CORSMiddleware
from loguru import logger
from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection

from fastapi_ratelimit import (
    DEFAULT_TIERS,
    Backend,
    MemoryBackend,
    RateLimit,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    rate_limit,
    report_cost,
)

# The library is silent until the app opts in: breaker and backend warnings, audit lines.
logger.enable("fastapi_ratelimit")


def make_backend() -> Backend:
    url = os.environ.get("REDIS_URL")
    return RedisBackend.from_url(url) if url else MemoryBackend()


def bearer(connection: HTTPConnection) -> tuple[str, str] | None:
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        return None
    user, _, tier = token.partition(":")
    return (user, tier) if user else None


def current_user(connection: HTTPConnection) -> str | None:
    found = bearer(connection)
    return found[0] if found else None


def current_tier(connection: HTTPConnection) -> str | None:
    found = bearer(connection)
    return found[1] or None if found else None


limiter = RateLimiter(
    backend=make_backend(),
    global_limit="10000/minute",
    ip_limit="300/minute",
    api_key_limit="1000/minute",
    endpoint_limits={"POST /ocr/process": "3000/minute", "POST /ocr/batch": "1000/minute"},
    costs={"POST /documents/upload": 5, "POST /ocr/process": 10, "POST /ocr/batch": 50},
    tiers=DEFAULT_TIERS,
    default_tier="free",
    user_resolver=current_user,
    tier_resolver=current_tier,
    trusted_proxies=[p for p in os.environ.get("TRUSTED_PROXIES", "").split(",") if p],
    on_backend_error="allow",
    headers="both",  # the IETF headers and the seed's X-RateLimit-*
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    if metrics is not None:
        metrics.close()  # several workers: this one's last counts
    await limiter.aclose()


app = FastAPI(title="OCR API (fastapi_ratelimit example)", lifespan=lifespan)


class Login(BaseModel):
    username: str = Field(max_length=100)
    password: str = Field(max_length=100)


class Batch(BaseModel):
    documents: list[str] = Field(default_factory=list, max_length=100)


def require_user(request: Request) -> str:
    user = current_user(request)
    if user is None:
        raise HTTPException(401, "log in first", headers={"WWW-Authenticate": "Bearer"})
    return user


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/auth/login")
@rate_limit("5/minute", scope="ip", refund_when=lambda status: status < 400)
async def login(credentials: Login) -> dict[str, str]:
    """Five failed logins per minute per IP; successful ones are given back."""
    if credentials.password != "demo":
        raise HTTPException(401, "wrong username or password")
    return {"token": f"{credentials.username}:free"}


@app.get("/users/me")
async def me(user: Annotated[str, Depends(require_user)]) -> dict[str, str]:
    return {"id": user}


@app.get("/users/{user_id}", dependencies=[Depends(RateLimit("60/minute", scope="ip"))])
async def get_user(user_id: int) -> dict[str, int | str]:
    return {"id": user_id, "tier": "free"}


@app.post("/documents/upload")
async def upload(request: Request) -> dict[str, int]:
    body = await request.body()
    return {"bytes": len(body)}


@app.post("/ocr/process")
async def process(request: Request) -> dict[str, str]:
    body = await request.body()
    if not body:
        # Nothing to read: it costs one unit, not ten.
        report_cost(request, 1)
    return {"text": "lorem ipsum"}


@app.post("/ocr/batch", status_code=202)
@rate_limit("5/minute", scope="user", cost=1)
async def batch(payload: Batch) -> dict[str, int]:
    return {"queued": len(payload.documents)}


try:  # Prometheus metrics at /metrics (exempt by default) when the [prometheus] extra is in
    from fastapi_ratelimit.metrics import RateLimitMetrics
except ImportError:
    metrics = None
else:
    metrics = RateLimitMetrics(limiter)
    app.add_route("/metrics", metrics.endpoint)

# Outermost last: CORS wraps the limiter, so a 429 still carries CORS headers.
app.add_middleware(RateLimitMiddleware, limiter=limiter)
app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"], allow_headers=["*"])


def main() -> None:
    import uvicorn

    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    uvicorn.run(app, host=host, port=port)


if __name__ == "__main__":
    main()
