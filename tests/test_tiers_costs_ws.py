"""Tiers and cost multipliers at the HTTP layer; WebSocket handshakes at the ASGI level."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI, WebSocket
from http_helpers import client_for, policies, remaining

from fastapi_ratelimit import (
    DEFAULT_TIERS,
    ConfigurationError,
    CostTable,
    RateLimiter,
    RateLimitMiddleware,
    Tier,
)


def tiered_app(limiter: RateLimiter) -> FastAPI:
    app = FastAPI()

    @app.post("/ocr/process")
    async def process() -> dict[str, str]:
        return {"ok": "yes"}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


def header_user(connection: Any) -> str | None:
    return connection.headers.get("x-user")


def header_tier(connection: Any) -> str | None:
    return connection.headers.get("x-tier")


def test_default_tiers_are_the_seed_figures() -> None:
    figures = {
        name: (t.policy.limit, t.policy.rate.limit / t.policy.rate.period)
        for name, t in DEFAULT_TIERS.items()
    }
    assert figures == {
        "free": (100, 1.0),
        "basic": (500, 10.0),
        "pro": (2000, 50.0),
        "enterprise": (10000, 200.0),
    }


async def test_tier_resolution_fallbacks_and_cost_multipliers() -> None:
    tiers = {
        **DEFAULT_TIERS,
        "partner": Tier("partner", "10/minute", cost_multiplier=0.5),
    }
    limiter = RateLimiter(
        tiers=tiers,
        default_tier="free",
        user_resolver=header_user,
        tier_resolver=header_tier,
        costs={"POST /ocr/process": 10},
    )
    app = tiered_app(limiter)
    async with client_for(app) as client:
        pro = await client.post("/ocr/process", headers={"x-user": "a", "x-tier": "pro"})
        assert "user-pro" in policies(pro)
        assert remaining(pro) == "1990"
        unknown = await client.post("/ocr/process", headers={"x-user": "b", "x-tier": "gold"})
        assert "user-free" in policies(unknown)
        assert unknown.status_code == 200
        missing = await client.post("/ocr/process", headers={"x-user": "c"})
        assert "user-free" in policies(missing)
        # 10 units x 0.5 = 5 units a request against 10/minute: two pass.
        partner = {"x-user": "d", "x-tier": "partner"}
        first = await client.post("/ocr/process", headers=partner)
        assert remaining(first) == "5"
        assert (await client.post("/ocr/process", headers=partner)).status_code == 200
        assert (await client.post("/ocr/process", headers=partner)).status_code == 429
        # Anonymous requests have no user level at all.
        anonymous = await client.post("/ocr/process")
        assert "ratelimit-policy" not in anonymous.headers


def test_tier_and_cost_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match=r"^default_tier: "):
        RateLimiter(tiers=DEFAULT_TIERS, default_tier="platinum")
    with pytest.raises(ConfigurationError, match=r"cost_multiplier"):
        Tier("x", "1/second", cost_multiplier=0)
    with pytest.raises(ConfigurationError, match=r"^costs\['POST /x'\]: "):
        CostTable({"POST /x": -1})
    with pytest.raises(ConfigurationError, match=r"^costs: "):
        CostTable({"/x": 1})
    assert CostTable({"* /x": 3}).cost("DELETE /x") == 3
    assert CostTable({"POST /x": 3}, default=2).cost("GET /y") == 2
    assert CostTable({"POST /x": 3}).cost("POST /x", 1.5) == 5


class WebSocketDriver:
    """Drives the middleware with a raw websocket scope."""

    def __init__(self, extensions: dict[str, Any] | None = None) -> None:
        self.sent: list[dict[str, Any]] = []
        self.extensions = extensions or {}

    async def __call__(self, app: Any) -> list[dict[str, Any]]:
        self.sent = []
        inbox = [{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1000}]

        async def receive() -> dict[str, Any]:
            return inbox.pop(0) if inbox else {"type": "websocket.disconnect", "code": 1000}

        async def send(message: dict[str, Any]) -> None:
            self.sent.append(message)

        scope = {
            "type": "websocket",
            "path": "/ws",
            "raw_path": b"/ws",
            "root_path": "",
            "scheme": "ws",
            "query_string": b"",
            "headers": [(b"host", b"testserver")],
            "client": ("198.51.100.9", 1234),
            "server": ("testserver", 80),
            "subprotocols": [],
            "extensions": self.extensions,
            "app": app,
        }
        await app(scope, receive, send)
        return self.sent


async def test_websocket_handshake_is_refused_before_accept() -> None:
    app = tiered_app(RateLimiter(ip_limit="1/minute"))
    driver = WebSocketDriver()
    accepted = await driver(app)
    assert accepted[0]["type"] == "websocket.accept"
    refused = await driver(app)
    assert refused == [{"type": "websocket.close", "code": 1008, "reason": "rate limit exceeded"}]


async def test_websocket_denial_response_where_the_server_supports_it() -> None:
    app = tiered_app(RateLimiter(ip_limit="1/minute"))
    driver = WebSocketDriver({"websocket.http.response": {}})
    await driver(app)
    refused = await driver(app)
    assert refused[0]["type"] == "websocket.http.response.start"
    assert refused[0]["status"] == 429
    headers = dict(refused[0]["headers"])
    assert int(headers[b"retry-after"]) >= 1
    assert refused[1]["type"] == "websocket.http.response.body"


async def test_websockets_can_be_left_alone() -> None:
    app = FastAPI()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.close()

    app.add_middleware(
        RateLimitMiddleware, limiter=RateLimiter(ip_limit="1/minute"), websockets=False
    )
    driver = WebSocketDriver()
    for _ in range(3):
        assert (await driver(app))[0]["type"] == "websocket.accept"
