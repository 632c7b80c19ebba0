"""Tiers set at runtime, allow/block lists, the admin router and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from conftest import BACKEND_KINDS
from fastapi import FastAPI, Header, HTTPException
from http_helpers import cli, client_for, policies, remaining, until, work_app
from loguru import logger

from fastapi_ratelimit import (
    DEFAULT_TIERS,
    ConfigurationError,
    RateLimiter,
    RedisBackend,
)
from fastapi_ratelimit.admin import admin_router

LOCAL = BACKEND_KINDS[:2]  # memory and standalone Redis


def user_from_header(connection: Any) -> str | None:
    return connection.headers.get("x-user")


def tiered(backend: Any, **kwargs: Any) -> RateLimiter:
    return RateLimiter(
        backend=backend,
        tiers=DEFAULT_TIERS,
        user_resolver=user_from_header,
        refresh_interval=0.2,
        **kwargs,
    )


@pytest.fixture
def audit() -> Iterator[list[str]]:
    lines: list[str] = []
    handler = logger.add(lambda message: lines.append(str(message)), level="INFO")
    yield lines
    logger.remove(handler)


@pytest.mark.parametrize("make_backend", LOCAL, indirect=True)
async def test_stored_tier_applies_and_keeps_counters(make_backend: Any, audit: list[str]) -> None:
    limiter = tiered(make_backend())
    app = work_app(limiter)
    alice = {"x-user": "alice"}
    async with client_for(app) as client:
        first = await client.get("/work", headers=alice)
        assert "user-free" in policies(first)
        assert remaining(first) == "99"
        await limiter.operator.set_tier("alice", "pro", by="ops")
        upgraded = await client.get("/work", headers=alice)
        assert "user-pro" in policies(upgraded)
        # Same bucket, nothing reset: the bucket holds what it held as Free (99 tokens, one
        # spent now); from here it refills at Pro's 50/s towards Pro's 2000.
        assert 97 <= int(remaining(upgraded)) <= 99
        assert await limiter.operator.get_tier("alice") == "pro"
        assert await limiter.operator.clear_tier(
            "alice", by="ops"
        )  # this instance applies it at once
        back = await client.get("/work", headers=alice)
        assert "user-free" in policies(back)
    assert any("tier user alice = pro by 'ops'" in line for line in audit)


@pytest.mark.parametrize("make_backend", LOCAL, indirect=True)
async def test_tier_ttl_and_unknown_stored_tier(make_backend: Any, audit: list[str]) -> None:
    backend = make_backend()
    limiter = tiered(backend)
    app = work_app(limiter)
    async with client_for(app) as client:
        await limiter.operator.set_tier("bob", "enterprise", ttl=0.4)
        assert "user-enterprise" in policies(await client.get("/work", headers={"x-user": "bob"}))
        await asyncio.sleep(0.5)
        assert "user-free" in policies(await client.get("/work", headers={"x-user": "bob"}))
        # Written by another deployment straight to the store, so this instance learns it
        # from its background refresh: first a known tier, then one this app does not know.
        carol = {"x-user": "carol"}

        async def carol_on(tier: str) -> bool:
            response = await client.get("/work", headers=carol)
            assert response.status_code == 200
            return set(policies(response)) == {f"user-{tier}"}

        await backend.control_put("tiers", "user:carol", json.dumps({"tier": "pro"}))
        await until(lambda: carol_on("pro"), "the stored tier applied")
        await backend.control_put("tiers", "user:carol", json.dumps({"tier": "platinum"}))
        # Unknown: the default tier, one warning, never a 500.
        await until(lambda: carol_on("free"), "the unknown stored tier fell back")
        for _ in range(3):
            assert await carol_on("free")
    assert sum("unknown tier 'platinum'" in line for line in audit) == 1
    with pytest.raises(ConfigurationError, match=r"^tier: "):
        await limiter.operator.set_tier("bob", "gold")


@pytest.mark.parametrize("make_backend", LOCAL, indirect=True)
async def test_api_key_tier_sets_the_api_key_level(make_backend: Any) -> None:
    limiter = tiered(make_backend(), api_key_limit="10/minute")
    app = work_app(limiter)
    async with client_for(app) as client:
        key = {"x-api-key": "sk_live_123"}
        assert policies(await client.get("/work", headers=key))["api_key"]["q"] == 10
        await limiter.operator.set_tier("sk_live_123", "basic", kind="api_key")  # applied at once
        assert "api_key-basic" in policies(await client.get("/work", headers=key))


async def test_changes_propagate_between_instances(redis_url: str) -> None:
    one = tiered(
        RedisBackend.from_url(redis_url, timeout=5.0), ip_limit="1/minute", access_lists=True
    )
    two = tiered(
        RedisBackend.from_url(redis_url, timeout=5.0), ip_limit="1/minute", access_lists=True
    )
    app_two = work_app(two)
    try:
        async with client_for(app_two) as client:
            await client.get("/work")  # loads the lists and tiers once
            await one.operator.set_tier("dave", "pro")
            await one.operator.allow("ip", "203.0.113.0/24", reason="partner", by="ops")

            async def dave(allowed: bool) -> bool:
                response = await client.get("/work", headers={"x-user": "dave"})
                if allowed:  # allow-listed: no limiting, no headers
                    return response.status_code == 200 and "ratelimit" not in response.headers
                return "ratelimit-policy" in response.headers and "user-pro" in policies(response)

            # Instance two learns both from its background refresh (refresh_interval 0.2 s).
            await until(lambda: dave(allowed=True), "the allow-list entry propagated")
            await one.operator.unallow("ip", "203.0.113.0/24")
            await until(lambda: dave(allowed=False), "the removal propagated")
    finally:
        await one.aclose()
        await two.aclose()


@pytest.mark.parametrize("make_backend", LOCAL, indirect=True)
async def test_allow_and_block_lists(make_backend: Any) -> None:
    backend = make_backend()
    limiter = RateLimiter(
        backend=backend,
        ip_limit="1/minute",
        api_key_limit="1/minute",
        user_resolver=user_from_header,
        user_limit="1/minute",
        trusted_proxies=["10.0.0.0/8"],
        access_lists=True,
        refresh_interval=0.1,
    )
    app = work_app(limiter)
    await limiter.operator.allow("ip", "198.51.100.0/24", reason="office", by="ops")
    await limiter.operator.allow("user", "vip")
    await limiter.operator.allow("api_key", "sk_partner")
    await limiter.operator.block("ip", "192.0.2.66")
    await limiter.operator.block("user", "mallory")
    async with client_for(app, ip="198.51.100.9") as office, client_for(app) as other:
        for _ in range(3):
            response = await office.get("/work")
            assert response.status_code == 200
            assert "ratelimit" not in response.headers  # allowed: headers omitted
            assert (await other.get("/work", headers={"x-user": "vip"})).status_code == 200
            assert (
                await other.get("/work", headers={"x-api-key": "sk_partner"})
            ).status_code == 200
        blocked = await other.get("/work", headers={"x-user": "mallory"})
        assert blocked.status_code == 403
        assert blocked.headers["content-type"] == "application/problem+json"
        assert "retry-after" not in blocked.headers
        # The other client's own quota was untouched by all of that.
        assert (await other.get("/work")).status_code == 200
        assert (await other.get("/work")).status_code == 429
    async with client_for(app, ip="192.0.2.66") as bad:
        assert (await bad.get("/work")).status_code == 403
    # Spoofed forwarding headers from an untrusted peer never reach an allow entry...
    async with client_for(app, ip="203.0.113.99") as spoofer:
        spoof = {"x-forwarded-for": "198.51.100.9"}
        assert (await spoofer.get("/work", headers=spoof)).status_code == 200
        assert (await spoofer.get("/work", headers=spoof)).status_code == 429
    # ...but do through a trusted proxy.
    async with client_for(app, ip="10.0.0.1") as proxy:
        for _ in range(3):
            forwarded = await proxy.get("/work", headers={"x-forwarded-for": "198.51.100.20"})
            assert forwarded.status_code == 200
    entries = {(e.kind, e.value): e for e in await limiter.operator.allowed()}
    assert entries[("ip", "198.51.100.0/24")].reason == "office"
    assert entries[("ip", "198.51.100.0/24")].added_by == "ops"
    assert entries[("ip", "198.51.100.0/24")].added_at > 0
    assert ("api_key", "sk_partner") not in entries  # stored as its hash, never raw
    assert {e.value for e in await limiter.operator.blocked()} == {"192.0.2.66/32", "mallory"}


@pytest.mark.parametrize("make_backend", LOCAL, indirect=True)
async def test_expiry_and_cleanup(make_backend: Any) -> None:
    limiter = RateLimiter(
        backend=make_backend(), ip_limit="1/minute", access_lists=True, refresh_interval=0.1
    )
    app = work_app(limiter)
    await limiter.operator.block("ip", "203.0.113.7", ttl=0.3)
    async with client_for(app) as client:
        assert (await client.get("/work")).status_code == 403
        await asyncio.sleep(0.35)
        assert (await client.get("/work")).status_code == 200
    assert await limiter.operator.blocked() == []
    assert await limiter.operator.cleanup() == 1
    assert await limiter.operator.cleanup() == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10.0.0.0/8", "10.0.0.0/8"),
        ("10.0.0.1", "10.0.0.1/32"),
        ("10.0.0.255/32", "10.0.0.255/32"),
        ("::ffff:10.0.0.0/104", "10.0.0.0/8"),
        ("::ffff:192.0.2.1", "192.0.2.1/32"),
        ("2001:db8::/32", "2001:db8::/32"),
        ("2001:db8:1:2::/64", "2001:db8:1:2::/64"),
    ],
)
def test_network_normalisation(value: str, expected: str) -> None:
    limiter = RateLimiter(access_lists=True)
    assert limiter.lists is not None
    assert limiter.lists.normalise("ip", value) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("10.0.0.1/8", "host bits"),
        ("0.0.0.0/0", "allow_any_network"),
        ("::/0", "allow_any_network"),
        ("2001:db8::1", "/64 or wider"),
        ("not-an-ip", "not an IP"),
        ("", "non-empty"),
    ],
)
def test_network_rejections(value: str, fragment: str) -> None:
    limiter = RateLimiter(access_lists=True)
    assert limiter.lists is not None
    with pytest.raises(ConfigurationError, match=fragment):
        limiter.lists.normalise("ip", value)
    opted_in = RateLimiter(access_lists=True, allow_any_network=True)
    assert opted_in.lists is not None
    assert opted_in.lists.normalise("ip", "0.0.0.0/0") == "0.0.0.0/0"


async def test_ipv4_mapped_clients_match_ipv4_entries() -> None:
    limiter = RateLimiter(ip_limit="1/minute", access_lists=True, refresh_interval=0.1)
    app = work_app(limiter)
    await limiter.operator.allow("ip", "192.0.2.0/24")
    async with client_for(app, ip="::ffff:192.0.2.10") as client:
        for _ in range(3):
            assert (await client.get("/work")).status_code == 200
    async with (
        client_for(app, ip="192.0.2.255") as broadcast,
        client_for(app, ip="192.0.3.0") as out,
    ):
        assert (await broadcast.get("/work")).status_code == 200
        assert (await broadcast.get("/work")).status_code == 200
        assert (await out.get("/work")).status_code == 200
        assert (await out.get("/work")).status_code == 429


def admin_app(limiter: RateLimiter, **kwargs: Any) -> FastAPI:
    app = FastAPI()
    app.include_router(admin_router(limiter, **kwargs), prefix="/ratelimit/admin")
    return app


async def test_admin_refuses_everything_by_default() -> None:
    app = admin_app(RateLimiter())
    async with client_for(app) as client:
        assert (await client.get("/ratelimit/admin/allow")).status_code == 403
        response = await client.post(
            "/ratelimit/admin/allow", json={"kind": "ip", "value": "10.0.0.0/8"}
        )
        assert response.status_code == 403


async def test_admin_with_a_token(audit: list[str]) -> None:
    limiter = RateLimiter(
        ip_limit="5/minute",
        tiers=DEFAULT_TIERS,
        user_resolver=user_from_header,
        access_lists=True,
    )
    app = admin_app(limiter, token="s3cret-admin-token-0123")
    good = {"authorization": "Bearer s3cret-admin-token-0123"}
    async with client_for(app) as client:
        assert (await client.get("/ratelimit/admin/allow")).status_code == 401
        wrong = {"authorization": "Bearer nope"}
        assert (await client.get("/ratelimit/admin/allow", headers=wrong)).status_code == 401
        added = await client.post(
            "/ratelimit/admin/block",
            json={"kind": "ip", "value": "192.0.2.0/24", "reason": "abuse", "ttl": 60},
            headers=good,
        )
        assert added.status_code == 200
        assert added.json()["value"] == "192.0.2.0/24"
        bad = await client.post(
            "/ratelimit/admin/block", json={"kind": "ip", "value": "10.0.0.1/8"}, headers=good
        )
        assert bad.status_code == 422
        assert "host bits" in bad.text
        listed = await client.get("/ratelimit/admin/block", headers=good)
        assert [e["reason"] for e in listed.json()["entries"]] == ["abuse"]
        tier = await client.put(
            "/ratelimit/admin/tiers/user/alice", json={"tier": "pro"}, headers=good
        )
        assert tier.status_code == 200
        got = await client.get("/ratelimit/admin/tiers/user/alice", headers=good)
        assert got.json()["tier"] == "pro"
        unknown = await client.put(
            "/ratelimit/admin/tiers/user/alice", json={"tier": "gold"}, headers=good
        )
        assert unknown.status_code == 422
        removed = await client.delete(
            "/ratelimit/admin/block",
            params={"kind": "ip", "value": "192.0.2.0/24"},
            headers=good,
        )
        assert removed.json() == {"removed": True}
    assert any("block add ip 192.0.2.0/24 by 'token'" in line for line in audit)


async def test_admin_inspect_and_reset() -> None:
    limiter = RateLimiter(ip_limit="5/minute", global_limit="100/minute")
    app = work_app(limiter)
    # The admin API on its own app (no middleware): its calls are not counted.
    admin = admin_app(limiter, token="s3cret-admin-token-0123")
    good = {"authorization": "Bearer s3cret-admin-token-0123"}
    async with client_for(app) as users, client_for(admin) as client:
        for _ in range(3):
            await users.get("/work")
        inspected = await client.post(
            "/ratelimit/admin/inspect", json={"ip": "203.0.113.7"}, headers=good
        )
        levels = {level["scope"]: level for level in inspected.json()["levels"]}
        assert levels["ip"]["remaining"] == 2
        assert levels["global"]["remaining"] == 97
        reset = await client.post(
            "/ratelimit/admin/reset", json={"ip": "203.0.113.7"}, headers=good
        )
        assert reset.json() == {"levels": 1}
        assert remaining(await users.get("/work")) == "4"


async def test_admin_with_a_custom_dependency() -> None:
    async def only_root(x_role: str = Header(default="")) -> str:
        if x_role != "root":
            raise HTTPException(403, "root only")
        return "root-user"

    app = admin_app(RateLimiter(access_lists=True), dependency=only_root)
    async with client_for(app) as client:
        assert (await client.get("/ratelimit/admin/allow")).status_code == 403
        ok = await client.get("/ratelimit/admin/allow", headers={"x-role": "root"})
        assert ok.status_code == 200
    # Without the lists: the list routes say so (after authorising), naming the option.
    unlisted = admin_app(RateLimiter(), dependency=only_root)
    root = {"x-role": "root"}
    async with client_for(unlisted) as client:
        assert (await client.get("/ratelimit/admin/allow")).status_code == 403
        for response in (
            await client.get("/ratelimit/admin/block", headers=root),
            await client.post(
                "/ratelimit/admin/block", json={"kind": "ip", "value": "10.0.0.1"}, headers=root
            ),
            await client.post("/ratelimit/admin/lists/cleanup", headers=root),
        ):
            assert response.status_code == 409
            assert "access_lists=True" in response.text
    with pytest.raises(ConfigurationError, match=r"^token: "):
        admin_router(RateLimiter(), token="short")


@pytest.mark.redis
def test_cli_end_to_end(redis_url: str) -> None:
    added = cli(redis_url, "--json", "allow", "add", "ip", "10.0.0.0/8", "--reason", "office")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["value"] == "10.0.0.0/8"
    listed = cli(redis_url, "--json", "allow", "list")
    assert [e["reason"] for e in json.loads(listed.stdout)] == ["office"]
    bad = cli(redis_url, "allow", "add", "ip", "10.0.0.1/8")
    assert bad.returncode == 2
    assert "host bits" in bad.stderr
    assert cli(redis_url, "block", "add", "user", "mallory", "--ttl", "60").returncode == 0
    assert cli(redis_url, "tier", "set", "user", "alice", "pro").returncode == 0
    got = cli(redis_url, "--json", "tier", "get", "user", "alice")
    assert json.loads(got.stdout)["tier"] == "pro"
    assert cli(redis_url, "tier", "get", "user", "nobody").returncode == 1
    assert cli(redis_url, "tier", "set", "user", "alice", "gold").returncode == 2
    assert cli(redis_url, "allow", "remove", "ip", "10.0.0.0/8").returncode == 0
    assert cli(redis_url, "allow", "remove", "ip", "10.0.0.0/8").returncode == 1

    # Counters made by an app, inspected and reset from the CLI.
    async def traffic() -> None:
        limiter = RateLimiter(
            backend=RedisBackend.from_url(redis_url, timeout=5.0), ip_limit="5/minute"
        )
        app = work_app(limiter)
        async with client_for(app) as client:
            for _ in range(3):
                await client.get("/work")
        await limiter.backend.aclose()

    asyncio.run(traffic())
    inspected = cli(redis_url, "--json", "inspect", "--ip", "203.0.113.7")
    levels = json.loads(inspected.stdout)
    assert [(x["scope"], x["policy"]) for x in levels] == [("ip", "ip")]
    stats = json.loads(cli(redis_url, "--json", "stats").stdout)
    assert stats["keys"] == {"ip/ip": 1}
    assert stats["block"] == 1
    assert stats["tiers"] == 1
    assert cli(redis_url, "reset", "--ip", "203.0.113.7").returncode == 0
    assert cli(redis_url, "inspect", "--ip", "203.0.113.7").returncode == 1
    with redis.Redis.from_url(redis_url) as client:
        keys = [k.decode() for k in client.scan_iter()]
    assert not any("mallory" in k or "alice" in k for k in keys)


@pytest.mark.redis
def test_cli_key_secret_reaches_what_the_app_hashes(redis_url: str) -> None:
    """An app with key_secret hashes API keys, users and IPs with it: a CLI block or reset
    without the same secret would touch keys the app never reads (and used to say "done")."""
    secret = "s3cret-for-keys"

    async def statuses(key: str) -> list[int]:
        limiter = RateLimiter(
            backend=RedisBackend.from_url(redis_url, timeout=5.0, key_secret=secret.encode()),
            api_key_limit="5/minute",
            access_lists=True,
        )
        try:
            async with client_for(work_app(limiter)) as client:
                return [
                    (await client.get("/work", headers={"x-api-key": key})).status_code
                    for _ in range(2)
                ]
        finally:
            await limiter.aclose()

    assert cli(redis_url, "block", "add", "api_key", "sk_unkeyed").returncode == 0
    assert asyncio.run(statuses("sk_unkeyed")) == [200, 200]  # the unkeyed digest: no effect
    blocked = cli(redis_url, "--key-secret", secret, "block", "add", "api_key", "sk_keyed")
    assert blocked.returncode == 0, blocked.stderr
    assert asyncio.run(statuses("sk_keyed")) == [403, 403]

    # Counters of a keyed app: found with the secret (also from the environment), and a
    # search without it says what is likely missing.
    assert asyncio.run(statuses("sk_counted")) == [200, 200]
    missing = cli(redis_url, "inspect", "--api-key", "sk_counted")
    assert missing.returncode == 1
    assert "--key-secret" in missing.stderr
    env_cli = cli(
        redis_url,
        "--json",
        "inspect",
        "--api-key",
        "sk_counted",
        env={"RATELIMIT_KEY_SECRET": secret},
    )
    assert env_cli.returncode == 0, env_cli.stderr
    assert [x["scope"] for x in json.loads(env_cli.stdout)] == ["api_key"]
    too_long = cli(redis_url, "--key-secret", "x" * 65, "stats")
    assert too_long.returncode == 2
    assert "key_secret" in too_long.stderr
    assert "x" * 65 not in too_long.stderr


def test_cli_errors_name_the_problem_and_hide_passwords() -> None:
    unreachable = cli("redis://:hunter2@127.0.0.1:1/0", "stats")
    assert unreachable.returncode == 2
    assert "hunter2" not in unreachable.stderr
    assert "Redis" in unreachable.stderr
    env = {k: v for k, v in os.environ.items() if "REDIS_URL" not in k}
    missing = subprocess.run(
        [sys.executable, "-m", "fastapi_ratelimit.cli", "stats"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert missing.returncode == 2
    assert "--redis-url" in missing.stderr


async def test_admin_override() -> None:
    from fastapi_ratelimit.dynamic import DynamicLimits

    limiter = RateLimiter(ip_limit="10/minute", dynamic=DynamicLimits(), refresh_interval=0.1)
    app = work_app(limiter)
    admin = admin_app(limiter, token="s3cret-admin-token-0123")
    good = {"authorization": "Bearer s3cret-admin-token-0123"}
    async with client_for(app) as users, client_for(admin) as client:
        set_ = await client.put(
            "/ratelimit/admin/override", json={"factor": 0.5, "ttl": 600}, headers=good
        )
        assert set_.status_code == 200
        assert policies(await users.get("/work"))["ip"]["q"] == 5
        got = await client.get("/ratelimit/admin/override", headers=good)
        assert got.json() == {"factor": 0.5}
        assert (await client.delete("/ratelimit/admin/override", headers=good)).json() == {
            "cleared": True
        }
        assert policies(await users.get("/work"))["ip"]["q"] == 10
        bad = await client.put("/ratelimit/admin/override", json={"factor": 0}, headers=good)
        assert bad.status_code == 422
    no_dynamic = admin_app(RateLimiter(), token="s3cret-admin-token-0123")
    async with client_for(no_dynamic) as client:
        assert (await client.get("/ratelimit/admin/override", headers=good)).status_code == 409
    await limiter.aclose()


@pytest.mark.redis
def test_cli_override(redis_url: str) -> None:
    assert cli(redis_url, "override", "set", "0.5", "--ttl", "600").returncode == 0
    assert json.loads(cli(redis_url, "--json", "override", "get").stdout) == {"factor": 0.5}
    assert cli(redis_url, "override", "clear").returncode == 0
    assert json.loads(cli(redis_url, "--json", "override", "get").stdout) == {"factor": 1.0}
    assert cli(redis_url, "override", "set", "0").returncode == 2
