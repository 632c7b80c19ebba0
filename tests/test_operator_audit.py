"""The operator's surfaces do what operations.md says (an audit of them, session 25): inspect
and reset reach the bucket a tiered API key is charged to and show the limits in force; the
admin API answers a bad factor with a 422 and a list route without shared lists with a 409;
list entries drop IPv6 zone ids; the CLI exits 2 with one line on bad input or an unreachable
Redis and writes an audit line for every change; live stats stay bounded under a flood."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from http_helpers import cli, client_for

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware, RedisBackend, Tier
from fastapi_ratelimit.admin import admin_router
from fastapi_ratelimit.dynamic import DynamicLimits
from fastapi_ratelimit.stats import LiveStats

KEY = "sk_live_tiered_key"
TOKEN = "a-long-random-secret-123"


def home_app(limiter: RateLimiter) -> FastAPI:
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    @app.get("/")
    async def home() -> dict[str, str]:
        return {"ok": "yes"}

    return app


async def test_inspect_and_reset_reach_the_bucket_of_an_api_keys_stored_plan() -> None:
    limiter = RateLimiter(
        api_key_limit="100/minute",  # the limiter's sliding window; the plans token buckets
        tiers={"free": Tier("free", "2/minute"), "gold": Tier("gold", "3/minute")},
        default_tier="free",
    )
    app = home_app(limiter)
    await limiter.operator.set_tier(KEY, "gold", kind="api_key")
    key = {"x-api-key": KEY}
    async with client_for(app) as client:
        assert [(await client.get("/", headers=key)).status_code for _ in range(2)] == [200] * 2
        [level] = [d for d in await limiter.operator.inspect(api_key=KEY) if d.scope == "api_key"]
        assert (level.policy, level.limit, level.remaining) == ("api_key-gold", 3, 1)
        assert (await client.get("/", headers=key)).status_code == 200
        assert (await client.get("/", headers=key)).status_code == 429
        await limiter.operator.reset(api_key=KEY, by="ops")
        assert (await client.get("/", headers=key)).status_code == 200


async def test_inspect_shows_the_limits_the_operators_override_puts_in_force() -> None:
    limiter = RateLimiter(ip_limit="4/minute", dynamic=DynamicLimits())
    assert limiter.dynamic is not None
    await limiter.dynamic.set_override(0.5, by="on-call")
    async with client_for(home_app(limiter)) as client:
        answer = await client.get("/")
    assert answer.headers["RateLimit-Policy"] == '"ip";q=2;w=60'
    [level] = await limiter.operator.inspect(ip="203.0.113.7")
    assert (level.limit, level.remaining) == (2, 1)


def admin_app(limiter: RateLimiter) -> FastAPI:
    app = FastAPI()
    app.include_router(admin_router(limiter, token=TOKEN), prefix="/admin")
    return app


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"11"])
async def test_an_override_factor_out_of_range_is_a_422_never_a_500(literal: bytes) -> None:
    limiter = RateLimiter(ip_limit="5/minute", dynamic=DynamicLimits())
    transport = httpx.ASGITransport(app=admin_app(limiter), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answer = await client.put(
            "/admin/override",
            content=b'{"factor": ' + literal + b"}",
            headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
        )
    assert answer.status_code == 422, answer.text
    assert "factor" in answer.text
    assert limiter.dynamic is not None
    assert await limiter.dynamic.override_factor() == 1.0


@pytest.mark.parametrize("static", [{"allow": ["user:probe"]}, {"block": ["ip:192.0.2.0/24"]}])
@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/allow", None),
        ("POST", "/block", {"kind": "ip", "value": "198.51.100.7"}),
        ("POST", "/block/remove", {"kind": "ip", "value": "198.51.100.7"}),
    ],
)
async def test_list_routes_answer_409_on_static_lists_alone(
    static: dict[str, list[str]], method: str, path: str, body: Any
) -> None:
    limiter = RateLimiter(ip_limit="5/minute", **static)
    async with client_for(admin_app(limiter)) as client:
        answer = await client.request(
            method, "/admin" + path, json=body, headers={"Authorization": f"Bearer {TOKEN}"}
        )
    assert answer.status_code == 409, answer.text
    assert "access_lists" in answer.text


async def test_a_list_entry_drops_an_ipv6_zone_id() -> None:
    limiter = RateLimiter(ip_limit="5/minute", access_lists=True)
    entry = await limiter.operator.block("ip", "2001:db8:1:2::%eth0/64")
    assert entry.value == "2001:db8:1:2::/64"
    assert await limiter.operator.unblock("ip", "2001:db8:1:2::/64") is True
    assert await limiter.operator.blocked() == []


DOWN = "redis://:hunter2@127.0.0.1:1/0"  # nothing listens on port 1


@pytest.mark.parametrize(
    ("url", "args"),
    [
        (DOWN, ["override", "get"]),
        (DOWN, ["--cluster", "stats"]),
        (DOWN, ["--cluster", "reset", "--user", "alice"]),
        ("redis://:hunter2@[::1/0", ["stats"]),
        ("redis://:hunter2@127.0.0.1:port/0", ["stats"]),
        ("redis://:hunter2@127.0.0.1:1/0?socket_timeout=abc", ["stats"]),
    ],
)
def test_the_cli_exits_2_with_one_line_on_bad_input_or_no_redis(url: str, args: list[str]) -> None:
    result = cli(url, "--json", *args)
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr[-400:])
    assert "Traceback" not in result.stderr
    assert "hunter2" not in result.stderr + result.stdout
    assert '"factor": 1.0' not in result.stdout  # no default shown as if read


@pytest.mark.redis
async def test_every_cli_change_writes_an_audit_line(redis_url: str) -> None:
    assert cli(redis_url, "--by", "oncall", "limit", "set", "ip", "7/minute").returncode == 0
    cleared = cli(redis_url, "--by", "oncall", "limit", "clear", "ip")
    assert cleared.returncode == 0
    assert "ratelimit audit: limit ip restored by 'oncall'" in cleared.stderr
    limiter = RateLimiter(backend=RedisBackend.from_url(redis_url), ip_limit="10/minute")
    async with client_for(home_app(limiter)) as client:
        assert (await client.get("/")).status_code == 200
    await limiter.aclose()
    reset = cli(redis_url, "--by", "oncall", "reset", "--ip", "203.0.113.7")
    assert reset.returncode == 0, reset.stderr
    assert "ratelimit audit: reset ip=203.0.113.7" in reset.stderr
    assert "by 'oncall'" in reset.stderr


async def test_live_stats_keep_a_bounded_share_of_a_flood_of_limited_clients() -> None:
    """Each second's bucket used to keep up to 10,000 clients, for the whole hour, and every
    tick wrote them all to the backend (63 MB a second under a flood, measured)."""
    limiter = RateLimiter(ip_limit="1/minute", trusted_proxies=["203.0.113.7"])
    stats = LiveStats(limiter, flush=False)
    app = home_app(limiter)
    try:
        async with client_for(app) as client:
            for second in range(5):
                for i in range(250):
                    forwarded = {"X-Forwarded-For": f"{10 + second}.{i}.0.1"}  # a /24 each
                    assert (await client.get("/", headers=forwarded)).status_code == 200
                    assert (await client.get("/", headers=forwarded)).status_code == 429
                stats.tick()
        summary = stats.local_summary()
        assert 0 < len(summary["limited"]) <= 100
        assert len(json.dumps(summary)) < 20_000
        assert all(len(b.limited) <= 20 for b in stats._buckets)
    finally:
        await stats.aclose()
