"""Latency added by a Redis outage: healthy, blackholed (until the breaker opens), breaker open,
and after recovery. In-process (httpx over ASGI) against a private redis-server behind the
fault-injecting proxy from tests/.

    python bench/bench_outage.py

Prints a Markdown table of per-request latency percentiles for each phase.
"""

from __future__ import annotations

import asyncio
import shutil
import statistics
import sys
import time
from pathlib import Path

import httpx
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faultproxy import FaultProxy
from runner import RedisServer

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware, RedisBackend
from fastapi_ratelimit.breaker import CircuitBreaker

TIMEOUT = 0.05


async def phase(client: httpx.AsyncClient, seconds: float) -> list[float]:
    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        started = time.perf_counter()
        response = await client.get("/work")
        latencies.append(time.perf_counter() - started)
        assert response.status_code == 200, response.status_code
    return latencies


async def one(client: httpx.AsyncClient) -> float:
    started = time.perf_counter()
    response = await client.get("/work")
    assert response.status_code == 200, response.status_code
    return time.perf_counter() - started


def row(name: str, latencies: list[float]) -> str:
    ms = sorted(x * 1000 for x in latencies)
    p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
    return f"| {name} | {len(ms)} | {statistics.median(ms):.2f} | {p99:.2f} | {ms[-1]:.2f} |"


async def main() -> None:
    with RedisServer(shutil.which("redis-server") or "redis-server") as server:
        async with FaultProxy("127.0.0.1", server.port) as proxy:
            limiter = RateLimiter(
                backend=RedisBackend.from_url(proxy.url, timeout=TIMEOUT),
                ip_limit="1000000/minute",
                breaker=CircuitBreaker(failure_threshold=5, cooldown=2.0),
            )
            app = FastAPI()

            @app.get("/work")
            async def work() -> dict[str, str]:
                return {"ok": "yes"}

            app.add_middleware(RateLimitMiddleware, limiter=limiter)
            transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 1))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                await phase(client, 0.5)  # warm-up
                healthy = await phase(client, 2.0)
                proxy.blackhole()
                first = [await one(client) for _ in range(5)]  # the breaker is still closed
                opened = await phase(client, 1.5)
                proxy.pass_through()
                await asyncio.sleep(2.2)  # cooldown, then the probe closes it
                recovered = await phase(client, 2.0)
            await limiter.aclose()
    print(f"Per-request latency (ms), timeout {TIMEOUT * 1000:.0f} ms, breaker after 5 failures:\n")
    print("| phase | requests | p50 | p99 | max |")
    print("|---|--:|--:|--:|--:|")
    print(row("healthy", healthy))
    print(row("blackholed, breaker closed", first))
    print(row("blackholed, breaker open", opened))
    print(row("recovered", recovered))


if __name__ == "__main__":
    asyncio.run(main())
