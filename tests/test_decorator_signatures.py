"""@rate_limit on every endpoint signature shape (issue 14, defect 1), and server errors are
never charged, by the decorator and by the ``RateLimit`` guard, with and without the
middleware, on memory and Redis."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import pytest
from conftest import BackendFactory
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from http_helpers import client_for, remaining
from loguru import logger

from fastapi_ratelimit import (
    RateLimit,
    RateLimiter,
    RateLimitExceeded,
    RateLimitMiddleware,
    logs,
    rate_limit,
    rate_limit_exceeded_handler,
)


def common() -> int:
    return 7


def shapes(bound: RateLimiter | None) -> dict[str, Callable[..., Any]]:
    """One endpoint per signature shape, each setting a header through its own Response when
    it has one (so a lost Response shows)."""

    @rate_limit("3/minute", limiter=bound)
    async def request_only(request: Request) -> dict[str, str]:
        return {"path": request.url.path}

    @rate_limit("3/minute", limiter=bound)
    async def response_only(response: Response) -> dict[str, str]:
        response.headers["x-own"] = "yes"
        return {"ok": "yes"}

    @rate_limit("3/minute", limiter=bound)
    async def both(request: Request, response: Response) -> dict[str, str]:
        response.headers["x-own"] = "yes"
        return {"path": request.url.path}

    @rate_limit("3/minute", limiter=bound)
    async def neither() -> dict[str, str]:
        return {"ok": "yes"}

    @rate_limit("3/minute", limiter=bound)
    async def annotated(
        q: Annotated[int, Depends(common)],
        response: Annotated[Response, "own"],
        request: Annotated[Request, "own"],
    ) -> dict[str, int]:
        response.headers["x-own"] = "yes"
        return {"q": q}

    @rate_limit("3/minute", limiter=bound)
    def sync_response(response: Response) -> dict[str, str]:
        response.headers["x-own"] = "yes"
        return {"ok": "yes"}

    @rate_limit("3/minute", limiter=bound)
    def sync_neither() -> dict[str, str]:
        return {"ok": "yes"}

    return {f.__name__: f for f in locals().values() if callable(f)}


OWN_RESPONSE = {"response_only", "both", "annotated", "sync_response"}


def build(limiter: RateLimiter, *, middleware: bool) -> FastAPI:
    app = FastAPI()
    for name, endpoint in shapes(None if middleware else limiter).items():
        app.get(f"/{name}")(endpoint)

    @app.get("/fails")
    @rate_limit("3/minute", limiter=None if middleware else limiter)
    async def fails(response: Response) -> None:
        raise RuntimeError("the endpoint's own bug")

    if middleware:
        app.add_middleware(RateLimitMiddleware, limiter=limiter)
    else:
        app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    return app


@pytest.mark.parametrize("middleware", [True, False], ids=["middleware", "decorator-alone"])
@pytest.mark.parametrize("name", sorted(shapes(None)))
async def test_every_signature_shape_is_limited_and_keeps_its_response(
    make_backend: BackendFactory, name: str, middleware: bool
) -> None:
    app = build(RateLimiter(backend=make_backend()), middleware=middleware)
    async with client_for(app) as client:
        answers = [await client.get(f"/{name}") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [remaining(a) for a in answers[:3]] == ["2", "1", "0"]
    if name in OWN_RESPONSE:
        assert all(a.headers["x-own"] == "yes" for a in answers[:3])


@pytest.mark.parametrize("middleware", [True, False], ids=["middleware", "decorator-alone"])
async def test_a_server_error_is_never_charged(
    make_backend: BackendFactory, middleware: bool
) -> None:
    limiter = RateLimiter(backend=make_backend(), ip_limit="5/minute")
    app = build(limiter, middleware=middleware)
    async with client_for(app) as client:
        with pytest.raises(RuntimeError, match="own bug"):
            await client.get("/fails")
        for _ in range(4):
            with pytest.raises(RuntimeError, match="own bug"):
                await client.get("/fails")
        # Five failures later, the 3/minute route limit (and the ip level) are untouched.
        checked = await client.get("/neither")
        assert checked.status_code == 200
    levels = {d.policy: d.remaining for d in await limiter.operator.inspect(ip="203.0.113.7")}
    if middleware:
        assert levels["ip"] == 5 - 1


async def test_a_5xx_response_is_given_back_and_a_4xx_is_not(make_backend: BackendFactory) -> None:
    limiter = RateLimiter(backend=make_backend(), ip_limit="3/minute")
    app = FastAPI()

    @app.get("/status/{code}")
    async def status(code: int) -> Response:
        return Response(status_code=code)

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        assert [(await client.get("/status/503")).status_code for _ in range(5)] == [503] * 5
        assert [(await client.get("/status/404")).status_code for _ in range(4)] == [
            404,
            404,
            404,
            429,
        ]


def guarded(limiter: RateLimiter, *, middleware: bool) -> FastAPI:
    """One route behind a ``RateLimit`` guard of 3 a minute (route limits count per route),
    ending as ``mode`` says: ``ok``, ``bug`` (an error escapes) or a status it raises."""
    guard = RateLimit("3/minute", limiter=None if middleware else limiter)
    app = FastAPI(dependencies=[Depends(guard)])

    @app.get("/act")
    async def act(mode: str, q: int = 0) -> dict[str, int]:
        if mode == "bug":
            raise RuntimeError("the endpoint's own bug")
        if mode != "ok":
            raise HTTPException(int(mode), "raised by the endpoint")
        return {"q": q}

    if middleware:
        app.add_middleware(RateLimitMiddleware, limiter=limiter)
    else:
        app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    return app


@pytest.mark.parametrize("middleware", [True, False], ids=["middleware", "guard-alone"])
async def test_a_guard_gives_back_a_server_error_and_keeps_a_client_error(
    make_backend: BackendFactory, middleware: bool
) -> None:
    limiter = RateLimiter(backend=make_backend())
    app = guarded(limiter, middleware=middleware)
    async with client_for(app) as client:

        async def status(**params: str) -> int:
            return (await client.get("/act", params=params)).status_code

        # An error escaping the endpoint, and a raised 503: never charged.
        for _ in range(4):
            with pytest.raises(RuntimeError, match="own bug"):
                await client.get("/act", params={"mode": "bug"})
        assert [await status(mode="503") for _ in range(4)] == [503] * 4
        # Nothing was taken: the guard's three units are all there.
        first = await client.get("/act", params={"mode": "ok"})
        assert (first.status_code, remaining(first)) == (200, "2")
        # A raised 404 and a failed validation (422) are the client's: charged.
        assert await status(mode="404") == 404
        assert await status(mode="ok", q="x") == 422
        assert await status(mode="ok") == 429


async def test_a_guards_refund_when_without_the_middleware_says_it_is_not_applied(
    make_backend: BackendFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A fresh process-wide log limiter: another test's line must not hold this one back.
    monkeypatch.setattr(logs, "_PROCESS", logs.LogLimiter())
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(m.record["message"]), level="WARNING")
    limiter = RateLimiter(backend=make_backend())
    guard = RateLimit("3/minute", limiter=limiter, refund_when=lambda status: status == 404)
    app = FastAPI(dependencies=[Depends(guard)])

    @app.get("/missing")
    async def missing() -> None:
        raise HTTPException(404)

    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    try:
        async with client_for(app) as client:
            statuses = [(await client.get("/missing")).status_code for _ in range(4)]
    finally:
        logger.remove(handler)
    # Not applied, and said so (once: the line is rate-limited), naming the limit.
    assert statuses == [404, 404, 404, 429]
    assert len(lines) == 1
    assert "refund_when" in lines[0]
    assert "RateLimitMiddleware" in lines[0]
    assert "route-ip-3-60s" in lines[0]
