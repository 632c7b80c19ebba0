"""Metrics with several uvicorn workers: prometheus_client's multiprocess mode adds up every
worker's counts, whichever worker answers the scrape."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families
from servers import free_port

pytestmark = pytest.mark.redis

APPS = Path(__file__).resolve().parent / "apps"


async def both_workers_answer(server: subprocess.Popen[bytes], base: str) -> None:
    deadline = time.monotonic() + 60
    seen: set[int] = set()
    while len(seen) < 2:
        assert server.poll() is None, "uvicorn exited"
        assert time.monotonic() < deadline, f"only workers {seen} answered"
        try:
            async with httpx.AsyncClient(base_url=base) as probe:
                answers = await asyncio.gather(*(probe.get("/health") for _ in range(8)))
                seen |= {a.json()["pid"] for a in answers}
        except httpx.TransportError:
            await asyncio.sleep(0.2)


def totals(text: str) -> dict[str, float]:
    """Each sample name (with its reason, if any) summed over the other labels."""
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            reason = sample.labels.get("reason")
            name = sample.name + (f"/{reason}" if reason else "")
            sums[name] = sums.get(name, 0.0) + sample.value
    return sums


def start_workers(redis_url: str, port: int, metrics_dir: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "uvicorn", "metrics_workers:app", "--workers", "2"]
    argv += ["--port", str(port), "--log-level", "warning", "--app-dir", str(APPS)]
    env = {**os.environ, "TEST_REDIS_URL": redis_url, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


async def test_two_workers_one_sum(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    server = start_workers(redis_url, port, tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:
        await both_workers_answer(server, base)

        async def one() -> tuple[int, str]:
            # A connection each, so that the kernel spreads them over both workers.
            async with httpx.AsyncClient(base_url=base) as client:
                response = await client.get("/hello")
                return response.status_code, response.headers["x-pid"]

        # At least 120 requests, and more until both workers have served some: the kernel
        # spreads connections over the workers, but a loaded machine may favour one for a while.
        answers: list[tuple[int, str]] = []
        deadline = time.monotonic() + 60
        while len(answers) < 120 or len({pid for _, pid in answers}) < 2:
            assert time.monotonic() < deadline, "one worker served all"
            answers += await asyncio.gather(*(one() for _ in range(15)))
        sent = len(answers)
        assert [status for status, _ in answers].count(200) == 40

        # Each worker writes its counts at least once a second; any worker serves the sum.
        deadline = time.monotonic() + 30
        while True:
            async with httpx.AsyncClient(base_url=base) as client:
                scraped = await client.get("/metrics")
            assert scraped.status_code == 200
            sums = totals(scraped.text)
            if sums.get("rate_limit_requests_total") == sent or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert sums["rate_limit_requests_total"] == sent
        assert sums["rate_limit_requests_allowed_total"] == 40
        assert sums["rate_limit_requests_blocked_total/ip"] == sent - 40
        assert sums["rate_limit_check_duration_seconds_count"] == sent
        assert sums["rate_limit_active_limiters"] == 2  # one per worker, added up
        assert "127.0.0.1" not in scraped.text

        # Counted just before the workers stop, after their last periodic write: each worker
        # writes them on its way out (metrics.close() in the app's lifespan).
        answers = await asyncio.gather(*(one() for _ in range(10)))
        assert len(answers) == 10
    finally:
        server.terminate()
        server.wait(timeout=20)
        if server.stderr is not None:
            server.stderr.close()
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    assert totals(generate_latest(registry).decode())["rate_limit_requests_total"] == sent + 10
