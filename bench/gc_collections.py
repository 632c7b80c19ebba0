#!/usr/bin/env python
"""How often the garbage collector runs in a served app, on production-shaped traffic.

    python bench/gc_collections.py app_bare app_frl_redis_5 app_fastapi_limiter_redis
    python bench/gc_collections.py --rounds 3 --seconds 6 app_frl_redis_5

Each app (a module of ``bench/apps``) is served as ``bench_http.py`` serves it (uvicorn, one
worker, uvloop, httptools, pinned to cpu0; wrk with ``production.lua`` and any redis-server on
cpu1), wrapped by ``bench/apps/gc_probe.py``, which counts the collector's runs from
``gc.callbacks``. After a warm-up, one measured wrk run; then the runs per 10,000 requests by
generation, the longest full collection, and wrk's throughput and p99. Apps are interleaved,
round after round.

Why it matters: the p99 of an app that waits on Redis is mostly full collections (tens of
milliseconds each, all requests in flight held), and how often they come depends on how many
objects each request holds while it waits (``docs/contributing.md``, "Tail latency"). Counts
vary less than p99 from run to run, so they show a change to what a request holds where p99
is lost in the noise.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from bench_http import PRODUCTION, run_wrk
from runner import HOST, AppServer, RedisServer, log


@dataclass(frozen=True)
class _Probe:
    """What :class:`runner.AppServer` needs of a variant."""

    id: str
    module: str = "gc_probe"
    workers: int = 1


def _stats(port: int, reset: bool = False) -> dict[str, Any]:
    query = "?reset=1" if reset else ""
    with urllib.request.urlopen(f"http://{HOST}:{port}/__gc__{query}", timeout=10) as answer:
        return dict(json.load(answer))


def measure(app: str, args: argparse.Namespace, log_dir: str) -> dict[str, Any]:
    """One warm-up and one measured wrk run of ``app``; the collector's runs during the latter."""
    redis = RedisServer(args.redis_server, cpu=args.client_cpu) if "redis" in app else None
    env = {**os.environ, "GC_PROBE_APP": app}
    server = AppServer(_Probe(app), args.server_cpu, log_dir, env)
    try:
        if redis is not None:
            redis.start()
            env["BENCH_REDIS_URL"] = redis.url
        server.start()
        run_wrk(args, PRODUCTION, server.url, args.warmup)
        _stats(server.port, reset=True)
        result = run_wrk(args, PRODUCTION, server.url, args.seconds)
        counted = _stats(server.port)
    finally:
        server.stop()
        if redis is not None:
            redis.stop()
    per = 10_000 / result["requests"]
    return {
        "rps": result["requests_per_s"],
        "p99_ms": result["latency_ms"]["p99"],
        "per_10k": [round(n * per, 1) for n in counted["runs"]],
        "longest_full_ms": counted["longest_ms"][2],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("apps", nargs="+", help="modules of bench/apps, e.g. app_frl_redis_5")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=6, help="measured wrk run")
    parser.add_argument("--warmup", type=int, default=2, help="wrk seconds before it")
    parser.add_argument("--connections", type=int, default=32, help="wrk -c")
    parser.add_argument("--threads", type=int, default=1, help="wrk -t")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1, help="wrk and redis-server")
    parser.add_argument("--wrk", default=shutil.which("wrk"))
    parser.add_argument("--redis-server", default=shutil.which("redis-server"))
    args = parser.parse_args()
    if args.wrk is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    samples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="bench-gc-") as log_dir:
        for round_ in range(1, args.rounds + 1):
            for app in args.apps:
                sample = measure(app, args, log_dir)
                log(f"round {round_} {app}: {sample}")
                samples[app].append(sample)
    print(
        f"{args.rounds} round(s), wrk -c{args.connections} for {args.seconds} s after "
        f"{args.warmup} s, production-shaped traffic; medians.\n"
    )
    print(
        "| app | req/s | p99 ms | collections per 10,000 requests: young / middle / full "
        "| longest full ms |"
    )
    print("|---|--:|--:|--:|--:|")
    for app, runs in samples.items():
        generations = " / ".join(
            f"{statistics.median(s['per_10k'][g] for s in runs):.1f}" for g in range(3)
        )
        print(
            f"| {app} | {statistics.median(s['rps'] for s in runs):,.0f} "
            f"| {statistics.median(s['p99_ms'] for s in runs):.1f} | {generations} "
            f"| {statistics.median(s['longest_full_ms'] for s in runs):.1f} |"
        )


if __name__ == "__main__":
    main()
