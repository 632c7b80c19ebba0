"""Instructions per request, counted with callgrind: deterministic, unlike wall time on a
shared machine. Each measurement runs twice (N and N + 1000 requests) and reports the
difference / 1000.

    python bench/instructions.py                  # in-process: bare, 3 memory levels, variants
    python bench/instructions.py --config '{"pure": true}'   # without the C speedups
    python bench/instructions.py --config '{"headers": "none"}'
    python bench/instructions.py --server         # whole uvicorn servers: the bench_http apps
    python bench/instructions.py --server --cache # ... with simulated L1 cache misses

In-process mode drives a FastAPI app with raw ASGI calls. ``--server`` runs the apps of
``bench/bench_http.py`` under uvicorn (uvloop, httptools) inside callgrind and sends them
sequential keep-alive requests (with the same headers as wrk), a private redis-server on a
free port serving the Redis variants: the same ratio to bare that wrk measures, without the
noise, but counting user-space instructions of the server process only (not the kernel's
socket work, nor what pipelining saves under concurrent load).

Needs valgrind (Debian package). Each in-process run takes about 15 s, each server run 30 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Mapping
from typing import Any

VARIANTS = {
    "bare": None,
    "3 memory levels (default)": {},
    "3 memory levels, pure Python (FASTAPI_RATELIMIT_PURE=1)": {"pure": True},
    "3 levels, headers='none'": {"headers": "none"},
    "1 level (ip)": {"global_limit": None, "endpoint_limits": None},
    "3 levels, headers='both'": {"headers": "both"},
}


def make_app(config: dict[str, Any] | None) -> Any:
    from fastapi import FastAPI

    from fastapi_ratelimit import MemoryBackend, RateLimiter, RateLimitMiddleware

    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    if config is not None:
        options: dict[str, Any] = {
            "backend": MemoryBackend(),
            "global_limit": "1000000000/minute",
            "ip_limit": "1000000000/minute",
            "endpoint_limits": {"GET /hello": "1000000000/minute"},
        }
        options.update(config)
        app.add_middleware(RateLimitMiddleware, limiter=RateLimiter(**options))
    return app


async def drive(app: Any, n: int) -> None:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/hello", "raw_path": b"/hello", "query_string": b"",
        "root_path": "", "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000),
        # What wrk sends in bench_http.py (the API key and user headers of its Redis apps).
        "headers": [(b"host", b"x"), (b"x-api-key", b"k1"), (b"x-user", b"u1")],
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    for _ in range(n):
        await app(dict(scope), receive, send)


def child_env(base: Mapping[str, str]) -> dict[str, str]:
    """valgrind needs the real binary, not the venv's symlink; the venv's packages (and this
    checkout) then come in through PYTHONPATH. A fixed hash seed: with a random one, dict
    layouts and so the counts move by a thousand instructions or so from run to run."""
    paths = [sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(__file__))]
    return {**base, "PYTHONPATH": os.pathsep.join(paths), "PYTHONHASHSEED": "0"}


def count(config: str, n: int) -> int:
    env = child_env(os.environ)
    options = json.loads(config)
    if isinstance(options, dict) and options.pop("pure", False):
        # Not a limiter option: run without the C speedups (see fastapi_ratelimit._accel).
        env["FASTAPI_RATELIMIT_PURE"] = "1"
        config = json.dumps(options)
    with tempfile.NamedTemporaryFile() as out:
        result = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out.name}",
             os.path.realpath(sys.executable), __file__, "--child", config, str(n)],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
    match = re.search(r"Collected : (\d+)", result.stderr)
    if match is None:
        raise SystemExit(f"no instruction count from valgrind:\n{result.stderr[-2000:]}")
    return int(match.group(1))


SERVER_VARIANTS = ("bare", "floor", "frl-memory-3", "frl-redis-5", "frl-redis-1")


def count_server(module: str, n: int, env: dict[str, str], cache: bool = False) -> dict[str, int]:
    """callgrind's totals for one uvicorn process serving ``n`` requests (start-up included):
    ``Ir`` (instructions), and with ``cache`` the simulated cache misses (``I1mr``, ``D1mr``,
    ``D1mw``, ...)."""
    import http.client
    import signal
    import socket
    import time

    from bench_http import APPS, HOST, PATH, REQUEST_HEADERS, free_port

    port = free_port()
    # fmt: off
    argv = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        *(["--cache-sim=yes"] if cache else []),
        os.path.realpath(sys.executable), "-m", "uvicorn", f"{module}:app", "--app-dir", str(APPS),
        "--host", HOST, "--port", str(port), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]
    # fmt: on
    process = subprocess.Popen(
        argv,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env(env),
        # `python -m` puts the working directory first on sys.path: from a checkout's root,
        # that checkout's package would be counted whatever PYTHONPATH says.
        cwd=APPS,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection((HOST, port), 0.5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"{module} did not start") from None
                time.sleep(0.2)
        connection = http.client.HTTPConnection(HOST, port, timeout=60)
        for _ in range(n):
            connection.request("GET", PATH, headers=dict(REQUEST_HEADERS))
            response = connection.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"{module}: status {response.status}")
            if module.startswith("app_frl") and response.getheader("ratelimit") is None:
                raise SystemExit(f"{module}: no RateLimit header (the limiter failed open)")
        connection.close()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    events = re.search(r"Events\s*:\s*(.+)", stderr)
    collected = re.search(r"Collected\s*:\s*(.+)", stderr)
    if events is None or collected is None:
        raise SystemExit(f"no counts from valgrind:\n{stderr[-2000:]}")
    return dict(zip(events.group(1).split(), map(int, collected.group(1).split()), strict=True))


def per_request(module: str, env: dict[str, str], cache: bool) -> dict[str, int]:
    """Each count per request: (1,300 requests - 300 requests) / 1,000."""
    more, fewer = count_server(module, 1300, env, cache), count_server(module, 300, env, cache)
    return {name: (more[name] - fewer[name]) // 1000 for name in more}


def servers(cache: bool) -> None:
    import shutil

    from bench_http import VARIANTS as HTTP_VARIANTS
    from bench_http import RedisServer

    redis_server = RedisServer(shutil.which("redis-server") or "redis-server", cpu=1)
    redis_server.start()
    try:
        # Under valgrind the server runs ~50x slower: the default 50 ms timeout could expire
        # and fail requests open (no Redis work counted). Every answer is checked below.
        env = {**os.environ, "BENCH_REDIS_URL": redis_server.url, "BENCH_REDIS_TIMEOUT": "10"}
        misses = " | L1 instruction misses | L1 data misses" if cache else ""
        print(f"| variant | instructions per request | ratio to bare{misses} |")
        print("|---|--:|--:|" + ("--:|--:|" if cache else ""))
        bare = None
        for variant in HTTP_VARIANTS:
            if variant.id not in SERVER_VARIANTS:
                continue
            rows = [(variant.id, env)]
            if variant.id == "frl-memory-3":
                # The same app without the C speedups (their pure-Python twins).
                rows.append((f"{variant.id}, pure Python", {**env, "FASTAPI_RATELIMIT_PURE": "1"}))
            for name, row_env in rows:
                counts = per_request(variant.module, row_env, cache)
                bare = bare or counts["Ir"]
                line = f"| {name} | {counts['Ir']:,} | {bare / counts['Ir']:.2f} |"
                if cache:
                    data = counts["D1mr"] + counts["D1mw"]
                    line += f" {counts['I1mr']:,} | {data:,} |"
                print(line, flush=True)
    finally:
        redis_server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--config", help="one RateLimiter configuration as JSON")
    parser.add_argument("--server", action="store_true", help="whole uvicorn servers")
    parser.add_argument(
        "--cache",
        action="store_true",
        help="with --server: also simulated L1 cache misses per request (about 4x slower)",
    )
    args = parser.parse_args()
    if args.server:
        servers(args.cache)
        return
    if args.child:
        config, n = args.child
        asyncio.run(drive(make_app(json.loads(config)), int(n)))
        return
    variants = {"custom": json.loads(args.config)} if args.config else VARIANTS
    print("| variant | instructions per request |\n|---|--:|")
    for name, config in variants.items():
        text = json.dumps(config)
        per_request = (count(text, 1200) - count(text, 200)) // 1000
        print(f"| {name} | {per_request:,} |", flush=True)


if __name__ == "__main__":
    main()
