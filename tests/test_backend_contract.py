"""One contract, every backend: memory, standalone Redis, Redis Cluster and Sentinel.

Scenarios that need control over time use a FakeClock; on Redis backends it is sent with
each call (the test-only override) instead of Redis TIME. Atomicity scenarios use real time.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import BACKEND_KINDS, BackendFactory

from fastapi_ratelimit import Algorithm, Check, FakeClock, Policy, RedisBackend

ALGORITHMS = list(Algorithm)
#: TTLs are a Redis matter; the memory backend's expiry has its own tests.
REDIS_KINDS = [kind for kind in BACKEND_KINDS if kind.id != "memory"]


def policy(algorithm: Algorithm, rate: str = "10/10 seconds", name: str = "p") -> Policy:
    return Policy(name, rate, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_admits_limit_then_denies_then_recovers(
    make_backend: BackendFactory, algorithm: Algorithm
) -> None:
    clock = FakeClock()
    backend = make_backend(clock=clock)
    check = [Check(policy(algorithm), "ip", "1.2.3.4")]
    for expected_remaining in range(9, -1, -1):
        verdict = await backend.hit(check)
        assert verdict.allowed
        (decision,) = verdict.decisions
        assert decision.remaining == expected_remaining
        assert decision.retry_after == 0
        assert decision.limit == 10
        assert (decision.policy, decision.scope) == ("p", "ip")
    denied = await backend.hit(check)
    assert not denied.allowed
    (decision,) = denied.decisions
    assert decision.remaining == 0
    # The sliding counter may have to wait into the next window: up to two windows.
    assert 0 < decision.retry_after <= (20 if algorithm is Algorithm.SLIDING_WINDOW_COUNTER else 10)
    assert decision.reset_after > 0
    # Just before retry_after it still refuses; at retry_after (+1 us for the estimating
    # algorithms' float rounding) it admits.
    wait_us = round(decision.retry_after * 1_000_000)
    clock.advance_us(wait_us - 1)
    assert not (await backend.hit(check)).allowed
    clock.advance_us(1 if algorithm not in (Algorithm.SLIDING_WINDOW_COUNTER,) else 2)
    assert (await backend.hit(check)).allowed


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_peek_does_not_consume(make_backend: BackendFactory, algorithm: Algorithm) -> None:
    clock = FakeClock()
    backend = make_backend(clock=clock)
    check = [Check(policy(algorithm), "user", "u1", cost=3)]
    before = await backend.peek(check)
    assert before.allowed
    assert before.decisions[0].remaining == 10
    assert before.decisions[0].reset_after == 0
    await backend.hit(check)
    for _ in range(3):
        peeked = await backend.peek(check)
        assert peeked.decisions[0].remaining == 7
        assert peeked.allowed


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_cost_counts_as_n_and_reset_and_refund(
    make_backend: BackendFactory, algorithm: Algorithm
) -> None:
    clock = FakeClock()
    backend = make_backend(clock=clock)
    check = [Check(policy(algorithm), "api_key", "k", cost=4)]
    assert (await backend.hit(check)).decisions[0].remaining == 6
    assert (await backend.hit(check)).decisions[0].remaining == 2
    denied = await backend.hit(check)
    assert not denied.allowed
    assert denied.decisions[0].remaining == 2
    await backend.refund([Check(policy(algorithm), "api_key", "k", cost=3)])
    assert (await backend.peek(check)).decisions[0].remaining == 5
    # A refund never lifts the quota above its limit.
    await backend.refund([Check(policy(algorithm), "api_key", "k", cost=50)])
    assert (await backend.peek(check)).decisions[0].remaining == 10
    await backend.hit(check)
    await backend.reset(check)
    assert (await backend.peek(check)).decisions[0].remaining == 10


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_cost_above_limit_is_denied_with_positive_retry(
    make_backend: BackendFactory, algorithm: Algorithm
) -> None:
    backend = make_backend(clock=FakeClock())
    verdict = await backend.hit([Check(policy(algorithm), "ip", "x", cost=11)])
    assert not verdict.allowed
    assert verdict.retry_after > 0
    assert verdict.decisions[0].remaining == 10


async def test_all_or_nothing_across_levels_and_algorithms(make_backend: BackendFactory) -> None:
    clock = FakeClock()
    backend = make_backend(clock=clock)
    levels = [
        Check(Policy("global", "1000/minute", Algorithm.FIXED_WINDOW), "global", ""),
        Check(Policy("ip", "100/minute", Algorithm.SLIDING_WINDOW_LOG), "ip", "10.0.0.1"),
        Check(
            Policy("endpoint", "50/minute", Algorithm.SLIDING_WINDOW_COUNTER), "endpoint", "POST /x"
        ),
        Check(Policy("key", "100/minute;burst=20", Algorithm.TOKEN_BUCKET), "api_key", "k1"),
        Check(Policy("user", "2/minute", Algorithm.GCRA), "user", "alice"),
    ]
    first = await backend.hit(levels)
    assert first.allowed
    assert [d.remaining for d in first.decisions] == [999, 99, 49, 19, 1]
    assert (await backend.hit(levels)).allowed
    denied = await backend.hit(levels)
    assert not denied.allowed
    assert [d.scope for d in denied.denied] == ["user"]
    assert denied.binding is not None
    assert denied.binding.scope == "user"
    # Nothing was consumed anywhere by the denied request.
    assert [d.remaining for d in denied.decisions] == [998, 98, 48, 18, 0]
    peeked = await backend.peek(levels)
    assert [d.remaining for d in peeked.decisions] == [998, 98, 48, 18, 0]
    # Another user on the same IP still passes, and is charged at the shared levels.
    bob = [*levels[:4], Check(levels[4].policy, "user", "bob")]
    passed = await backend.hit(bob)
    assert passed.allowed
    assert [d.remaining for d in passed.decisions] == [997, 97, 47, 17, 1]


async def test_same_level_twice_is_refused(make_backend: BackendFactory) -> None:
    backend = make_backend()
    check = Check(Policy("p", "1/second"), "ip", "a")
    with pytest.raises(ValueError, match="twice"):
        await backend.hit([check, check])


async def test_hostile_identifiers_get_separate_quotas(make_backend: BackendFactory) -> None:
    backend = make_backend()
    p = Policy("p", "1/hour", Algorithm.FIXED_WINDOW)
    identities = [
        "{}",
        "{a}",
        "}{",
        "a:b",
        "a",
        "*",
        "\n",
        "ünï",
        "\ud800",
        "x" * 65536,
        "",
        "{{{}}}",
        "rl:ip:p:fw:{0}",
        "\x00",
    ]
    for identity in identities:
        assert (await backend.hit([Check(p, "ip", identity)])).allowed, identity
    for identity in identities:
        assert not (await backend.hit([Check(p, "ip", identity)])).allowed, identity
    # Levels of many identities, in one call: on Cluster these span slots.
    many = [Check(p, "user", identity) for identity in identities]
    assert (await backend.hit(many)).allowed
    assert not (await backend.hit(many)).allowed


def _limit_for_concurrency(algorithm: Algorithm) -> str:
    # Long periods so that real time cannot refill anything during the test.
    return "100/day" if algorithm is not Algorithm.SLIDING_WINDOW_LOG else "100/hour"


async def _avoid_window_edge() -> None:
    # Fixed and sliding-counter windows are aligned to the epoch: don't start a burst in the
    # last two seconds of an hour (or a day), where it would straddle two windows.
    if 3600 - time.time() % 3600 < 2:
        await asyncio.sleep(2.5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_concurrent_hits_admit_exactly_the_limit(
    make_backend: BackendFactory, algorithm: Algorithm
) -> None:
    await _avoid_window_edge()
    backend = make_backend()
    check = [Check(Policy("p", _limit_for_concurrency(algorithm), algorithm), "ip", "1.1.1.1")]
    verdicts = await asyncio.gather(*(backend.hit(check) for _ in range(500)))
    assert sum(v.allowed for v in verdicts) == 100
    assert all(v.retry_after > 0 for v in verdicts if not v.allowed)
    remaining = sorted(v.decisions[0].remaining for v in verdicts if v.allowed)
    assert remaining == list(range(100))


async def test_concurrent_multi_level_hits_stay_exact(make_backend: BackendFactory) -> None:
    await _avoid_window_edge()
    backend = make_backend()
    shared = Check(Policy("global", "100/day", Algorithm.GCRA), "global", "")
    checks = [
        [shared, Check(Policy("user", "30/day", Algorithm.TOKEN_BUCKET), "user", f"u{i % 5}")]
        for i in range(400)
    ]
    verdicts = await asyncio.gather(*(backend.hit(c) for c in checks))
    assert sum(v.allowed for v in verdicts) == 100
    final = await backend.peek([shared])
    assert final.decisions[0].remaining == 0


@pytest.mark.parametrize("make_backend", REDIS_KINDS, indirect=True)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
async def test_every_key_has_a_bounded_ttl(
    make_backend: BackendFactory, algorithm: Algorithm
) -> None:
    backend = make_backend()
    assert isinstance(backend, RedisBackend)
    p = Policy("p", "5/2 seconds" + (";burst=9" if algorithm.uses_burst else ""), algorithm)
    for i in range(30):
        await backend.hit([Check(p, "ip", f"10.0.0.{i % 7}", cost=1 + i % 2)])
    await backend.refund([Check(p, "ip", "10.0.0.1")])
    keys = [k async for k in _scan(backend)]
    assert len(keys) == 7
    client = backend.client
    for key in keys:
        ttl_ms = await client.pttl(key)
        assert 0 < ttl_ms <= p.horizon_us / 1000 + 1000, (key, ttl_ms)


async def _scan(backend: RedisBackend):  # type: ignore[no-untyped-def]
    async for key in backend.client.scan_iter(match=backend.key_builder.pattern()):
        yield key
