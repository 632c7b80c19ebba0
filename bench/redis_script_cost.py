#!/usr/bin/env python
"""What the library's one Lua script costs the Redis server per request.

    python bench/redis_script_cost.py                   # this checkout's script
    python bench/redis_script_cost.py --against 023ad56 # and that revision's, interleaved

A Redis server runs one script call per request, for every app process that shares it, so the
server's CPU time per call sets how much traffic one Redis can take (one core: at 50 us a
call, 20,000 requests a second, whatever the app servers can do). This measures that time the
way Redis itself accounts it: ``INFO commandstats``, ``usec_per_call`` of ``EVALSHA`` (the
script and every command it runs; not the network reads and writes, which a change to the
script does not touch). It also counts the commands run per call.

Every algorithm at 1 level (IP) and 5 levels (global, IP, endpoint, API key, user), over
``bench_core.py``'s production-sized identity pools (10,000 each, 50 endpoints), with this
checkout's keys and script argument (``RedisBackend``'s own). Each case first fills the
keyspace with one pass over the pool, then measures a second pass: most requests find their
keys, as in steady traffic. With ``--against``, the script as that revision's package builds it
(taken with ``git archive``; it must read this checkout's argument and give its reply) runs
beside this one on the same server, case by case, each going first in every other round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis.asyncio
from bench_core import Identities, check_pool
from runner import HOST, RedisServer, log

from fastapi_ratelimit import Algorithm, Check, RedisBackend
from fastapi_ratelimit.backends._scripts import multi_level_script

ROOT = Path(__file__).resolve().parent.parent
#: Calls in flight at once, as the multiplexed connection batches them under load.
BATCH = 32


def revision_script(revision: str) -> str:
    """The script as ``revision`` assembled it: its package, extracted and asked."""
    with tempfile.TemporaryDirectory() as tmp:
        archive = subprocess.run(
            ["git", "archive", revision, "fastapi_ratelimit"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        code = (
            "from fastapi_ratelimit.backends import _scripts; print(_scripts.multi_level_script())"
        )
        return subprocess.run(
            [sys.executable, "-c", code], cwd=tmp, check=True, capture_output=True, text=True
        ).stdout.removesuffix("\n")


async def one_pass(
    client: redis.asyncio.Redis, sha: str, backend: RedisBackend, pool: Sequence[list[Check]]
) -> None:
    for start in range(0, len(pool), BATCH):
        pipe = client.pipeline(transaction=False)
        for checks in pool[start : start + BATCH]:
            keys = backend._keys_of(checks)
            pipe.evalsha(sha, len(keys), *keys, backend._arg("h", checks))
        for reply in await pipe.execute():
            # Four numbers a level, the first whether it admitted: every level must.
            if any(allowed != b"1" for allowed in reply.split()[::4]):
                raise SystemExit(f"a call was refused ({reply[:40]!r}): limits must not be hit")


async def measure(
    client: redis.asyncio.Redis, sha: str, backend: RedisBackend, pool: Sequence[list[Check]]
) -> tuple[float, float]:
    """Redis's microseconds per script call, and commands per call, over a pass of ``pool``."""
    await client.flushdb()
    await one_pass(client, sha, backend, pool)  # every key written once
    await client.config_resetstat()
    await one_pass(client, sha, backend, pool)
    stats: dict[str, Any] = await client.info("commandstats")
    script = stats["cmdstat_evalsha"]
    commands = sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")
    return float(script["usec_per_call"]), commands / int(script["calls"])


async def run(args: argparse.Namespace, server: RedisServer) -> list[dict[str, Any]]:
    client = redis.asyncio.Redis(host=HOST, port=server.port)
    backend = RedisBackend(client)
    scripts = {"this checkout": multi_level_script()}
    if args.against:
        scripts[args.against] = revision_script(args.against)
    shas = {name: await client.script_load(text) for name, text in scripts.items()}
    ids = Identities.make(args.identities)
    rows: list[dict[str, Any]] = []
    for algorithm in Algorithm:
        for levels in (1, 5):
            pool = check_pool(algorithm, levels, ids)
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in scripts}
            for round_ in range(args.rounds):
                # Each script goes first in every other round: drift favours neither.
                order = list(shas.items()) if round_ % 2 == 0 else list(shas.items())[::-1]
                for name, sha in order:
                    samples[name].append(await measure(client, sha, backend, pool))
            for name, got in samples.items():
                row = {
                    "script": name,
                    "algorithm": algorithm.value,
                    "levels": levels,
                    "usec_per_call": statistics.median(s[0] for s in got),
                    "commands_per_call": statistics.median(s[1] for s in got),
                }
                rows.append(row)
                log(f"{name}: {algorithm.value} x{levels}: {row['usec_per_call']:.1f} us")
    await client.aclose()
    return rows


def markdown(rows: Sequence[dict[str, Any]], args: argparse.Namespace, version: str) -> str:
    names = list(dict.fromkeys(row["script"] for row in rows))
    command = shlex.join(["python", "bench/redis_script_cost.py", *args.argv])
    lines = [
        "## Redis CPU per request: the script's cost on the server",
        "",
        f"- command: `{command}`; redis-server {version}; {args.rounds} rounds, median; "
        f"{args.identities:,} identities per pool, {BATCH} calls in flight",
        "- `us/call`: Redis's own `usec_per_call` for `EVALSHA` (`INFO commandstats`): the "
        "script and the commands it runs, not the network",
        "",
        "| algorithm | levels | "
        + " | ".join(f"{n}: us/call | commands/call" for n in names)
        + " |",
        "|---|--:|" + "--:|--:|" * len(names),
    ]
    by_case: dict[tuple[str, int], dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_case.setdefault((row["algorithm"], row["levels"]), {})[row["script"]] = row
    for (algorithm, levels), got in by_case.items():
        cells = " | ".join(
            f"{got[n]['usec_per_call']:.1f} | {got[n]['commands_per_call']:.2f}" for n in names
        )
        lines.append(f"| {algorithm} | {levels} | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", help="a git revision whose script runs beside this one")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--identities", type=int, default=10_000)
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]  # for the results' header
    # The server on one core, this client on the other: neither slows the other down.
    os.sched_setaffinity(0, {0})
    with RedisServer("redis-server", cpu=1) as server:
        rows = asyncio.run(run(args, server))
        text = markdown(rows, args, server.version())
    sys.stdout.write(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
