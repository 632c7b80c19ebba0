#!/usr/bin/env python
"""A flood from clients that are over their limit: what each 429 costs.

The five-level Redis app (``bench/apps/app_frl_redis_5.py``) with its IP level lowered to
``5/minute``, under production-shaped traffic from only 200 client IPs: after the first
thousand requests every request is a 429. Measured with the denial cache on (the default)
and off (``denial_cache=0``), beside the bare app answering 200s, in interleaved rounds:

    python bench/bench_flood.py                  # 3 rounds x 5 s
    python bench/bench_flood.py --rounds 1 --seconds 2

Reports req/s, p99, the share of 429s, and Redis commands per request (everything the
variant's own redis-server ran, scripts' inner commands included, less the benchmark's
``INFO``). Targets: with the cache, fewer than 0.05 Redis commands per denied request, and
429s at least as fast as the bare app's 200s. Writes ``bench/results/flood.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_http as bh

IPS = 200  # clients, each soon over 5/minute


VARIANTS = (
    bh.Variant("bare", "app_bare", ""),
    bh.Variant(
        "frl-redis-5, denial cache",
        "app_frl_redis_5",
        "",
        redis=True,
        env=(("BENCH_IP_LIMIT", "5/minute"),),
    ),
    bh.Variant(
        "frl-redis-5, no denial cache",
        "app_frl_redis_5",
        "",
        redis=True,
        env=(("BENCH_IP_LIMIT", "5/minute"), ("BENCH_DENIAL_CACHE", "0")),
    ),
)


def flood_argv(args: argparse.Namespace, url: str, seconds: int) -> list[str]:
    argv = [args.wrk, "-t1", "-c32", f"-d{seconds}s", "--latency", "-s"]
    argv += [str(bh.PRODUCTION_SCRIPT), url, "--", "1", str(IPS), "1000", "5000"]
    return bh.pinned(args.client_cpu, argv)


def run_wrk(args: argparse.Namespace, url: str, seconds: int) -> dict[str, float]:
    done = bh.subprocess.run(
        flood_argv(args, url, seconds), capture_output=True, text=True, check=True
    )
    parsed = bh.parse_wrk(done.stdout)
    return {
        "rps": parsed["requests_per_s"],
        "p99": parsed["latency_ms"]["p99"],
        "requests": parsed["requests"],
        "non_2xx": parsed["non_2xx_3xx"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--wrk", default="wrk")
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--markdown", default=str(bh.RESULTS / "flood.md"))
    args = parser.parse_args()

    results: dict[str, list[dict[str, float]]] = {v.id: [] for v in VARIANTS}
    with bh.serving(VARIANTS, args.server_cpu, args.redis_server, args.client_cpu) as servers:
        for app, _ in servers.values():
            run_wrk(args, app.url, 2)  # warm-up: every client goes over its limit
        for round_no in range(1, args.rounds + 1):
            for v in VARIANTS:
                app, redis_server = servers[v.id]
                before = redis_server.stats().total if redis_server else 0
                sample = run_wrk(args, app.url, args.seconds)
                after = redis_server.stats().total if redis_server else 0
                sample["redis_per_request"] = (after - before) / max(sample["requests"], 1)
                results[v.id].append(sample)
                bh.log(
                    f"round {round_no} {v.id}: {sample['rps']:,.0f} req/s, p99 "
                    f"{sample['p99']:.1f} ms, {sample['non_2xx']:,.0f} of "
                    f"{sample['requests']:,.0f} non-2xx, "
                    f"{sample['redis_per_request']:.3f} Redis commands per request"
                )
                time.sleep(0.5)

    bare = statistics.median(s["rps"] for s in results["bare"])
    lines = [
        "## Denial flood (`python bench/bench_flood.py`)",
        "",
        f"{args.rounds} round(s) x {args.seconds} s, medians; production-shaped traffic from "
        f"{IPS} client IPs, each over its `5/minute` IP level after a 2 s warm-up, so the "
        "limited variants answer 429; the bare app answers 200.",
        "",
        "| variant | req/s | / bare 200s | p99 ms | 429 share | Redis cmds per request |",
        "|---|--:|--:|--:|--:|--:|",
    ]
    for v in VARIANTS:
        samples = results[v.id]
        rps = statistics.median(s["rps"] for s in samples)
        p99 = statistics.median(s["p99"] for s in samples)
        share = statistics.median(s["non_2xx"] / max(s["requests"], 1) for s in samples)
        per = statistics.median(s["redis_per_request"] for s in samples)
        redis_col = f"{per:.3f}" if v.redis else "-"
        lines.append(
            f"| {v.id} | {rps:,.0f} | {rps / bare:.2f} | {p99:.1f} | {share:.0%} | {redis_col} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
