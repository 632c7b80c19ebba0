"""Prometheus metrics: scraped over HTTP and parsed with prometheus_client's own parser."""

from __future__ import annotations

from collections.abc import Iterable

import httpx
import pytest
from fastapi import FastAPI, Request
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample
from servers import free_port

from fastapi_ratelimit import ConfigurationError, RateLimiter, RateLimitMiddleware
from fastapi_ratelimit.dynamic import DynamicLimits
from fastapi_ratelimit.metrics import METRICS, RateLimitMetrics
from fastapi_ratelimit.recorder import Recorder, error_kind

TIERS = {"free": "5/minute", "pro": "50/minute"}


def make_app(limiter: RateLimiter) -> tuple[FastAPI, RateLimitMetrics]:
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    metrics = RateLimitMetrics(limiter, registry=CollectorRegistry())
    app.add_route("/metrics", metrics.endpoint)

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {"id": item_id}

    return app, metrics


def client(app: FastAPI) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


async def scrape(http: httpx.AsyncClient) -> tuple[str, dict[str, list[Sample]]]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f.samples for f in text_string_to_metric_families(response.text)}
    return response.text, families


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    return sum(s.value for s in samples if s.name == name and s.labels == labels)


def by_user(request: Request) -> str | None:
    return request.headers.get("x-user")


def tier_of(request: Request) -> str | None:
    return "pro" if request.headers.get("x-user", "").endswith("7") else None


async def test_every_metric_bounded_and_free_of_secrets_under_10000_identities() -> None:
    limiter = RateLimiter(
        ip_limit="1/minute",
        api_key_limit="100/minute",
        tiers=TIERS,
        user_resolver=by_user,
        tier_resolver=tier_of,
        trusted_proxies=["127.0.0.1"],
    )
    app, _ = make_app(limiter)
    secrets: list[str] = []
    async with client(app) as http:
        for i in range(10_000):
            ip, key, user = f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"sk-{i:08d}", f"u{i}"
            secrets += [ip, key, user] if i % 97 == 0 else []
            headers = {"x-forwarded-for": ip, "x-api-key": key, "x-user": user}
            response = await http.get(f"/items/{i}", headers=headers)
            assert response.status_code == 200
        # The same IP again: refused at the ip level, on a method no app has.
        blocked = await http.request("BREW", "/items/1", headers={"x-forwarded-for": "10.0.0.1"})
        assert blocked.status_code == 429
        text, families = await scrape(http)

    for name, (kind, _, labels) in METRICS.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert family in families, name
        for sample in families[family]:
            expected = {*labels, "le"} if sample.name.endswith("_bucket") else set(labels)
            assert set(sample.labels) == expected, sample
    # 10,001 identities, 10,001 paths: a handful of series, none of them an identity.
    assert sum(len(samples) for samples in families.values()) < 120
    for secret in secrets:
        assert secret not in text
    assert "10.0.0.1" not in text
    assert "sk-" not in text
    assert '/items/1"' not in text

    requests = families["rate_limit_requests"]
    assert value(requests, "rate_limit_requests_total", endpoint="/items/{item_id}", method="GET")
    assert value(requests, "rate_limit_requests_total", endpoint="/items/{item_id}", method="OTHER")
    allowed = families["rate_limit_requests_allowed"]
    assert sum(s.value for s in allowed if s.name.endswith("_total")) == 10_000
    blocked_samples = families["rate_limit_requests_blocked"]
    assert (
        value(
            blocked_samples,
            "rate_limit_requests_blocked_total",
            endpoint="/items/{item_id}",
            method="OTHER",
            reason="ip",
        )
        == 1
    )
    by_scope = families["rate_limit_requests_by_scope"]
    assert value(by_scope, "rate_limit_requests_by_scope_total", scope="ip") == 10_001
    assert value(by_scope, "rate_limit_requests_by_scope_total", scope="api_key") == 10_000
    blocked_scope = families["rate_limit_blocked_by_scope"]
    assert value(blocked_scope, "rate_limit_blocked_by_scope_total", scope="ip") == 1
    tiers = families["rate_limit_requests_by_tier"]
    assert value(tiers, "rate_limit_requests_by_tier_total", tier="pro") == 1000
    assert value(tiers, "rate_limit_requests_by_tier_total", tier="free") == 9000
    assert value(tiers, "rate_limit_requests_by_tier_total", tier="none") == 1
    duration = families["rate_limit_check_duration_seconds"]
    assert value(duration, "rate_limit_check_duration_seconds_count") == 10_001
    assert value(duration, "rate_limit_check_duration_seconds_bucket", le="+Inf") == 10_001
    gauges = families["rate_limit_breaker_state"]
    assert value(gauges, "rate_limit_breaker_state", state="closed") == 1
    assert value(families["rate_limit_active_limiters"], "rate_limit_active_limiters") == 1


async def test_shadow_levels_are_counted_apart() -> None:
    app, _ = make_app(RateLimiter(ip_limit="1/minute", global_limit="100/minute", shadow={"ip"}))
    async with client(app) as http:
        for _ in range(3):
            assert (await http.get("/items/a")).status_code == 200
        _, families = await scrape(http)
    shadow = families["rate_limit_shadow_requests"]
    assert value(shadow, "rate_limit_shadow_requests_total", scope="ip") == 3
    shadow_blocked = families["rate_limit_shadow_blocked"]
    assert value(shadow_blocked, "rate_limit_shadow_blocked_total", scope="ip") == 2
    # Enforced levels only in the scope counts.
    by_scope = families["rate_limit_requests_by_scope"]
    assert value(by_scope, "rate_limit_requests_by_scope_total", scope="global") == 3
    assert value(by_scope, "rate_limit_requests_by_scope_total", scope="ip") == 0


@pytest.mark.redis
async def test_backend_errors_by_kind_and_the_breaker_state() -> None:
    from fastapi_ratelimit import RedisBackend

    # Nothing listens on this port: every call is refused.
    backend = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=1.0)
    limiter = RateLimiter(backend=backend, ip_limit="10/minute")
    app, _ = make_app(limiter)
    assert limiter.breaker is not None
    async with client(app) as http:
        sent = 0
        while limiter.breaker.state != "open":
            assert sent < 100, "the breaker never opened"
            assert (await http.get("/items/a")).status_code == 200  # fails open
            sent += 1
        assert (await http.get("/items/a")).status_code == 200
        _, families = await scrape(http)
    await limiter.aclose()
    errors = families["rate_limit_backend_errors"]
    assert value(errors, "rate_limit_backend_errors_total", kind="connection") == sent
    assert value(errors, "rate_limit_backend_errors_total", kind="circuit_open") == 1
    states = families["rate_limit_breaker_state"]
    assert value(states, "rate_limit_breaker_state", state="open") == 1
    assert value(states, "rate_limit_breaker_state", state="closed") == 0
    # Failed open: admitted, with no level decided.
    allowed = families["rate_limit_requests_allowed"]
    assert sum(s.value for s in allowed if s.name.endswith("_total")) == sent + 1


async def test_refusals_before_any_limit_are_counted_with_their_reason() -> None:
    limiter = RateLimiter(ip_limit="10/minute", access_lists=True)
    app, _ = make_app(limiter)
    await limiter.operator.block("ip", "127.0.0.1")
    async with client(app) as http:
        assert (await http.get("/items/a")).status_code == 403
        _, families = await scrape(http)
    blocked = families["rate_limit_requests_blocked"]
    assert (
        value(
            blocked,
            "rate_limit_requests_blocked_total",
            endpoint="/items/{item_id}",
            method="GET",
            reason="blocklist",
        )
        == 1
    )
    await limiter.aclose()


async def test_throttled_requests_and_their_delay() -> None:
    limiter = RateLimiter(ip_limit="10/second", delay={"ip": 5})
    app, _ = make_app(limiter)
    async with client(app) as http:
        statuses = [(await http.get("/items/a")).status_code for _ in range(11)]
        _, families = await scrape(http)
    assert statuses == [200] * 11
    throttled = families["rate_limit_throttled"]
    assert value(throttled, "rate_limit_throttled_total", outcome="allowed") == 1
    delay = families["rate_limit_throttle_delay_seconds"]
    assert value(delay, "rate_limit_throttle_delay_seconds_count") == 1
    assert value(delay, "rate_limit_throttle_delay_seconds_sum") > 0


async def test_dynamic_factor_gauges() -> None:
    limiter = RateLimiter(ip_limit="10/minute", dynamic=DynamicLimits())
    app, _ = make_app(limiter)
    assert limiter.dynamic is not None
    await limiter.dynamic.set_override(0.5, ttl=60)
    async with client(app) as http:
        _, families = await scrape(http)
    factors = families["rate_limit_dynamic_factor"]
    assert value(factors, "rate_limit_dynamic_factor", source="override") == 0.5
    assert value(factors, "rate_limit_dynamic_factor", source="load") == 1.0
    await limiter.aclose()


def test_a_client_cannot_mint_series_with_methods_or_unmatched_paths() -> None:
    recorder = Recorder()
    limiter = RateLimiter()
    from fastapi_ratelimit.context import RequestContext

    for i in range(5000):
        context = RequestContext(limiter, "ip", None, None, None, f"M{i} <unmatched>", None, 1)
        recorder.request(context, None, 0.001)
    assert set(recorder.requests) == {("<unmatched>", "OTHER", "none", "")}


def test_bad_configuration_names_the_field() -> None:
    with pytest.raises(ConfigurationError, match="limiters"):
        RateLimitMetrics()
    with pytest.raises(ConfigurationError, match="flush_interval"):
        RateLimitMetrics(RateLimiter(), registry=None, flush_interval=5)
    with pytest.raises(ConfigurationError, match="multiprocess"):
        RateLimitMetrics(RateLimiter(), registry=None, multiprocess=True)


def test_error_kinds_are_bounded_labels() -> None:
    def failure(cause: BaseException) -> BaseException:
        error = RuntimeError("redis://user:secret@db:6379 refused")
        error.__cause__ = cause
        return error

    assert error_kind(None) == "circuit_open"
    assert error_kind(failure(TimeoutError())) == "timeout"
    assert error_kind(failure(ConnectionRefusedError())) == "connection"
    assert error_kind(failure(ValueError())) == "error"
