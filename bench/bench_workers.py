#!/usr/bin/env python
"""Two uvicorn workers against one: does the limiter scale with processes?

The bare app and the five-level Redis app (``bench/apps/app_frl_redis_5.py``), each with 1
and with 2 uvicorn workers, under production-shaped traffic, in interleaved rounds. On a
2-core machine everything shares both cores (servers, wrk and redis-server), so the bare
app's own gain is the ceiling: the target is that the limited app gains as much, at least
1.6x where the bare app does. Admission across workers is exact: see
``tests/test_workers.py``.

    python bench/bench_workers.py                 # 3 rounds x 5 s
    python bench/bench_workers.py --rounds 1 --seconds 2

Writes ``bench/results/workers.md``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_http as bh

CPUS = "0,1"
VARIANTS = (
    bh.Variant("bare, 1 worker", "app_bare", "", workers=1),
    bh.Variant("bare, 2 workers", "app_bare", "", workers=2),
    bh.Variant("frl-redis-5, 1 worker", "app_frl_redis_5", "", redis=True, workers=1),
    bh.Variant("frl-redis-5, 2 workers", "app_frl_redis_5", "", redis=True, workers=2),
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--wrk", default="wrk")
    parser.add_argument("--redis-server", default="redis-server")
    parser.add_argument("--markdown", default=str(bh.RESULTS / "workers.md"))
    args = parser.parse_args()
    # bench_http's wrk_argv reads these; here nothing is pinned to one core.
    wrk_args = argparse.Namespace(wrk=args.wrk, threads=1, connections=64, client_cpu=CPUS)

    results: dict[str, list[tuple[float, float]]] = {v.id: [] for v in VARIANTS}
    with bh.serving(VARIANTS, CPUS, args.redis_server, CPUS) as servers:
        for app, _ in servers.values():
            bh.run_wrk(wrk_args, bh.PRODUCTION, app.url, 1)  # warm-up: every worker started
        for round_no in range(1, args.rounds + 1):
            for v in VARIANTS:
                app, _ = servers[v.id]
                result = bh.run_wrk(wrk_args, bh.PRODUCTION, app.url, args.seconds)
                rps, p99 = result["requests_per_s"], result["latency_ms"]["p99"]
                results[v.id].append((rps, p99))
                bh.log(f"round {round_no} {v.id}: {rps:,.0f} req/s, p99 {p99:.1f} ms")
                time.sleep(0.5)

    def median(vid: str, i: int) -> float:
        return statistics.median(sample[i] for sample in results[vid])

    lines = [
        "## Workers (`python bench/bench_workers.py`)",
        "",
        f"{args.rounds} round(s) x {args.seconds} s, medians; production-shaped traffic, "
        "`wrk -t1 -c64`; servers, wrk and each Redis share both cores.",
        "",
        "| variant | req/s | p99 ms | 2 workers / 1 |",
        "|---|--:|--:|--:|",
    ]
    for v in VARIANTS:
        gain = ""
        if v.workers == 2:
            one = v.id.replace("2 workers", "1 worker")
            gain = f"{median(v.id, 0) / median(one, 0):.2f}"
        lines.append(f"| {v.id} | {median(v.id, 0):,.0f} | {median(v.id, 1):.1f} | {gain} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.markdown).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
