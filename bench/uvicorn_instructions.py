#!/usr/bin/env python
"""Instructions per request through uvicorn, counted by callgrind: the same figure whatever
else the machine is doing, so two versions of the code can be compared on a busy machine.

    python bench/uvicorn_instructions.py app_bare app_frl_memory_3
    python bench/uvicorn_instructions.py --redis --ips 200 --env BENCH_IP_LIMIT=5/hour \
        app_frl_redis_5

For each app (a module of ``bench/apps``), uvicorn runs under ``valgrind --tool=callgrind`` as
``bench_http.py`` starts it (uvloop, httptools, one worker, proxy headers from 127.0.0.1), twice:
one run answers a warm-up and then 1,000 requests, the other the same warm-up and then 3,000.
Instructions per request = (total of the second - total of the first) / 2,000, so start-up,
imports and the warm-up cancel out. The requests are production-shaped, as ``production.lua``
sends them (``X-Forwarded-For`` from ``--ips`` clients, ``X-API-Key``, ``X-User``), over 32
keep-alive connections from a client in this script (callgrind slows the server about fifty
times: wrk's fixed duration would make the count vary). The two runs go in parallel.

What it leaves out is what instructions cannot see: cache misses, branch prediction, the
collector's timing under real concurrency. ``bench_http.py`` on a quiet machine is still the
measure of record; this one says where a change moved the work.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench_http import production_headers
from runner import APPS, BENCH, HOST, PATH, TRUSTED_PROXY, RedisServer, free_port, log

CONNECTIONS = 32
WARM_UP = 3_000
COUNTS = (1_000, 3_000)


def requests(count: int, ips: int, seed: int) -> list[bytes]:
    """``count`` requests with the headers ``production.lua`` sends (``bench_http``'s own
    definition of that traffic), each value drawn at random."""
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        headers = production_headers(rng.randrange(ips), rng.randrange(1_000), rng.randrange(5_000))
        lines = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        made.append(f"GET {PATH} HTTP/1.1\r\nHost: {HOST}\r\n{lines}\r\n".encode())
    return made


async def send_all(port: int, batch: list[bytes]) -> Counter[int]:
    """Send ``batch`` over ``CONNECTIONS`` keep-alive connections; the statuses seen."""
    pending = iter(batch)
    statuses: Counter[int] = Counter()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(HOST, port)
        for request in pending:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            statuses[int(head.split(b" ", 2)[1])] += 1
            length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
        writer.close()

    await asyncio.gather(*(connection() for _ in range(CONNECTIONS)))
    return statuses


def wait_listening(port: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"uvicorn exited ({process.returncode})")
        try:
            asyncio.run(asyncio.wait_for(asyncio.open_connection(HOST, port), 1))
            return
        except (OSError, TimeoutError):
            time.sleep(1)
    raise SystemExit(f"uvicorn under callgrind did not listen within {timeout:g} s")


def count(
    module: str, measured: int, ips: int, env: dict[str, str], redis: bool
) -> tuple[int, Counter[int]]:
    """Total instructions of one uvicorn run (warm-up + ``measured`` requests), and the
    statuses of the measured requests. ``redis``: the app gets a redis-server of its own."""
    with contextlib.ExitStack() as stack:
        if redis:
            server = stack.enter_context(
                RedisServer(shutil.which("redis-server") or "redis-server")
            )
            env = {**env, "BENCH_REDIS_URL": server.url}
        return _count(module, measured, ips, env)


def _count(module: str, measured: int, ips: int, env: dict[str, str]) -> tuple[int, Counter[int]]:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        # fmt: off
        argv = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
            sys.executable, "-m", "uvicorn", f"{module}:app", "--app-dir", str(APPS),
            "--host", HOST, "--port", str(port), "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning", "--lifespan", "on",
            "--proxy-headers", "--forwarded-allow-ips", TRUSTED_PROXY,
        ]
        # fmt: on
        process = subprocess.Popen(
            argv, stderr=subprocess.PIPE, env={**os.environ, **env}, cwd=BENCH.parent
        )
        try:
            wait_listening(port, process, 900)
            asyncio.run(send_all(port, requests(WARM_UP, ips, seed=7)))
            statuses = asyncio.run(send_all(port, requests(measured, ips, seed=1)))
        finally:
            process.send_signal(2)  # SIGINT: uvicorn shuts down, callgrind writes its totals
        _, stderr = process.communicate(timeout=300)
    found = re.search(rb"Collected : ([\d,]+)", stderr)
    if found is None:
        raise SystemExit(f"no callgrind total for {module}: {stderr[-500:]!r}")
    return int(found.group(1).replace(b",", b"")), statuses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("apps", nargs="+", help="modules of bench/apps, e.g. app_bare")
    parser.add_argument("--ips", type=int, default=10_000, help="distinct client IPs")
    parser.add_argument("--redis", action="store_true", help="start a redis-server for the app")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the app")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind not found: apt-get install valgrind")
    env = dict(item.split("=", 1) for item in args.env)
    # Under callgrind a 50 ms Redis timeout would fail every call open.
    env.setdefault("BENCH_REDIS_TIMEOUT", "30")
    for module in args.apps:
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(count, module, n, args.ips, env, args.redis).result for n in COUNTS]
        (low, _), (high, statuses) = (result() for result in runs)
        per_request = (high - low) // (COUNTS[1] - COUNTS[0])
        shown = ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items()))
        print(f"{module}: {per_request:,} instructions/request ({shown})", flush=True)
        log(f"{module}: totals {low:,} and {high:,}")


if __name__ == "__main__":
    main()
