"""Draw the algorithm plots of docs/concepts.md from the real implementation.

Every algorithm gets the same bursty traffic, sent through :class:`MemoryBackend` on a
:class:`FakeClock` (the same code that decides requests in production, and the same maths as
the Redis scripts), and one PNG shows which requests it admitted. Run it after changing an
algorithm and commit the images:

    .venv/bin/python docs/plots.py          # writes docs/img/<algorithm>.png
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: write files only

import matplotlib.pyplot as plt

from fastapi_ratelimit import Algorithm, Check, FakeClock, MemoryBackend, Policy

IMG = Path(__file__).parent / "img"
#: Every algorithm enforces this: 10 requests per 10 seconds (a burst of 10 for the buckets).
RATE = "10/10 seconds"
DURATION = 40.0
#: Width of the bars in the plot, in seconds.
BIN = 1.0


def traffic() -> list[float]:
    """Arrival times (seconds): two bursts around a window boundary, a steady trickle, a burst."""
    arrivals = [9.0 + i * 0.04 for i in range(20)]  # 20 requests just before t=10
    arrivals += [10.2 + i * 0.04 for i in range(20)]  # 20 just after it
    arrivals += [15.0 + i * 0.25 for i in range(60)]  # 4 a second for 15 s
    arrivals += [33.0 + i * 0.02 for i in range(30)]  # a burst of 30
    return sorted(arrivals)


async def admitted(algorithm: Algorithm, arrivals: list[float]) -> list[float]:
    """The arrival times the algorithm admits, decided by the memory backend."""
    clock = FakeClock(start=1_700_000_000.0)  # a multiple of 10: windows start at t=0
    backend = MemoryBackend(clock=clock)
    policy = Policy("demo", RATE, algorithm)
    now, passed = 0.0, []
    for t in arrivals:
        clock.advance(t - now)
        now = t
        verdict = await backend.hit([Check(policy, "ip", "203.0.113.7")])
        if verdict.allowed:
            passed.append(t)
    await backend.aclose()
    return passed


def plot(algorithm: Algorithm, arrivals: list[float], passed: list[float]) -> Path:
    """One figure: offered and admitted requests per second, and the running total admitted."""
    bins = [i * BIN for i in range(int(DURATION / BIN) + 1)]
    fig, ax = plt.subplots(figsize=(8, 3.2), dpi=100)
    ax.hist(arrivals, bins=bins, color="#d0d0d0", label="offered")
    ax.hist(passed, bins=bins, color="#1f77b4", label="admitted")
    ax.set_xlim(0, DURATION)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests per second")
    total = ax.twinx()
    total.step(passed, range(1, len(passed) + 1), where="post", color="#d62728", label="total")
    total.set_ylabel("admitted so far", color="#d62728")
    total.set_ylim(0, 60)
    ax.set_title(f"{algorithm.value}: {RATE}, {len(passed)} of {len(arrivals)} admitted")
    handles = ax.get_legend_handles_labels()[0] + total.get_legend_handles_labels()[0]
    ax.legend(handles, ["offered", "admitted", "admitted so far"], loc="upper left")
    fig.tight_layout()
    path = IMG / f"{algorithm.value}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def main() -> None:
    IMG.mkdir(exist_ok=True)
    arrivals = traffic()
    for algorithm in Algorithm:
        passed = asyncio.run(admitted(algorithm, arrivals))
        print(plot(algorithm, arrivals, passed), len(passed))


if __name__ == "__main__":
    main()
