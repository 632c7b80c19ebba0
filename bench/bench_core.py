#!/usr/bin/env python
"""Core throughput benchmark: rate-limit *checks per second*.

Measures ``fastapi_ratelimit`` (memory and Redis backends, all five algorithms, one and five
levels) and, in the same run against the same private ``redis-server``, the ``limits``
library's async API (what slowapi builds on). See ``bench/README.md``.

    python bench/bench_core.py                 # 3 rounds x 3 s per measurement
    python bench/bench_core.py --quick         # 1 round x 1 s, a smoke test

Prints a Markdown table on stdout (progress goes to stderr) and writes
``bench/results/core.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import importlib.util
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal

import limits
import redis
import redis.asyncio
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter, RateLimiter
from runner import HOST, RedisServer, log

from fastapi_ratelimit import Algorithm, Check, MemoryBackend, Policy, RedisBackend

RESULTS = Path(__file__).resolve().parent / "results" / "core.json"

#: Rate of every level for every algorithm but the sliding window log: never reached, and
#: within what GCRA keeps exactly (an interval of 12 us; policy.py refuses under 10).
HIGH_RATE = "300000000/hour"
#: Sliding window log stores one entry per request, so its rate is chosen to keep lists short:
#: per-identity levels use SWL_RATE over SWL_POOL_FACTOR times more identities, and the global
#: level (one key for every request) a one-second window.
SWL_RATE = "100000/minute"
SWL_GLOBAL_RATE = "100000/second"
SWL_POOL_FACTOR = 10
#: Distinct endpoints for the endpoint level (a much smaller pool than IPs, as in real traffic).
ENDPOINTS = 50
#: What limits is asked for (a single item: its key differs per level through the identifiers).
LIMITS_RATE = "1000000000/hour"
LEVEL_SCOPES = ("global", "ip", "endpoint", "api_key", "user")

#: One check: gets a running counter (to rotate identities), returns whether it was allowed.
Op = Callable[[int], Awaitable[bool]]


# -- event loop ------------------------------------------------------------------------------


def loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    """uvloop when it is installed, else the default asyncio loop."""
    if importlib.util.find_spec("uvloop") is None:
        return None, "asyncio (uvloop not installed)"
    uvloop: Any = importlib.import_module("uvloop")  # optional: not a declared dependency
    return uvloop.new_event_loop, f"uvloop {importlib.metadata.version('uvloop')}"


# -- workload ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Identities:
    """Pools of identities; request ``i`` uses entry ``i % size`` of each."""

    ips: list[str]
    endpoints: list[str]
    api_keys: list[str]
    users: list[str]

    @classmethod
    def make(cls, size: int) -> Identities:
        n = size
        return cls(
            ips=[f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}" for i in range(n)],
            endpoints=[f"GET /api/v1/resource{i}" for i in range(ENDPOINTS)],
            # Different strides so the five levels do not move in lock-step.
            api_keys=[f"sk_live_{(i * 7 + 3) % n:024x}" for i in range(n)],
            users=[f"user-{(i * 13 + 5) % n}" for i in range(n)],
        )

    @property
    def size(self) -> int:
        return len(self.ips)

    def row(self, i: int) -> tuple[str, str, str, str, str]:
        """(global, ip, endpoint, api key, user) identities of request ``i``."""
        return (
            "",
            self.ips[i],
            self.endpoints[i % len(self.endpoints)],
            self.api_keys[i],
            self.users[i],
        )


def policies_for(algorithm: Algorithm) -> list[Policy]:
    """One policy per level, in LEVEL_SCOPES order."""
    if algorithm is Algorithm.SLIDING_WINDOW_LOG:
        rates = [SWL_GLOBAL_RATE] + [SWL_RATE] * 4
    else:
        rates = [HIGH_RATE] * 5
    return [Policy(scope, rate, algorithm) for scope, rate in zip(LEVEL_SCOPES, rates, strict=True)]


def check_pool(algorithm: Algorithm, levels: int, ids: Identities) -> list[list[Check]]:
    """Pre-built ``Check`` lists, so the benchmark times the backend, not the caller."""
    policies = policies_for(algorithm)
    pool: list[list[Check]] = []
    for i in range(ids.size):
        row = ids.row(i)
        if levels == 1:
            pool.append([Check(policies[1], "ip", row[1])])
        else:
            pool.append(
                [
                    Check(p, scope, ident)
                    for p, scope, ident in zip(policies, LEVEL_SCOPES, row, strict=True)
                ]
            )
    return pool


def frl_op(backend: MemoryBackend | RedisBackend, pool: list[list[Check]]) -> Op:
    size = len(pool)
    hit = backend.hit

    async def op(i: int) -> bool:
        return (await hit(pool[i % size])).allowed

    return op


def limits_op(limiter: RateLimiter, levels: int, ids: Identities) -> Op:
    item = limits.parse(LIMITS_RATE)
    size = ids.size
    hit = limiter.hit
    if levels == 1:
        ips = ids.ips

        async def one(i: int) -> bool:
            return await hit(item, "ip", ips[i % size])

        return one
    rows = [list(zip(LEVEL_SCOPES, ids.row(i), strict=True)) for i in range(size)]

    async def five(i: int) -> bool:
        # How slowapi applies several limits: one call per limit, one after another.
        allowed = True
        for scope, ident in rows[i % size]:
            allowed = await hit(item, scope, ident) and allowed
        return allowed

    return five


# -- measurement ------------------------------------------------------------------------------


@dataclass
class Sample:
    checks_per_s: float
    denied: float
    errors: int
    client_cpu: float
    redis_cpu: float | None


@dataclass
class Case:
    id: str
    library: str
    backend: str
    algorithm: str
    levels: int
    tasks: int
    op: Op = field(repr=False)
    uses_redis: bool
    samples: list[Sample] = field(default_factory=list)
    first_error: str = ""

    @property
    def median(self) -> float:
        return statistics.median(s.checks_per_s for s in self.samples)


@dataclass
class Counts:
    done: int = 0
    denied: int = 0
    errors: int = 0
    first_error: str = ""


async def drive(op: Op, tasks: int, seconds: float, counter: Iterator[int]) -> Counts:
    """Run ``tasks`` loops of ``op`` for ``seconds``; count the checks completed in time."""
    counts = Counts()
    clock = time.perf_counter
    deadline = clock() + seconds

    async def worker() -> None:
        while True:
            try:
                allowed = await op(next(counter))
            except Exception as exc:  # counted and reported, never as a completed check
                if clock() >= deadline:
                    return
                counts.errors += 1
                if not counts.first_error:
                    counts.first_error = f"{type(exc).__name__}: {exc}"[:300]
                continue
            if clock() >= deadline:
                return
            counts.done += 1
            if not allowed:
                counts.denied += 1

    if tasks == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(tasks)))
    return counts


async def redis_cpu_seconds(monitor: redis.asyncio.Redis) -> float:
    info = await monitor.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def measure(
    case: Case, seconds: float, warmup: float, counter: Iterator[int], monitor: redis.asyncio.Redis
) -> Sample:
    await drive(case.op, case.tasks, warmup, counter)
    server_before = await redis_cpu_seconds(monitor) if case.uses_redis else 0.0
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    counts = await drive(case.op, case.tasks, seconds, counter)
    cpu_after, wall_after = time.process_time(), time.perf_counter()
    server_after = await redis_cpu_seconds(monitor) if case.uses_redis else 0.0
    wall = wall_after - wall_before  # includes the tail of calls in flight at the deadline
    if counts.first_error and not case.first_error:
        case.first_error = counts.first_error
    return Sample(
        checks_per_s=counts.done / seconds,
        denied=counts.denied / counts.done if counts.done else 0.0,
        errors=counts.errors,
        client_cpu=(cpu_after - cpu_before) / wall,
        redis_cpu=(server_after - server_before) / wall if case.uses_redis else None,
    )


# -- the run ---------------------------------------------------------------------------------


async def close_limits_storage(storage: RedisStorage) -> None:
    client: Any = getattr(storage.bridge, "storage", None)  # set by the bridge's use_basic()
    aclose = getattr(client, "aclose", None)
    if aclose is not None:  # redis-py
        await aclose()
        return
    pool = getattr(client, "connection_pool", None)  # coredis
    if pool is not None:
        result = pool.disconnect()
        if asyncio.iscoroutine(result):
            await result


async def run(args: argparse.Namespace, server: RedisServer) -> dict[str, Any]:
    ids = Identities.make(args.identities)
    swl_ids = Identities.make(args.identities * SWL_POOL_FACTOR)
    n = args.concurrency
    cases: list[Case] = []

    memory_backends: list[MemoryBackend] = []
    for algorithm in Algorithm:
        pool_ids = swl_ids if algorithm is Algorithm.SLIDING_WINDOW_LOG else ids
        for levels in (1, 5):
            backend = MemoryBackend(max_keys=1_000_000)
            memory_backends.append(backend)
            cases.append(
                Case(
                    f"frl-memory-{algorithm.value}-{levels}",
                    "fastapi_ratelimit",
                    "memory",
                    algorithm.value,
                    levels,
                    1,
                    frl_op(backend, check_pool(algorithm, levels, pool_ids)),
                    uses_redis=False,
                )
            )

    redis_backend = RedisBackend.from_url(server.url)
    for algorithm in Algorithm:
        pool_ids = swl_ids if algorithm is Algorithm.SLIDING_WINDOW_LOG else ids
        for levels in (1, 5):
            cases.append(
                Case(
                    f"frl-redis-{algorithm.value}-{levels}",
                    "fastapi_ratelimit",
                    "redis",
                    algorithm.value,
                    levels,
                    n,
                    frl_op(redis_backend, check_pool(algorithm, levels, pool_ids)),
                    uses_redis=True,
                )
            )

    limits_uri = f"async+redis://{HOST}:{server.port}"
    implementations: list[Literal["coredis", "redispy"]] = ["coredis"]
    if not args.no_redispy:
        implementations.append("redispy")
    storages: list[RedisStorage] = []
    for impl in implementations:
        strategies: list[tuple[str, type[RateLimiter]]] = [("fixed_window", FixedWindowRateLimiter)]
        if impl == "coredis":  # limits' default implementation: measure both strategies
            strategies.append(("moving_window", MovingWindowRateLimiter))
        for name, strategy in strategies:
            # One storage (client, pool) per strategy and its own key prefix: the fixed window
            # keeps a counter where the moving window keeps a list under the same item key.
            storage = RedisStorage(
                limits_uri, implementation=impl, key_prefix=f"LIMITS-{impl}-{name}"
            )
            storages.append(storage)
            limiter = strategy(storage)
            for levels in (1, 5):
                cases.append(
                    Case(
                        f"limits-{impl}-{name}-{levels}",
                        f"limits ({impl})" + (" x5" if levels == 5 else ""),
                        "redis",
                        name,
                        levels,
                        n,
                        limits_op(limiter, levels, ids),
                        uses_redis=True,
                    )
                )

    if args.only:
        cases = [c for c in cases if any(part in c.id for part in args.only)]
        if not cases:
            raise SystemExit(f"--only {args.only} matches no case")

    monitor = redis.asyncio.Redis(host=HOST, port=server.port)
    counter = itertools.count()
    started = time.perf_counter()
    try:
        for r in range(args.rounds):
            # Rotate the order every round, so no case always runs first or last.
            shift = (r * len(cases)) // args.rounds
            for index, case in enumerate(cases[shift:] + cases[:shift], 1):
                sample = await measure(case, args.seconds, args.warmup, counter, monitor)
                case.samples.append(sample)
                log(
                    f"round {r + 1}/{args.rounds} [{index:2}/{len(cases)}] {case.id:<42} "
                    f"{sample.checks_per_s:>10,.0f} checks/s"
                    + (f"  ({sample.errors} errors)" if sample.errors else "")
                )
        server_info = await monitor.info("server")
        memory_info = await monitor.info("memory")
        dbsize = await monitor.dbsize()
    finally:
        await monitor.aclose()
        await redis_backend.aclose()
        for storage in storages:
            await close_limits_storage(storage)
        for backend in memory_backends:
            await backend.aclose()
    return {
        "cases": cases,
        "elapsed": time.perf_counter() - started,
        "redis_version": server_info.get("redis_version", "?"),
        "redis_used_memory": memory_info.get("used_memory_human", "?"),
        "redis_keys": dbsize,
    }


# -- reporting ---------------------------------------------------------------------------------


def fmt_rate(value: float) -> str:
    return f"{value:,.0f}"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def markdown(cases: Sequence[Case], meta: dict[str, Any]) -> str:
    lines = [
        f"## Rate-limit checks per second ({meta['rounds']} rounds x {meta['seconds']:g} s, "
        f"median)",
        "",
        f"- event loop: {meta['event_loop']}; Python {meta['python']}; "
        f"redis-server {meta['redis_version']} (private, port {meta['redis_port']}); "
        f"redis-py {meta['versions']['redis']} (hiredis: {meta['hiredis']}); "
        f"limits {meta['versions']['limits']}; coredis {meta['versions']['coredis']}",
        f"- {meta['cpu_count']} CPUs shared by the client process and redis-server; "
        f"Redis cases run {meta['concurrency']} concurrent tasks on one event loop, memory "
        "cases one task awaiting sequentially",
        f"- identities: {meta['identities']} per level ({meta['identities'] * SWL_POOL_FACTOR} "
        f"for the sliding window log), {ENDPOINTS} endpoints; rate {HIGH_RATE} "
        f"(sliding window log: {SWL_RATE}, global level {SWL_GLOBAL_RATE}; limits: {LIMITS_RATE})",
        "",
        "| Library | Backend | Algorithm | Levels | Tasks | checks/s (median) | min - max "
        "| denied | errors | client CPU | redis CPU |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for c in cases:
        rates = [s.checks_per_s for s in c.samples]
        redis_cpu = [s.redis_cpu for s in c.samples if s.redis_cpu is not None]
        lines.append(
            f"| {c.library} | {c.backend} | {c.algorithm} | {c.levels} | {c.tasks} "
            f"| **{fmt_rate(c.median)}** | {fmt_rate(min(rates))} - {fmt_rate(max(rates))} "
            f"| {fmt_pct(statistics.median(s.denied for s in c.samples))} "
            f"| {sum(s.errors for s in c.samples)} "
            f"| {fmt_pct(statistics.median(s.client_cpu for s in c.samples))} "
            f"| {fmt_pct(statistics.median(redis_cpu) if redis_cpu else None)} |"
        )
    comparison = compare(cases)
    if comparison:
        lines += ["", comparison["text"]]
    errors = [f"- {c.id}: {c.first_error}" for c in cases if c.first_error]
    if errors:
        lines += ["", "First error per case:", *errors]
    return "\n".join(lines)


#: (case id, label) of the limits rows that fastapi_ratelimit's 5-level Redis check is held to.
REFERENCES = (
    ("limits-coredis-fixed_window-1", "limits coredis FW, 1 level"),
    ("limits-redispy-fixed_window-1", "limits redispy FW, 1 level"),
    ("limits-coredis-fixed_window-5", "limits coredis FW x5"),
)


def compare(cases: Sequence[Case]) -> dict[str, Any]:
    """fastapi_ratelimit 5-level Redis checks/s against limits' fixed window (1 level, x5)."""
    by_id = {c.id: c for c in cases}
    refs = [
        (ref_id, label, by_id[ref_id].median) for ref_id, label in REFERENCES if ref_id in by_id
    ]
    frl = [
        (a.value, by_id[f"frl-redis-{a.value}-5"])
        for a in Algorithm
        if f"frl-redis-{a.value}-5" in by_id
    ]
    if not refs or not frl:
        return {}
    head = " | ".join(f"{label} ({fmt_rate(base)}/s)" for _, label, base in refs)
    text = [
        "fastapi_ratelimit Redis, 5 levels in one atomic call, as a multiple of limits "
        "(>= 1.00 means at least as many checks/s):",
        "",
        f"| Algorithm (5 levels) | checks/s | {head} |",
        "|---|--:|" + "--:|" * len(refs),
    ]
    rows: dict[str, Any] = {}
    for name, case in frl:
        ratios = {ref_id: case.median / base if base else float("inf") for ref_id, _, base in refs}
        rows[name] = {
            "checks_per_s": case.median,
            "ratio": ratios,
            "ge": {ref_id: r >= 1 for ref_id, r in ratios.items()},
        }
        cells = " | ".join(f"{r:.2f}x {'>=' if r >= 1 else '<'}" for r in ratios.values())
        text.append(f"| {name} | {fmt_rate(case.median)} | {cells} |")
    return {
        "references": {ref_id: base for ref_id, _, base in refs},
        "rows": rows,
        "text": "\n".join(text),
    }


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def write_json(path: Path, cases: Sequence[Case], meta: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    comparison = compare(cases)
    comparison.pop("text", None)
    document = {
        "meta": meta,
        "results": [
            {
                "id": c.id,
                "library": c.library,
                "backend": c.backend,
                "algorithm": c.algorithm,
                "levels": c.levels,
                "tasks": c.tasks,
                "checks_per_s_median": round(c.median, 1),
                "samples": [
                    {
                        "checks_per_s": round(s.checks_per_s, 1),
                        "denied_fraction": round(s.denied, 6),
                        "errors": s.errors,
                        "client_cpu": round(s.client_cpu, 3),
                        "redis_cpu": None if s.redis_cpu is None else round(s.redis_cpu, 3),
                    }
                    for s in c.samples
                ],
                "first_error": c.first_error or None,
            }
            for c in cases
        ],
        "comparison": comparison,
    }
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)


# -- CLI ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=3.0, help="measured time per case")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--concurrency", type=int, default=32, help="asyncio tasks for Redis")
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s (overrides both)")
    parser.add_argument("--warmup", type=float, default=0.3, help="warm-up seconds per case")
    parser.add_argument("--identities", type=int, default=1000, help="identities per level")
    parser.add_argument(
        "--no-redispy", action="store_true", help="skip limits with implementation='redispy'"
    )
    parser.add_argument(
        "--only", nargs="+", metavar="TEXT", help="run only cases whose id contains TEXT"
    )
    parser.add_argument("--output", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--redis-server", default=shutil.which("redis-server"), help="binary")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.seconds = 1, 1.0
    if args.seconds <= 0 or args.rounds < 1 or args.concurrency < 1 or args.identities < 1:
        parser.error("--seconds, --rounds, --concurrency and --identities must be positive")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if not args.redis_server:
        parser.error("redis-server not found on PATH (or give --redis-server)")
    return args


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through `finally`: the redis-server is stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    factory, loop_name = loop_factory()
    log(f"event loop: {loop_name}; starting a private redis-server ...")
    with RedisServer(args.redis_server) as server:
        log(f"redis-server on {HOST}:{server.port} (dir {server.dir})")
        with asyncio.Runner(loop_factory=factory) as runner:
            outcome = runner.run(run(args, server))
    cases: list[Case] = outcome["cases"]
    meta: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seconds": args.seconds,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "concurrency": args.concurrency,
        "identities": args.identities,
        "event_loop": loop_name,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "hiredis": version("hiredis") != "not installed",
        "redis_version": outcome["redis_version"],
        "redis_port": server.port,
        "redis_used_memory_at_end": outcome["redis_used_memory"],
        "redis_keys_at_end": outcome["redis_keys"],
        "elapsed_seconds": round(outcome["elapsed"], 1),
        "versions": {
            p: version(p) for p in ("fastapi_ratelimit", "redis", "limits", "coredis", "hiredis")
        },
        "workload": {
            "rate": HIGH_RATE,
            "sliding_window_log_rate": SWL_RATE,
            "sliding_window_log_global_rate": SWL_GLOBAL_RATE,
            "sliding_window_log_identities": args.identities * SWL_POOL_FACTOR,
            "endpoints": ENDPOINTS,
            "limits_rate": LIMITS_RATE,
            "levels": list(LEVEL_SCOPES),
        },
    }
    print(markdown(cases, meta))
    write_json(args.output, cases, meta)
    log(f"\nwrote {args.output} ({outcome['elapsed']:.0f} s of measurements)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
