"""Behaviour that a one-line bug once broke without any test noticing (issue 15).

Each test names the bug it catches; each was seen to fail with that bug put back in.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from http_helpers import client_for, policies, remaining
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Host, Route, Router

from fastapi_ratelimit import (
    Algorithm,
    Check,
    CompositeLimit,
    ConfigurationError,
    Decision,
    FakeClock,
    MemoryBackend,
    Policy,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    Tier,
)
from fastapi_ratelimit.dynamic import BehaviourTracker, DynamicLimits
from fastapi_ratelimit.identity import ClientIP


def plain_app(limiter: RateLimiter) -> Starlette:
    """``GET /x`` (Starlette also routes HEAD to it) behind the middleware."""

    async def x(request: Request) -> Response:
        return PlainTextResponse("x")

    app = Starlette(routes=[Route("/x", x, methods=["GET"])])
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


async def test_head_is_held_to_the_get_endpoint_limit() -> None:
    """Bug: HEAD not mapped to GET; HEAD then bypassed a "GET /x" limit ([200] * 4)."""
    app = plain_app(RateLimiter(endpoint_limits={"GET /x": "2/minute"}))
    async with client_for(app) as client:
        statuses = [(await client.head("/x")).status_code for _ in range(4)]
        after = await client.get("/x")
    assert statuses == [200, 200, 429, 429]
    assert after.status_code == 429


async def test_head_costs_what_get_costs() -> None:
    app = plain_app(RateLimiter(ip_limit="10/minute", costs={"GET /x": 4}))
    async with client_for(app) as client:
        head = await client.head("/x")
    assert head.status_code == 200
    assert remaining(head) == "6"


async def test_readme_demo_anonymous_batch_is_five_202s_then_429() -> None:
    """Bug: anonymous callers of a scope="user" route limit unlimited (six 202s)."""
    from examples.app import app, limiter

    limiter.backend = MemoryBackend()  # a fresh memory backend for this test
    async with app.router.lifespan_context(app):
        async with client_for(app, ip="203.0.113.71") as client:
            statuses = [
                (await client.post("/ocr/batch", json={"documents": ["a"]})).status_code
                for _ in range(6)
            ]
        # Another address is another anonymous caller, with five of its own.
        async with client_for(app, ip="203.0.113.72") as other:
            fresh = await other.post("/ocr/batch", json={"documents": ["a"]})
    assert statuses == [202] * 5 + [429]
    assert fresh.status_code == 202


async def test_shadow_levels_are_charged() -> None:
    """Bug: shadow levels never charged. The counters in the backend show the charge."""
    backend = MemoryBackend()
    limiter = RateLimiter(
        backend=backend, ip_limit="3/minute", global_limit="100/minute", shadow={"ip"}
    )
    app = plain_app(limiter)
    async with client_for(app) as client:
        statuses = [(await client.get("/x")).status_code for _ in range(5)]
    assert statuses == [200] * 5
    levels = {d.scope: d.remaining for d in await limiter.operator.inspect(ip="203.0.113.7")}
    assert levels == {"global": 95, "ip": 0}


async def test_shadow_levels_are_charged_by_each_request() -> None:
    backend = MemoryBackend()
    limiter = RateLimiter(backend=backend, ip_limit="5/minute", shadow=True)
    async with client_for(plain_app(limiter)) as client:
        for _ in range(2):
            assert (await client.get("/x")).status_code == 200
    [ip] = await limiter.operator.inspect(ip="203.0.113.7")
    assert ip.remaining == 3


@pytest.mark.redis
async def test_sliding_counter_key_lives_until_both_windows_stop_weighing(
    redis_url: str,
) -> None:
    """Bug: the sliding-counter key's TTL was ``window - elapsed``, so it expired while the
    next window still weighed it. Redis expires keys in real time: the TTL must have a lower
    bound too. At 9 s into a 10 s window the key must live 11 s (+ the 1 s margin)."""
    clock = FakeClock(1_700_000_009.0)  # 1_700_000_000 is a multiple of 10
    backend = RedisBackend.from_url(redis_url, clock=clock, ttl_margin=1.0)
    try:
        policy = Policy("p", "5/10 seconds", Algorithm.SLIDING_WINDOW_COUNTER)
        assert (await backend.hit([Check(policy, "ip", "10.0.0.1")])).allowed
        [key] = [k async for k in backend.client.scan_iter(match=backend.key_builder.pattern())]
        ttl_ms = await backend.client.pttl(key)
    finally:
        await backend.aclose()
    # Only the time between the two calls may have passed (generously bounded below).
    assert 10_000 < ttl_ms <= 12_000


async def test_behaviour_factor_scales_the_client_levels() -> None:
    """Bug: the behaviour factor ignored. A good citizen's quota shows x1.2, an abusive
    one's x0.3; the global level is not the client's and is never scaled by it."""
    good = RateLimiter(
        ip_limit="20/minute",
        global_limit="1000/minute",
        dynamic=DynamicLimits(behaviour=BehaviourTracker()),
    )
    async with client_for(plain_app(good)) as client:
        first = [await client.get("/x") for _ in range(11)]
        rewarded = await client.get("/x")
    assert [r.status_code for r in first] == [200] * 11
    assert policies(first[-1])["ip"]["q"] == 20
    assert policies(rewarded) == {"global": {"q": 1000, "w": 60}, "ip": {"q": 24, "w": 60}}

    abusive = RateLimiter(ip_limit="10/minute", dynamic=DynamicLimits(behaviour=BehaviourTracker()))
    async with client_for(plain_app(abusive)) as client:
        statuses = [(await client.get("/x")).status_code for _ in range(21)]
        punished = await client.get("/x")
    assert statuses == [200] * 10 + [429] * 11
    assert punished.status_code == 429
    assert policies(punished) == {"ip": {"q": 3, "w": 60}}


async def test_response_builder_answers_denials() -> None:
    """Bug: ``response_builder=`` ignored."""
    seen: list[tuple[list[str], dict[bytes, bytes]]] = []

    def builder(decisions: Sequence[Decision], headers: Sequence[tuple[bytes, bytes]]) -> Response:
        seen.append(([d.policy for d in decisions if not d.allowed], dict(headers)))
        return PlainTextResponse("slow down", status_code=429, headers={"x-denied": "yes"})

    app = plain_app(RateLimiter(ip_limit="1/minute", response_builder=builder))
    async with client_for(app) as client:
        assert (await client.get("/x")).status_code == 200
        denied = await client.get("/x")
    assert denied.status_code == 429
    assert denied.text == "slow down"
    assert denied.headers["x-denied"] == "yes"
    assert denied.headers["content-type"] == "text/plain; charset=utf-8"
    [(denied_policies, headers)] = seen
    assert denied_policies == ["ip"]
    assert headers[b"ratelimit-policy"] == b'"ip";q=1;w=60'


async def test_api_key_query_is_read_when_configured() -> None:
    """Bug: ``api_key_query=`` ignored by ``RateLimiter``: query keys were not limited."""
    app = plain_app(RateLimiter(api_key_limit="1/minute", api_key_query="api_key"))
    async with client_for(app) as client:
        first = await client.get("/x", params={"api_key": "k1"})
        again = await client.get("/x", params={"api_key": "k1"})
        other = await client.get("/x", params={"api_key": "k2"})
        # The header, when sent, still wins over the query parameter.
        header = await client.get("/x", params={"api_key": "k1"}, headers={"x-api-key": "k3"})
    assert [r.status_code for r in (first, again, other, header)] == [200, 429, 200, 200]
    assert policies(first) == {"api_key": {"q": 1, "w": 60}}


@pytest.mark.parametrize("size", [16 * 1024, 16 * 1024 + 1, 65536])
async def test_a_huge_api_key_is_still_held_to_the_key_level(size: int) -> None:
    """Bug: API keys over 16 KiB dropped, letting a client escape the key level."""
    app = plain_app(RateLimiter(api_key_limit="1/minute"))
    key = {"x-api-key": "k" * size}
    async with client_for(app) as client:
        statuses = [(await client.get("/x", headers=key)).status_code for _ in range(2)]
        shorter = await client.get("/x", headers={"x-api-key": "k" * (size - 1)})
    assert statuses == [200, 429]
    assert shorter.status_code == 200


# -- surviving mutants of the first mutation run (scripts/mutation.sh) ---------------------


async def test_a_route_under_a_host_keeps_its_endpoint_limit() -> None:
    """A Host adds no path: "GET /x" under it is the "GET /x" endpoint."""

    async def x(request: Request) -> Response:
        return PlainTextResponse("x")

    app = Starlette(routes=[Host("api.example", app=Router([Route("/x", x)]))])
    app.add_middleware(
        RateLimitMiddleware, limiter=RateLimiter(endpoint_limits={"GET /x": "1/minute"})
    )
    async with client_for(app) as client:
        statuses = [(await client.get("http://api.example/x")).status_code for _ in range(2)]
    assert statuses == [200, 429]


async def test_requests_that_waited_are_counted() -> None:
    """Delay mode: a request admitted after waiting is charged like any other, and its
    place among the waiters (max_waiting=1: one at a time) is given back for the next."""
    limiter = RateLimiter(ip_limit="10/second", algorithm="gcra", delay={"ip": 5}, max_waiting=1)
    async with client_for(plain_app(limiter)) as client:
        responses = [await client.get("/x") for _ in range(13)]
    assert [r.status_code for r in responses] == [200] * 13
    # Each response carries the decision it was admitted on: the waiting ones too.
    assert all("ratelimit" in r.headers for r in responses)


async def test_shadow_levels_on_a_failing_backend_never_block() -> None:
    """A shadow level's failed charge is logged at most, never a 503."""
    from servers import free_port

    dead = RedisBackend.from_url(f"redis://127.0.0.1:{free_port()}/0", timeout=5.0)
    limiter = RateLimiter(backend=dead, ip_limit="1/minute", shadow=True, breaker=None)
    try:
        async with client_for(plain_app(limiter)) as client:
            statuses = [(await client.get("/x")).status_code for _ in range(3)]
    finally:
        await limiter.aclose()
    assert statuses == [200, 200, 200]


async def test_a_composite_limit_uses_its_own_algorithm() -> None:
    # At the start of a minute, a fixed window's denial waits for the window's end (60 s);
    # the default sliding counter would wait 90 s.
    backend = MemoryBackend(clock=FakeClock(1_700_000_040.0))  # a multiple of 60
    composite = CompositeLimit(("ip", "endpoint"), "2/minute", algorithm="fixed_window")
    limiter = RateLimiter(backend=backend, composite_limits=[composite])
    async with client_for(plain_app(limiter)) as client:
        responses = [await client.get("/x") for _ in range(3)]
    assert [r.status_code for r in responses] == [200, 200, 429]
    assert responses[-1].headers["retry-after"] == "60"


def tiered_limiter(backend: MemoryBackend) -> RateLimiter:
    tiers = {
        "free": Tier("free", "5/minute", Algorithm.FIXED_WINDOW),
        "pro": Tier("pro", "50/minute", Algorithm.GCRA),
        "team": Tier("team", "500/minute", Algorithm.SLIDING_WINDOW_LOG),
    }
    return RateLimiter(
        backend=backend, tiers=tiers, user_resolver=lambda c: c.headers.get("x-user")
    )


async def test_get_tier_and_clear_tier_of_an_identity_without_one() -> None:
    limiter = tiered_limiter(MemoryBackend())
    assert await limiter.operator.get_tier("nobody") is None
    assert await limiter.operator.clear_tier("nobody") is False  # nothing stored anywhere yet
    await limiter.operator.set_tier("alice", "pro")
    assert await limiter.operator.get_tier("alice") == "pro"
    assert await limiter.operator.clear_tier("nobody") is False  # stored ones, but not this one
    assert await limiter.operator.clear_tier("alice") is True
    assert await limiter.operator.get_tier("alice") is None


async def test_deleting_operator_state_moves_its_version_on() -> None:
    backend = MemoryBackend()
    await backend.control_put("tiers", "user:a", "{}")
    before = await backend.control_version("tiers")
    assert await backend.control_delete("tiers", ["user:a", "user:b"]) == 1
    assert await backend.control_version("tiers") > before


async def test_reset_forgets_the_user_under_every_tier() -> None:
    """The tiers' algorithms differ, so each has a bucket of its own: reset clears them all,
    and forgetting an identity that has no counters is no error."""
    limiter = tiered_limiter(MemoryBackend())
    alice = {"x-user": "alice"}
    async with client_for(plain_app(limiter)) as client:
        for tier in ("free", "pro", "team"):
            if tier != "free":
                await limiter.operator.set_tier("alice", tier)
            assert (await client.get("/x", headers=alice)).status_code == 200
        assert await limiter.operator.reset(user="alice") == 3
        left = {}
        for tier in ("pro", "team", "free"):
            await limiter.operator.set_tier("alice", tier)
            left[tier] = remaining(await client.get("/x", headers=alice))
    assert left == {"pro": "49", "team": "499", "free": "4"}
    assert await limiter.operator.reset(ip="198.51.100.1") == 0  # no IP level: nothing to forget
    ip_only = RateLimiter(ip_limit="5/minute")
    assert await ip_only.operator.reset(ip="198.51.100.1") == 1


async def test_no_breaker_on_the_awaited_path() -> None:
    """``breaker=None`` on the path that awaits the backend (here delay mode takes it)."""
    limiter = RateLimiter(ip_limit="2/minute", breaker=None, delay={"ip": 1})
    async with client_for(plain_app(limiter)) as client:
        statuses = [(await client.get("/x")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]  # the third would wait 30 s: refused at once


def test_a_bad_endpoint_is_named_with_what_was_given() -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimiter(endpoint_limits={"GET users": "1/minute"})
    assert str(info.value) == (
        "endpoint_limits: must be '<METHOD> <route template>', such as 'POST /ocr/process' "
        "(got 'GET users')"
    )


@pytest.mark.parametrize(
    ("forwarded", "identity"),
    [
        (b"for=198.51.100.9", "198.51.100.9"),
        (b"\tFOR=198.51.100.9;proto=http", "198.51.100.9"),  # HTTP blanks, any case
        # Not HTTP whitespace (str.strip() would eat it): no "for" parameter, so the
        # trusted proxy itself is the client.
        (b"\x1cfor=198.51.100.9", "203.0.113.7"),
        (b"\x85for=198.51.100.9", "203.0.113.7"),
    ],
)
def test_forwarded_parameter_names_allow_only_http_whitespace(
    forwarded: bytes, identity: str
) -> None:
    client_ip = ClientIP(trusted_proxies=["203.0.113.0/24"], headers=["forwarded"])
    scope = {"type": "http", "client": ("203.0.113.7", 1), "headers": [(b"forwarded", forwarded)]}
    assert client_ip(scope) == identity


@pytest.mark.parametrize(
    ("composites", "field", "message"),
    [
        (
            ["ip+user"],
            "composite_limits",
            "composite_limits: must hold CompositeLimit objects (got 'ip+user')",
        ),
        (
            [CompositeLimit(("ip", "ip"), "1/minute")],
            "composite_limits.parts",
            "composite_limits.parts: must be two or more of ip, user, api_key, endpoint "
            "(got ('ip', 'ip'))",
        ),
        (
            [CompositeLimit(("ip", "user"), "often")],
            "composite_limits['ip+user']",
            None,
        ),
    ],
)
def test_bad_composite_limits_name_their_field(
    composites: list[object], field: str, message: str | None
) -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimiter(composite_limits=composites)  # type: ignore[arg-type]
    assert info.value.field == field
    if message is not None:
        assert str(info.value) == message


async def test_a_composite_of_every_part_is_one_level_named_by_its_parts() -> None:
    every = CompositeLimit(("ip", "user", "api_key", "endpoint"), "1/minute")
    limiter = RateLimiter(
        composite_limits=[every],
        user_resolver=lambda c: c.headers.get("x-user"),
        headers="both",
    )
    who = {"x-user": "u", "x-api-key": "k"}
    async with client_for(plain_app(limiter)) as client:
        first = await client.get("/x", headers=who)
        denied = await client.get("/x", headers=who)
        anonymous = await client.get("/x", headers={"x-api-key": "k"})  # not every part
    assert (first.status_code, denied.status_code) == (200, 429)
    assert denied.headers["x-ratelimit-scope"] == "ip+user+api_key+endpoint"
    assert policies(denied) == {"ip-user-api_key-endpoint": {"q": 1, "w": 60}}
    assert anonymous.status_code == 200


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: RateLimiter(shadow="ip"),
            "shadow: must be True/False or a set of scopes (got 'ip')",
        ),
        (lambda: RateLimiter(ipv6_prefix=0), "ipv6_prefix: must be from 1 to 128 (got 0)"),
        (
            lambda: RateLimitMiddleware(plain_app, limiter=RateLimiter(), exempt=["health"]),
            "exempt: paths must start with '/' (got 'health')",
        ),
    ],
)
def test_configuration_errors_say_field_rule_and_value(build: object, message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        build()  # type: ignore[operator]
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"api_key_header": ""}, "api_key_header: must be an HTTP header name (got '')"),
        ({"api_key_header": 5}, "api_key_header: must be an HTTP header name (got 5)"),
        ({"dynamic": "yes"}, "dynamic: must be a DynamicLimits (got 'yes')"),
    ],
)
def test_more_configuration_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimiter(**kwargs)  # type: ignore[arg-type]
    assert str(info.value) == message
