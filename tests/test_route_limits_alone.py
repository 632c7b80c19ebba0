"""Route limits with and without the middleware agree on what a request is charged (an audit
of the guards' own path, session 25): stacked decorators, a refusal by another route limit,
exceptions the app handles, WebSocket disconnects, returned 5xx responses, headers on a
returned response, the 403 of a cost no wait would help, and limits that differ in burst."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from conftest import BackendFactory
from fastapi import APIRouter, Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse
from http_helpers import client_for
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from fastapi_ratelimit import (
    RateLimit,
    RateLimiter,
    RateLimitExceeded,
    RateLimitMiddleware,
    rate_limit,
    rate_limit_exceeded_handler,
)

MODES = pytest.mark.parametrize("middleware", [True, False], ids=["middleware", "alone"])


def new_app(limiter: RateLimiter, middleware: bool) -> FastAPI:
    app = FastAPI()
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    if middleware:
        app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


async def statuses(app: Any, path: str, n: int, method: str = "GET") -> list[int]:
    async with client_for(app) as client:
        return [(await client.request(method, path)).status_code for _ in range(n)]


@MODES
async def test_two_stacked_decorators_both_apply(
    make_backend: BackendFactory, middleware: bool
) -> None:
    limiter = RateLimiter(backend=make_backend())
    bound = None if middleware else limiter
    app = new_app(limiter, middleware)

    @app.get("/search")
    @rate_limit("10/minute", limiter=bound)
    @rate_limit("2/minute", scope="global", limiter=bound)
    async def search() -> dict[str, int]:
        return {"ok": 1}

    assert await statuses(app, "/search", 3) == [200, 200, 429]


@MODES
async def test_a_request_another_route_limit_refuses_consumes_nothing(
    make_backend: BackendFactory, middleware: bool
) -> None:
    limiter = RateLimiter(backend=make_backend())
    bound = None if middleware else limiter
    app = new_app(limiter, middleware)
    router = APIRouter(dependencies=[Depends(RateLimit("4/minute", name="router", limiter=bound))])

    @router.get("/reports")
    @rate_limit("2/minute", name="reports", limiter=bound)
    async def reports() -> dict[str, int]:
        return {"ok": 1}

    app.include_router(router)
    async with client_for(app) as client:
        answers = [await client.get("/reports") for _ in range(6)]
    assert [a.status_code for a in answers] == [200, 200, 429, 429, 429, 429]
    # The router's 4 a minute was never used up by the refusals: each is the route's own.
    assert [a.json()["violated-policies"] for a in answers[2:]] == [["reports"]] * 4


class InvalidInput(Exception):
    pass


async def invalid_input(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"error": "invalid input"}, status_code=400)


@MODES
@pytest.mark.parametrize("kind", ["decorator", "guard"])
async def test_an_exception_the_app_answers_with_a_4xx_stays_charged(
    middleware: bool, kind: str
) -> None:
    """Refunding it would let a client dodge the limit (a login that raises on a bad
    password, say)."""
    limiter = RateLimiter()
    bound = None if middleware else limiter
    app = new_app(limiter, middleware)
    app.add_exception_handler(InvalidInput, invalid_input)
    if kind == "decorator":

        @app.post("/convert")
        @rate_limit("2/minute", limiter=bound)
        async def convert() -> None:
            raise InvalidInput

    else:

        @app.post("/convert", dependencies=[Depends(RateLimit("2/minute", limiter=bound))])
        async def convert_guarded() -> None:
            raise InvalidInput

    assert await statuses(app, "/convert", 3, "POST") == [400, 400, 429]


@MODES
async def test_a_returned_5xx_is_not_charged_by_the_decorator(
    make_backend: BackendFactory, middleware: bool
) -> None:
    limiter = RateLimiter(backend=make_backend())
    app = new_app(limiter, middleware)

    @app.get("/upstream")
    @rate_limit("2/minute", limiter=None if middleware else limiter)
    async def upstream() -> JSONResponse:
        return JSONResponse({"error": "upstream down"}, status_code=503)

    assert await statuses(app, "/upstream", 4) == [503] * 4


async def test_a_returned_response_carries_the_decorators_headers() -> None:
    limiter = RateLimiter()
    app = FastAPI()

    @app.get("/json")
    @rate_limit("2/minute", limiter=limiter)
    async def as_json() -> JSONResponse:
        return JSONResponse({"a": 1})

    @rate_limit("2/minute", limiter=limiter)
    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    starlette_app = Starlette(
        routes=[Route("/hello", hello)],
        exception_handlers={RateLimitExceeded: rate_limit_exceeded_handler},
    )
    for served, path in ((app, "/json"), (starlette_app, "/hello")):
        async with client_for(served) as client:
            answer = await client.get(path)
        assert answer.status_code == 200
        assert answer.headers["RateLimit"].startswith('"route-ip-2-60s";r=1;')
        assert answer.headers["RateLimit-Policy"].startswith('"route-ip-2-60s";q=2;')


@MODES
async def test_a_cost_no_wait_would_help_is_the_403_problem(middleware: bool) -> None:
    limiter = RateLimiter(costs={"POST /ocr": 20})
    app = new_app(limiter, middleware)

    @app.post("/ocr")
    @rate_limit("10/minute", limiter=None if middleware else limiter)
    async def ocr() -> dict[str, str]:
        return {"ok": "yes"}

    async with client_for(app) as client:
        refused = await client.post("/ocr")
    assert refused.status_code == 403
    assert "Retry-After" not in refused.headers
    assert refused.headers["Content-Type"] == "application/problem+json"
    body = refused.json()
    assert body["type"] == "tag:fastapi-ratelimit,2026:cost-exceeds-limit"
    assert body["cost"] == 20
    assert body["violated-policies"] == ["route-ip-10-60s"]


@MODES
async def test_limits_differing_only_in_burst_are_two_limits(middleware: bool) -> None:
    limiter = RateLimiter()
    bound = None if middleware else limiter
    app = new_app(limiter, middleware)
    strict = RateLimit("10/minute;burst=2", algorithm="token_bucket", limiter=bound)

    @app.get("/s", dependencies=[Depends(strict)])
    @rate_limit("10/minute;burst=20", algorithm="token_bucket", limiter=bound)
    async def s() -> dict[str, int]:
        return {"ok": 1}

    assert await statuses(app, "/s", 4) == [200, 200, 429, 429]
    assert strict.limit.policy.name == "route-ip-10-60s-b2"


async def handshake(app: Any) -> str:
    """One WebSocket connection whose client reads a message and leaves: ``accepted`` or
    ``refused``."""
    inbox: list[dict[str, Any]] = [{"type": "websocket.connect"}]
    outcome: list[str] = []

    async def receive() -> dict[str, Any]:
        return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "websocket.accept":
            outcome.append("accepted")
        elif message["type"] in ("websocket.close", "websocket.http.response.start"):
            outcome.append("refused")

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "scheme": "ws",
        "path": "/ws",
        "raw_path": b"/ws",
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"t")],
        "client": ("203.0.113.7", 40000),
        "server": ("t", 80),
        "subprotocols": [],
        "extensions": {"websocket.http.response": {}},
        "state": {},
    }
    # The endpoint lets the client's leaving escape, as many do.
    with contextlib.suppress(WebSocketDisconnect):
        await app(scope, receive, send)
    return outcome[0]


@pytest.mark.parametrize("kind", ["guard", "decorator"])
async def test_a_client_leaving_a_websocket_keeps_its_handshake_charged(kind: str) -> None:
    limiter = RateLimiter()
    app = FastAPI()
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)

    async def chat(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.receive_text()  # the client leaves: WebSocketDisconnect escapes

    if kind == "guard":
        app.websocket("/ws", dependencies=[Depends(RateLimit("2/minute", limiter=limiter))])(chat)
    else:
        app.websocket("/ws")(rate_limit("2/minute", limiter=limiter)(chat))
    assert [await handshake(app) for _ in range(4)] == [
        "accepted",
        "accepted",
        "refused",
        "refused",
    ]


@pytest.mark.parametrize(
    ("rate", "name"),
    [
        ("100/30day", "route-ip-100-2592000s"),  # was 2.592e+06: a ConfigurationError
        ("5/minute", "route-ip-5-60s"),
        ("2/0.5 seconds", "route-ip-2-0_5s"),
    ],
)
def test_default_names_of_route_limits_hold_plain_digits(rate: str, name: str) -> None:
    assert RateLimit(rate).limit.policy.name == name
