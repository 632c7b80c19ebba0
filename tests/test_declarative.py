"""The declarative forms a new user reaches for (issue 14, API friction): static allow/block
entries and user tiers in the constructor, per-client endpoint limits, one default
algorithm, exempt paths that add to the defaults, a quiet logger, the CLI's global options."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest
import redis.asyncio
from fastapi import Depends, FastAPI, Request
from http_helpers import cli, client_for, policies

from fastapi_ratelimit import (
    ConfigurationError,
    MemoryBackend,
    RateLimit,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    rate_limit,
)


def user_from_header(request: Request) -> str | None:
    return request.headers.get("x-user")


def app_for(limiter: RateLimiter, **middleware: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/work")
    async def work() -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/ocr/process")
    async def process() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(RateLimitMiddleware, limiter=limiter, **middleware)
    return app


async def test_static_allow_and_block_entries_apply_without_access_lists() -> None:
    limiter = RateLimiter(
        ip_limit="1/minute",
        allow=["ip:10.0.0.0/8", "user:admin"],
        block=["ip:192.0.2.0/24"],
        user_resolver=user_from_header,
    )
    app = app_for(limiter)
    async with client_for(app, ip="10.1.2.3") as office:
        answers = [await office.get("/work") for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert "ratelimit" not in answers[0].headers
    async with client_for(app, ip="203.0.113.9") as admin:
        for _ in range(3):
            assert (await admin.get("/work", headers={"x-user": "admin"})).status_code == 200
        assert (await admin.get("/work")).status_code == 200
        assert (await admin.get("/work")).status_code == 429
    async with client_for(app, ip="192.0.2.77") as blocked:
        assert (await blocked.get("/work")).status_code == 403
    # The stored lists are still off: adding at run time names the option.
    with pytest.raises(ConfigurationError, match="access_lists"):
        await limiter.operator.block("ip", "198.51.100.0/24")


async def test_static_and_stored_entries_together() -> None:
    limiter = RateLimiter(ip_limit="1/minute", access_lists=True, allow=["ip:10.0.0.0/8"])
    await limiter.operator.block("ip", "10.9.0.0/16")
    app = app_for(limiter)
    async with client_for(app, ip="10.9.1.1") as client:
        assert (await client.get("/work")).status_code == 403  # a block wins over an allow
    async with client_for(app, ip="10.8.1.1") as client:
        assert [(await client.get("/work")).status_code for _ in range(2)] == [200, 200]


@pytest.mark.parametrize(
    ("kwargs", "field", "words"),
    [
        ({"allow": ["ip:10.0.0.1/8"]}, "allow-list ip entry", "did you mean 10.0.0.0/8?"),
        ({"block": ["ip:2001:db8::1/128"]}, "block-list ip entry", "/64 or wider"),
        ({"block": ["user:"]}, "block-list user entry", "non-empty"),
        ({"allow": ["host:example.com"]}, "allow", "'ip:<address or network>'"),
        ({"block": "ip:192.0.2.1"}, "block", "a list of entries"),
        ({"user_tiers": {"alice": "pro"}}, "user_tiers", "needs tiers"),
        (
            {"tiers": {"free": "1/second"}, "user_tiers": {"alice": "gold"}},
            "user_tiers['alice']",
            "not one of the tiers (free)",
        ),
        (
            {"endpoint_limits": {"POST /ocr/process": ("50/minute", "user", 3)}},
            "endpoint_limits['POST /ocr/process']",
            "(rate, scope)",
        ),
        (
            {"endpoint_limits": {"POST /ocr/process": ("50/minute", "tenant")}},
            "endpoint_limits['POST /ocr/process']: scope",
            "must combine",
        ),
        (
            {"tiers": {"free": "1/second;burst=100"}},
            "tiers['free']",
            "pass algorithm='token_bucket' or 'gcra'",
        ),
    ],
)
def test_declarative_configuration_is_checked_at_construction(
    kwargs: dict[str, Any], field: str, words: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        RateLimiter(**kwargs)
    assert caught.value.field == field
    assert words in str(caught.value)


async def test_static_user_tiers_apply_and_a_stored_tier_wins() -> None:
    limiter = RateLimiter(
        tiers={"free": "2/minute", "pro": "100/minute"},
        user_tiers={"alice": "pro"},
        user_resolver=user_from_header,
    )
    app = app_for(limiter)
    async with client_for(app) as client:
        alice = await client.get("/work", headers={"x-user": "alice"})
        assert set(policies(alice)) == {"user-pro"}
        bob = await client.get("/work", headers={"x-user": "bob"})
        assert set(policies(bob)) == {"user-free"}
        await limiter.operator.set_tier("alice", "free")
        assert set(policies(await client.get("/work", headers={"x-user": "alice"}))) == {
            "user-free"
        }


async def test_per_client_endpoint_limits_are_declarative() -> None:
    limiter = RateLimiter(
        endpoint_limits={"POST /ocr/process": ("2/minute", "user"), "GET /work": "3/minute"},
        user_resolver=user_from_header,
    )
    app = app_for(limiter)
    async with client_for(app) as client:
        for user in ("alice", "bob"):
            statuses = [
                (await client.post("/ocr/process", headers={"x-user": user})).status_code
                for _ in range(3)
            ]
            assert statuses == [200, 200, 429], user
        # The shared form is unchanged: all clients together.
        statuses = [
            (await client.get("/work", headers={"x-user": user})).status_code
            for user in ("alice", "bob", "carol", "dave")
        ]
        assert statuses == [200, 200, 200, 429]


async def test_one_default_algorithm_flows_everywhere(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url, timeout=5.0)
    limiter = RateLimiter(
        backend=backend,
        algorithm="gcra",
        ip_limit="100/minute",
        tiers={"free": "50/minute"},
        endpoint_limits={"GET /guarded": ("20/minute", "ip"), "GET /decorated": "30/minute"},
        user_resolver=user_from_header,
    )
    app = FastAPI()

    @app.get("/decorated")
    @rate_limit("10/minute")
    async def decorated() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/guarded", dependencies=[Depends(RateLimit("10/minute"))])
    async def guarded() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/own")
    @rate_limit("10/minute", algorithm="fixed_window")
    async def own() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        for path in ("/decorated", "/guarded"):
            answer = await client.get(path, headers={"x-user": "alice"})
            assert answer.status_code == 200
        assert (await client.get("/own")).status_code == 200
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = sorted(k.decode() for k in await client.keys("rl:*"))
    finally:
        await client.aclose()
        await backend.aclose()
    # rl:<scope>:<policy>:<algorithm>:{hash}: the ip level, the tier, both endpoint limits,
    # the decorator and the guard all took the limiter's GCRA; only the limit naming its own
    # algorithm did not.
    levels = [tuple(key.split(":")[1:4]) for key in keys]
    assert [policy for _, policy, code in levels if code != "gc"] == ["route-ip-10-60s"]
    assert sum(policy == "route-ip-10-60s" for _, policy, _ in levels) == 3
    assert {policy for _, policy, _ in levels} >= {"ip", "user", "endpoint", "route-ip-20-60s"}


async def test_exempt_adds_to_the_defaults_unless_told_otherwise() -> None:
    backend = MemoryBackend()
    app = app_for(RateLimiter(backend=backend, ip_limit="1/minute"), exempt=["/hello"])
    async with client_for(app) as client:
        for path in ("/hello", "/health"):
            assert [(await client.get(path)).status_code for _ in range(3)] == [200] * 3
    assert len(backend) == 0
    replaced = app_for(RateLimiter(ip_limit="1/minute"), exempt=["/hello"], default_exempt=False)
    async with client_for(replaced) as client:
        assert [(await client.get("/health")).status_code for _ in range(2)] == [200, 429]


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )


def test_the_library_is_silent_until_the_app_opts_in() -> None:
    warn = "from fastapi_ratelimit.identify import _WarnOnce; _WarnOnce()('probe', int)"
    silent = run_python(f"import fastapi_ratelimit; {warn}")
    assert silent.returncode == 0
    assert silent.stderr == ""
    enabled = run_python(
        f"import fastapi_ratelimit; from loguru import logger; "
        f"logger.enable('fastapi_ratelimit'); {warn}"
    )
    assert "unusable user identity from probe" in enabled.stderr


def test_the_stdlib_logging_bridge_recipe() -> None:
    # The README's recipe, as written there.
    code = """
import logging, sys
from loguru import logger
import fastapi_ratelimit

logging.basicConfig(stream=sys.stdout, format="%(name)s %(levelname)s %(message)s")

class PropagateHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger(record.name).handle(record)

logger.remove()
logger.add(PropagateHandler(), format="{message}")
logger.enable("fastapi_ratelimit")

from fastapi_ratelimit.identify import _WarnOnce
_WarnOnce()("probe", int)
"""
    bridged = run_python(code)
    assert "fastapi_ratelimit.identify WARNING rate limit: unusable user identity" in bridged.stdout


@pytest.mark.redis
def test_cli_global_options_go_before_or_after_the_command(redis_url: str) -> None:
    added = cli(redis_url, "block", "add", "ip", "192.0.2.0/24", "--json", "--by", "ops")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["added_by"] == "ops"
    after = cli(redis_url, "block", "list", "--json")
    assert after.returncode == 0, after.stderr
    before = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastapi_ratelimit.cli",
            "--json",
            "--redis-url",
            redis_url,
            "block",
            "list",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert json.loads(after.stdout) == json.loads(before.stdout)
    assert [e["value"] for e in json.loads(after.stdout)] == ["192.0.2.0/24"]
    # Given after the command, --prefix is honoured too: another prefix has no entries.
    other = cli(redis_url, "block", "list", "--prefix", "other", "--json")
    assert json.loads(other.stdout) == []


@pytest.mark.redis
def test_cli_names_the_network_meant(redis_url: str) -> None:
    refused = cli(redis_url, "block", "add", "ip", "10.0.0.1/8")
    assert refused.returncode == 2
    assert "block-list ip entry" in refused.stderr
    assert "did you mean 10.0.0.0/8?" in refused.stderr
