"""Instructions per request, counted with callgrind: deterministic, unlike wall time on a
shared machine. Drives a FastAPI app in-process (raw ASGI calls) with and without the
middleware, runs each twice (N and N + 1000 requests) and reports the difference / 1000.

    python bench/instructions.py                  # bare, 3 memory levels, variants
    python bench/instructions.py --config '{"headers": "none"}'

Needs valgrind (Debian package). Each run takes about 15 s.
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
from typing import Any

VARIANTS = {
    "bare": None,
    "3 memory levels (default)": {},
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
        "root_path": "", "headers": [(b"host", b"x")], "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        pass

    for _ in range(n):
        await app(dict(scope), receive, send)


def count(config: str, n: int) -> int:
    # valgrind needs the real binary, not the venv's symlink; the venv's packages (and this
    # checkout) then come in through PYTHONPATH.
    paths = [sysconfig.get_paths()["purelib"], os.path.dirname(os.path.dirname(__file__))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", nargs=2)
    parser.add_argument("--config", help="one RateLimiter configuration as JSON")
    args = parser.parse_args()
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
