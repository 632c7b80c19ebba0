"""The middleware behind a real uvicorn server on a loopback port, in the test's event loop.

What in-process ASGI clients can't show: a streamed body really leaves the server chunk by
chunk, WebSocket handshakes are refused on the wire (HTTP 429 through the ASGI
``websocket.http.response`` extension, 403 after a ``websocket.close`` without it) by each
of uvicorn's WebSocket implementations, pipelined HTTP/1.1 requests on one connection are
counted and answered in order by each HTTP implementation, and CORS wraps a 429.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import StreamingResponse
from http_helpers import live_server
from starlette.types import ASGIApp, Receive, Scope, Send
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware

HOST = "127.0.0.1"
TIMEOUT = 10.0  # generous for small shared CI machines; a passing run takes milliseconds
RATE_HEADERS = ("ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining")
WS_IMPLEMENTATIONS = ["websockets-sansio", "wsproto"]  # "websockets" (legacy) is deprecated
HTTP_IMPLEMENTATIONS = ["h11", "httptools"]


def http_client(port: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=TIMEOUT)


def assert_rate_headers(
    headers: httpx.Headers | dict[str, str], limit: int, remaining: int
) -> None:
    for name in RATE_HEADERS:
        assert name in headers, name
    assert headers["x-ratelimit-limit"] == str(limit)
    assert headers["x-ratelimit-remaining"] == str(remaining)


# -- streaming -------------------------------------------------------------------------------

CHUNKS = [f"chunk-{i}\n".encode() for i in range(5)]


def streaming_app(gate: asyncio.Event, events: list[str]) -> FastAPI:
    app = FastAPI()

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            events.append("start")
            yield CHUNKS[0]
            # Released by the test once it holds chunk 0: a server (or middleware) that
            # buffered the body would never send chunk 0, and the test would time out.
            await asyncio.wait_for(gate.wait(), TIMEOUT)
            for chunk in CHUNKS[1:]:
                await asyncio.sleep(0.05)
                yield chunk
            events.append("end")

        return StreamingResponse(body(), media_type="text/plain")

    app.add_middleware(
        RateLimitMiddleware, limiter=RateLimiter(ip_limit="2/minute", headers="both")
    )
    return app


async def test_streaming_response_is_streamed_and_limited() -> None:
    gate = asyncio.Event()
    events: list[str] = []
    async with live_server(streaming_app(gate, events)) as port, http_client(port) as client:
        async with client.stream("GET", "/stream") as response:
            assert response.status_code == 200
            assert "content-length" not in response.headers
            assert response.headers["transfer-encoding"] == "chunked"
            assert_rate_headers(response.headers, limit=2, remaining=1)
            pieces = response.aiter_raw()
            first = await asyncio.wait_for(anext(pieces), TIMEOUT)
            first_at = time.monotonic()
            assert first == CHUNKS[0]
            assert events == ["start"]  # the generator is still running
            gate.set()
            rest = [piece async for piece in pieces]
            last_at = time.monotonic()
        assert first + b"".join(rest) == b"".join(CHUNKS)
        assert events == ["start", "end"]
        # Four 50 ms pauses separate chunk 0 from the end of the body.
        assert last_at - first_at >= 0.15

        second = await client.get("/stream")
        assert second.status_code == 200
        assert second.content == b"".join(CHUNKS)
        assert_rate_headers(second.headers, limit=2, remaining=0)

        async with client.stream("GET", "/stream") as denied:
            body = await denied.aread()
        assert denied.status_code == 429
        assert denied.headers["content-type"] == "application/problem+json"
        assert int(denied.headers["retry-after"]) > 0
        assert_rate_headers(denied.headers, limit=2, remaining=0)
        assert json.loads(body)["status"] == 429
        # The denied request never reached the endpoint: its generator never started.
        assert events == ["start", "end", "start", "end"]


# -- WebSocket -------------------------------------------------------------------------------


def websocket_app(accepted: list[dict[str, Any]]) -> FastAPI:
    app = FastAPI()

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        accepted.append(dict(websocket.scope.get("extensions") or {}))
        await websocket.accept()
        try:
            while True:
                text = await websocket.receive_text()
                await websocket.send_text(f"echo:{text}")
        except WebSocketDisconnect:
            pass

    app.add_middleware(
        RateLimitMiddleware, limiter=RateLimiter(ip_limit="2/minute", headers="both")
    )
    return app


def without_denial_extension(app: ASGIApp) -> ASGIApp:
    """What a server without the ``websocket.http.response`` extension looks like to the app."""

    async def wrapper(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            extensions = dict(scope.get("extensions") or {})
            extensions.pop("websocket.http.response", None)
            scope = {**scope, "extensions": extensions}
        await app(scope, receive, send)

    return wrapper


async def echo_once(ws: ClientConnection, text: str) -> None:
    await ws.send(text)
    assert await asyncio.wait_for(ws.recv(), TIMEOUT) == f"echo:{text}"


@pytest.mark.parametrize("ws_impl", WS_IMPLEMENTATIONS)
@pytest.mark.parametrize("extension", [True, False], ids=["denial-response", "close-1008"])
async def test_websocket_handshakes_are_limited(ws_impl: str, extension: bool) -> None:
    accepted: list[dict[str, Any]] = []
    app = websocket_app(accepted)
    served: ASGIApp = app if extension else without_denial_extension(app)
    async with live_server(served, ws=ws_impl) as port:
        url = f"ws://{HOST}:{port}/ws"
        async with connect(url, open_timeout=TIMEOUT) as first:
            await echo_once(first, "a1")
            async with connect(url, open_timeout=TIMEOUT) as second:
                await echo_once(second, "b1")
            # The limit (2/minute) is used up: the third handshake is refused on the wire.
            with pytest.raises(InvalidStatus) as refused:
                async with connect(url, open_timeout=TIMEOUT):
                    pass
            response = refused.value.response
            if extension:
                # uvicorn advertises websocket.http.response: the client gets the real 429.
                assert response.status_code == 429
                assert response.headers["content-type"] == "application/problem+json"
                assert int(response.headers["retry-after"]) > 0
                assert response.headers["x-ratelimit-remaining"] == "0"
                assert response.body is not None
                assert json.loads(response.body)["status"] == 429
            else:
                # websocket.close before accept: uvicorn answers the handshake with 403.
                assert response.status_code == 403
            # The socket opened before the limit was hit is not affected.
            await echo_once(first, "a2")
    assert len(accepted) == 2  # the refused handshake never reached the endpoint
    for extensions in accepted:
        assert ("websocket.http.response" in extensions) is extension


# -- HTTP/1.1 pipelining ---------------------------------------------------------------------


def items_app(served: list[int]) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item}")
    async def item(item: int) -> dict[str, int]:
        served.append(item)
        return {"item": item}

    app.add_middleware(
        RateLimitMiddleware, limiter=RateLimiter(ip_limit="3/minute", headers="both")
    )
    return app


async def read_response(reader: asyncio.StreamReader) -> tuple[int, list[tuple[str, str]], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    version, status, _ = status_line.split(" ", 2)
    assert version == "HTTP/1.1"
    headers = [(k.strip().lower(), v.strip()) for k, v in (line.split(":", 1) for line in lines)]
    fields = dict(headers)
    assert "transfer-encoding" not in fields
    body = await reader.readexactly(int(fields["content-length"]))
    return int(status), headers, body


@pytest.mark.parametrize("http_impl", HTTP_IMPLEMENTATIONS)
async def test_pipelined_requests_are_answered_in_order(http_impl: str) -> None:
    served: list[int] = []
    async with live_server(items_app(served), http=http_impl) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(
                b"".join(
                    f"GET /items/{i} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()
                    for i in range(4)
                )
            )
            await writer.drain()
            responses = [await asyncio.wait_for(read_response(reader), TIMEOUT) for _ in range(4)]
        finally:
            writer.close()
            await writer.wait_closed()
    assert [status for status, _, _ in responses] == [200, 200, 200, 429]
    for index, (status, headers, body) in enumerate(responses):
        names = [name for name, _ in headers]
        assert len(names) == len(set(names)), f"duplicated headers in response {index}"
        fields = dict(headers)
        assert_rate_headers(fields, limit=3, remaining=max(0, 2 - index))
        if status == 200:
            assert json.loads(body) == {"item": index}
            assert fields["content-type"] == "application/json"
            assert "retry-after" not in fields
        else:
            assert fields["content-type"] == "application/problem+json"
            assert int(fields["retry-after"]) > 0
            assert json.loads(body)["status"] == 429
    assert served == [0, 1, 2]  # the fourth never reached the endpoint


def upload_app(received: list[int]) -> FastAPI:
    app = FastAPI()

    @app.post("/upload")
    async def upload(request: Request) -> dict[str, int]:
        received.append(len(await request.body()))
        return {"bytes": received[-1]}

    app.add_middleware(
        RateLimitMiddleware, limiter=RateLimiter(ip_limit="2/minute", headers="both")
    )
    return app


@pytest.mark.parametrize("http_impl", HTTP_IMPLEMENTATIONS)
async def test_denied_request_bodies_do_not_desync_the_connection(http_impl: str) -> None:
    """A denied POST's body is never read by the app; the server must still skip it, or the
    next pipelined request would be parsed out of the middle of that body."""
    received: list[int] = []
    sizes = [70_000, 1, 70_000, 5, 70_000]
    async with live_server(upload_app(received), http=http_impl) as port:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            for index, size in enumerate(sizes):
                # The bodies are all "G"s: a server that lost its place would see "GGG..." as
                # a request line and answer 400 (or close the connection).
                writer.write(
                    f"POST /upload HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                    f"Content-Length: {size}\r\nX-Index: {index}\r\n\r\n".encode()
                    + b"G" * size
                )
            writer.write(f"GET /upload HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
            await writer.drain()
            responses = [
                await asyncio.wait_for(read_response(reader), TIMEOUT)
                for _ in range(len(sizes) + 1)
            ]
        finally:
            writer.close()
            await writer.wait_closed()
    assert [status for status, _, _ in responses] == [200, 200, 429, 429, 429, 429]
    assert [json.loads(body) for _, _, body in responses[:2]] == [{"bytes": 70_000}, {"bytes": 1}]
    assert received == [70_000, 1]


# -- CORS --------------------------------------------------------------------------------------

ORIGIN = "https://frontend.example"


def cors_app(limiter_inside: bool) -> FastAPI:
    app = FastAPI()

    @app.get("/ping")
    async def ping() -> dict[str, str]:
        return {"pong": "yes"}

    def add_limiter() -> None:
        app.add_middleware(
            RateLimitMiddleware, limiter=RateLimiter(ip_limit="1/minute", headers="both")
        )

    def add_cors() -> None:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=[ORIGIN],
            allow_methods=["*"],
            expose_headers=["Retry-After", "RateLimit", "RateLimit-Policy"],
        )

    # Starlette runs the middleware added last outermost.
    for add in (add_limiter, add_cors) if limiter_inside else (add_cors, add_limiter):
        add()
    return app


async def test_cors_wraps_a_429() -> None:
    async with live_server(cors_app(limiter_inside=True)) as port, http_client(port) as client:
        headers = {"Origin": ORIGIN}
        allowed = await client.get("/ping", headers=headers)
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == ORIGIN
        denied = await client.get("/ping", headers=headers)
        assert denied.status_code == 429
        assert denied.headers["access-control-allow-origin"] == ORIGIN
        exposed = denied.headers["access-control-expose-headers"].lower()
        assert "retry-after" in exposed
        assert int(denied.headers["retry-after"]) > 0
        # A preflight is answered by CORS even though the quota is used up.
        preflight = await client.options(
            "/ping", headers={**headers, "Access-Control-Request-Method": "GET"}
        )
        assert preflight.status_code == 200
        assert preflight.headers["access-control-allow-origin"] == ORIGIN


async def test_limiter_outside_cors_sends_a_bare_429() -> None:
    """The wrong order, for contrast: the limiter answers before CORS can add its headers."""
    async with live_server(cors_app(limiter_inside=False)) as port, http_client(port) as client:
        headers = {"Origin": ORIGIN}
        assert (await client.get("/ping", headers=headers)).status_code == 200
        denied = await client.get("/ping", headers=headers)
        assert denied.status_code == 429
        assert "access-control-allow-origin" not in denied.headers
