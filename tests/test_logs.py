"""Structured, rate-limited log lines with masked identities (real loguru sinks)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from loguru import logger

from fastapi_ratelimit import FakeClock, RateLimiter, RateLimitMiddleware
from fastapi_ratelimit.logs import LogLimiter
from fastapi_ratelimit.masking import mask_identity


@pytest.fixture
def records() -> Iterator[list[dict[str, Any]]]:
    captured: list[dict[str, Any]] = []
    # The library may be silent by default (logger.disable): turn it on for this test only.
    logger.enable("fastapi_ratelimit")
    handler = logger.add(lambda message: captured.append(message.record), level="DEBUG")
    try:
        yield captured
    finally:
        logger.remove(handler)


def test_one_line_per_category_per_interval_then_the_count_left_out(
    records: list[dict[str, Any]],
) -> None:
    clock = FakeClock()
    limiter = LogLimiter(interval=1.0, clock=lambda: clock.now_us() / 1e6)
    for _ in range(50):
        limiter.log("WARNING", "refund", "refund failed: {}", "timeout", kind="timeout")
    assert limiter.log("WARNING", "other", "another category is not held back")
    clock.advance(0.5)
    assert not limiter.log("WARNING", "refund", "refund failed: {}", "timeout")
    clock.advance(0.5)
    assert limiter.log("WARNING", "refund", "refund failed: {}", "timeout")
    lines = [(r["extra"]["category"], r["message"]) for r in records]
    assert lines == [
        ("refund", "refund failed: timeout"),
        ("other", "another category is not held back"),
        ("refund", "refund failed: timeout (50 more like it left out)"),
    ]
    assert records[0]["extra"]["kind"] == "timeout"
    assert records[0]["name"] == __name__  # the caller, not the logs module


async def test_a_shadow_flood_logs_a_line_a_second_with_the_client_masked(
    records: list[dict[str, Any]],
) -> None:
    app = FastAPI()
    limiter = RateLimiter(ip_limit="1/minute", shadow={"ip"})
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    transport = httpx.ASGITransport(app=app, client=("198.51.100.23", 1234))
    started = time.monotonic()
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        for _ in range(200):
            assert (await http.get("/hello")).status_code == 200
    seconds = time.monotonic() - started
    shadow = [r for r in records if r["extra"].get("category") == "shadow"]
    # 199 denials; a line a second at most (plus the first, at once).
    assert 1 <= len(shadow) <= seconds + 1
    first = shadow[0]
    assert first["extra"]["client"] == "198.51.100.0/24"
    assert first["extra"]["scope"] == "ip"
    assert first["extra"]["endpoint"] == "GET /hello"
    for record in records:
        assert "198.51.100.23" not in record["message"]
        assert "198.51.100.23" not in str(record["extra"])


def test_masks() -> None:
    assert mask_identity("ip", "203.0.113.7") == "203.0.113.0/24"
    assert mask_identity("ip", "2001:db8::/64") == "2001:db8::/48"
    assert mask_identity("ip", "not an ip").startswith("ip#")
    assert mask_identity("api_key", "sk-1").startswith("key#")
    assert len(mask_identity("api_key", "sk-1")) == 8
    assert mask_identity("user", "alice@example.com") == "user:alic…"
