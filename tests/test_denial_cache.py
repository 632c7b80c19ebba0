"""The Redis backend's denial cache: a flood from a client over its limit costs (almost) no
round trips, and no cached denial outlives the wait Redis gave."""

from __future__ import annotations

import pytest
import redis
from http_helpers import client_for
from test_middleware import make_app

from fastapi_ratelimit import Check, FakeClock, Policy, RateLimiter, RedisBackend
from fastapi_ratelimit.backends._denials import DenialCache
from fastapi_ratelimit.decision import Decision, Verdict

POLICY = Policy("ip", "5/minute")


def denied(retry: float, reset: float = 60.0) -> Verdict:
    return Verdict((Decision(False, 5, 0, reset, retry, "ip", "ip", 60.0),))


def test_entries_expire_exactly_when_redis_said() -> None:
    now = [0.0]
    cache = DenialCache(100, lambda: now[0])
    check = Check(POLICY, "ip", "203.0.113.7", 1)
    cache.store([check], ["k"], denied(12.0), sent=0.0)
    now[0] = 11.5
    known = cache.lookup([check], ["k"])
    assert known is not None
    assert not known.allowed
    assert known.decisions[0].retry_after == pytest.approx(0.5)
    assert known.decisions[0].reset_after == pytest.approx(48.5)
    now[0] = 12.0
    assert cache.lookup([check], ["k"]) is None
    assert len(cache) == 0


def test_only_the_same_policy_and_at_least_the_same_cost() -> None:
    cache = DenialCache(100, lambda: 0.0)
    cache.store([Check(POLICY, "ip", "a", 3)], ["k"], denied(10.0), sent=0.0)
    assert cache.lookup([Check(POLICY, "ip", "a", 3)], ["k"]) is not None
    assert cache.lookup([Check(POLICY, "ip", "a", 9)], ["k"]) is not None
    assert cache.lookup([Check(POLICY, "ip", "a", 2)], ["k"]) is None  # a smaller cost may pass
    raised = Policy("ip", "50/minute")
    assert cache.lookup([Check(raised, "ip", "a", 3)], ["k"]) is None  # a new limit: ask
    cache.forget(["k"])
    assert cache.lookup([Check(POLICY, "ip", "a", 3)], ["k"]) is None


def test_a_repeated_request_gets_every_level_back_until_the_shortest_wait() -> None:
    now = [0.0]
    cache = DenialCache(100, lambda: now[0])
    ip, user = Policy("ip", "5/minute"), Policy("user", "50/hour")
    checks = [Check(ip, "ip", "a", 1), Check(user, "user", "u", 1)]
    verdict = Verdict(
        (
            Decision(False, 5, 0, 60.0, 10.0, "ip", "ip", 60.0),
            Decision(False, 50, 0, 3600.0, 30.0, "user", "user", 3600.0),
        )
    )
    cache.store(checks, ["k-ip", "k-user"], verdict, sent=0.0)
    now[0] = 4.0
    whole = cache.lookup(checks, ["k-ip", "k-user"])
    assert whole is not None
    assert [d.policy for d in whole.decisions] == ["ip", "user"]
    assert [d.retry_after for d in whole.decisions] == [6.0, 26.0]
    # Rotating the user: only the IP level is known to refuse, and says so alone.
    rotated = cache.lookup([checks[0], Check(user, "user", "v", 1)], ["k-ip", "k-other"])
    assert rotated is not None
    assert [d.policy for d in rotated.decisions] == ["ip"]
    # Past the IP level's wait the IP level may admit: the whole verdict is gone, the user
    # level still refuses on its own.
    now[0] = 10.0
    later = cache.lookup(checks, ["k-ip", "k-user"])
    assert later is not None
    assert [(d.policy, d.retry_after) for d in later.decisions] == [("user", 20.0)]


def test_bounded_under_100k_distinct_denied_clients() -> None:
    cache = DenialCache(1000, lambda: 0.0)
    for i in range(100_000):
        cache.store([Check(POLICY, "ip", str(i), 1)], [f"k{i}"], denied(30.0), sent=0.0)
        assert len(cache) <= 1000
        assert len(cache._verdicts) <= 1000


def evalsha_calls(url: str) -> int:
    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


@pytest.mark.redis
async def test_a_flood_of_denied_requests_costs_almost_no_round_trips(redis_url: str) -> None:
    clock = FakeClock()
    backend = RedisBackend.from_url(redis_url, timeout=5.0, clock=clock)
    limiter = RateLimiter(backend=backend, ip_limit="5/minute")
    try:
        async with client_for(make_app(limiter), ip="198.51.100.7") as client:
            assert [(await client.get("/hello")).status_code for _ in range(5)] == [200] * 5
            before = evalsha_calls(redis_url)
            flood = [await client.get("/hello") for _ in range(400)]
            after = evalsha_calls(redis_url)
            assert [r.status_code for r in flood] == [429] * 400
            assert after - before <= 0.05 * 400  # the first denial asks Redis, the rest don't
            retry = int(flood[-1].headers["retry-after"])
            assert 1 <= retry <= 60
            # Just before the wait Redis gave is over: still refused. At its end: admitted,
            # by Redis (the cached denial is gone).
            clock.advance(retry - 1)
            assert (await client.get("/hello")).status_code == 429
            clock.advance(1)
            assert (await client.get("/hello")).status_code == 200
            # Another client was never refused: nothing cached applies to it.
            async with client_for(make_app(limiter), ip="198.51.100.8") as other:
                assert (await other.get("/hello")).status_code == 200
    finally:
        await backend.aclose()


@pytest.mark.redis
async def test_a_reset_is_seen_at_once(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url, timeout=5.0)
    limiter = RateLimiter(backend=backend, ip_limit="2/minute")
    try:
        async with client_for(make_app(limiter), ip="198.51.100.9") as client:
            statuses = [(await client.get("/hello")).status_code for _ in range(4)]
            assert statuses == [200, 200, 429, 429]
            await limiter.operator.reset(ip="198.51.100.9")
            assert (await client.get("/hello")).status_code == 200
    finally:
        await backend.aclose()


@pytest.mark.redis
async def test_a_flood_under_a_reduction_costs_almost_no_round_trips_either(
    redis_url: str,
) -> None:
    """While a reduction is in force, a refusal also asks whether the quota as configured
    would admit the request (429 or 503): that look is cached like a denial."""
    from fastapi_ratelimit.dynamic import DynamicLimits

    clock = FakeClock()
    backend = RedisBackend.from_url(redis_url, timeout=5.0, clock=clock)
    limiter = RateLimiter(backend=backend, ip_limit="10/minute", dynamic=DynamicLimits())
    assert limiter.dynamic is not None
    try:
        async with client_for(make_app(limiter), ip="198.51.100.9") as client:
            assert [(await client.get("/hello")).status_code for _ in range(10)] == [200] * 10
            await limiter.dynamic.set_override(0.5, by="ops")
            before = evalsha_calls(redis_url)
            flood = [await client.get("/hello") for _ in range(400)]
            after = evalsha_calls(redis_url)
        assert [r.status_code for r in flood] == [429] * 400  # over its configured quota
        assert after - before <= 0.05 * 400
    finally:
        await backend.aclose()
