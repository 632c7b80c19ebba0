"""Shadow levels are announced in the rate-limit headers (issue 14, defect 7), so clients see
a limit during its dark launch; ``shadow_headers=False`` hides them."""

from __future__ import annotations

import pytest
from conftest import BackendFactory
from http_helpers import client_for, policies, ratelimit, work_app

from fastapi_ratelimit import ConfigurationError, RateLimiter


async def test_a_shadow_level_is_announced_but_never_enforced(
    make_backend: BackendFactory,
) -> None:
    limiter = RateLimiter(backend=make_backend(), ip_limit="2/minute", shadow={"ip"})
    async with client_for(work_app(limiter)) as client:
        answers = [await client.get("/work") for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(policies(a)["ip"] == {"q": 2, "w": 60} for a in answers)
    assert [ratelimit(a)[1]["r"] for a in answers] == [1, 0, 0]
    # Over the coming limit: the client is told it would now wait.
    assert ratelimit(answers[2])[1]["t"] >= 1


async def test_shadow_and_enforced_levels_side_by_side() -> None:
    limiter = RateLimiter(global_limit="3/minute", ip_limit="1/minute", shadow={"ip"})
    async with client_for(work_app(limiter)) as client:
        answers = [await client.get("/work") for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert set(policies(answers[1])) == {"global", "ip"}
    assert ratelimit(answers[1])[0] == "ip"  # the shadow level is the tighter one
    # A real denial speaks of the enforced levels only: its Retry-After matches its t.
    denied = answers[3]
    assert set(policies(denied)) == {"global"}
    assert int(denied.headers["retry-after"]) >= ratelimit(denied)[1]["t"]


async def test_shadow_headers_false_hides_them() -> None:
    limiter = RateLimiter(ip_limit="2/minute", shadow={"ip"}, shadow_headers=False)
    async with client_for(work_app(limiter)) as client:
        answer = await client.get("/work")
    assert answer.status_code == 200
    assert "ratelimit" not in answer.headers
    assert "ratelimit-policy" not in answer.headers


def test_shadow_headers_must_be_a_bool() -> None:
    with pytest.raises(ConfigurationError, match="shadow_headers"):
        RateLimiter(shadow=True, shadow_headers="yes")  # type: ignore[arg-type]
