"""Redis memory per rate-limit key, per algorithm (``MEMORY USAGE``), on a private redis-server.

    python bench/key_memory.py

Prints a Markdown table: bytes per key after one request, and after ``limit`` requests (which
is what matters for the sliding window log, whose list holds one entry per request unit).
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import tempfile
import time

import redis.asyncio

from fastapi_ratelimit import Algorithm, Check, Policy, RedisBackend


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(url: str) -> list[tuple[str, int, int]]:
    backend = RedisBackend.from_url(url)
    client = redis.asyncio.Redis.from_url(url)
    rows = []
    try:
        for algorithm in Algorithm:
            policy = Policy("p", "100/minute", algorithm)
            one = Check(policy, "ip", "one")
            full = Check(policy, "ip", "full")
            await backend.hit([one])
            for _ in range(100):
                await backend.hit([full])
            used_one = await client.memory_usage(backend.key_for(one)) or 0
            used_full = await client.memory_usage(backend.key_for(full)) or 0
            rows.append((algorithm.value, used_one, used_full))
    finally:
        await client.aclose()
        await backend.aclose()
    return rows


def main() -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server not found")
    port = _free_port()
    with tempfile.TemporaryDirectory() as directory:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", directory],
            stdout=subprocess.DEVNULL,
        )
        try:
            time.sleep(0.3)
            rows = asyncio.run(measure(f"redis://127.0.0.1:{port}/0"))
        finally:
            proc.terminate()
            proc.wait()
    print("| algorithm | bytes after 1 request | bytes after 100 requests (limit 100) |")
    print("|---|---:|---:|")
    for name, one, full in rows:
        print(f"| {name} | {one} | {full} |")


if __name__ == "__main__":
    main()
