"""A cost larger than a limit (issue 14, defect 6): refused at construction when it is known
then, and answered honestly (no Retry-After, no RateLimit `t`) when it appears at run time."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import BackendFactory
from fastapi import FastAPI, Request
from http_helpers import client_for, remaining

from fastapi_ratelimit import (
    ConfigurationError,
    RateLimiter,
    RateLimitMiddleware,
    Tier,
    rate_limit,
    report_cost,
)
from fastapi_ratelimit.responses import COST_EXCEEDS_LIMIT_TYPE


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        (
            {"ip_limit": "10/minute", "costs": {"POST /ocr/process": 11}},
            "costs['POST /ocr/process']",
            ["11 units", "'ip'", "(10)"],
        ),
        (
            {"endpoint_limits": {"* /upload": "4/minute"}, "costs": {"POST /upload": 5}},
            "costs['POST /upload']",
            ["5 units", "'endpoint'", "(4)"],
        ),
        (
            {
                "tiers": {"free": Tier("free", "10/minute", cost_multiplier=2.0)},
                "costs": {"POST /ocr/batch": 6},
            },
            "costs['POST /ocr/batch']",
            ["12 units in tier 'free'", "'user-free'"],
        ),
        (
            {"global_limit": "3/second", "costs": {"POST /x": 2, "GET /y": 4}},
            "costs['GET /y']",
            ["4 units", "'global'"],
        ),
    ],
)
def test_a_cost_no_level_could_admit_is_refused_at_construction(
    kwargs: dict[str, Any], field: str, words: list[str]
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RateLimiter(**kwargs)
    assert caught.value.field == field
    for word in words:
        assert word in str(caught.value)


def test_a_route_limit_cost_over_its_rate_is_refused_naming_the_endpoint() -> None:
    with pytest.raises(ConfigurationError) as caught:

        @rate_limit("10/minute", cost=11)
        async def process() -> None: ...

    message = str(caught.value)
    assert "process'" in message
    assert "cost" in caught.value.field
    assert "(got 11)" in message
    assert "'route-ip-10-60s'" in message


def assert_honest_refusal(response: httpx.Response, cost: int) -> None:
    assert response.status_code == 403
    assert "retry-after" not in response.headers
    assert "ratelimit" not in response.headers
    body = response.json()
    assert body["type"] == COST_EXCEEDS_LIMIT_TYPE
    assert body["cost"] == cost


def app_for(limiter: RateLimiter) -> FastAPI:
    app = FastAPI()

    @app.post("/ocr/process")
    async def process() -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/report/{units}")
    async def report(request: Request, units: int) -> dict[str, str]:
        report_cost(request, units)
        return {"ok": "yes"}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


async def test_a_cost_function_over_the_limit_is_refused_for_good_without_retry_after(
    make_backend: BackendFactory,
) -> None:
    def cost(request: Any) -> int:
        return int(request.headers.get("x-pages", "1"))

    limiter = RateLimiter(backend=make_backend(), ip_limit="10/minute", cost_function=cost)
    async with client_for(app_for(limiter)) as client:
        for _ in range(3):
            assert_honest_refusal(await client.post("/ocr/process", headers={"x-pages": "11"}), 11)
        # Nothing was consumed: the whole quota is still there.
        fits = await client.post("/ocr/process", headers={"x-pages": "10"})
        assert fits.status_code == 200
        # A plain over-quota refusal is still the 429 with a true Retry-After.
        over = await client.post("/ocr/process")
        assert over.status_code == 429
        assert int(over.headers["retry-after"]) >= 1


async def test_a_huge_cost_function_cost_is_charged_in_full_or_refused_for_good(
    make_backend: BackendFactory,
) -> None:
    """Found in the session-25 audit: a cost above the cost table's bound (1,000,000) fell
    back to the table's cost of 1, so the dearest requests were the cheapest."""

    def cost(request: Any) -> int:
        return int(request.headers.get("x-bytes", "1"))

    limiter = RateLimiter(backend=make_backend(), ip_limit="100000000/day", cost_function=cost)
    async with client_for(app_for(limiter)) as client:
        # Far beyond any limit a level can have: refused for good, not charged 1.
        assert_honest_refusal(
            await client.post("/ocr/process", headers={"x-bytes": str(10**30)}), 10**12 + 1
        )
        big = await client.post("/ocr/process", headers={"x-bytes": "2000000"})
        assert big.status_code == 200
    assert remaining(big) == str(100_000_000 - 2_000_000)


async def test_a_tier_multiplier_pushing_a_cost_over_the_limit_is_refused_for_good() -> None:
    limiter = RateLimiter(
        tiers={"free": Tier("free", "10/minute", cost_multiplier=3.0)},
        user_resolver=lambda request: "alice",
        cost_function=lambda request: 4,
    )
    async with client_for(app_for(limiter)) as client:
        assert_honest_refusal(await client.post("/ocr/process"), 12)


@pytest.mark.parametrize("middleware", [True, False])
async def test_a_route_limit_taking_the_table_cost_over_its_rate(middleware: bool) -> None:
    limiter = RateLimiter(costs={"POST /big": 3})
    app = FastAPI()

    @app.post("/big")
    @rate_limit("2/minute", limiter=None if middleware else limiter)
    async def big() -> dict[str, str]:
        return {"ok": "yes"}

    if middleware:
        app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        refused = await client.post("/big")
    assert refused.status_code == 403
    assert "retry-after" not in refused.headers
    assert "can never pass" in refused.text


async def test_a_reported_cost_over_the_limit_takes_the_whole_quota(
    make_backend: BackendFactory,
) -> None:
    limiter = RateLimiter(backend=make_backend(), ip_limit="10/minute")
    async with client_for(app_for(limiter)) as client:
        assert (await client.post("/report/50")).status_code == 200
        # The request really cost more than the quota: the client has nothing left, and the
        # 429 it gets now tells a wait that is true (the quota refills over the window).
        after = await client.post("/ocr/process")
        assert after.status_code == 429
        assert 1 <= int(after.headers["retry-after"]) <= 120
