"""The local mirrors of operator state (``fastapi_ratelimit.control``): none unless a feature
that needs one is configured, and, when one polls, through the circuit breaker, with one log
line per change of health.

Redis commands are counted by the server itself (``INFO stats``, ``total_commands_processed``)
on a server of the test's own, so no other test's traffic is counted. Waits are deadlines on
a condition, or generous windows in which the expected count is zero.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from http_helpers import client_for, work_app
from loguru import logger
from servers import RedisServer

from fastapi_ratelimit import (
    DEFAULT_TIERS,
    ConfigurationError,
    MemoryBackend,
    RateLimiter,
    RedisBackend,
)
from fastapi_ratelimit.breaker import EndpointBreaker
from fastapi_ratelimit.dynamic import BehaviourTracker, DynamicLimits

#: A client the lists below name (client_for's default peer).
CLIENT_IP = "203.0.113.7"


async def until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> float:
    """Wait for ``condition``, checking every 20 ms; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < deadline, f"{what}: not within {deadline} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def commands_processed(server: RedisServer) -> int:
    return int(server.info("stats")["total_commands_processed"])


async def commands_while_idle(server: RedisServer, seconds: float) -> int:
    """Commands the server ran over ``seconds`` (less the first INFO, which counts itself in
    the second one)."""
    before = commands_processed(server)
    await asyncio.sleep(seconds)
    return commands_processed(server) - before - 1


@pytest.fixture
def records() -> Iterator[list[Any]]:
    """Every loguru record (INFO and up) logged during the test."""
    captured: list[Any] = []
    handler = logger.add(lambda message: captured.append(message.record), level="INFO")
    yield captured
    logger.remove(handler)


def control_lines(records: list[Any], level: str, module: str = "control") -> list[str]:
    return [
        r["message"]
        for r in records
        if r["name"] == f"fastapi_ratelimit.{module}" and r["level"].name == level
    ]


# -- which mirrors poll ------------------------------------------------------------------------


class CountingStore(MemoryBackend):
    """A memory backend that counts the operator-state reads per namespace."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    async def control_version(self, namespace: str) -> int:
        self.reads[namespace] += 1
        return await super().control_version(namespace)

    async def control_load(self, namespace: str) -> tuple[int, dict[str, str]]:
        self.reads[namespace] += 1
        return await super().control_load(namespace)


FEATURES: dict[str, tuple[Callable[[], dict[str, Any]], set[str]]] = {
    "nothing": (dict, set()),
    "lists": (lambda: {"access_lists": True}, {"allow", "block"}),
    "tiers": (lambda: {"tiers": DEFAULT_TIERS}, {"tiers"}),
    "endpoint breaker": (lambda: {"endpoint_breaker": EndpointBreaker()}, {"breakers"}),
    "dynamic": (lambda: {"dynamic": DynamicLimits()}, {"override"}),
    "penalty box": (
        lambda: {"dynamic": DynamicLimits(behaviour=BehaviourTracker(penalty_violations=3))},
        {"override", "penalty"},
    ),
}


@pytest.mark.parametrize("feature", list(FEATURES))
async def test_only_configured_features_mirror_and_poll(feature: str) -> None:
    options, expected = FEATURES[feature]
    store = CountingStore()
    limiter = RateLimiter(
        backend=store,
        ip_limit="1000/minute",
        user_resolver=lambda connection: "alice",
        refresh_interval=0.05,
        **options(),
    )
    try:
        async with client_for(work_app(limiter)) as client:
            for _ in range(3):
                assert (await client.get("/work")).status_code == 200
            # The configured ones keep polling...
            await until(lambda: all(store.reads[n] >= 5 for n in expected), "polls")
            # ...and, over 10 more intervals, nothing else is ever read.
            await asyncio.sleep(0.5)
        assert set(store.reads) == expected
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_nothing_configured_sends_redis_nothing_while_idle() -> None:
    with RedisServer(name="idle") as server:
        limiter = RateLimiter(
            backend=RedisBackend.from_url(server.url, timeout=5.0),
            ip_limit="1000/minute",
            global_limit="100000/minute",
            refresh_interval=0.1,
        )
        try:
            async with client_for(work_app(limiter)) as client:
                for _ in range(5):
                    assert (await client.get("/work")).status_code == 200
                idle = await commands_while_idle(server, 2.0)
            assert idle == 0, server.command("INFO", "commandstats")
        finally:
            await limiter.aclose()


@pytest.mark.redis
async def test_idle_polling_with_lists_reads_only_the_version() -> None:
    with RedisServer(name="idle-lists") as server:
        limiter = RateLimiter(
            backend=RedisBackend.from_url(server.url, timeout=5.0),
            ip_limit="1000/minute",
            access_lists=True,
            refresh_interval=0.1,
        )
        try:
            async with client_for(work_app(limiter)) as client:
                assert (await client.get("/work")).status_code == 200
                server.command("CONFIG", "RESETSTAT")
                idle = await commands_while_idle(server, 1.0)
            stats = server.info("commandstats")
            # Two lists, every 0.1 s: one HGET of the version each, never the whole hash (and
            # a HELLO if the two polls needed a second connection).
            assert 2 <= idle <= 2 * 10 + 4, stats
            ours = {"cmdstat_info", "cmdstat_config|resetstat", "cmdstat_hello"}
            assert set(stats) - ours == {"cmdstat_hget"}, stats
        finally:
            await limiter.aclose()


# -- the lists, configured: a block from anywhere applies everywhere ----------------------------


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if "REDIS_URL" not in k}
    return subprocess.run(
        [sys.executable, "-m", "fastapi_ratelimit.cli", "--redis-url", url, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


@pytest.mark.redis
async def test_cli_block_reaches_every_instance_with_lists(redis_url: str) -> None:
    limiters = [
        RateLimiter(
            backend=RedisBackend.from_url(redis_url, timeout=5.0),
            ip_limit="1000/minute",
            access_lists=True,
        )
        for _ in range(2)
    ]
    # An instance without the lists: the documented rule is that it never applies them.
    unlisted = RateLimiter(backend=RedisBackend.from_url(redis_url, timeout=5.0))
    try:
        async with (
            client_for(work_app(limiters[0])) as first,
            client_for(work_app(limiters[1])) as second,
            client_for(work_app(unlisted)) as third,
        ):
            for client in (first, second, third):
                assert (await client.get("/work")).status_code == 200
            done = await asyncio.to_thread(
                cli, redis_url, "block", "add", "ip", CLIENT_IP, "--reason", "abuse"
            )
            assert done.returncode == 0, done.stderr
            statuses: dict[int, int] = {}

            async def blocked() -> None:
                # Every instance polls on its own: wait for both, with a generous deadline
                # (the promise is about 1 s at the default refresh_interval of 0.5 s).
                started = time.monotonic()
                while True:
                    for index, client in enumerate((first, second)):
                        if index not in statuses:
                            status = (await client.get("/work")).status_code
                            if status == 403:
                                statuses[index] = status
                    if len(statuses) == 2:
                        return
                    assert time.monotonic() - started < 5.0, f"blocked only on {statuses}"
                    await asyncio.sleep(0.02)

            await blocked()
            assert (await third.get("/work")).status_code == 200
        with pytest.raises(ConfigurationError, match=r"^access_lists: "):
            await unlisted.block("ip", CLIENT_IP)
    finally:
        for limiter in (*limiters, unlisted):
            await limiter.aclose()


def test_lists_need_a_store() -> None:
    class Plain:
        """A Backend without operator state."""

        async def hit(self, checks: Any) -> Any: ...
        async def peek(self, checks: Any) -> Any: ...
        async def refund(self, checks: Any) -> None: ...
        async def reset(self, checks: Any) -> None: ...
        async def aclose(self) -> None: ...

    assert RateLimiter(backend=Plain()).lists is None  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^access_lists: "):
        RateLimiter(backend=Plain(), access_lists=True)  # type: ignore[arg-type]
