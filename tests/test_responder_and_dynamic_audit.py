"""Found in the session-25 audits of the response path and of dynamic limits, each a test that
failed before its fix: an app's headers as any iterable and under str names; a guard's denial
through the limiter's response_builder; the dynamic-factor and breaker gauges; a client's
composite levels under its behaviour factor; small override factors; bad dynamic settings; a
refund naming one level twice."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from fastapi import Depends, FastAPI
from http_helpers import client_for, policies
from prometheus_client import CollectorRegistry
from starlette.responses import PlainTextResponse, Response
from test_hostile_input import raw_get

from fastapi_ratelimit import (
    Algorithm,
    Check,
    CompositeLimit,
    ConfigurationError,
    FakeClock,
    MemoryBackend,
    Policy,
    RateLimit,
    RateLimiter,
    RateLimitMiddleware,
)
from fastapi_ratelimit.breaker import CircuitBreaker
from fastapi_ratelimit.decision import Decision
from fastapi_ratelimit.dynamic import BehaviourTracker, DynamicLimits, LoadMonitor, LoadThresholds
from fastapi_ratelimit.metrics import RateLimitMetrics


async def start_message(app: Any) -> dict[str, Any]:
    """The response start ``app`` sends behind the middleware (ip level: 10 a minute)."""
    middleware = RateLimitMiddleware(app, limiter=RateLimiter(ip_limit="10/minute"))
    return await raw_get(middleware, "/x", b"")


async def test_an_apps_headers_given_as_a_generator_are_kept() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pairs = [(b"content-type", b"text/plain"), (b"x-app", b"1")]
        start = {"type": "http.response.start", "status": 200, "headers": (p for p in pairs)}
        await send(start)
        await send({"type": "http.response.body", "body": b"x"})

    names = [name for name, _ in (await start_message(app))["headers"]]
    assert names[:2] == [b"content-type", b"x-app"]
    assert b"ratelimit" in names


async def test_an_apps_own_ratelimit_header_under_a_str_name_is_replaced() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        headers = [("RateLimit", "mine"), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"x"})

    headers = (await start_message(app))["headers"]
    names = [name.lower() if isinstance(name, str) else name.decode() for name, _ in headers]
    assert names.count("ratelimit") == 1
    assert dict(zip(names, (v for _, v in headers), strict=True))["ratelimit"] != "mine"


def custom_denial(
    decisions: Sequence[Decision], headers: Sequence[tuple[bytes, bytes]]
) -> Response:
    response = PlainTextResponse("custom denial", status_code=429)
    response.raw_headers += list(headers)
    return response


async def test_a_self_checking_guards_denial_uses_the_limiters_response_builder() -> None:
    async def current_user() -> str:
        return "alice"

    limiter = RateLimiter(ip_limit="100/minute", response_builder=custom_denial)
    app = FastAPI()

    @app.get("/g", dependencies=[Depends(RateLimit("1/minute", scope="user", user=current_user))])
    async def g() -> dict[str, str]:
        return {}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        assert (await client.get("/g")).status_code == 200
        denied = await client.get("/g")
    assert denied.status_code == 429
    assert denied.text == "custom denial"
    assert "route-user-1-60s" in policies(denied)


def x_app(limiter: RateLimiter) -> FastAPI:
    """``GET /x`` behind the middleware."""
    app = FastAPI()

    @app.get("/x")
    async def x() -> dict[str, str]:
        return {}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


def gauges(limiter: RateLimiter) -> dict[str, dict[tuple[str, ...], float]]:
    return RateLimitMetrics(limiter, registry=CollectorRegistry()).snapshot()[2]


async def test_the_dynamic_factor_gauge_shows_an_override_above_one() -> None:
    limiter = RateLimiter(ip_limit="3/minute", dynamic=DynamicLimits())
    assert limiter.dynamic is not None
    await limiter.dynamic.set_override(2.0, by="ops")
    assert gauges(limiter)["rate_limit_dynamic_factor"][("override",)] == 2.0


def test_the_breaker_gauge_shows_half_open_once_the_cooldown_is_over() -> None:
    now = [1000.0]
    breaker = CircuitBreaker(failure_threshold=1, cooldown=5.0, clock=lambda: now[0])
    limiter = RateLimiter(ip_limit="3/minute", breaker=breaker)
    breaker.record_failure()
    assert gauges(limiter)["rate_limit_breaker_state"][("open",)] == 1.0
    now[0] += 5  # no request since: an idle instance must not report "open" for ever
    shown = gauges(limiter)["rate_limit_breaker_state"]
    assert (shown[("open",)], shown[("half_open",)]) == (0.0, 1.0)


async def test_a_clients_behaviour_factor_scales_its_composite_levels_too() -> None:
    behaviour = BehaviourTracker(abusive_requests=1)  # any client is "far over volume"
    limiter = RateLimiter(
        ip_limit="10/minute",
        composite_limits=[CompositeLimit(("ip", "endpoint"), "10/minute")],
        dynamic=DynamicLimits(behaviour=behaviour),
    )
    app = x_app(limiter)
    async with client_for(app) as client:
        for _ in range(3):
            answer = await client.get("/x")
    shown = policies(answer)
    assert shown["ip"]["q"] == shown["ip-endpoint"]["q"] == 3  # x0.3 on both


@pytest.mark.parametrize(("factor", "quota"), [(0.02, 20), (0.07, 70), (0.12, 120), (2.5, 2500)])
async def test_an_override_keeps_small_factors(factor: float, quota: int) -> None:
    limiter = RateLimiter(ip_limit="1000/minute", dynamic=DynamicLimits())
    assert limiter.dynamic is not None
    await limiter.dynamic.set_override(factor, by="ops")
    app = x_app(limiter)
    async with client_for(app) as client:
        answer = await client.get("/x")
    assert policies(answer)["ip"]["q"] == quota


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: BehaviourTracker(max_clients=0), "behaviour.max_clients"),
        (lambda: BehaviourTracker(penalty_violations=0), "behaviour.penalty_violations"),
        (lambda: BehaviourTracker(penalty_duration=-1), "behaviour.penalty_duration"),
        (lambda: BehaviourTracker(good_factor="x"), "behaviour.good_factor"),
        (lambda: BehaviourTracker(abusive_factor=-1), "behaviour.abusive_factor"),
        (lambda: LoadThresholds(cpu_high_factor=0), "load.thresholds.cpu_high_factor"),
        (lambda: LoadMonitor(thresholds="x"), "load.thresholds"),
        (lambda: DynamicLimits(load="x"), "dynamic.load"),
        (lambda: DynamicLimits(behaviour=LoadMonitor()), "dynamic.behaviour"),
    ],
)
def test_bad_dynamic_settings_fail_at_construction(build: Any, field: str) -> None:
    """BehaviourTracker(max_clients=0) used to be taken, and then fail every request."""
    with pytest.raises(ConfigurationError) as info:
        build()
    assert info.value.field == field


async def test_a_refund_naming_one_level_twice_is_refused_as_on_redis() -> None:
    backend = MemoryBackend(clock=FakeClock())
    check = Check(Policy("p", "10/minute", Algorithm.FIXED_WINDOW), "ip", "192.0.2.1", 1)
    await backend.hit([check])
    with pytest.raises(ValueError, match="twice"):
        await backend.refund([check, check])


async def test_behaviour_is_judged_over_the_last_hour_not_per_clock_hour(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An abuser refused 18 times of 20 at 10:59:50 was a clean client at 11:00:05."""
    import types

    import fastapi_ratelimit.dynamic as dynamic_module

    now = [1_700_002_790.0]  # 10 s before a whole hour
    monkeypatch.setattr(dynamic_module, "time", types.SimpleNamespace(time=lambda: now[0]))
    tracker = BehaviourTracker()
    for i in range(20):
        await tracker.record("ip:203.0.113.7", i < 2)
    assert tracker.factor("ip:203.0.113.7") == 0.3
    now[0] += 15  # a new clock hour: the hour before still weighs
    assert tracker.factor("ip:203.0.113.7") == 0.3
    now[0] += 3600  # more than an hour after: forgotten
    assert tracker.factor("ip:203.0.113.7") == 1.0


async def test_the_503_of_reduced_capacity_is_for_a_refusal_the_reduction_caused() -> None:
    """A client that spent its whole quota as configured used to get the 503 once a cut was
    in force; it used its quota, and gets the 429. One the cut alone refuses gets the 503."""
    limiter = RateLimiter(ip_limit="4/minute", dynamic=DynamicLimits())
    assert limiter.dynamic is not None
    app = x_app(limiter)
    async with client_for(app, ip="198.51.100.1") as spender:
        assert [(await spender.get("/x")).status_code for _ in range(5)] == [200] * 4 + [429]
    await limiter.dynamic.set_override(0.5, by="ops")
    async with client_for(app, ip="198.51.100.1") as spender:
        over = await spender.get("/x")
    assert over.status_code == 429
    assert over.json()["type"].endswith("#quota-exceeded")
    async with client_for(app, ip="198.51.100.2") as newcomer:
        answers = [await newcomer.get("/x") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 503]  # 2 of a configured 4
    assert answers[2].json()["type"].endswith("#temporary-reduced-capacity")
