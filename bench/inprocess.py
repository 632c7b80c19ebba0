"""Per-request cost of an app in process, without a server: production-shaped scopes straight
into the ASGI app, one at a time.

    python bench/inprocess.py bench/apps/app_bare.py bench/apps/app_frl_memory_3.py
    python bench/inprocess.py --instructions bench/apps/app_bare.py bench/apps/app_frl_memory_3.py

The first form reports CPU microseconds per request (best of 5 rounds of 20,000 requests); it
needs a quiet machine. ``--instructions`` counts instructions per request under
``valgrind --tool=callgrind`` instead (the difference between a run of 3,000 and one of 1,000
requests, divided by 2,000): the same count on a loaded machine, so it can compare two
versions of the code where timing cannot. Neither replaces ``bench_http.py``: uvicorn's own
work and the collector under concurrency are missing here.

Each request gets a fresh scope that dies after it, as under uvicorn: a driver that kept the
scopes would keep every request's objects alive and measure the garbage collector instead.
The traffic matches ``production.lua``: 10,000 client IPs (the peer, as uvicorn's proxy
headers leave it), 1,000 API keys and 5,000 users, from a seeded generator.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

Scope = dict[str, Any]


def load_app(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("bench_app", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.app


def scopes(count: int, seed: int = 1) -> list[Scope]:
    rng = random.Random(seed)
    ips = [f"10.{i // 65536 % 256}.{i // 256 % 256}.{i % 256}" for i in range(10_000)]
    keys = [f"key-{i:06d}".encode() for i in range(1_000)]
    users = [f"user-{i:05d}".encode() for i in range(5_000)]
    made = []
    for _ in range(count):
        ip = rng.choice(ips)
        made.append(
            {
                "type": "http",
                "asgi": {"version": "3.0", "spec_version": "2.3"},
                "http_version": "1.1",
                "server": ("127.0.0.1", 8000),
                "client": (ip, 40000),
                "scheme": "http",
                "method": "GET",
                "root_path": "",
                "path": "/hello",
                "raw_path": b"/hello",
                "query_string": b"",
                "headers": [
                    (b"host", b"127.0.0.1:8000"),
                    (b"user-agent", b"wrk"),
                    (b"x-forwarded-for", ip.encode()),
                    (b"x-api-key", rng.choice(keys)),
                    (b"x-user", rng.choice(users)),
                ],
            }
        )
    return made


async def drive(app: Any, batch: list[Scope]) -> None:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise SystemExit(f"status {message['status']}: every request must be admitted")

    for scope in batch:
        # A fresh scope (and header list) per request, dropped right after it.
        await app({**scope, "headers": list(scope["headers"]), "state": {}}, receive, send)


async def cpu_us_per_request(path: str, count: int = 20_000, rounds: int = 5) -> float:
    app = load_app(path)
    batch = scopes(count)
    await drive(app, batch[:3_000])  # warm: caches, first-time imports
    best = float("inf")
    for _ in range(rounds):
        started = time.process_time_ns()
        await drive(app, batch)
        best = min(best, (time.process_time_ns() - started) / count)
    return best / 1000


def instructions_per_request(path: str) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind not found: apt-get install valgrind")
    totals = []
    for count in (1_000, 3_000):
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "callgrind.out"
            argv = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out}"]
            argv += [sys.executable, __file__, "--run", path, str(count)]
            result = subprocess.run(argv, capture_output=True, text=True, check=True)
            line = next(ln for ln in result.stderr.splitlines() if "Collected :" in ln)
            totals.append(int(line.rsplit(":", 1)[1].strip().replace(",", "")))
    return (totals[1] - totals[0]) // 2_000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("apps", nargs="+", help="bench/apps/app_*.py files")
    parser.add_argument("--instructions", action="store_true", help="count with callgrind")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:  # under callgrind: 500 warm-up requests, then the count asked for
        path, count = args.apps[0], int(args.apps[1])
        app = load_app(path)
        batch = scopes(count + 500)
        asyncio.run(drive(app, batch))
        return
    for path in args.apps:
        name = Path(path).stem.removeprefix("app_")
        if args.instructions:
            print(f"{name}: {instructions_per_request(path):,} instructions/request", flush=True)
        else:
            print(f"{name}: {asyncio.run(cpu_us_per_request(path)):.1f} us/request", flush=True)


if __name__ == "__main__":
    main()
