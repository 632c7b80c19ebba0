"""Helpers for the HTTP-layer tests: clients over ASGITransport with a chosen peer address."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import http_sf
import httpx

RATE_HEADERS = (
    "ratelimit",
    "ratelimit-policy",
    "x-ratelimit-limit",
    "x-ratelimit-remaining",
    "x-ratelimit-reset",
    "x-ratelimit-used",
    "x-ratelimit-scope",
)


@asynccontextmanager
async def client_for(
    app: Any, ip: str = "203.0.113.7", port: int = 40000
) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(ip, port))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        yield client


def policies(response: httpx.Response) -> dict[str, dict[str, Any]]:
    """RateLimit-Policy parsed as a structured field: {name: {"q": .., "w": ..}}."""
    parsed = http_sf.parse(response.headers["ratelimit-policy"].encode(), tltype="list")
    return {item[0]: dict(item[1]) for item in parsed}


def ratelimit(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    """RateLimit parsed as a structured field item: (policy name, {"r": .., "t": ..})."""
    value, params = http_sf.parse(response.headers["ratelimit"].encode(), tltype="item")
    return value, dict(params)


def header_counts(response: httpx.Response) -> dict[str, int]:
    names = [name.decode().lower() for name, _ in response.headers.raw]
    return {name: names.count(name) for name in set(names)}


def remaining(response: httpx.Response) -> str:
    """``r`` of the ``RateLimit`` header (the binding level's remaining units), as text."""
    return str(ratelimit(response)[1]["r"])


def work_app(limiter: Any) -> Any:
    """``GET /work`` -> ``{"ok": "yes"}`` behind ``RateLimitMiddleware``."""
    from fastapi import FastAPI

    from fastapi_ratelimit import RateLimitMiddleware

    app = FastAPI()

    @app.get("/work")
    async def work() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


def cli(
    url: str, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``fastapi-ratelimit --redis-url URL ARGS`` (no Redis URL from this environment;
    ``env`` adds variables)."""
    base = {k: v for k, v in os.environ.items() if "REDIS_URL" not in k}
    return subprocess.run(
        [sys.executable, "-m", "fastapi_ratelimit.cli", "--redis-url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**base, **(env or {})},
        check=False,
    )


async def until(condition: Any, what: str, deadline: float = 10.0) -> None:
    """Wait for ``condition()`` (sync or async) to hold -- a background refresh to land, ...
    -- checking every 20 ms and failing after a generous ``deadline``: never a sleep that
    hopes to be long enough."""
    import asyncio
    import inspect
    import time

    started = time.monotonic()
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        assert time.monotonic() - started < deadline, f"{what}: not within {deadline} s"
        await asyncio.sleep(0.02)
