"""Regression tests from a security review (issue 13, second part): what one untrusted client
sends must never change what applies to other clients, grow per-process memory without a
bound, or put a raw API key anywhere it could be read back."""

from __future__ import annotations

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware

# -- 5. the route cache keys on everything routing reads -----------------------------------


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def host_routed_app(limiter: RateLimiter) -> Starlette:
    api = Router(
        routes=[
            Route("/ocr/process", _ok, methods=["POST"]),
            Mount("/v1", routes=[Route("/jobs/{id}", _ok, methods=["POST"])]),
        ]
    )
    app = Starlette(routes=[Host("api.example.com", app=api)])
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


async def test_a_bogus_host_never_changes_the_route_other_clients_resolve_to() -> None:
    limiter = RateLimiter(
        endpoint_limits={"POST /ocr/process": "1/minute", "POST /v1/jobs/{id}": "1/minute"}
    )
    app = host_routed_app(limiter)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 1), root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        good = {"host": "api.example.com"}
        evil = {"host": "evil.example"}
        for path in ("/api/ocr/process", "/api/v1/jobs/7"):
            # The attacker goes first: its request matches no route (a 404)...
            assert (await client.post(path, headers=evil)).status_code == 404
            # ...and everyone else's still meets the endpoint limit.
            statuses = [(await client.post(path, headers=good)).status_code for _ in range(2)]
            assert statuses == [200, 429]
            # After them, the attacker's request is still a 404 of its own (unmatched, not
            # the endpoint the others' requests left in the cache).
            assert (await client.post(path, headers=evil)).status_code == 404
