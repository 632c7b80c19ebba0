#!/usr/bin/env python
"""End-to-end HTTP benchmark: requests per second through uvicorn, driven by ``wrk``.

The same hello-world FastAPI app (``GET /hello`` -> ``{"hello": "world"}``) is served bare and
behind ``fastapi_ratelimit``, slowapi and fastapi-limiter (memory and Redis), each by its own
uvicorn (one worker, uvloop, httptools, no access log) pinned to one core, while ``wrk`` runs
pinned to the other. The apps live in ``bench/apps/``. Every variant is reported as a ratio to
the bare app measured just before and just after it. See ``bench/README.md``.

    python bench/bench_http.py                # 3 interleaved rounds x 5 s per variant
    python bench/bench_http.py --quick        # 1 round x 2 s, a smoke test

Prints a Markdown table on stdout (progress goes to stderr) and writes
``bench/results/http.md`` and ``bench/results/http.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import redis

HOST = "127.0.0.1"
BENCH = Path(__file__).resolve().parent
APPS = BENCH / "apps"
RESULTS = BENCH / "results"
PATH = "/hello"
#: Sent with every request to every variant (only frl-redis-5 reads them), so all variants
#: parse the same request.
REQUEST_HEADERS = (("X-API-Key", "k1"), ("X-User", "u1"))
EXPECTED_BODY = {"hello": "world"}
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- variants ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    id: str
    module: str  # in bench/apps/
    description: str
    redis: bool = False
    #: fastapi_ratelimit variants: the number of levels the RateLimit-Policy header must list.
    frl_levels: int | None = None
    requires: tuple[str, ...] = ()  # importable modules the app needs
    target: float | None = None  # ratio to bare that must be reached
    reference: float | None = None  # ratio to bare measured earlier on this machine


VARIANTS: tuple[Variant, ...] = (
    Variant("bare", "app_bare", "FastAPI, no rate limiting"),
    Variant(
        "floor",
        "app_floor",
        "no limiting: a pure-ASGI send wrapper adding two constant headers (any limiter's floor)",
    ),
    Variant(
        "frl-memory-3",
        "app_frl_memory_3",
        "fastapi_ratelimit middleware, memory, 3 levels (global, IP, endpoint)",
        frl_levels=3,
        target=0.85,
    ),
    Variant(
        "frl-redis-5",
        "app_frl_redis_5",
        "fastapi_ratelimit middleware, Redis, 5 levels (+ API key, user) in one EVALSHA",
        redis=True,
        frl_levels=5,
        requires=("redis",),
        target=0.45,
    ),
    Variant(
        "frl-redis-1",
        "app_frl_redis_1",
        "fastapi_ratelimit middleware, Redis, IP level only",
        redis=True,
        frl_levels=1,
        requires=("redis",),
    ),
    Variant(
        "slowapi-memory-decorator",
        "app_slowapi_memory_decorator",
        "slowapi @limiter.limit, memory",
        requires=("slowapi",),
        reference=0.53,
    ),
    Variant(
        "slowapi-memory-middleware",
        "app_slowapi_memory_middleware",
        "slowapi SlowAPIMiddleware + default_limits, memory",
        requires=("slowapi",),
        reference=0.25,
    ),
    Variant(
        "slowapi-redis-1",
        "app_slowapi_redis_1",
        "slowapi @limiter.limit, Redis, 1 limit",
        redis=True,
        requires=("slowapi", "redis"),
        reference=0.23,
    ),
    Variant(
        "slowapi-redis-5",
        "app_slowapi_redis_5",
        "slowapi, 5 stacked @limiter.limit, Redis",
        redis=True,
        requires=("slowapi", "redis"),
        reference=0.15,
    ),
    Variant(
        "fastapi-limiter-redis",
        "app_fastapi_limiter_redis",
        "fastapi-limiter RateLimiter dependency, Redis (pyrate-limiter RedisBucket)",
        redis=True,
        requires=("fastapi_limiter", "pyrate_limiter", "redis"),
        reference=0.26,
    ),
)


@dataclass
class Sample:
    """One measured wrk run of one variant."""

    round: int
    position: int  # place in the round's order (0 = first)
    requests_per_s: float
    requests: int
    duration_s: float
    non_2xx_3xx: int
    socket_errors: dict[str, int]
    latency_ms: dict[str, float]  # avg, p50, p99
    ratio: float | None = None  # over the mean of the same round's bare runs
    server_cpu: float | None = None  # uvicorn CPU time / wall time (1.0 = one core)
    redis_cpu: float | None = None
    #: Per request: top-level script calls (EVAL/EVALSHA/FCALL and their _RO forms), and every
    #: command Redis counted (including those run inside scripts), by command.
    redis_scripts_per_request: float | None = None
    redis_commands_per_request: float | None = None
    redis_commands: dict[str, float] | None = None
    #: CPU time on the server's / the client's core not accounted to uvicorn / to wrk and
    #: redis-server (other processes, interrupts, softirqs), over wall time: a noise indicator.
    server_core_other: float | None = None
    client_core_other: float | None = None
    attempts: int = 1
    waited_s: float = 0.0  # waiting for the machine to be quiet before (re)measuring
    noisy: bool = False  # foreign load above --max-foreign on every attempt


@dataclass
class Outcome:
    variant: Variant
    status: str = "pending"  # ok | skipped | failed
    note: str = ""
    preflight: dict[str, Any] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return sum(s.non_2xx_3xx + sum(s.socket_errors.values()) for s in self.samples)

    @property
    def flagged(self) -> bool:
        return self.status == "failed" or self.errors > 0

    def median(self, attribute: str) -> float | None:
        values = [getattr(s, attribute) for s in self.samples]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int, argv: Sequence[str]) -> list[str]:
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


def core_busy_seconds(cpu: int) -> float:
    """Busy (not idle, not iowait) time of one CPU since boot (Linux ``/proc/stat``)."""
    with open("/proc/stat", encoding="ascii") as stat:
        for line in stat:
            name, *values = line.split()
            if name == f"cpu{cpu}":
                ticks = [int(v) for v in values[:8]]
                return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    raise RuntimeError(f"cpu{cpu} not in /proc/stat")


def cores_busy(cpus: Sequence[int], seconds: float) -> dict[int, float]:
    """Share of each CPU busy over ``seconds``."""
    before = {c: core_busy_seconds(c) for c in cpus}
    time.sleep(seconds)
    return {c: (core_busy_seconds(c) - before[c]) / seconds for c in cpus}


def wait_quiet(args: argparse.Namespace) -> float:
    """Wait (up to ``--quiet-wait`` s) until neither benchmark core is more than
    ``--max-foreign`` busy over one second; between measurements nothing of ours runs, so
    whatever is busy is someone else. Returns the seconds waited."""
    started = time.monotonic()
    cores = sorted({args.server_cpu, args.client_cpu, args.redis_cpu})
    told = False
    while True:
        busy = max(cores_busy(cores, 1.0).values())
        waited = time.monotonic() - started
        if busy <= args.max_foreign:
            return waited
        if waited >= args.quiet_wait:
            log(f"  still {_pct(busy)} busy after {waited:.0f} s: measuring anyway")
            return waited
        if not told:
            log(f"  a benchmark core is {_pct(busy)} busy (someone else): waiting for quiet")
            told = True


def machine_busy(seconds: float = 2.0) -> float:
    """Share of all CPUs busy over ``seconds`` (1.0 = every core), before anything starts."""
    cpus = sorted(os.sched_getaffinity(0))
    before = [core_busy_seconds(c) for c in cpus]
    time.sleep(seconds)
    after = [core_busy_seconds(c) for c in cpus]
    return sum(a - b for a, b in zip(after, before, strict=True)) / (seconds * len(cpus))


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class RedisServer:
    """``redis-server`` on a free loopback port, no persistence, in a temporary directory."""

    def __init__(self, binary: str, cpu: int) -> None:
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
        self.dir = tempfile.mkdtemp(prefix="bench-http-redis-")
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            # fmt: off
            argv = [
                self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                "--appendonly", "no", "--dir", self.dir, "--logfile", "redis.log",
                "--daemonize", "no",
            ]
            # fmt: on
            self.process = subprocess.Popen(pinned(self.cpu, argv), stdin=subprocess.DEVNULL)
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

    def stats(self) -> tuple[dict[str, int], float]:
        """(calls so far per command, CPU seconds used so far).

        Redis counts the commands a script runs (``redis.call``) as calls too, so the
        per-command counts include what ran inside ``EVALSHA``.
        """
        assert self.client is not None
        info: dict[str, Any] = self.client.info("all")
        calls = {
            key.removeprefix("cmdstat_"): int(value["calls"])
            for key, value in info.items()
            if key.startswith("cmdstat_")
        }
        return calls, float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

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


class AppServer:
    """One uvicorn (one worker) serving ``bench/apps/<module>.py`` on a free loopback port."""

    def __init__(self, variant: Variant, cpu: int, log_dir: str, env: dict[str, str]) -> None:
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
            "--workers", "1", "--loop", "uvloop", "--http", "httptools",
            "--no-access-log", "--log-level", "warning", "--lifespan", "on",
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


def preflight(server: AppServer) -> dict[str, Any]:
    """One request as wrk sends it: must answer 200 with the expected body, and for
    fastapi_ratelimit carry ``RateLimit`` and a ``RateLimit-Policy`` naming every level."""
    connection = http.client.HTTPConnection(HOST, server.port, timeout=5.0)
    try:
        connection.request("GET", PATH, headers=dict(REQUEST_HEADERS))
        response = connection.getresponse()
        body = response.read()
        headers = {k.lower(): v for k, v in response.getheaders()}
    finally:
        connection.close()
    result: dict[str, Any] = {"status": response.status, "headers": headers}
    problems = []
    if response.status != 200:
        problems.append(f"status {response.status}")
    try:
        if json.loads(body) != EXPECTED_BODY:
            problems.append(f"body {body[:80]!r}")
    except ValueError:
        problems.append(f"body {body[:80]!r}")
    levels = server.variant.frl_levels
    if levels is not None:
        if "ratelimit" not in headers:
            problems.append("no RateLimit header")
        policy = headers.get("ratelimit-policy", "")
        listed = len([p for p in policy.split(",") if p.strip()])
        result["policy_levels"] = listed
        if listed != levels:
            problems.append(f"RateLimit-Policy lists {listed} levels, expected {levels}")
    result["problems"] = problems
    return result


# -- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError(f"unexpected wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    done = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", output, re.M)
    if not rps or not done:
        raise ValueError(f"cannot parse wrk output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    sockets = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    latency: dict[str, float] = {}
    avg = re.search(r"^\s*Latency\s+(\S+)", output, re.M)
    if avg:
        latency["avg"] = _ms(avg.group(1))
    for percentile in ("50", "99"):
        found = re.search(rf"^\s*{percentile}%\s+(\S+)", output, re.M)
        if found:
            latency[f"p{percentile}"] = _ms(found.group(1))
    return {
        "requests_per_s": float(rps.group(1)),
        "requests": int(done.group(1)),
        "duration_s": _ms(done.group(2) + done.group(3)) / 1000.0,
        "non_2xx_3xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": dict(
            zip(
                ("connect", "read", "write", "timeout"),
                (int(g) for g in sockets.groups()) if sockets else (0, 0, 0, 0),
                strict=True,
            )
        ),
        "latency_ms": latency,
    }


def wrk_argv(args: argparse.Namespace, url: str, seconds: int) -> list[str]:
    headers = [part for name, value in REQUEST_HEADERS for part in ("-H", f"{name}: {value}")]
    argv = [args.wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s"]
    return pinned(args.client_cpu, [*argv, "--latency", *headers, url])


def run_wrk(args: argparse.Namespace, url: str, seconds: int) -> dict[str, Any]:
    argv = wrk_argv(args, url, seconds)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    return parse_wrk(done.stdout)


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure_once(
    args: argparse.Namespace,
    server: AppServer,
    redis_server: RedisServer | None,
    round_index: int,
    position: int,
) -> Sample:
    """One wrk run, with the CPU accounting of both cores around it."""
    cores = sorted({args.server_cpu, args.client_cpu})
    redis_before = redis_server.stats() if redis_server else None
    busy_before = {c: core_busy_seconds(c) for c in cores}
    server_before = process_cpu_seconds(server.pid)
    wrk_before = children_cpu_seconds()  # wrk is waited for: it lands in RUSAGE_CHILDREN
    started = time.perf_counter()
    result = run_wrk(args, server.url, args.seconds)
    wall = time.perf_counter() - started
    known = dict.fromkeys(cores, 0.0)
    known[args.server_cpu] += process_cpu_seconds(server.pid) - server_before
    known[args.client_cpu] += children_cpu_seconds() - wrk_before
    sample = Sample(round=round_index, position=position, **result)
    # Over wall time, which includes wrk's start-up and exit (a few ms).
    sample.server_cpu = known[args.server_cpu] / wall
    if redis_server is not None and redis_before is not None:
        calls, redis_cpu = redis_server.stats()
        sample.redis_cpu = (redis_cpu - redis_before[1]) / wall
        if args.redis_cpu in known:
            known[args.redis_cpu] += redis_cpu - redis_before[1]
        if server.variant.redis:
            requests = max(sample.requests, 1)
            delta = {
                name: (n - redis_before[0].get(name, 0)) / requests
                for name, n in calls.items()
                if name != "info" and n != redis_before[0].get(name, 0)
            }
            sample.redis_commands = {k: round(v, 3) for k, v in sorted(delta.items())}
            sample.redis_commands_per_request = sum(delta.values())
            sample.redis_scripts_per_request = sum(delta.get(name, 0.0) for name in SCRIPT_COMMANDS)
    other = {c: max(core_busy_seconds(c) - busy_before[c] - known[c], 0.0) / wall for c in cores}
    sample.server_core_other = other[args.server_cpu]
    sample.client_core_other = other[args.client_cpu]
    return sample


def measure(
    args: argparse.Namespace,
    server: AppServer,
    redis_server: RedisServer | None,
    round_index: int,
    position: int,
) -> Sample:
    """Warm up, then measure; measure again (up to ``--retries`` times, after a pause) while
    something else used more than ``--max-foreign`` of either core. The last try is kept."""
    waited = 0.0
    for attempt in range(args.retries + 1):
        if args.quiet_wait > 0:
            waited += wait_quiet(args)
        if args.warmup > 0:
            run_wrk(args, server.url, args.warmup)
        sample = measure_once(args, server, redis_server, round_index, position)
        sample.attempts = attempt + 1
        sample.waited_s = round(waited, 1)
        foreign = max(sample.server_core_other or 0.0, sample.client_core_other or 0.0)
        sample.noisy = foreign > args.max_foreign
        if not sample.noisy:
            break
        log(
            f"  {server.variant.id}: {_pct(foreign)} of a core used by something else during "
            f"the run" + (", measuring again" if attempt < args.retries else "; kept, as noisy")
        )
        if attempt < args.retries:
            time.sleep(args.retry_pause)
    return sample


# -- reporting ---------------------------------------------------------------------------------


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def wrk_version(binary: str) -> str:
    done = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0] if first else "?"


def git_state() -> str:
    """The commit measured, and whether ``fastapi_ratelimit/`` differs from it."""
    root = BENCH.parent

    def git(*argv: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(root), *argv], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    dirty = git("status", "--porcelain", "--", "fastapi_ratelimit")
    return f"{commit}{' + uncommitted changes in fastapi_ratelimit/' if dirty else ''}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def goal(variant: Variant, ratio: float | None) -> str:
    if variant.target is not None:
        if ratio is None:
            return f"target >= {variant.target:.2f}: not measured"
        verdict = "**met**" if ratio >= variant.target else "**NOT met**"
        return f"target >= {variant.target:.2f}: {verdict}"
    if variant.reference is not None:
        return f"earlier: {variant.reference:.2f}"
    return ""


def summary_rows(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        rates = [s.requests_per_s for s in o.samples]
        rows.append(
            {
                "id": o.variant.id,
                "description": o.variant.description,
                "status": o.status,
                "note": o.note or None,
                "requests_per_s_median": round(statistics.median(rates), 1) if rates else None,
                "requests_per_s_min": round(min(rates), 1) if rates else None,
                "requests_per_s_max": round(max(rates), 1) if rates else None,
                # bare's own samples hold its drift within a round (vs the round's mean)
                "ratio_to_bare_median": 1.0
                if o.variant.id == "bare"
                else _round(o.median("ratio"), 3),
                "target": o.variant.target,
                "target_met": (
                    None
                    if o.variant.target is None or o.median("ratio") is None
                    else bool(o.median("ratio") >= o.variant.target)  # type: ignore[operator]
                ),
                "reference_ratio": o.variant.reference,
                "non_2xx_3xx": sum(s.non_2xx_3xx for s in o.samples),
                "socket_errors": sum(sum(s.socket_errors.values()) for s in o.samples),
                "flagged": o.flagged,
                "latency_p50_ms": _round(_median_latency(o, "p50"), 3),
                "latency_p99_ms": _round(_median_latency(o, "p99"), 3),
                "server_cpu": _round(o.median("server_cpu"), 3),
                "redis_cpu": _round(o.median("redis_cpu"), 3),
                "redis_scripts_per_request": _round(o.median("redis_scripts_per_request"), 2),
                "redis_commands_per_request": _round(o.median("redis_commands_per_request"), 2),
                "server_core_other": _round(o.median("server_core_other"), 3),
                "client_core_other": _round(o.median("client_core_other"), 3),
                "noisy_samples": sum(s.noisy for s in o.samples),
                "retries": sum(s.attempts - 1 for s in o.samples),
            }
        )
    return rows


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _median_latency(outcome: Outcome, key: str) -> float | None:
    values = [s.latency_ms[key] for s in outcome.samples if key in s.latency_ms]
    return statistics.median(values) if values else None


def markdown(outcomes: Sequence[Outcome], meta: dict[str, Any]) -> str:
    v = meta["versions"]
    lines = [
        f"## HTTP requests per second through uvicorn ({meta['rounds']} interleaved round(s) x "
        f"{meta['seconds']:g} s, median)",
        "",
        f"- command: `{meta['command']}` ({meta['date']}, {meta['elapsed_seconds']:g} s)",
        f"- load: `{meta['wrk_command']}` ({meta['wrk_version']}), warm-up "
        f"{meta['warmup']:g} s per variant and round; headers sent to every variant: "
        + ", ".join(f"`{n}: {val}`" for n, val in REQUEST_HEADERS),
        f"- server: uvicorn {v['uvicorn']}, 1 worker, `--loop uvloop --http httptools "
        f"--no-access-log --log-level warning` (uvloop {v['uvloop']}, httptools "
        f"{v['httptools']}), pinned to CPU {meta['server_cpu']}; wrk pinned to CPU "
        f"{meta['client_cpu']}; "
        + (
            f"redis-server {meta['redis_version']} (private, no persistence) pinned to CPU "
            f"{meta['redis_cpu']}; "
            if meta["redis_version"] != "-"
            else "no Redis variant run; "
        )
        + f"{meta['cpu_count']} CPUs",
        f"- Python {meta['python']}; fastapi {v['fastapi']}, starlette {v['starlette']}; "
        f"fastapi_ratelimit {v['fastapi_ratelimit']} ({meta['git']}); slowapi {v['slowapi']} "
        f"(limits {v['limits']}); fastapi-limiter {v['fastapi-limiter']} (pyrate-limiter "
        f"{v['pyrate-limiter']}); redis-py {v['redis']} (hiredis {v['hiredis']})",
        "- every limit is ~10^9/minute: nothing is ever denied; `ratio to bare` = the variant's "
        "req/s over the mean of the bare runs just before and just after it, median over "
        "rounds",
        "",
        "| Variant | What | req/s (median) | min - max | ratio to bare | target / earlier "
        "| non-2xx | socket err | p50 / p99 ms | server CPU | Redis scripts / cmds per req "
        "| redis CPU |",
        "|---|---|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for o, row in zip(outcomes, summary_rows(outcomes), strict=True):
        name = f"{o.variant.id} ⚠" if o.flagged else o.variant.id
        if not o.samples:
            lines.append(
                f"| {name} | {o.variant.description} | {o.status}: {o.note} | | | "
                f"{goal(o.variant, None)} | | | | | | |"
            )
            continue
        p50, p99 = row["latency_p50_ms"], row["latency_p99_ms"]
        scripts, cmds = row["redis_scripts_per_request"], row["redis_commands_per_request"]
        redis_calls = "-" if cmds is None else f"{scripts:.2f} / {cmds:.2f}"
        lines.append(
            f"| {name} | {o.variant.description} "
            f"| **{row['requests_per_s_median']:,.0f}** "
            f"| {row['requests_per_s_min']:,.0f} - {row['requests_per_s_max']:,.0f} "
            f"| **{fmt_ratio(row['ratio_to_bare_median'])}** "
            f"| {goal(o.variant, row['ratio_to_bare_median'])} "
            f"| {row['non_2xx_3xx']} | {row['socket_errors']} "
            f"| {p50 if p50 is not None else '-'} / {p99 if p99 is not None else '-'} "
            f"| {_pct(row['server_cpu'])} | {redis_calls} "
            f"| {_pct(row['redis_cpu'])} |"
        )
    samples = [s for o in outcomes for s in o.samples]
    others = [
        max(s.server_core_other or 0.0, s.client_core_other or 0.0)
        for s in samples
        if s.server_core_other is not None
    ]
    other_median = _pct(statistics.median(others) if others else None)
    other_max = _pct(max(others) if others else None)
    noisy = [
        f"{o.variant.id} (round {s.round + 1})" for o in outcomes for s in o.samples if s.noisy
    ]
    retried = sum(s.attempts - 1 for s in samples)
    waited = sum(s.waited_s for s in samples)
    bare = next((o for o in outcomes if o.variant.id == "bare"), None)
    drift = []
    for r in sorted({s.round for s in bare.samples} if bare else ()):
        assert bare is not None
        runs = [s.requests_per_s for s in bare.samples if s.round == r]
        drift.append(
            f"{min(runs):,.0f} - {max(runs):,.0f} ({100 * (max(runs) / min(runs) - 1):+.0f}%)"
        )
    bare_median = (
        statistics.median(s.requests_per_s for s in bare.samples) if bare and bare.samples else 0
    )
    cross = [
        f"{o.variant.id} {statistics.median(s.requests_per_s for s in o.samples) / bare_median:.2f}"
        for o in outcomes
        if o.samples and bare_median and o is not bare
    ]
    lines += [
        "",
        "Cross-check, less sensitive to one slow neighbour: each variant's median req/s over "
        "bare's median over all its runs: " + ("; ".join(cross) or "-") + ".",
        "",
        "bare runs before and after every variant, and each variant's baseline is the mean of "
        "those two neighbours. bare's range within each round (the drift that design absorbs): "
        + ("; ".join(drift) or "-")
        + ".",
        "`server CPU`: uvicorn's CPU time / wall time (100% = its core saturated). `Redis scripts "
        "/ cmds per req`: script calls (EVAL/EVALSHA) per request / every command Redis counted, "
        "including those run inside scripts (from `INFO commandstats`).",
        f"Foreign load (CPU time on the server's or the client's core not accounted to uvicorn, "
        f"wrk or redis-server: interrupts, softirqs, other processes), kept samples: median "
        f"{other_median}, max {other_max}; {retried} measurement(s) repeated because it exceeded "
        f"{_pct(meta['max_foreign'])}; kept although noisy: {', '.join(noisy) or 'none'}. "
        f"Waited {waited:.0f} s in all for the cores to be idle before measuring. Machine busy "
        f"before the run: {_pct(meta['machine_busy_before'])} of all CPUs.",
        "",
        *target_lines(outcomes),
    ]
    flagged = [o for o in outcomes if o.flagged]
    if flagged:
        lines += ["", "Flagged (⚠): failed, or wrk counted non-2xx responses or socket errors:"]
        lines += [f"- {o.variant.id}: {o.status} {o.note}".rstrip() for o in flagged]
    return "\n".join(lines) + "\n"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def target_lines(outcomes: Sequence[Outcome]) -> list[str]:
    lines = []
    for o in outcomes:
        if o.variant.target is None:
            continue
        ratio = o.median("ratio")
        if ratio is None:
            lines.append(f"- {o.variant.id}: not measured ({o.status} {o.note})")
            continue
        met = "met" if ratio >= o.variant.target and not o.flagged else "NOT met"
        lines.append(
            f"- target {o.variant.id} >= {o.variant.target:.2f} of bare: {ratio:.2f} -> **{met}**"
        )
    return lines


def write_outputs(
    outcomes: Sequence[Outcome], meta: dict[str, Any], json_path: Path, md_path: Path
) -> str:
    text = markdown(outcomes, meta)
    document = {
        "meta": meta,
        "summary": summary_rows(outcomes),
        "variants": [
            {
                "id": o.variant.id,
                "module": f"bench/apps/{o.variant.module}.py",
                "status": o.status,
                "note": o.note or None,
                "preflight": o.preflight,
                "samples": [s.__dict__ for s in o.samples],
            }
            for o in outcomes
        ],
    }
    for path, content in ((json_path, json.dumps(document, indent=2) + "\n"), (md_path, text)):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(path)
    return text


# -- the run -----------------------------------------------------------------------------------


def select(args: argparse.Namespace) -> list[Outcome]:
    outcomes = []
    for variant in VARIANTS:
        if args.only and variant.id != "bare" and not any(t in variant.id for t in args.only):
            continue
        outcome = Outcome(variant)
        missing = [m for m in variant.requires if importlib.util.find_spec(m) is None]
        if missing:
            outcome.status, outcome.note = "skipped", f"not installed: {', '.join(missing)}"
        outcomes.append(outcome)
    return outcomes


def run(args: argparse.Namespace, outcomes: list[Outcome], meta: dict[str, Any]) -> None:
    active = [o for o in outcomes if o.status == "pending"]
    redis_server: RedisServer | None = None
    servers: dict[str, AppServer] = {}
    log_dir = tempfile.mkdtemp(prefix="bench-http-logs-")
    try:
        env = dict(os.environ)
        if any(o.variant.redis for o in active):
            redis_server = RedisServer(args.redis_server, args.redis_cpu)
            redis_server.start()
            meta["redis_version"] = redis_server.version()
            env["BENCH_REDIS_URL"] = redis_server.url
            log(f"redis-server {meta['redis_version']} on {redis_server.url}")
        for o in active:
            server = AppServer(o.variant, args.server_cpu, log_dir, env)
            try:
                server.start()
                o.preflight = preflight(server)
            except Exception as exc:
                server.stop()
                o.status, o.note = "failed", f"start/pre-flight: {exc}"
                log(f"{o.variant.id}: FAILED to start: {exc}")
                continue
            servers[o.variant.id] = server
            if o.preflight["problems"]:
                o.status, o.note = "failed", "pre-flight: " + "; ".join(o.preflight["problems"])
                log(f"{o.variant.id}: pre-flight FAILED: {o.note}")
                continue
            o.status = "ok"
            log(f"{o.variant.id}: uvicorn pid {server.pid} on port {server.port}, pre-flight ok")
        bare = next((o for o in outcomes if o.variant.id == "bare"), None)
        if bare is None or bare.status != "ok":
            raise RuntimeError(f"the bare app is not available: {bare.note if bare else ''}")
        running = [o for o in active if o.status == "ok"]
        others = [o for o in running if o is not bare]
        for r in range(args.rounds):
            # bare runs before and after every variant, and each variant is compared with the
            # mean of its two neighbours: this machine's speed drifts by 30-50% within a
            # minute, so a baseline from the round's two ends (a minute or more apart) was
            # noise. The others rotate.
            shift = r % len(others) if others else 0
            order = [bare]
            for other in [*others[shift:], *others[:shift]]:
                order += [other, bare]
            log(f"round {r + 1}/{args.rounds}: " + ", ".join(o.variant.id for o in order))
            for position, o in enumerate(order):
                if o.status != "ok":
                    continue
                try:
                    sample = measure(args, servers[o.variant.id], redis_server, r, position)
                except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
                    if o is bare:
                        raise
                    server = servers[o.variant.id]
                    o.status, o.note = "failed", f"round {r + 1}: {exc}; log: {server.tail(5)}"
                    log(f"  {o.variant.id}: FAILED: {o.note}")
                    continue
                o.samples.append(sample)
                errors = sample.non_2xx_3xx + sum(sample.socket_errors.values())
                log(
                    f"  {o.variant.id:<27} {sample.requests_per_s:>10,.0f} req/s"
                    f"  cpu {_pct(sample.server_cpu):>4}" + (f"  ERRORS {errors}" if errors else "")
                )
            bare_at = {s.position: s.requests_per_s for s in bare.samples if s.round == r}
            round_mean = statistics.mean(bare_at.values())
            for o in running:
                for sample in o.samples:
                    if sample.round != r:
                        continue
                    if o is bare:  # its drift within the round
                        base = round_mean
                    else:
                        around = [
                            bare_at[p]
                            for p in (sample.position - 1, sample.position + 1)
                            if p in bare_at
                        ]
                        base = statistics.mean(around) if around else round_mean
                    sample.ratio = sample.requests_per_s / base if base else None
        for o in running:
            server = servers[o.variant.id]
            if server.process is not None and server.process.poll() is not None:
                o.status, o.note = "failed", f"uvicorn died: {server.tail()}"
    finally:
        for server in servers.values():
            server.stop()
        if redis_server is not None:
            redis_server.stop()
        shutil.rmtree(log_dir, ignore_errors=True)


# -- CLI ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=int, default=5, help="wrk -d per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s (overrides both)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded wrk seconds before each")
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.1,
        help="measure again when something else used more than this share of a core",
    )
    parser.add_argument("--retries", type=int, default=3, help="re-measurements when noisy")
    parser.add_argument("--retry-pause", type=float, default=2.0, help="seconds before a retry")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        help="before each measurement, wait up to this long for both cores to be idle (0: off)",
    )
    parser.add_argument("--connections", type=int, default=32, help="wrk -c")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t")
    parser.add_argument("--server-cpu", type=int, default=0, help="CPU for every uvicorn")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU for wrk")
    parser.add_argument("--redis-cpu", type=int, help="CPU for redis-server (default: wrk's)")
    parser.add_argument(
        "--only", nargs="+", metavar="TEXT", help="only variants whose id contains TEXT (+ bare)"
    )
    parser.add_argument("--output", type=Path, default=RESULTS / "http.json", help="JSON file")
    parser.add_argument("--markdown", type=Path, default=RESULTS / "http.md", help="table file")
    parser.add_argument("--wrk", default=shutil.which("wrk"), help="wrk binary")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"), help="binary")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 2
    if args.redis_cpu is None:
        args.redis_cpu = args.client_cpu
    if args.seconds < 1 or args.rounds < 1 or args.connections < 1 or args.threads < 1:
        parser.error("--seconds must be >= 1; --rounds, --connections, --threads positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not args.wrk:
        parser.error("wrk not found on PATH: apt-get install -y wrk (or give --wrk)")
    if shutil.which("taskset") is None:
        parser.error("taskset not found on PATH: apt-get install -y util-linux")
    allowed = os.sched_getaffinity(0)
    for name in ("server_cpu", "client_cpu", "redis_cpu"):
        if getattr(args, name) not in allowed:
            parser.error(f"--{name.replace('_', '-')}: CPU {getattr(args, name)} not in {allowed}")
    if args.server_cpu == args.client_cpu:
        log("warning: uvicorn and wrk pinned to the same CPU")
    if importlib.util.find_spec("uvloop") is None or importlib.util.find_spec("httptools") is None:
        parser.error("needs uvloop and httptools: pip install uvloop httptools")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`: every server is stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    outcomes = select(args)
    if any(o.variant.redis and o.status == "pending" for o in outcomes) and not args.redis_server:
        log("redis-server not found on PATH: the Redis variants are skipped")
        for o in outcomes:
            if o.variant.redis and o.status == "pending":
                o.status, o.note = "skipped", "no redis-server"
    packages = (
        "fastapi_ratelimit",
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "slowapi",
        "limits",
        "fastapi-limiter",
        "pyrate-limiter",
        "redis",
        "hiredis",
    )
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "connections": args.connections,
        "max_foreign": args.max_foreign,
        "retries": args.retries,
        "quiet_wait": args.quiet_wait,
        "threads": args.threads,
        "server_cpu": args.server_cpu,
        "client_cpu": args.client_cpu,
        "redis_cpu": args.redis_cpu,
        "wrk_command": shlex.join(wrk_argv(args, f"http://{HOST}:PORT{PATH}", args.seconds)),
        "wrk_version": wrk_version(args.wrk),
        "redis_version": "-",
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "versions": {p: version(p) for p in packages},
        "git": git_state(),
    }
    meta["machine_busy_before"] = round(machine_busy(), 3)
    if meta["machine_busy_before"] > 0.1:
        log(f"warning: the machine is {_pct(meta['machine_busy_before'])} busy before the run")
    started = time.perf_counter()
    run(args, outcomes, meta)
    meta["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    text = write_outputs(outcomes, meta, args.output, args.markdown)
    print(text)
    log(f"wrote {args.markdown} and {args.output}")
    return 1 if any(o.flagged for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
