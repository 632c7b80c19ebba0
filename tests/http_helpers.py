"""Helpers for the HTTP-layer tests: clients over ASGITransport with a chosen peer address."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import http_sf
import httpx
import uvicorn

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


@asynccontextmanager
async def live_server(app: Any, *, lifespan: str = "off", **options: Any) -> AsyncIterator[int]:
    """Serve ``app`` with uvicorn on 127.0.0.1 as a task of the running loop; yield the port
    once uvicorn serves (with ``lifespan="on"``: once the app's start-up is complete).

    The listening socket is bound here (port 0) and handed to uvicorn, so there is no race
    for the port and no ``sys.exit`` from uvicorn when a port turns out to be taken.
    """
    host, patience = "127.0.0.1", 10.0  # generous for small shared CI machines
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    port: int = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        log_config=None,  # leave the test process's logging configuration alone
        lifespan=lifespan,
        timeout_graceful_shutdown=5,
        **options,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        deadline = time.monotonic() + patience
        while not server.started:
            if task.done():
                task.result()  # raises what made the server stop
                raise RuntimeError("uvicorn stopped before it started")
            if time.monotonic() > deadline:
                raise TimeoutError("uvicorn did not start")
            await asyncio.sleep(0.01)
        yield port
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(task, patience)
        finally:
            sock.close()


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
