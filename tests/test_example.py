"""The example app: in-process through httpx, and as the README's first command runs it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from http_helpers import client_for, policies, ratelimit, remaining
from servers import free_port

ROOT = Path(__file__).resolve().parent.parent


async def test_seed_costs_tiers_and_levels() -> None:
    from examples.app import app, limiter

    limiter.backend = type(limiter.backend)()  # a fresh memory backend for this test
    async with app.router.lifespan_context(app), client_for(app, ip="203.0.113.70") as client:
        health = await client.get("/health")
        assert health.status_code == 200
        assert "ratelimit" not in health.headers
        pro = {"authorization": "Bearer alice:pro"}
        process = await client.post("/ocr/process", headers=pro, content=b"image")
        assert process.status_code == 200
        assert set(policies(process)) == {"global", "ip", "endpoint", "user-pro"}
        assert policies(process)["user-pro"]["q"] == 2000
        # Cost 10 at every level: the IP level (300/minute) binds and shows it.
        assert ratelimit(process)[0] == "ip"
        assert process.headers["x-ratelimit-scope"] == "ip"
        assert remaining(process) == "290"
        # An empty body reports a cost of 1: 9 of the 10 units come back.
        empty = await client.post("/ocr/process", headers=pro)
        assert remaining(empty) == "280"  # charged 10 before the app ran
        upload = await client.post("/documents/upload", content=b"abc", headers=pro)
        assert upload.json() == {"bytes": 3}
        # 300 - 10 - 1 - 5 (the upload): the 9 came back before the upload was charged.
        assert remaining(upload) == "284"
        # Batch: five per minute per user (decorator), whatever the tier.
        for _ in range(5):
            accepted = await client.post("/ocr/batch", json={"documents": ["a"]}, headers=pro)
            assert accepted.status_code == 202
        denied = await client.post("/ocr/batch", json={"documents": ["a"]}, headers=pro)
        assert denied.status_code == 429
        assert denied.headers["content-type"] == "application/problem+json"
        assert int(denied.headers["retry-after"]) >= 1
        # Failed logins count, successful ones do not.
        for _ in range(8):
            ok = await client.post("/auth/login", json={"username": "a", "password": "demo"})
            assert ok.status_code == 200
        for _ in range(5):
            bad = await client.post("/auth/login", json={"username": "a", "password": "x"})
            assert bad.status_code == 401
        locked = await client.post("/auth/login", json={"username": "a", "password": "demo"})
        assert locked.status_code == 429


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
        # Anonymous: no user level; cost 10 against the IP level's 300.
        assert response.headers["x-ratelimit-scope"] == "ip"
        assert remaining(response) == "290"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()
