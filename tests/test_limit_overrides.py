"""One level's limit changed at run time (issue 14, item 8): set on one instance, through
the Python API, the admin API or the CLI, it applies on every instance built with
``limit_overrides=True`` without a restart, counters carried over; an invalid rate is refused
with an error naming it, and the old limit stays."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import pytest
from fastapi import FastAPI
from http_helpers import cli, client_for, policies, remaining, work_app

from fastapi_ratelimit import ConfigurationError, MemoryBackend, RateLimiter, RedisBackend
from fastapi_ratelimit.admin import admin_router

TOKEN = "s3cret-admin-token-0123"
ADMIN = {"authorization": f"Bearer {TOKEN}"}
INVALID = ["-5/minute", "0/0s", "abc"]


async def until(
    condition: Callable[[], Awaitable[bool]], what: str, deadline: float = 10.0
) -> None:
    """Poll ``condition`` every 20 ms until it holds; fail after ``deadline`` seconds."""
    started = time.monotonic()
    while not await condition():
        assert time.monotonic() - started < deadline, f"{what}: not within {deadline} s"
        await asyncio.sleep(0.02)


def limiter_on(url: str, **options: object) -> RateLimiter:
    # Day-long windows: no window boundary moves the counts while the test runs.
    return RateLimiter(
        backend=RedisBackend.from_url(url, timeout=5.0),
        ip_limit="5/day",
        endpoint_limits={"GET /work": "100/day"},
        limit_overrides=True,
        **options,  # type: ignore[arg-type]
    )


async def limit_of(limiter: RateLimiter, scope: str) -> tuple[int, int]:
    """(limit, remaining) of a level for the test client, as that instance sees it now."""
    decisions = await limiter.operator.inspect(ip="203.0.113.7", endpoint="GET /work")
    (decision,) = [d for d in decisions if d.scope == scope]
    return decision.limit, decision.remaining


@pytest.mark.redis
async def test_a_changed_limit_reaches_every_instance_counters_kept(redis_url: str) -> None:
    first, second = limiter_on(redis_url), limiter_on(redis_url)
    # An instance without the opt-in never applies it (and never polls for it).
    other = RateLimiter(backend=RedisBackend.from_url(redis_url, timeout=5.0), ip_limit="5/day")
    admin_app = FastAPI()  # not behind the limiter: its calls cost the client nothing
    admin_app.include_router(admin_router(first, token=TOKEN), prefix="/admin")
    try:
        async with (
            client_for(work_app(first)) as a,
            client_for(admin_app) as admin,
            client_for(work_app(second)) as b,
            client_for(work_app(other)) as c,
        ):
            statuses = [(await client.get("/work")).status_code for client in (a, a, b, b)]
            assert statuses == [200, 200, 200, 200]
            assert policies(await b.get("/work"))["ip"]["q"] == 5  # the 5th of 5

            # Python API, on the first instance; the second applies it on its next refresh.
            await first.operator.set_limit("ip", "20/day", by="test")

            async def second_sees(limit: int) -> bool:
                return (await limit_of(second, "ip"))[0] == limit

            await until(lambda: second_sees(20), "the second instance applies 20/day")
            assert await limit_of(second, "ip") == (20, 15)  # 5 spent, none forgotten
            response = await b.get("/work")
            assert response.status_code == 200
            assert policies(response)["ip"]["q"] == 20
            assert remaining(response) == "14"
            assert (await c.get("/work")).status_code == 429  # still 5/day there

            # Invalid values are refused on every surface, and 20/day stays in force.
            for rate in INVALID:
                with pytest.raises(ConfigurationError, match=r"^rate"):
                    await first.operator.set_limit("ip", rate)
                refused = await admin.put(
                    "/admin/limits", json={"level": "ip", "rate": rate}, headers=ADMIN
                )
                assert refused.status_code == 422
                assert refused.json()["detail"].startswith("rate")
                # "--": argparse would read "-5/minute" as an option.
                done = await asyncio.to_thread(cli, redis_url, "limit", "set", "ip", "--", rate)
                assert done.returncode == 2
                assert "error: rate" in done.stderr
            with pytest.raises(ConfigurationError, match=r"^level"):
                await first.operator.set_limit(
                    "user", "10/day"
                )  # a level this limiter doesn't have
            assert await limit_of(first, "ip") == (20, 14)
            assert await limit_of(second, "ip") == (20, 14)

            # The admin API: one endpoint's limit, named in the body.
            body = {"level": "endpoint", "endpoint": "GET /work", "rate": "6/day"}
            assert (await admin.put("/admin/limits", json=body, headers=ADMIN)).status_code == 200
            await until(lambda: second_sees_endpoint(second, 6), "endpoint limit on the second")
            # 6 requests so far: the endpoint level is spent on both instances.
            assert (await b.get("/work")).status_code == 429
            assert (await a.get("/work")).status_code == 429
            listed = (await admin.get("/admin/limits", headers=ADMIN)).json()["limits"]
            assert {k: v["rate"] for k, v in listed.items()} == {
                "endpoint:GET /work": "6/day",
                "ip": "20/day",
            }

            # The CLI: back to the configured endpoint limit, then a new one.
            done = await asyncio.to_thread(
                cli, redis_url, "limit", "clear", "endpoint", "--endpoint", "GET /work"
            )
            assert done.returncode == 0, done.stderr
            await until(lambda: second_sees_endpoint(second, 100), "restored on the second")
            done = await asyncio.to_thread(cli, redis_url, "limit", "set", "ip", "7/day")
            assert done.returncode == 0, done.stderr
            await until(lambda: second_sees(7), "the CLI's 7/day on the second")
            await until(lambda: second_sees_endpoint(first, 100), "restored on the first")
            assert await limit_of(first, "ip") == (7, 1)
            assert (await a.get("/work")).status_code == 200  # the 7th of 7
            assert (await b.get("/work")).status_code == 429
    finally:
        for limiter in (first, second, other):
            await limiter.aclose()


async def second_sees_endpoint(limiter: RateLimiter, limit: int) -> bool:
    return (await limit_of(limiter, "endpoint"))[0] == limit


async def test_the_opt_in_is_needed_and_needs_a_store() -> None:
    limiter = RateLimiter(ip_limit="5/day")
    with pytest.raises(ConfigurationError, match=r"^limit_overrides: "):
        await limiter.operator.set_limit("ip", "10/day")
    app = FastAPI()
    app.include_router(admin_router(limiter, token=TOKEN), prefix="/admin")
    async with client_for(app) as client:
        response = await client.put(
            "/admin/limits", json={"level": "ip", "rate": "9/day"}, headers=ADMIN
        )
        assert response.status_code == 409

    class Plain(MemoryBackend):
        control_load = control_version = control_put = control_delete = None  # type: ignore[assignment]

    with pytest.raises(ConfigurationError, match=r"^limit_overrides: "):
        RateLimiter(backend=Plain(), ip_limit="5/day", limit_overrides=True)
    with pytest.raises(ConfigurationError, match=r"^limit_overrides: "):
        RateLimiter(ip_limit="5/day", limit_overrides="yes")  # type: ignore[arg-type]


async def test_a_stored_rate_this_instance_cannot_use_is_ignored() -> None:
    # A CLI cannot know the app's algorithm: a burst for a sliding window is stored, and the
    # instance keeps its configured limit rather than fail requests.
    from fastapi_ratelimit.limit_overrides import store_limit

    backend = MemoryBackend()
    limiter = RateLimiter(backend=backend, ip_limit="2/day", limit_overrides=True)
    await store_limit(backend, "ip", "10/day;burst=20")
    try:
        async with client_for(work_app(limiter)) as client:
            statuses = [(await client.get("/work")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
    finally:
        await limiter.aclose()
