#!/usr/bin/env python
"""End-to-end HTTP benchmark: requests per second through uvicorn, driven by ``wrk``.

The same hello-world FastAPI app (``GET /hello`` -> ``{"hello": "world"}``) is served bare and
behind ``fastapi_ratelimit``, slowapi, fastapi-limiter and a minimal ``limits`` middleware
(memory and Redis), each by its own uvicorn (one worker, uvloop, httptools, no access log,
proxy headers from 127.0.0.1) pinned to one core, while ``wrk`` runs pinned to the other. The
apps live in ``bench/apps/``. Every variant is reported as a ratio to the bare app measured
just before and just after it, for throughput and for p99 latency.

Two kinds of traffic: *production-shaped* (``bench/production.lua``: every request from one of
10,000 client IPs in ``X-Forwarded-For``, with one of 1,000 API keys and one of 5,000 users),
the headline, and *single peer* (every request the same: one peer, one key, one user). See
``bench/README.md``.

    python bench/bench_http.py                # both traffics, 3 interleaved rounds x 5 s
    python bench/bench_http.py --quick        # 1 round x 2 s, a smoke test

Prints Markdown tables on stdout (progress goes to stderr) and writes
``bench/results/http.md`` and ``bench/results/http.json`` (``--quick``: ``http-quick.*.tmp``).
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
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from runner import (
    BENCH,
    HOST,
    PATH,
    TRUSTED_PROXY,
    AppServer,
    RedisServer,
    RedisStats,
    log,
    pinned,
)

RESULTS = BENCH / "results"
#: Single-peer traffic: sent with every request to every variant (only the 5-level apps read
#: them), so all variants parse the same request.
REQUEST_HEADERS = (("X-API-Key", "k1"), ("X-User", "u1"))
EXPECTED_BODY = {"hello": "world"}
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")
#: Production-shaped traffic: the wrk script and its arguments (seed, pool sizes).
PRODUCTION_SCRIPT = BENCH / "production.lua"
PRODUCTION_SEED = 1
PRODUCTION_IPS, PRODUCTION_KEYS, PRODUCTION_USERS = 10_000, 1_000, 5_000


# -- traffic -----------------------------------------------------------------------------------


def production_ip(i: int) -> str:
    """Client address ``i`` of ``production.lua`` (198.18.0.0/15: reserved for benchmarks)."""
    return f"198.18.{i // 256}.{i % 256}"


def production_key(i: int) -> str:
    """API key ``i`` of ``production.lua``."""
    return f"bk_{i * 2654435761 % 4294967296:010d}{i:04d}"


def production_user(i: int) -> str:
    """User ``i`` of ``production.lua``."""
    return f"user-{i:05d}"


def production_headers(ip: int, key: int = 0, user: int = 0) -> dict[str, str]:
    """A request as ``production.lua`` sends it (which values it draws is up to the script)."""
    return {
        "X-Forwarded-For": production_ip(ip),
        "X-API-Key": production_key(key),
        "X-User": production_user(user),
    }


@dataclass(frozen=True)
class Traffic:
    id: str
    title: str
    description: str
    production: bool  # production.lua, else REQUEST_HEADERS on every request


PRODUCTION = Traffic(
    "production",
    "Production-shaped traffic (headline)",
    f"`bench/production.lua`: every request carries `X-Forwarded-For` (one of "
    f"{PRODUCTION_IPS:,} client IPs, which uvicorn's proxy headers make the peer), `X-API-Key` "
    f"(one of {PRODUCTION_KEYS:,}) and `X-User` (one of {PRODUCTION_USERS:,}), each dealt from "
    f"a seeded shuffled deck (seed {PRODUCTION_SEED}): every value once per pass",
    production=True,
)
SINGLE = Traffic(
    "single",
    "Single peer (secondary)",
    "every request the same: one peer (127.0.0.1, no `X-Forwarded-For`), "
    + ", ".join(f"`{n}: {v}`" for n, v in REQUEST_HEADERS),
    production=False,
)
TRAFFICS = {"production": (PRODUCTION,), "single": (SINGLE,), "both": (PRODUCTION, SINGLE)}


# -- variants ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    id: str
    module: str  # in bench/apps/
    description: str
    redis: bool = False  # gets a redis-server of its own (BENCH_REDIS_URL)
    #: fastapi_ratelimit variants: the number of levels the RateLimit-Policy header must list.
    frl_levels: int | None = None
    requires: tuple[str, ...] = ()  # importable modules the app needs
    target: float | None = None  # ratio to bare that must be reached
    reference: float | None = None  # single-peer ratio to bare measured earlier here
    #: Counts per client IP, so production traffic's forwarded addresses must be told apart
    #: (checked in the pre-flight wherever it shows: a remaining count, Redis keys).
    per_ip: bool = True
    #: (header, regex) giving the IP level's remaining count, when the response shows it.
    ip_remaining: tuple[str, str] | None = None
    #: In the default selection; the others run when named by --only, or with --all.
    default: bool = True
    #: Extra environment for the app's server (the same app under another setting).
    env: tuple[tuple[str, str], ...] = ()
    #: uvicorn worker processes (bench_workers.py runs more than one).
    workers: int = 1


FRL_IP_REMAINING = ("ratelimit", r";r=(\d+)")

VARIANTS: tuple[Variant, ...] = (
    Variant("bare", "app_bare", "FastAPI, no rate limiting", per_ip=False),
    Variant(
        "floor",
        "app_floor",
        "no limiting: a pure-ASGI send wrapper adding two constant headers (any limiter's floor)",
        per_ip=False,
    ),
    Variant(
        "frl-memory-1",
        "app_frl_memory_1",
        "fastapi_ratelimit middleware, memory, 1 level (IP)",
        frl_levels=1,
        ip_remaining=FRL_IP_REMAINING,
    ),
    Variant(
        "frl-memory-3",
        "app_frl_memory_3",
        "fastapi_ratelimit middleware, memory, 3 levels (global, IP, endpoint)",
        frl_levels=3,
        target=0.85,
    ),
    Variant(
        "frl-memory-3-metrics",
        "app_frl_memory_3",
        "frl-memory-3 with Prometheus metrics on (target: 0.95 of frl-memory-3)",
        frl_levels=3,
        env=(("BENCH_METRICS", "1"),),
    ),
    Variant(
        "frl-memory-5",
        "app_frl_memory_5",
        "fastapi_ratelimit middleware, memory, 5 levels (+ API key, user via user_resolver)",
        frl_levels=5,
    ),
    *(
        Variant(
            f"frl-memory-{n}-general",
            f"app_frl_memory_{n}",
            f"frl-memory-{n} with the express path off: the general path alone, as before it",
            frl_levels=n,
            env=(("BENCH_GENERAL", "1"),),
            default=False,
        )
        for n in (1, 3, 5)
    ),
    Variant(
        "frl-redis-1",
        "app_frl_redis_1",
        "fastapi_ratelimit middleware, Redis, 1 level (IP), sliding window counter (default)",
        redis=True,
        frl_levels=1,
        requires=("redis",),
        ip_remaining=FRL_IP_REMAINING,
    ),
    Variant(
        "frl-redis-1-pool",
        "app_frl_redis_1",
        "frl-redis-1 on redis-py's connection pool (multiplex=False)",
        redis=True,
        frl_levels=1,
        requires=("redis",),
        ip_remaining=FRL_IP_REMAINING,
        default=False,
        env=(("BENCH_MULTIPLEX", "0"),),
    ),
    Variant(
        "frl-redis-1-fixed",
        "app_frl_redis_1_fixed",
        "fastapi_ratelimit middleware, Redis, 1 level (IP), fixed window",
        redis=True,
        frl_levels=1,
        requires=("redis",),
        ip_remaining=FRL_IP_REMAINING,
    ),
    Variant(
        "frl-redis-5",
        "app_frl_redis_5",
        "fastapi_ratelimit middleware, Redis, 5 levels (+ API key, user) in one EVALSHA",
        redis=True,
        frl_levels=5,
        requires=("redis",),
        target=0.50,
    ),
    Variant(
        "frl-redis-5-pool",
        "app_frl_redis_5",
        "frl-redis-5 on redis-py's connection pool (multiplex=False)",
        redis=True,
        frl_levels=5,
        requires=("redis",),
        default=False,
        env=(("BENCH_MULTIPLEX", "0"),),
    ),
    Variant(
        "frl-redis-5-metrics",
        "app_frl_redis_5",
        "frl-redis-5 with Prometheus metrics on (target: 0.95 of frl-redis-5)",
        redis=True,
        frl_levels=5,
        requires=("redis",),
        default=False,
        env=(("BENCH_METRICS", "1"),),
    ),
    Variant(
        "limits-redis-1",
        "app_limits_redis_1",
        "yardstick: limits (async, coredis) fixed window, 1 limit (IP), in a pure-ASGI "
        "middleware: one INCRBY per request",
        redis=True,
        requires=("limits", "coredis"),
        ip_remaining=("x-ratelimit-remaining", r"(\d+)"),
    ),
    Variant(
        "slowapi-memory-decorator",
        "app_slowapi_memory_decorator",
        "slowapi @limiter.limit, memory",
        requires=("slowapi",),
        reference=0.53,
    ),
    Variant(
        "fastapi-limiter-redis",
        "app_fastapi_limiter_redis",
        "fastapi-limiter RateLimiter dependency, Redis (pyrate-limiter RedisBucket)",
        redis=True,
        requires=("fastapi_limiter", "pyrate_limiter", "redis"),
        reference=0.26,
        # Its key names the client, but pyrate-limiter's Limiter puts every key into its one
        # RedisBucket (one sorted set): one bucket for all clients.
        per_ip=False,
    ),
    Variant(
        "slowapi-memory-middleware",
        "app_slowapi_memory_middleware",
        "slowapi SlowAPIMiddleware + default_limits, memory",
        requires=("slowapi",),
        reference=0.25,
        default=False,
    ),
    Variant(
        "slowapi-redis-1",
        "app_slowapi_redis_1",
        "slowapi @limiter.limit, Redis, 1 limit",
        redis=True,
        requires=("slowapi", "redis"),
        reference=0.23,
        default=False,
    ),
    Variant(
        "slowapi-redis-5",
        "app_slowapi_redis_5",
        "slowapi, 5 stacked @limiter.limit, Redis",
        redis=True,
        requires=("slowapi", "redis"),
        reference=0.15,
        default=False,
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
    #: production.lua's closing line: requests made, distinct IPs / keys / users used.
    script_report: dict[str, int] | None = None
    ratio: float | None = None  # req/s over the mean of the neighbouring bare runs
    p99_ratio: float | None = None  # p99 latency over the mean of the same bare runs' p99
    server_cpu: float | None = None  # uvicorn CPU time / wall time (1.0 = one core)
    redis_cpu: float | None = None
    #: Per request, on the variant's own redis-server: top-level script calls (EVAL/EVALSHA/
    #: FCALL and their _RO forms), and every command Redis counted during the run (including
    #: those run inside scripts and any background polling; not the benchmark's own INFO), in
    #: all and by command.
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
    #: Commands the variant's redis-server ran while the variant was not being measured
    #: (other variants' turns, waits): background polling, per second, in all and by command.
    redis_idle_per_s: float | None = None
    redis_idle_commands: dict[str, float] | None = None

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


#: A started variant: its server, and its own redis-server when it needs one.
Served = tuple["AppServer", "RedisServer | None"]


@contextlib.contextmanager
def serving(
    variants: Sequence[Variant], app_cpu: int | str, redis_binary: str, redis_cpu: int | str
) -> Iterator[dict[str, Served]]:
    """Start every variant's uvicorn (each Redis variant with a redis-server of its own, at
    ``BENCH_REDIS_URL``), and stop them all on the way out. For the smaller benchmarks."""
    log_dir = tempfile.mkdtemp(prefix="bench-")
    servers: dict[str, Served] = {}
    started: list[AppServer | RedisServer] = []
    try:
        for variant in variants:
            env = dict(os.environ)
            redis_server = None
            if variant.redis:
                redis_server = RedisServer(redis_binary, redis_cpu)
                started.append(redis_server)
                redis_server.start()
                env["BENCH_REDIS_URL"] = redis_server.url
            app = AppServer(variant, app_cpu, log_dir, {**env, **dict(variant.env)})
            started.append(app)
            app.start()
            servers[variant.id] = (app, redis_server)
        yield servers
    finally:
        for server in started:
            server.stop()


def _get(port: int, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection(HOST, port, timeout=5.0)
    try:
        connection.request("GET", PATH, headers=headers)
        response = connection.getresponse()
        body = response.read()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, body
    finally:
        connection.close()


def _check_answer(
    variant: Variant, status: int, headers: dict[str, str], body: bytes
) -> tuple[list[str], int | None]:
    """Problems with one answer, and the number of levels its RateLimit-Policy lists."""
    problems = []
    if status != 200:
        problems.append(f"status {status}")
    try:
        if json.loads(body) != EXPECTED_BODY:
            problems.append(f"body {body[:80]!r}")
    except ValueError:
        problems.append(f"body {body[:80]!r}")
    levels = variant.frl_levels
    listed = None
    if levels is not None:
        if "ratelimit" not in headers:
            problems.append("no RateLimit header")
        policy = headers.get("ratelimit-policy", "")
        listed = len([p for p in policy.split(",") if p.strip()])
        if listed != levels:
            problems.append(f"RateLimit-Policy lists {listed} levels, expected {levels}")
    return problems, listed


def _remaining(variant: Variant, headers: dict[str, str]) -> int | None:
    if variant.ip_remaining is None:
        return None
    name, pattern = variant.ip_remaining
    found = re.search(pattern, headers.get(name, ""))
    return int(found.group(1)) if found else None


def preflight(
    server: AppServer, traffic: Traffic, redis_server: RedisServer | None
) -> dict[str, Any]:
    """Requests as wrk sends them: each must answer 200 with the expected body, and for
    fastapi_ratelimit carry ``RateLimit`` and a ``RateLimit-Policy`` naming every level.

    Production traffic sends three: client A, A again, then B with A's key and user. Where the
    app shows per-client state, A's second request and B's must tell the two clients apart
    (the forwarded address reached the limiter): a remaining count for the IP level that is
    B's own, and, on Redis, B's first request adding keys where A's second added none.
    """
    variant = server.variant
    if traffic.production:
        requests = [production_headers(0), production_headers(0), production_headers(1)]
    else:
        requests = [dict(REQUEST_HEADERS)] * 2
    answers = []
    problems: list[str] = []
    listed: int | None = None
    dbsizes = []
    for headers in requests:
        status, response_headers, body = _get(server.port, headers)
        trouble, listed = _check_answer(variant, status, response_headers, body)
        problems += [t for t in trouble if t not in problems]
        answers.append(
            {
                "request_headers": headers,
                "status": status,
                "headers": response_headers,
                "remaining": _remaining(variant, response_headers),
            }
        )
        if redis_server is not None:
            dbsizes.append(redis_server.dbsize())
    result: dict[str, Any] = {"answers": answers, "redis_dbsize": dbsizes or None}
    if listed is not None:
        result["policy_levels"] = listed
    if traffic.production:
        seen = _sees_clients(variant, answers, dbsizes)
        result["tells_clients_apart"] = seen
        if variant.per_ip and seen is False:
            problems.append(
                "clients with different X-Forwarded-For share one count: "
                + "; ".join(
                    f"remaining {a['remaining']}" for a in answers if a["remaining"] is not None
                )
                + (f"; Redis keys after each request {dbsizes}" if dbsizes else "")
            )
    result["problems"] = problems
    return result


def _sees_clients(
    variant: Variant, answers: Sequence[dict[str, Any]], dbsizes: Sequence[int]
) -> bool | None:
    """Whether the app counted the third request (client B) apart from the first two (A);
    ``None`` when nothing in the answers or in Redis shows it."""
    verdicts = []
    remaining = [a["remaining"] for a in answers]
    if None not in remaining and len(remaining) == 3:
        # A: n, then n - 1; B, counted apart: n again (or more), not n - 2.
        verdicts.append(remaining[2] > remaining[1])
    if len(dbsizes) == 3 and variant.per_ip:
        verdicts.append(dbsizes[1] == dbsizes[0] and dbsizes[2] > dbsizes[1])
    elif len(dbsizes) == 3:
        # Informational (fastapi-limiter): did client B get keys of its own?
        verdicts.append(dbsizes[2] > dbsizes[1])
    return all(verdicts) if verdicts else None


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
    # wrk --latency: "  Latency Distribution" then "     50%  706.00us" ... "     99%    2.38ms".
    distribution = output.partition("Latency Distribution")[2]
    for percentile in ("50", "75", "90", "99"):
        found = re.search(rf"^\s*{percentile}%\s+(\S+)", distribution, re.M)
        if found:
            latency[f"p{percentile}"] = _ms(found.group(1))
    if "p50" not in latency or "p99" not in latency:
        raise ValueError(f"no latency distribution (wrk --latency) in wrk output:\n{output}")
    script = re.search(
        r"^production\.lua: (\d+) requests made \(seed (\d+)\); distinct per thread: "
        r"(\d+)/(\d+) X-Forwarded-For, (\d+)/(\d+) X-API-Key, (\d+)/(\d+) X-User",
        output,
        re.M,
    )
    script_report = None
    if script:
        numbers = [int(g) for g in script.groups()]
        names = ("requests", "seed", "ips", "ips_pool", "keys", "keys_pool", "users", "users_pool")
        script_report = dict(zip(names, numbers, strict=True))
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
        "script_report": script_report,
    }


def wrk_argv(args: argparse.Namespace, traffic: Traffic, url: str, seconds: int) -> list[str]:
    argv = [args.wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--latency"]
    if traffic.production:
        # The script's own arguments follow "--".
        pools = (PRODUCTION_SEED, PRODUCTION_IPS, PRODUCTION_KEYS, PRODUCTION_USERS)
        argv += ["-s", str(PRODUCTION_SCRIPT), url, "--", *map(str, pools)]
    else:
        argv += [part for name, value in REQUEST_HEADERS for part in ("-H", f"{name}: {value}")]
        argv.append(url)
    return pinned(args.client_cpu, argv)


def run_wrk(args: argparse.Namespace, traffic: Traffic, url: str, seconds: int) -> dict[str, Any]:
    argv = wrk_argv(args, traffic, url, seconds)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()}")
    result = parse_wrk(done.stdout)
    if traffic.production and result["script_report"] is None:
        raise ValueError(f"no report from {PRODUCTION_SCRIPT.name} in wrk output:\n{done.stdout}")
    return result


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def redis_cpu_seconds(redis_servers: Sequence[RedisServer]) -> float:
    """CPU time so far of every running redis-server of the run (``/proc``)."""
    total = 0.0
    for server in redis_servers:
        if server.pid is not None:
            with contextlib.suppress(OSError):
                total += process_cpu_seconds(server.pid)
    return total


def measure_once(
    args: argparse.Namespace,
    traffic: Traffic,
    server: AppServer,
    redis_server: RedisServer | None,
    redis_servers: Sequence[RedisServer],
    round_index: int,
    position: int,
) -> Sample:
    """One wrk run, with the CPU accounting of both cores around it. ``redis_server`` is the
    variant's own (``None`` without one), ``redis_servers`` every one the run started."""
    cores = sorted({args.server_cpu, args.client_cpu})
    redis_before = redis_server.stats() if redis_server else None
    all_redis_before = redis_cpu_seconds(redis_servers)
    busy_before = {c: core_busy_seconds(c) for c in cores}
    server_before = process_cpu_seconds(server.pid)
    wrk_before = children_cpu_seconds()  # wrk is waited for: it lands in RUSAGE_CHILDREN
    started = time.perf_counter()
    result = run_wrk(args, traffic, server.url, args.seconds)
    wall = time.perf_counter() - started
    known = dict.fromkeys(cores, 0.0)
    known[args.server_cpu] += process_cpu_seconds(server.pid) - server_before
    known[args.client_cpu] += children_cpu_seconds() - wrk_before
    if args.redis_cpu in known:
        known[args.redis_cpu] += redis_cpu_seconds(redis_servers) - all_redis_before
    sample = Sample(round=round_index, position=position, **result)
    # Over wall time, which includes wrk's start-up and exit (a few ms).
    sample.server_cpu = known[args.server_cpu] / wall
    if redis_server is not None and redis_before is not None:
        after = redis_server.stats()
        sample.redis_cpu = (after.cpu_seconds - redis_before.cpu_seconds) / wall
        requests = max(sample.requests, 1)
        delta = _delta(redis_before.calls, after.calls)
        sample.redis_commands = {k: round(v / requests, 3) for k, v in sorted(delta.items())}
        # Every command this variant's server ran during the run, less the benchmark's INFO:
        # total_commands_processed counts the same as the sum of INFO commandstats.
        sample.redis_commands_per_request = (after.total - redis_before.total) / requests
        sample.redis_scripts_per_request = (
            sum(delta.get(name, 0) for name in SCRIPT_COMMANDS) / requests
        )
    other = {c: max(core_busy_seconds(c) - busy_before[c] - known[c], 0.0) / wall for c in cores}
    sample.server_core_other = other[args.server_cpu]
    sample.client_core_other = other[args.client_cpu]
    return sample


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}


@dataclass
class RedisIdle:
    """What one variant's redis-server ran while the variant was not being measured."""

    server: RedisServer
    start: RedisStats | None = None
    started: float = 0.0
    busy_calls: dict[str, int] = field(default_factory=dict)
    busy_seconds: float = 0.0

    def begin(self) -> None:
        self.start, self.started = self.server.stats(), time.monotonic()

    def busy(self, before: RedisStats, after: RedisStats, seconds: float) -> None:
        for name, n in _delta(before.calls, after.calls).items():
            self.busy_calls[name] = self.busy_calls.get(name, 0) + n
        self.busy_seconds += seconds

    def rates(self) -> tuple[float, dict[str, float]] | None:
        """(commands per second, per command per second) outside the measured turns."""
        if self.start is None:
            return None
        end, seconds = self.server.stats(), time.monotonic() - self.started - self.busy_seconds
        if seconds <= 0:
            return None
        counts = {
            name: n - self.busy_calls.get(name, 0)
            for name, n in _delta(self.start.calls, end.calls).items()
        }
        per_s = {name: n / seconds for name, n in sorted(counts.items()) if n}
        return sum(per_s.values(), 0.0), per_s


def measure(
    args: argparse.Namespace,
    traffic: Traffic,
    server: AppServer,
    redis_server: RedisServer | None,
    redis_servers: Sequence[RedisServer],
    idle: RedisIdle | None,
    round_index: int,
    position: int,
) -> Sample:
    """Warm up, then measure; measure again (up to ``--retries`` times, after a pause) while
    something else used more than ``--max-foreign`` of either core. The last try is kept."""
    waited = 0.0
    for attempt in range(args.retries + 1):
        if args.quiet_wait > 0:
            waited += wait_quiet(args)
        # The variant's turn (warm-up and run) is left out of its idle Redis traffic.
        turn_start = redis_server.stats() if redis_server is not None else None
        turn_started = time.monotonic()
        try:
            if args.warmup > 0:
                run_wrk(args, traffic, server.url, args.warmup)
            sample = measure_once(
                args, traffic, server, redis_server, redis_servers, round_index, position
            )
        finally:
            if idle is not None and redis_server is not None and turn_start is not None:
                # The requests wrk left in flight finish after it exits: still the turn's.
                time.sleep(0.2)
                idle.busy(turn_start, redis_server.stats(), time.monotonic() - turn_started)
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


def goal(variant: Variant, traffic: Traffic, ratio: float | None) -> str:
    if variant.target is not None:
        if ratio is None:
            return f"target >= {variant.target:.2f}: not measured"
        verdict = "**met**" if ratio >= variant.target else "**NOT met**"
        return f"target >= {variant.target:.2f}: {verdict}"
    if variant.reference is not None and not traffic.production:
        # Measured before production-shaped traffic existed: single-peer figures.
        return f"earlier: {variant.reference:.2f}"
    return ""


@dataclass
class TrafficRun:
    """One traffic's part of a run: its own servers, rounds and table."""

    traffic: Traffic
    outcomes: list[Outcome]
    meta: dict[str, Any] = field(default_factory=dict)


def summary_rows(outcomes: Sequence[Outcome]) -> list[dict[str, Any]]:
    rows = []
    for o in outcomes:
        rates = [s.requests_per_s for s in o.samples]
        is_bare = o.variant.id == "bare"
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
                "ratio_to_bare_median": 1.0 if is_bare else _round(o.median("ratio"), 3),
                "latency_p50_ms": _round(_median_latency(o, "p50"), 3),
                "latency_p99_ms": _round(_median_latency(o, "p99"), 3),
                "p99_ratio_to_bare_median": 1.0 if is_bare else _round(o.median("p99_ratio"), 3),
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
                "tells_clients_apart": o.preflight.get("tells_clients_apart"),
                "server_cpu": _round(o.median("server_cpu"), 3),
                "redis_cpu": _round(o.median("redis_cpu"), 3),
                "redis_scripts_per_request": _round(o.median("redis_scripts_per_request"), 2),
                "redis_commands_per_request": _round(o.median("redis_commands_per_request"), 2),
                "redis_idle_commands_per_s": _round(o.redis_idle_per_s, 2),
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


def _ms_text(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value < 100 else f"{value:.0f}"


def markdown(runs: Sequence[TrafficRun], meta: dict[str, Any]) -> str:
    v = meta["versions"]
    redis_versions = sorted({r.meta["redis_version"] for r in runs} - {"-"})
    lines = [
        f"## HTTP requests per second through uvicorn ({meta['rounds']} interleaved round(s) x "
        f"{meta['seconds']:g} s, median)",
        "",
        f"- command: `{meta['command']}` ({meta['date']}, {meta['elapsed_seconds']:g} s)",
        f"- load: wrk ({meta['wrk_version']}) `-t{meta['threads']} -c{meta['connections']} "
        f"-d{meta['seconds']}s --latency`, warm-up {meta['warmup']:g} s per variant and round; "
        "traffic: " + "; ".join(f"**{r.traffic.id}**: {r.traffic.description}" for r in runs),
        f"- server: uvicorn {v['uvicorn']}, 1 worker, `--loop uvloop --http httptools "
        f"--no-access-log --log-level warning --proxy-headers --forwarded-allow-ips "
        f"{TRUSTED_PROXY}` (uvloop {v['uvloop']}, httptools {v['httptools']}), pinned to CPU "
        f"{meta['server_cpu']}; wrk pinned to CPU {meta['client_cpu']}; "
        + (
            f"redis-server {', '.join(redis_versions)} (one per Redis variant, private, no "
            f"persistence) pinned to CPU {meta['redis_cpu']}; "
            if redis_versions
            else "no Redis variant run; "
        )
        + f"{meta['cpu_count']} CPUs",
        f"- Python {meta['python']}; fastapi {v['fastapi']}, starlette {v['starlette']}; "
        f"fastapi_ratelimit {v['fastapi_ratelimit']} ({meta['git']}); slowapi {v['slowapi']} "
        f"(limits {v['limits']}, coredis {v['coredis']}); fastapi-limiter "
        f"{v['fastapi-limiter']} (pyrate-limiter {v['pyrate-limiter']}); redis-py {v['redis']} "
        f"(hiredis {v['hiredis']})",
        "- every limit is ~10^9/minute: nothing is ever denied; `ratio to bare` = the variant's "
        "req/s over the mean of the bare runs just before and just after it, `p99 / bare` the "
        "same for p99 latency (above 1: slower), medians over rounds",
    ]
    for run in runs:
        lines += ["", *traffic_section(run, meta)]
    lines += [
        "",
        "`server CPU`: uvicorn's CPU time / wall time (100% = its core saturated). `Redis "
        "scripts / cmds per req`: script calls (EVAL/EVALSHA) per request / every command the "
        "variant's own redis-server ran during the run, including those run inside scripts and "
        "any background polling, less the benchmark's own `INFO` (`INFO` "
        "`total_commands_processed`; `commandstats` by command in the JSON). `Redis cmds/s "
        "idle`: commands that server ran while its variant was not being measured: background "
        "polling.",
    ]
    flagged = [(r, o) for r in runs for o in r.outcomes if o.flagged]
    if flagged:
        lines += ["", "Flagged (⚠): failed, or wrk counted non-2xx responses or socket errors:"]
        lines += [
            f"- {r.traffic.id} {o.variant.id}: {o.status} {o.note}".rstrip() for r, o in flagged
        ]
    return "\n".join(lines) + "\n"


def traffic_section(run: TrafficRun, meta: dict[str, Any]) -> list[str]:
    traffic, outcomes = run.traffic, run.outcomes
    lines = [
        f"### {traffic.title}",
        "",
        f"{traffic.description}. `{run.meta['wrk_command']}`; {run.meta['elapsed_seconds']:g} s.",
        "",
        "| Variant | What | req/s (median) | min - max | ratio to bare | p99 ms | p99 / bare "
        "| p50 ms | target / earlier | non-2xx | socket err | server CPU "
        "| Redis scripts / cmds per req | Redis cmds/s idle | redis CPU |",
        "|---|---|--:|--:|--:|--:|--:|--:|---|--:|--:|--:|--:|--:|--:|",
    ]
    for o, row in zip(outcomes, summary_rows(outcomes), strict=True):
        name = f"{o.variant.id} ⚠" if o.flagged else o.variant.id
        if not o.samples:
            lines.append(
                f"| {name} | {o.variant.description} | {o.status}: {o.note} | | | | | | "
                f"{goal(o.variant, traffic, None)} | | | | | | |"
            )
            continue
        scripts, cmds = row["redis_scripts_per_request"], row["redis_commands_per_request"]
        redis_calls = "-" if cmds is None else f"{scripts:.2f} / {cmds:.2f}"
        idle = row["redis_idle_commands_per_s"]
        lines.append(
            f"| {name} | {o.variant.description} "
            f"| **{row['requests_per_s_median']:,.0f}** "
            f"| {row['requests_per_s_min']:,.0f} - {row['requests_per_s_max']:,.0f} "
            f"| **{fmt_ratio(row['ratio_to_bare_median'])}** "
            f"| {_ms_text(row['latency_p99_ms'])} "
            f"| **{fmt_ratio(row['p99_ratio_to_bare_median'])}** "
            f"| {_ms_text(row['latency_p50_ms'])} "
            f"| {goal(o.variant, traffic, row['ratio_to_bare_median'])} "
            f"| {row['non_2xx_3xx']} | {row['socket_errors']} "
            f"| {_pct(row['server_cpu'])} | {redis_calls} "
            f"| {'-' if idle is None else f'{idle:.2f}'} "
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
        f"Foreign load (CPU time on the server's or the client's core not accounted to uvicorn, "
        f"wrk or redis-server: interrupts, softirqs, other processes), kept samples: median "
        f"{other_median}, max {other_max}; {retried} measurement(s) repeated because it exceeded "
        f"{_pct(meta['max_foreign'])}; kept although noisy: {', '.join(noisy) or 'none'}. "
        f"Waited {waited:.0f} s in all for the cores to be idle before measuring.",
    ]
    if traffic.production:
        lines += ["", *production_lines(outcomes)]
    targets = target_lines(outcomes)
    if targets:
        lines += ["", *targets]
    return lines


def production_lines(outcomes: Sequence[Outcome]) -> list[str]:
    """What production.lua sent, and which variants told the forwarded clients apart."""
    reports = [s.script_report for o in outcomes for s in o.samples if s.script_report]
    lines = []
    if reports:
        least = {k: min(r[k] for r in reports) for k in ("requests", "ips", "keys", "users")}
        pool = reports[0]
        lines.append(
            f"Every measured wrk run of this traffic made at least {least['requests']:,} "
            f"requests and sent at least {least['ips']:,} of the {pool['ips_pool']:,} client "
            f"IPs, {least['keys']:,} of the {pool['keys_pool']:,} API keys and "
            f"{least['users']:,} of the {pool['users_pool']:,} users."
        )
    verdicts = {True: "yes", False: "**no**", None: "not visible"}
    apart = [
        f"{o.variant.id} {verdicts[o.preflight.get('tells_clients_apart')]}"
        + ("" if o.variant.per_ip else " (not required: one count for all clients)")
        for o in outcomes
        if o.preflight and o.variant.id not in ("bare", "floor")
    ]
    if apart:
        lines.append(
            "Pre-flight, two clients differing only in `X-Forwarded-For` counted apart (a "
            "remaining count, or new Redis keys for the second): " + "; ".join(apart) + "."
        )
    return lines


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
    runs: Sequence[TrafficRun], meta: dict[str, Any], json_path: Path, md_path: Path
) -> str:
    text = markdown(runs, meta)
    document = {
        "meta": meta,
        "runs": [
            {
                "traffic": run.traffic.id,
                "title": run.traffic.title,
                "description": run.traffic.description,
                **run.meta,
                "summary": summary_rows(run.outcomes),
                "variants": [
                    {
                        "id": o.variant.id,
                        "module": f"bench/apps/{o.variant.module}.py",
                        "status": o.status,
                        "note": o.note or None,
                        "preflight": o.preflight,
                        "redis_idle_commands_per_s": o.redis_idle_commands,
                        "samples": [s.__dict__ for s in o.samples],
                    }
                    for o in run.outcomes
                ],
            }
            for run in runs
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
        if variant.id != "bare":
            if args.only:
                if not any(t in variant.id for t in args.only):
                    continue
            elif not (variant.default or args.all):
                continue
        outcome = Outcome(variant)
        missing = [m for m in variant.requires if importlib.util.find_spec(m) is None]
        if missing:
            outcome.status, outcome.note = "skipped", f"not installed: {', '.join(missing)}"
        elif variant.redis and not args.redis_server:
            outcome.status, outcome.note = "skipped", "no redis-server"
        outcomes.append(outcome)
    return outcomes


def run(args: argparse.Namespace, traffic_run: TrafficRun) -> None:
    """Start every variant's server (and each Redis variant's redis-server), pre-flight them
    with this traffic, measure the rounds, stop everything."""
    traffic, outcomes = traffic_run.traffic, traffic_run.outcomes
    traffic_run.meta["redis_version"] = "-"
    active = [o for o in outcomes if o.status == "pending"]
    redis_servers: dict[str, RedisServer] = {}
    idle: dict[str, RedisIdle] = {}
    servers: dict[str, AppServer] = {}
    log_dir = tempfile.mkdtemp(prefix="bench-http-logs-")
    started = time.perf_counter()
    try:
        for o in active:
            env = dict(os.environ)
            redis_server = None
            if o.variant.redis:
                redis_server = RedisServer(args.redis_server, args.redis_cpu)
                redis_servers[o.variant.id] = redis_server
                try:
                    redis_server.start()
                except RuntimeError as exc:
                    o.status, o.note = "failed", f"redis-server: {exc}"
                    log(f"{o.variant.id}: FAILED: {o.note}")
                    continue
                traffic_run.meta["redis_version"] = redis_server.version()
                env["BENCH_REDIS_URL"] = redis_server.url
            server = AppServer(o.variant, args.server_cpu, log_dir, {**env, **dict(o.variant.env)})
            try:
                server.start()
                o.preflight = preflight(server, traffic, redis_server)
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
            where = f" ({redis_server.url})" if redis_server else ""
            log(
                f"{o.variant.id}: uvicorn pid {server.pid} port {server.port}{where}: pre-flight ok"
            )
        bare = next((o for o in outcomes if o.variant.id == "bare"), None)
        if bare is None or bare.status != "ok":
            raise RuntimeError(f"the bare app is not available: {bare.note if bare else ''}")
        running = [o for o in active if o.status == "ok"]
        others = [o for o in running if o is not bare]
        for o in running:
            if o.variant.id in redis_servers:
                idle[o.variant.id] = RedisIdle(redis_servers[o.variant.id])
                idle[o.variant.id].begin()
        every_redis = list(redis_servers.values())
        for r in range(args.rounds):
            # bare runs before and after every variant, and each variant is compared with the
            # mean of its two neighbours: this machine's speed drifts by 30-50% within a
            # minute, so a baseline from the round's two ends (a minute or more apart) was
            # noise. The others rotate.
            shift = r % len(others) if others else 0
            order = [bare]
            for other in [*others[shift:], *others[:shift]]:
                order += [other, bare]
            log(
                f"{traffic.id} round {r + 1}/{args.rounds}: "
                + ", ".join(o.variant.id for o in order)
            )
            for position, o in enumerate(order):
                if o.status != "ok":
                    continue
                server = servers[o.variant.id]
                try:
                    sample = measure(
                        args,
                        traffic,
                        server,
                        redis_servers.get(o.variant.id),
                        every_redis,
                        idle.get(o.variant.id),
                        r,
                        position,
                    )
                except (RuntimeError, ValueError, OSError, subprocess.TimeoutExpired) as exc:
                    if o is bare:
                        raise
                    o.status, o.note = "failed", f"round {r + 1}: {exc}; log: {server.tail(5)}"
                    log(f"  {o.variant.id}: FAILED: {o.note}")
                    continue
                o.samples.append(sample)
                errors = sample.non_2xx_3xx + sum(sample.socket_errors.values())
                log(
                    f"  {o.variant.id:<27} {sample.requests_per_s:>10,.0f} req/s"
                    f"  p99 {_ms_text(sample.latency_ms.get('p99')):>6} ms"
                    f"  cpu {_pct(sample.server_cpu):>4}" + (f"  ERRORS {errors}" if errors else "")
                )
            set_ratios(running, bare, r)
        for o in running:
            rates = idle[o.variant.id].rates() if o.variant.id in idle else None
            if rates is not None:
                o.redis_idle_per_s = rates[0]
                o.redis_idle_commands = {k: round(v, 3) for k, v in rates[1].items()}
            server = servers[o.variant.id]
            if server.process is not None and server.process.poll() is not None:
                o.status, o.note = "failed", f"uvicorn died: {server.tail()}"
    finally:
        for server in servers.values():
            server.stop()
        for redis_server in redis_servers.values():
            redis_server.stop()
        shutil.rmtree(log_dir, ignore_errors=True)
        traffic_run.meta["elapsed_seconds"] = round(time.perf_counter() - started, 1)


def set_ratios(running: Sequence[Outcome], bare: Outcome, round_index: int) -> None:
    """Each sample of the round over the mean of the bare runs on either side of it: req/s
    (``ratio``) and p99 latency (``p99_ratio``). bare's own: over the round's mean (drift)."""
    at = {s.position: s for s in bare.samples if s.round == round_index}
    if not at:
        return
    for o in running:
        for sample in o.samples:
            if sample.round != round_index:
                continue
            if o is bare:
                around = list(at.values())
            else:
                near = (sample.position - 1, sample.position + 1)
                around = [at[p] for p in near if p in at] or list(at.values())
            base = statistics.mean(s.requests_per_s for s in around)
            sample.ratio = sample.requests_per_s / base if base else None
            p99s = [s.latency_ms["p99"] for s in around if "p99" in s.latency_ms]
            p99 = sample.latency_ms.get("p99")
            base_p99 = statistics.mean(p99s) if p99s else 0.0
            sample.p99_ratio = p99 / base_p99 if p99 is not None and base_p99 else None


# -- CLI ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--traffic",
        choices=sorted(TRAFFICS),
        default="both",
        help="production-shaped (production.lua), single peer, or both (production first)",
    )
    parser.add_argument("--seconds", type=int, default=5, help="wrk -d per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 2 s (overrides both); results go to http-quick.*.tmp",
    )
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
    parser.add_argument(
        "--all", action="store_true", help="also the variants left out by default (slowapi ...)"
    )
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/http.json)")
    parser.add_argument("--markdown", type=Path, help="table file (default: bench/results/http.md)")
    parser.add_argument("--wrk", default=shutil.which("wrk"), help="wrk binary")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"), help="binary")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 2
    # A smoke test never replaces the kept results (bench/results/*.tmp is git-ignored).
    stem = "http-quick" if args.quick else "http"
    suffix = ".tmp" if args.quick else ""
    if args.output is None:
        args.output = RESULTS / f"{stem}.json{suffix}"
    if args.markdown is None:
        args.markdown = RESULTS / f"{stem}.md{suffix}"
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
    if not args.redis_server:
        log("redis-server not found on PATH: the Redis variants are skipped")
    packages = (
        "fastapi_ratelimit",
        "fastapi",
        "starlette",
        "uvicorn",
        "uvloop",
        "httptools",
        "slowapi",
        "limits",
        "coredis",
        "fastapi-limiter",
        "pyrate-limiter",
        "redis",
        "hiredis",
    )
    url = f"http://{HOST}:PORT{PATH}"
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "traffic": args.traffic,
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
        "trusted_proxy": TRUSTED_PROXY,
        "production": {
            "script": str(PRODUCTION_SCRIPT.relative_to(BENCH.parent)),
            "seed": PRODUCTION_SEED,
            "ips": PRODUCTION_IPS,
            "api_keys": PRODUCTION_KEYS,
            "users": PRODUCTION_USERS,
        },
        "wrk_version": wrk_version(args.wrk),
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
    runs = []
    for traffic in TRAFFICS[args.traffic]:
        wrk_command = shlex.join(wrk_argv(args, traffic, url, args.seconds))
        traffic_run = TrafficRun(traffic, select(args), {"wrk_command": wrk_command})
        runs.append(traffic_run)
        log(f"-- {traffic.title}: {traffic.description}")
        run(args, traffic_run)
    meta["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    text = write_outputs(runs, meta, args.output, args.markdown)
    print(text)
    log(f"wrote {args.markdown} and {args.output}")
    return 1 if any(o.flagged for r in runs for o in r.outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
