"""What the benchmarks run besides the code they measure: a private ``redis-server`` and the
uvicorn serving an app, each on a free loopback port, and the process helpers they share.
``bench_core.py``, ``bench_http.py`` (and through it ``bench_flood.py``, ``bench_workers.py``)
start their servers here."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis

HOST = "127.0.0.1"
BENCH = Path(__file__).resolve().parent
APPS = BENCH / "apps"
#: The path every benchmark app serves.
PATH = "/hello"
#: uvicorn believes X-Forwarded-For from this peer (``--forwarded-allow-ips``): wrk's address.
TRUSTED_PROXY = "127.0.0.1"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int | str, argv: Sequence[str]) -> list[str]:
    """``taskset`` execs the program, so the child's pid is the program's own."""
    return ["taskset", "-c", str(cpu), *argv]


def stop_process(process: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


@dataclass(frozen=True)
class RedisStats:
    calls: dict[str, int]  # per command, INFO left out
    total: int  # total_commands_processed, INFO left out
    cpu_seconds: float

    def commands(self) -> int:
        return sum(self.calls.values())


class RedisServer:
    """``redis-server`` on a free loopback port, no persistence, in a temporary directory.

    ``bench_http.py`` gives each Redis variant one of its own, so that every command a server
    counts is that variant's (background polling included), and keyspaces stay apart.
    ``cpu``: the core it is pinned to (``None``: not pinned).
    """

    def __init__(self, binary: str, cpu: int | str | None = None) -> None:
        self.binary = binary
        self.cpu = cpu
        self.port = 0
        self.dir = ""
        self.process: subprocess.Popen[bytes] | None = None
        self.client: redis.Redis | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, attempts: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="bench-redis-")
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            # fmt: off
            argv = [
                self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--logfile", "redis.log",
                "--daemonize", "no",
            ]
            # fmt: on
            if self.cpu is not None:
                argv = pinned(self.cpu, argv)
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
            self.client = redis.Redis(host=HOST, port=self.port, socket_timeout=2.0)
            if self._wait_ready(10.0):
                return
            self._terminate()
            log(f"redis-server did not start on port {self.port} (attempt {attempt})")
        raise RuntimeError(f"could not start redis-server; see {self.dir}/redis.log")

    def _wait_ready(self, timeout: float) -> bool:
        assert self.client is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            with contextlib.suppress(redis.RedisError, OSError):
                if self.client.ping():
                    return True
            time.sleep(0.05)
        return False

    def stats(self) -> RedisStats:
        """Calls so far per command (``INFO commandstats``, without ``INFO``: the benchmark's
        own), ``total_commands_processed`` less the ``INFO`` calls, and CPU seconds so far.

        Redis counts the commands a script runs (``redis.call``) as calls too, in both, so the
        counts include what ran inside ``EVALSHA``.
        """
        assert self.client is not None
        info: dict[str, Any] = self.client.info("all")
        calls = {
            key.removeprefix("cmdstat_"): int(value["calls"])
            for key, value in info.items()
            if key.startswith("cmdstat_")
        }
        own = calls.pop("info", 0)
        return RedisStats(
            calls,
            int(info["total_commands_processed"]) - own,
            float(info["used_cpu_sys"]) + float(info["used_cpu_user"]),
        )

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def dbsize(self) -> int:
        assert self.client is not None
        return int(self.client.dbsize())

    def version(self) -> str:
        assert self.client is not None
        return str(self.client.info("server").get("redis_version", "?"))

    def _terminate(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        process, self.process = self.process, None
        stop_process(process)

    def stop(self) -> None:
        self._terminate()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class AppServer:
    """One uvicorn serving ``bench/apps/<module>.py`` on a free loopback port (one worker
    unless the variant says otherwise). ``variant``: anything with ``id``, ``module`` and
    ``workers`` (``bench_http.Variant``)."""

    def __init__(self, variant: Any, cpu: int | str, log_dir: str, env: dict[str, str]) -> None:
        self.variant = variant
        self.cpu = cpu
        self.port = 0
        self.env = env
        self.log_path = Path(log_dir) / f"{variant.id}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}{PATH}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self, timeout: float = 30.0) -> None:
        self.port = free_port()
        # fmt: off
        argv = [
            sys.executable, "-m", "uvicorn", f"{self.variant.module}:app",
            "--app-dir", str(APPS), "--host", HOST, "--port", str(self.port),
            "--workers", str(self.variant.workers), "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning", "--lifespan", "on",
            # uvicorn's defaults, spelled out (FORWARDED_ALLOW_IPS in the environment would
            # change the second): behind a proxy on the same host, X-Forwarded-For from it sets
            # scope["client"], so every limiter keys on the forwarded client address.
            "--proxy-headers", "--forwarded-allow-ips", TRUSTED_PROXY,
        ]
        # fmt: on
        with open(self.log_path, "wb") as output:
            self.process = subprocess.Popen(
                pinned(self.cpu, argv),
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=BENCH.parent,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"uvicorn exited ({self.process.returncode}): {self.tail()}")
            with contextlib.suppress(OSError), socket.create_connection((HOST, self.port), 0.2):
                return
            time.sleep(0.05)
        raise RuntimeError(f"uvicorn did not listen within {timeout:g} s: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:]) or "(empty log)"

    def stop(self) -> None:
        process, self.process = self.process, None
        stop_process(process)
