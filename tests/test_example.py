"""The example app: in-process through httpx, and as the README's first command runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from servers import free_port

from examples.app import app

ROOT = Path(__file__).resolve().parent.parent


async def test_costs_and_levels_in_process() -> None:
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 1234))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        health = await client.get("/health")
        assert health.status_code == 200
        assert "x-ratelimit-remaining" not in health.headers
        first = await client.post("/ocr/batch")
        assert first.status_code == 202
        # Cost 50 out of the endpoint bucket's burst of 100.
        assert first.headers["x-ratelimit-remaining"] == "50"
        assert first.headers["x-ratelimit-scope"] == "endpoint"
        assert (await client.post("/ocr/batch")).status_code == 202
        denied = await client.post("/ocr/batch")
        assert denied.status_code == 429
        assert int(denied.headers["retry-after"]) >= 1
        assert "endpoint" in denied.json()["detail"]
        # Other endpoints of the same client are untouched by that denial.
        upload = await client.post("/documents/upload", content=b"abc")
        assert upload.status_code == 200
        assert upload.json() == {"bytes": 3}


def test_readme_command_runs_the_example_on_memory() -> None:
    port = free_port()
    env = {**os.environ, "PORT": str(port)}
    env.pop("REDIS_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "examples/app.py"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{port}/ocr/process", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the example did not start"
                time.sleep(0.1)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-remaining"] == "90"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
