"""Several uvicorn workers share one Redis: admission stays exact across processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from servers import free_port

pytestmark = pytest.mark.redis

APPS = Path(__file__).resolve().parent / "apps"


def start_workers(redis_url: str, port: int) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "uvicorn", "two_workers:app", "--workers", "2"]
    argv += ["--port", str(port), "--log-level", "warning", "--app-dir", str(APPS)]
    env = {**os.environ, "TEST_REDIS_URL": redis_url, "TEST_IP_LIMIT": "40/minute"}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_two_workers_admit_exactly_the_limit(redis_url: str) -> None:
    port = free_port()
    server = start_workers(redis_url, port)
    try:
        # Until both workers answer (the second may still be starting), on the exempt path.
        deadline = time.monotonic() + 60
        seen: set[int] = set()
        while len(seen) < 2:
            assert server.poll() is None, "uvicorn exited"
            assert time.monotonic() < deadline, f"only workers {seen} answered"
            try:
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as probe:
                    answers = await asyncio.gather(*(probe.get("/health") for _ in range(8)))
                    seen |= {a.json()["pid"] for a in answers}
            except httpx.TransportError:
                await asyncio.sleep(0.2)

        async def one() -> tuple[int, int]:
            # A connection each, so that the kernel spreads them over both workers.
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                response = await client.get("/hello")
                return response.status_code, int(response.headers["x-pid"])

        answers = []
        for _ in range(8):  # 8 bursts of 15 concurrent requests: 120 in all
            answers += await asyncio.gather(*(one() for _ in range(15)))
        statuses = [status for status, _ in answers]
        assert statuses.count(200) == 40
        assert statuses.count(429) == 80
        assert len({pid for _, pid in answers}) == 2, "one worker served all"
    finally:
        server.terminate()
        server.wait(timeout=20)
        if server.stderr is not None:
            server.stderr.close()
