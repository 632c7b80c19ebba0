"""A flood of denied requests logs one line per second, never one per request."""

from __future__ import annotations

from http_helpers import client_for
from loguru import logger
from test_middleware import make_app

from fastapi_ratelimit import FakeClock, MemoryBackend, RateLimiter
from fastapi_ratelimit.denials import DenialLog


def capture() -> tuple[list[str], int]:
    lines: list[str] = []
    handler = logger.add(lambda m: lines.append(str(m)), level="DEBUG", format="{message}")
    return lines, handler


def test_one_line_per_interval_with_counts_and_no_identities() -> None:
    now = [100.0]
    log = DenialLog(interval=1.0, clock=lambda: now[0])
    lines, handler = capture()
    try:
        for _ in range(10_000):
            log.record("GET /hello", "ip")
        assert len(lines) == 1  # the first denial, at once
        for i in range(5000):
            now[0] += 0.0001
            log.record("POST /ocr/process" if i % 2 else "GET /hello", "ip,user")
        assert len(lines) == 1
        now[0] += 1.0
        log.record("GET /hello", "ip")
    finally:
        logger.remove(handler)
    assert len(lines) == 2
    assert "rate limit exceeded 15000 time(s)" in lines[1]
    assert "GET /hello (ip) x10000" in lines[1]
    assert "GET /hello (ip,user) x2500" in lines[1]
    assert "POST /ocr/process (ip,user) x2500" in lines[1]


def test_bounded_however_many_endpoints() -> None:
    log = DenialLog(interval=3600.0)
    log.record("GET /first", "ip")  # logged at once
    for i in range(100_000):
        log.record(f"GET /r{i}", "ip")
    assert len(log._counts) <= 1024
    assert log._total == 100_000


async def test_a_flood_of_429s_logs_a_line_not_a_line_each() -> None:
    clock = FakeClock()
    limiter = RateLimiter(backend=MemoryBackend(clock=clock), ip_limit="2/minute")
    lines, handler = capture()
    try:
        async with client_for(make_app(limiter), ip="198.51.100.9") as client:
            statuses = [(await client.get("/hello")).status_code for _ in range(502)]
    finally:
        logger.remove(handler)
    assert statuses == [200, 200] + [429] * 500
    denied = [line for line in lines if "rate limit exceeded" in line]
    assert len(denied) == 1
    assert "198.51.100.9" not in "".join(lines)
