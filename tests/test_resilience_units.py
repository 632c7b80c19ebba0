"""Breakers, dynamic limits, penalty box, overrides and delay mode, without network faults."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fastapi import FastAPI, HTTPException
from http_helpers import client_for, policies, remaining, until

from fastapi_ratelimit import (
    BackendError,
    ConfigurationError,
    MemoryBackend,
    RateLimiter,
    RateLimitMiddleware,
    Verdict,
)
from fastapi_ratelimit.breaker import CircuitBreaker, EndpointBreaker
from fastapi_ratelimit.dynamic import (
    BehaviourTracker,
    DynamicLimits,
    LoadMonitor,
    LoadSample,
    LoadThresholds,
    load_factor,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_on_consecutive_failures_then_probes_once() -> None:
    clock = Clock()
    states: list[str] = []
    breaker = CircuitBreaker(failure_threshold=3, cooldown=5.0, clock=clock)
    breaker.listeners.append(states.append)
    for _ in range(2):
        assert breaker.allow_call()
        breaker.record_failure()
    assert breaker.state == "closed"
    breaker.record_success()  # resets the streak
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state == "open"
    assert not breaker.allow_call()
    assert breaker.retry_after() == 5
    clock.now += 5
    assert breaker.allow_call()  # the single probe
    assert breaker.state == "half_open"
    assert not breaker.allow_call()  # nobody else while it probes
    breaker.record_failure()
    assert breaker.state == "open"
    clock.now += 5
    assert breaker.allow_call()
    breaker.record_success()
    assert breaker.state == "closed"
    assert states == ["open", "half_open", "open", "half_open", "closed"]


def test_an_idle_breaker_is_one_with_nothing_to_record() -> None:
    # The limiter skips record_success while the breaker is idle; that must never hide a
    # success the failure rate needs.
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=100, failure_rate=0.5, min_calls=4, clock=clock)
    assert breaker.idle
    breaker.record_failure()
    assert not breaker.idle
    breaker.record_success()  # counted: a failure is in the window
    assert not breaker.idle
    breaker.record_failure()
    breaker.record_success()
    assert breaker.state == "closed"  # 2 failures of 4 calls: at the rate, not under min
    breaker.record_failure()
    # 3 of 5, but counted for less than a window: the successes before the first failure
    # were not counted (idle), so the rate does not speak yet.
    assert breaker.state == "closed"
    clock.now += 10
    breaker.record_failure()
    assert breaker.state == "open"  # 4 of 6, counted over a whole window
    clock.now += 5
    assert breaker.allow_call()
    breaker.record_success()
    assert breaker.state == "closed"
    assert not breaker.idle
    breaker.record_success()
    assert breaker.idle
    clock.now += 60
    breaker.record_failure()
    assert not breaker.idle


def test_breaker_opens_on_failure_rate() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=100, failure_rate=0.5, min_calls=10, clock=clock)
    for i in range(9):
        (breaker.record_failure if i % 2 else breaker.record_success)()
    assert breaker.state == "closed"
    clock.now += 10  # a whole window counted since the first failure
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state == "open"


def test_a_rare_failure_among_many_successes_does_not_open_it() -> None:
    """Found in the session-25 audit: successes are not counted while nothing fails, so the
    rate used to be taken over the calls since the first failure only (12 failures among
    1,024 calls in 10 s opened it as if half had failed)."""
    clock = Clock()
    breaker = CircuitBreaker(clock=clock)  # 5 in a row, or >= 50% of >= 20 calls in 10 s
    for _ in range(1000):
        if not breaker.idle:
            breaker.record_success()
        clock.now += 0.009
    for _ in range(12):
        breaker.record_failure()
        breaker.record_success()
        clock.now += 0.01
    assert breaker.state == "closed"


async def test_a_success_sent_before_the_breaker_opened_does_not_close_it() -> None:
    """Found in the session-25 audit: a slow call that succeeded after the breaker opened
    closed it at once, without the cooldown or its probe."""
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown=5.0, clock=clock)
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state == "open"
    breaker.record_success()  # the slow call from before answers now
    assert breaker.state == "open"
    assert not breaker.allow_call()
    clock.now += 5
    assert breaker.allow_call()  # the probe
    breaker.record_success()
    assert breaker.state == "closed"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"failure_threshold": 0}, "breaker.failure_threshold"),
        ({"failure_rate": 1.5}, "breaker.failure_rate"),
        ({"cooldown": -1}, "breaker.cooldown"),
    ],
)
def test_breaker_configuration(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        CircuitBreaker(**kwargs)
    assert info.value.field == field


class FlakyBackend(MemoryBackend):
    def __init__(self) -> None:
        super().__init__()
        self.down = False
        self.calls = 0

    async def hit(self, checks: Any) -> Verdict:
        self.calls += 1
        if self.down:
            raise BackendError("Redis script failed: ConnectionError")
        return await super().hit(checks)


def app_for(limiter: RateLimiter) -> FastAPI:
    app = FastAPI()

    @app.get("/work")
    async def work() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/fail")
    async def fail() -> None:
        raise HTTPException(500, "broken")

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


async def test_open_breaker_skips_the_backend_and_recovers() -> None:
    clock = Clock()
    backend = FlakyBackend()
    limiter = RateLimiter(
        backend=backend,
        ip_limit="100/minute",
        breaker=CircuitBreaker(failure_threshold=3, cooldown=2.0, clock=clock),
    )
    app = app_for(limiter)
    async with client_for(app) as client:
        assert remaining(await client.get("/work")) == "99"
        backend.down = True
        statuses = [(await client.get("/work")).status_code for _ in range(10)]
        assert statuses == [200] * 10  # fail open
        assert backend.calls == 1 + 3  # then the breaker kept requests away from the backend
        backend.down = False
        clock.now += 2
        recovered = await client.get("/work")
        assert remaining(recovered) == "98"  # counters continued


async def test_a_cancelled_probe_hands_its_turn_on() -> None:
    # The half-open breaker lets one probe through; if that request is cancelled (the client
    # went away), the next call must probe instead of the breaker staying half-open for good.
    clock = Clock()
    backend = FlakyBackend()
    limiter = RateLimiter(
        backend=backend,
        ip_limit="100/minute",
        breaker=CircuitBreaker(failure_threshold=3, cooldown=2.0, clock=clock),
    )
    hang = asyncio.Event()
    plain_hit = backend.hit

    async def hanging_hit(checks: Any) -> Verdict:
        await hang.wait()
        return await plain_hit(checks)

    async with client_for(app_for(limiter)) as client:
        backend.down = True
        for _ in range(3):
            await client.get("/work")
        assert limiter.breaker is not None
        assert limiter.breaker.state == "open"
        backend.down = False
        clock.now += 2
        backend.hit = hanging_hit  # type: ignore[method-assign]
        probe = asyncio.ensure_future(client.get("/work"))
        breaker = limiter.breaker
        await until(lambda: breaker.state == "half_open", "the probe reached the backend")
        probe.cancel()
        with pytest.raises(asyncio.CancelledError):
            await probe
        backend.hit = plain_hit  # type: ignore[method-assign]
        calls = backend.calls
        recovered = await client.get("/work")
        assert backend.calls == calls + 1  # probed
        assert limiter.breaker.state == "closed"
        assert remaining(recovered) == "99"


async def test_fail_closed_per_level_and_fallback() -> None:
    backend = FlakyBackend()
    backend.down = True
    deny_ip = RateLimiter(
        backend=backend,
        ip_limit="5/minute",
        global_limit="100/minute",
        on_backend_error={"ip": "deny", "default": "allow"},
        breaker=None,
    )
    async with client_for(app_for(deny_ip)) as client:
        refused = await client.get("/work")
    assert refused.status_code == 503
    assert refused.json()["detail"] == "Rate limiting is temporarily unavailable."
    assert int(refused.headers["retry-after"]) >= 1

    fallback = RateLimiter(backend=backend, ip_limit="2/minute", fallback=True, breaker=None)
    async with client_for(app_for(fallback)) as client:
        statuses = [(await client.get("/work")).status_code for _ in range(3)]
    # Redis is down, yet the per-process fallback still limits.
    assert statuses == [200, 200, 429]


async def test_endpoint_breaker_opens_for_every_instance() -> None:
    backend = MemoryBackend()
    breaker = EndpointBreaker(threshold=0.5, min_requests=4, window=10, open_for=0.5)
    one = app_for(RateLimiter(backend=backend, endpoint_breaker=breaker, refresh_interval=0.1))
    other_breaker = EndpointBreaker(threshold=0.5, min_requests=4, window=10, open_for=0.5)
    two = app_for(
        RateLimiter(backend=backend, endpoint_breaker=other_breaker, refresh_interval=0.1)
    )
    async with client_for(one) as a, client_for(two) as b:
        assert (await b.get("/fail")).status_code == 500  # loads b's copy of the shared state
        for _ in range(4):
            assert (await a.get("/fail")).status_code == 500
        opened = await a.get("/fail")
        assert opened.status_code == 503
        assert opened.json()["detail"] == "This endpoint is temporarily unavailable."
        assert int(opened.headers["retry-after"]) >= 1
        assert (await a.get("/work")).status_code == 200  # other endpoints unaffected
        # Shared through the backend: b's background refresh brings it.
        await until(lambda: other_breaker.open_until("GET /fail"), "b saw the open breaker")
        assert (await b.get("/fail")).status_code == 503

        async def probing() -> bool:
            return (await a.get("/fail")).status_code == 500

        # Once open_for (0.5 s) is over, half-open: traffic probes again.
        await until(probing, "the breaker half-opened")


@pytest.mark.parametrize(
    ("sample", "factor"),
    [
        (LoadSample(), 1.0),
        (LoadSample(cpu=61), 0.75),
        (LoadSample(cpu=81), 0.5),
        (LoadSample(memory=85), 0.7),
        (LoadSample(error_rate=0.2), 0.5),
        (LoadSample(in_flight=1001), 0.6),
        (LoadSample(cpu=90, memory=90), 0.35),
    ],
)
def test_seed_load_thresholds(sample: LoadSample, factor: float) -> None:
    assert load_factor(sample, LoadThresholds())[0] == pytest.approx(factor)


async def test_load_shrinks_quotas_without_resetting_counters() -> None:
    readings = {"cpu": 10.0}
    load = LoadMonitor(sampler=lambda: (readings["cpu"], 20.0), interval=60)
    limiter = RateLimiter(ip_limit="10/minute", dynamic=DynamicLimits(load=load))
    app = app_for(limiter)
    async with client_for(app) as client:
        for _ in range(4):
            await client.get("/work")
        readings["cpu"] = 85.0
        load.sample_now()
        reduced = await client.get("/work")
        # Quota halved to 5; the 4 already spent still count: this is the fifth.
        assert policies(reduced)["ip"]["q"] == 5
        assert remaining(reduced) == "0"
        refused = await client.get("/work")
        assert refused.status_code == 503
        assert refused.json()["type"].endswith("#temporary-reduced-capacity")
        assert int(refused.headers["retry-after"]) >= 1
        readings["cpu"] = 10.0
        load.sample_now()
        back = await client.get("/work")
        assert back.status_code == 200
        assert remaining(back) == "4"
    await limiter.aclose()


async def test_app_errors_and_in_flight_feed_the_load_factor() -> None:
    load = LoadMonitor(sampler=lambda: (0.0, 0.0), interval=60)
    limiter = RateLimiter(dynamic=DynamicLimits(load=load))
    async with client_for(app_for(limiter)) as client:
        # One 500 in a quiet sample says nothing yet (fewer than 10 responses).
        await client.get("/fail")
        assert load.sample_now() == 1.0
        for _ in range(9):
            await client.get("/fail")
        for _ in range(3):
            await client.get("/work")
    assert load.sample_now() == 0.5  # 9 of 12 5xx
    assert load.in_flight == 0
    await limiter.aclose()


async def test_behaviour_good_citizens_and_abusers() -> None:
    tracker = BehaviourTracker()
    for _ in range(20):
        await tracker.record("good", True)
    assert tracker.factor("good") == 1.2
    for i in range(20):
        await tracker.record("bad", i % 3 == 0)
    assert tracker.factor("bad") == 0.3
    assert tracker.factor("unknown") == 1.0


async def test_penalty_box_after_repeated_violations() -> None:
    behaviour = BehaviourTracker(penalty_violations=3, penalty_window=60, penalty_duration=0.5)
    limiter = RateLimiter(
        ip_limit="1/minute", dynamic=DynamicLimits(behaviour=behaviour), refresh_interval=0.1
    )
    app = app_for(limiter)
    async with client_for(app) as client:
        assert (await client.get("/work")).status_code == 200
        for _ in range(3):
            assert (await client.get("/work")).status_code == 429
        boxed = await client.get("/work")
        assert boxed.status_code == 429
        assert boxed.json()["violated-policies"] == ["penalty-box"]
        await asyncio.sleep(0.55)
        after = await client.get("/work")
        assert after.json()["violated-policies"] == ["ip"]  # out of the box, still limited
    await limiter.aclose()


async def test_operator_override_halves_every_limit() -> None:
    dynamic = DynamicLimits()
    limiter = RateLimiter(ip_limit="10/minute", dynamic=dynamic, refresh_interval=0.1)
    app = app_for(limiter)
    async with client_for(app) as client:
        await dynamic.set_override(0.5, ttl=0.4, by="ops")
        assert policies(await client.get("/work"))["ip"]["q"] == 5
        await asyncio.sleep(0.45)
        assert policies(await client.get("/work"))["ip"]["q"] == 10
        await dynamic.set_override(0.2)
        assert policies(await client.get("/work"))["ip"]["q"] == 2
        assert await dynamic.clear_override()
        assert policies(await client.get("/work"))["ip"]["q"] == 10
    with pytest.raises(ConfigurationError, match=r"^factor: "):
        await dynamic.set_override(0)
    await limiter.aclose()


async def test_delay_mode_waits_instead_of_rejecting() -> None:
    limiter = RateLimiter(ip_limit="10/second", algorithm="gcra", delay={"ip": 0.5})
    app = app_for(limiter)
    async with client_for(app) as client:
        started = time.monotonic()
        statuses = [(await client.get("/work")).status_code for _ in range(13)]
        elapsed = time.monotonic() - started
    assert statuses == [200] * 13
    # Ten pass at once; the next three each wait about 0.1 s rather than being refused.
    assert elapsed >= 0.2


async def test_delay_mode_rejects_past_max_delay_and_bounds_waiters() -> None:
    limiter = RateLimiter(ip_limit="1/minute", delay={"ip": 5})
    async with client_for(app_for(limiter)) as client:
        assert (await client.get("/work")).status_code == 200
        started = time.monotonic()
        assert (await client.get("/work")).status_code == 429  # would need ~60 s
        # Refused at once, not after waiting out max_delay (5 s): the bound is the behaviour.
        assert time.monotonic() - started < 2.5
    none_waiting = RateLimiter(
        ip_limit="5/second", algorithm="gcra", delay={"ip": 1}, max_waiting=0
    )
    async with client_for(app_for(none_waiting)) as client:
        statuses = [(await client.get("/work")).status_code for _ in range(6)]
    assert statuses[-1] == 429


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"delay": {"ip": 0}}, "delay['ip']"),
        ({"delay": {"ip": 120}}, "delay['ip']"),
        ({"max_waiting": -1}, "max_waiting"),
        ({"on_backend_error": {"ip": "maybe"}}, "on_backend_error['ip']"),
        ({"breaker": "yes"}, "breaker"),
        ({"refresh_interval": 5}, "refresh_interval"),
        ({"access_lists": "yes"}, "access_lists"),
    ],
)
def test_resilience_configuration_errors(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimiter(**kwargs)
    assert info.value.field == field
