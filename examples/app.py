"""The seed's OCR API, rate limited with fastapi_ratelimit's core.

Run it with the README's first command (in-memory backend, no Redis needed), or point it at
Redis with ``REDIS_URL=redis://127.0.0.1:6379/0``. Every request is checked at three levels
(global, per IP, per endpoint) in ONE atomic backend call; the endpoint level charges the
seed's costs (upload 5, OCR process 10, OCR batch 50, everything else 1).

The HTTP layer (RateLimitMiddleware, @rate_limit, Depends guards, tiers and the full header
set) is the next milestone; this example uses the core API directly through a dependency.
"""

from __future__ import annotations

import math
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, HTTPException, Request, Response

from fastapi_ratelimit import Algorithm, Backend, Check, MemoryBackend, Policy, RedisBackend

GLOBAL = Policy("global", "10000/minute", Algorithm.FIXED_WINDOW)
PER_IP = Policy("ip", "300/minute", Algorithm.SLIDING_WINDOW_COUNTER)
PER_ENDPOINT = Policy("endpoint", "1000/hour;burst=100", Algorithm.TOKEN_BUCKET)
#: The seed's costs, keyed by method and route template.
COSTS = {"POST /documents/upload": 5, "POST /ocr/process": 10, "POST /ocr/batch": 50}


def make_backend() -> Backend:
    url = os.environ.get("REDIS_URL")
    return RedisBackend.from_url(url) if url else MemoryBackend()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    app.state.backend = make_backend()
    yield
    await app.state.backend.aclose()


async def limited(request: Request, response: Response) -> None:
    """Check global, IP and endpoint levels in one call; 429 with Retry-After when denied."""
    route = request.scope.get("route")
    template = getattr(route, "path", request.url.path)
    endpoint = f"{request.method} {template}"
    cost = COSTS.get(endpoint, 1)
    ip = request.client.host if request.client else "unknown"
    backend: Backend = request.app.state.backend
    verdict = await backend.hit(
        [
            Check(GLOBAL, "global", "", cost),
            Check(PER_IP, "ip", ip, cost),
            Check(PER_ENDPOINT, "endpoint", (ip, endpoint), cost),
        ]
    )
    binding = verdict.binding
    if not verdict.allowed and binding is not None:
        raise HTTPException(
            status_code=429,
            detail=f"rate limit exceeded at the {binding.scope} level",
            headers={"Retry-After": str(max(1, math.ceil(verdict.retry_after)))},
        )
    if binding is not None:
        # FastAPI merges headers set on this Response into the endpoint's response.
        response.headers["X-RateLimit-Limit"] = str(binding.limit)
        response.headers["X-RateLimit-Remaining"] = str(binding.remaining)
        response.headers["X-RateLimit-Scope"] = binding.scope


app = FastAPI(title="OCR API (fastapi_ratelimit example)", lifespan=lifespan)


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.post("/auth/login", dependencies=[Depends(limited)])
async def login() -> dict[str, str]:
    return {"token": "demo"}


@app.get("/users/{user_id}", dependencies=[Depends(limited)])
async def get_user(user_id: int) -> dict[str, int | str]:
    return {"id": user_id, "tier": "free"}


@app.post("/documents/upload", dependencies=[Depends(limited)])
async def upload(request: Request) -> dict[str, int]:
    return {"bytes": len(await request.body())}


@app.post("/ocr/process", dependencies=[Depends(limited)])
async def process() -> dict[str, str]:
    return {"text": "lorem ipsum"}


@app.post("/ocr/batch", dependencies=[Depends(limited)], status_code=202)
async def batch() -> dict[str, int]:
    return {"queued": 10}


def main() -> None:
    import uvicorn

    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "8000"))
    uvicorn.run(app, host=host, port=port)


if __name__ == "__main__":
    main()
