"""Parity: the memory backend (pure-Python references) and Redis (Lua twins) must give
identical decisions for any sequence of (time step, identity, cost, operation).

Both backends read the same FakeClock; Redis gets it through the test-only clock override.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import pytest
import redis.asyncio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastapi_ratelimit import (
    Algorithm,
    Check,
    FakeClock,
    MemoryBackend,
    Policy,
    Rate,
    RedisBackend,
    Verdict,
)

pytestmark = pytest.mark.redis

RATES = [(5, 2.0), (7, 3.0), (3, 0.25), (100, 60.0), (1, 1.0)]
Step = tuple[int, int, int, str]
steps_strategy = st.lists(
    st.tuples(
        st.integers(0, 2_500_000),  # microseconds to advance
        st.integers(0, 2),  # which identity
        st.integers(1, 4),  # cost
        st.sampled_from(["hit"] * 6 + ["peek", "refund"]),
    ),
    min_size=10,
    max_size=80,
)


def make_policy(name: str, algorithm: Algorithm, rate: tuple[int, float], burst: int) -> Policy:
    limit, period = rate
    return Policy(name, Rate(limit, period, burst if algorithm.uses_burst else None), algorithm)


class Pair:
    """Runs every operation on both backends and compares the answers."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, start: float) -> None:
        self.clock = FakeClock(start)
        self.memory = MemoryBackend(clock=self.clock)
        self.redis = RedisBackend(client, clock=self.clock, prefix=prefix, timeout=5.0)

    async def run(self, steps: list[Step], levels: Callable[[int, int], list[Check]]) -> None:
        for index, (advance_us, who, cost, op) in enumerate(steps):
            self.clock.advance_us(advance_us)
            checks = levels(who, cost)
            if op == "refund":
                await self.memory.refund(checks)
                await self.redis.refund(checks)
                op = "peek"
            expected: Verdict = await getattr(self.memory, op)(checks)
            actual: Verdict = await getattr(self.redis, op)(checks)
            assert actual == expected, f"step {index}: {steps[index]}"


@pytest.fixture
def runner() -> asyncio.Runner:
    with asyncio.Runner() as r:
        yield r  # type: ignore[misc]


@pytest.mark.parametrize("algorithm", list(Algorithm))
def test_single_level_parity(redis_url: str, runner: asyncio.Runner, algorithm: Algorithm) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    prefixes = (f"par{i}" for i in itertools.count())

    @settings(
        max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        rate=st.sampled_from(RATES),
        burst=st.integers(1, 9),
        start=st.floats(1_700_000_000, 1_700_000_100),
        steps=steps_strategy,
    )
    def scenario(rate: tuple[int, float], burst: int, start: float, steps: list[Step]) -> None:
        policy = make_policy("p", algorithm, rate, burst)
        pair = Pair(client, next(prefixes), start)

        def levels(who: int, cost: int) -> list[Check]:
            return [Check(policy, "ip", f"10.0.0.{who}", cost)]

        runner.run(pair.run(steps, levels))

    try:
        scenario()
    finally:
        runner.run(client.aclose())


def test_multi_level_parity(redis_url: str, runner: asyncio.Runner) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    prefixes = (f"mpar{i}" for i in itertools.count())
    algorithms = st.sampled_from(list(Algorithm))

    @settings(
        max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
    )
    @given(
        algos=st.tuples(algorithms, algorithms, algorithms),
        rates=st.tuples(*(st.sampled_from(RATES) for _ in range(3))),
        burst=st.integers(1, 9),
        steps=steps_strategy,
    )
    def scenario(
        algos: tuple[Algorithm, ...],
        rates: tuple[tuple[int, float], ...],
        burst: int,
        steps: list[Step],
    ) -> None:
        shared = make_policy("global", algos[0], (rates[0][0] * 3, rates[0][1]), burst * 2)
        per_ip = make_policy("ip", algos[1], rates[1], burst)
        per_user = make_policy("user", algos[2], rates[2], burst)
        pair = Pair(client, next(prefixes), 1_700_000_000.5)

        def levels(who: int, cost: int) -> list[Check]:
            return [
                Check(shared, "global", "", cost),
                Check(per_ip, "ip", f"ip{who % 2}", cost),
                Check(per_user, "user", f"user{who}", cost),
            ]

        runner.run(pair.run(steps, levels))

    try:
        scenario()
    finally:
        runner.run(client.aclose())
