"""Edges of the algorithms, on both backends from one clock (an audit, session 25): a wait
announced is one after which the same request passes, to the microsecond; a refund after the
window turned gives the units back under the default algorithm too; rates whose arithmetic
the backends cannot carry are refused at construction."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI

from fastapi_ratelimit import (
    Algorithm,
    Check,
    ConfigurationError,
    FakeClock,
    MemoryBackend,
    Policy,
    Rate,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
)
from fastapi_ratelimit.backends.base import Backend


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1_700_000_000.0)


@pytest_asyncio.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def backend(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[Backend]:
    """Both backends on the same FakeClock (Redis is sent its time, tests only)."""
    made: Backend
    if request.param == "memory":
        made = MemoryBackend(clock=clock)
    else:
        url = request.getfixturevalue("redis_url")
        prefix = "edges" + uuid.uuid4().hex[:12]
        made = RedisBackend.from_url(url, clock=clock, prefix=prefix, timeout=5.0, denial_cache=0)
    yield made
    await made.aclose()


async def wait_it_out(backend: Backend, clock: FakeClock, check: Check) -> tuple[float, bool]:
    """Refused, wait exactly the retry_after announced, try again: (the wait, admitted)."""
    denied = (await backend.hit([check])).decisions[0]
    assert not denied.allowed
    clock.advance_us(round(denied.retry_after * 1_000_000))
    return denied.retry_after, (await backend.hit([check])).allowed


@pytest.mark.parametrize(
    ("limit", "period", "cost", "wait"),
    [
        (1000, 3600, 15, 54.0),  # 54e6 * (1000 / 3.6e9) was 14.999999999999998 tokens
        (7, 3, 7, 3.0),
        (5, 10, 1, 2.0),
    ],
)
async def test_a_token_buckets_wait_is_true_to_the_microsecond(
    backend: Backend, clock: FakeClock, limit: int, period: int, cost: int, wait: float
) -> None:
    policy = Policy("tb", Rate(limit, period), Algorithm.TOKEN_BUCKET)
    drained = Check(policy, "ip", "203.0.113.7", limit)
    assert (await backend.hit([drained])).allowed
    announced, admitted = await wait_it_out(backend, clock, drained._replace(cost=cost))
    assert announced == wait  # exact figures give exact waits, not a microsecond more
    assert admitted


async def test_the_sliding_counters_wait_is_true_to_the_microsecond(
    backend: Backend, clock: FakeClock
) -> None:
    # 42 units in one window, 75 in the next; a cost of 49 must wait until 75 * 0.68 + 49
    # is 100 (75 * 0.68 was 51.00000000000001).
    policy = Policy("sc", Rate(100, 1), Algorithm.SLIDING_WINDOW_COUNTER)
    check = Check(policy, "ip", "203.0.113.8", 42)
    assert (await backend.hit([check])).allowed
    clock.advance_us(1_500_000)
    assert (await backend.hit([check._replace(cost=75)])).allowed
    clock.advance_us(100_000)
    announced, admitted = await wait_it_out(backend, clock, check._replace(cost=49))
    assert announced == 0.72
    assert admitted


async def test_an_http_retry_after_is_a_wait_after_which_the_request_passes() -> None:
    clock = FakeClock(1_700_000_000.0)
    limiter = RateLimiter(
        backend=MemoryBackend(clock=clock),
        ip_limit="1000/hour",
        algorithm="token_bucket",
        costs={"POST /batch": 1000, "POST /ocr": 15},
    )
    app = FastAPI()

    @app.post("/batch")
    @app.post("/ocr")
    async def work() -> dict[str, str]:
        return {}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.post("/batch")).status_code == 200
        refused = await client.post("/ocr")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "54"
        clock.advance(54)
        assert (await client.post("/ocr")).status_code == 200


@pytest.mark.parametrize("algorithm", list(Algorithm), ids=str)
async def test_a_refund_after_the_window_turned_gives_the_units_back(
    backend: Backend, clock: FakeClock, algorithm: Algorithm
) -> None:
    """A request charged just before a window ends and refunded just after (a 5xx, a
    refund_when): the sliding window counter used to drop it, though the units kept
    weighing as the previous window's count."""
    policy = Policy("p", Rate(10, 10), algorithm)
    check = Check(policy, "ip", "192.0.2.1", 10)
    clock.advance_us(9_900_000)
    assert (await backend.hit([check])).allowed
    clock.advance_us(200_000)
    await backend.refund([check])
    assert (await backend.peek([check._replace(cost=1)])).decisions[0].remaining == 10
    assert (await backend.hit([check])).allowed


async def test_a_refund_takes_from_the_previous_window_what_the_current_one_lacks(
    backend: Backend, clock: FakeClock
) -> None:
    policy = Policy("p", Rate(10, 10), Algorithm.SLIDING_WINDOW_COUNTER)
    check = Check(policy, "ip", "192.0.2.2", 8)
    clock.advance_us(9_900_000)
    assert (await backend.hit([check])).allowed  # 8 in the window that is ending
    clock.advance_us(200_000)
    assert (await backend.hit([check._replace(cost=1)])).allowed  # 1 in the new one
    await backend.refund([check])  # the 8: 1 from this window, 7 from the previous
    left = (await backend.peek([check._replace(cost=1)])).decisions[0].remaining
    assert left == 9  # 1 * weight (0.98) + 0 -> 9.02 available, floor 9


@pytest.mark.parametrize(
    ("rate", "algorithm", "field"),
    [
        # GCRA at millions a second admitted every request (its absolute time, a double in
        # microseconds, cannot hold a step under 0.25 us).
        (Rate(10_000_000, 1, burst=1), "gcra", "policy 'p': rate"),
        (Rate(10**9, 60, burst=100), "gcra", "policy 'p': rate"),
        # A bucket refilling over millennia overflowed Redis's integers.
        (Rate(1, 31_536_000, burst=300_000), "token_bucket", "policy 'p': rate.burst"),
        (Rate(1, 31_536_000, burst=300_000), "gcra", "policy 'p': rate.burst"),
    ],
)
def test_rates_the_backends_cannot_keep_exactly_are_refused(
    rate: Rate, algorithm: str, field: str
) -> None:
    with pytest.raises(ConfigurationError) as info:
        Policy("p", rate, algorithm)
    assert info.value.field == field


def test_the_fastest_rates_each_algorithm_keeps_are_accepted() -> None:
    Policy("p", Rate(100_000, 1, burst=10), "gcra")  # an interval of 10 us
    Policy("p", Rate(10**9, 60), "token_bucket")
    Policy("p", Rate(1, 3600, burst=87_600), "token_bucket")  # 10 years to refill


async def test_a_sliding_log_refund_never_lets_more_than_the_limit_through(
    backend: Backend, clock: FakeClock
) -> None:
    """A at 0, B at 5, A refunded at 5.1: dropping the newest entry (B's) let two more
    through at 10, with B still in the window (three in [5, 15))."""
    check = Check(Policy("log", Rate(2, 10), Algorithm.SLIDING_WINDOW_LOG), "ip", "192.0.2.3", 1)
    assert (await backend.hit([check])).allowed  # A
    clock.advance_us(5_000_000)
    assert (await backend.hit([check])).allowed  # B
    clock.advance_us(100_000)
    await backend.refund([check])  # A's
    clock.advance_us(4_900_000)  # t = 10
    admitted = [(await backend.hit([check])).allowed for _ in range(2)]
    assert admitted == [True, False]


def test_scaling_a_gcra_rate_up_stays_within_what_gcra_keeps() -> None:
    """An override of up to x10 on a fast GCRA level must not build a policy that the
    construction checks refuse (that would fail the request)."""
    from fastapi_ratelimit.dynamic import scale_policy

    scaled = scale_policy(Policy("g", Rate(60_000, 1, burst=10), "gcra"), 10)
    assert scaled.rate.limit == 100_000  # at the bound, not 600,000
    assert scale_policy(Policy("g", Rate(200, 1), "gcra"), 10).rate.limit == 2000


async def test_a_route_limit_too_fast_for_the_limiters_gcra_keeps_its_own_algorithm() -> None:
    from fastapi_ratelimit import RateLimit

    guard = RateLimit(Rate(200_000, 1))  # no algorithm named: the limiter's default applies
    assert guard.limit.policy_for(Algorithm.GCRA) is guard.limit.policy
