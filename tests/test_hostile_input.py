"""Regression tests from a security review (issue 13, second part): what one untrusted client
sends must never change what applies to other clients, grow per-process memory without a
bound, or put a raw API key anywhere it could be read back."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import random
import string
import time
from typing import Any

import httpx
import pytest
import redis.asyncio
from fastapi import Depends, FastAPI
from http_helpers import cli, client_for, policies, work_app
from servers import RedisServer
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Host, Mount, Route, Router
from uvicorn.protocols.utils import get_path_with_query_string

from fastapi_ratelimit import (
    DEFAULT_TIERS,
    CompositeLimit,
    MemoryBackend,
    RateLimit,
    RateLimiter,
    RateLimitMiddleware,
    RedisBackend,
    dynamic,
)
from fastapi_ratelimit.admin import admin_router
from fastapi_ratelimit.breaker import MAX_ENDPOINTS, EndpointBreaker
from fastapi_ratelimit.dynamic import BehaviourTracker, DynamicLimits, LoadMonitor
from fastapi_ratelimit.identity import MAX_QUERY_BYTES, api_key_from_scope

# -- 5. the route cache keys on everything routing reads -----------------------------------


async def _ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def host_routed_app(limiter: RateLimiter) -> Starlette:
    api = Router(
        routes=[
            Route("/ocr/process", _ok, methods=["POST"]),
            Mount("/v1", routes=[Route("/jobs/{id}", _ok, methods=["POST"])]),
        ]
    )
    app = Starlette(routes=[Host("api.example.com", app=api)])
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


async def test_a_bogus_host_never_changes_the_route_other_clients_resolve_to() -> None:
    limiter = RateLimiter(
        endpoint_limits={"POST /ocr/process": "1/minute", "POST /v1/jobs/{id}": "1/minute"}
    )
    app = host_routed_app(limiter)
    transport = httpx.ASGITransport(app=app, client=("203.0.113.7", 1), root_path="/api")
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        good = {"host": "api.example.com"}
        evil = {"host": "evil.example"}
        for path in ("/api/ocr/process", "/api/v1/jobs/7"):
            # The attacker goes first: its request matches no route (a 404)...
            assert (await client.post(path, headers=evil)).status_code == 404
            # ...and everyone else's still meets the endpoint limit.
            statuses = [(await client.post(path, headers=good)).status_code for _ in range(2)]
            assert statuses == [200, 429]
            # After them, the attacker's request is still a 404 of its own (unmatched, not
            # the endpoint the others' requests left in the cache).
            assert (await client.post(path, headers=evil)).status_code == 404


# -- 6, 3, 10. the penalty box: digests, expiry, no reload per entry, never a 5xx -----------


def behaviour_app(limiter: RateLimiter) -> Starlette:
    app = Starlette(routes=[Route("/work", _ok)])
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


def hgetall_calls(server: RedisServer) -> int:
    stats = server.info("commandstats").get("cmdstat_hgetall", "calls=0")
    return int(stats.split(",")[0].partition("=")[2])


async def _penalise(app: Starlette, ip: str, key: str) -> None:
    async with client_for(app, ip=ip) as client:
        headers = {"x-api-key": key}
        assert (await client.get("/work", headers=headers)).status_code == 200
        for _ in range(2):
            assert (await client.get("/work", headers=headers)).status_code == 429
        boxed = await client.get("/work", headers=headers)
        assert boxed.json()["violated-policies"] == ["penalty-box"]


@pytest.mark.redis
async def test_the_penalty_box_holds_digests_that_expire_and_are_applied_without_a_reload(
    redis_url: str, redis_server: RedisServer, redis_client: redis.asyncio.Redis
) -> None:
    behaviour = BehaviourTracker(penalty_violations=2, penalty_duration=1.0)
    limiter = RateLimiter(
        backend=RedisBackend.from_url(redis_url),
        ip_limit="1/minute",
        dynamic=DynamicLimits(behaviour=behaviour),
        refresh_interval=1.0,
    )
    app = behaviour_app(limiter)
    clients = 40
    reloads_before, started = hgetall_calls(redis_server), time.monotonic()
    for i in range(clients):
        await _penalise(app, f"198.51.100.{i}", f"sk_live_SECRET{i:04}")
    reloads = hgetall_calls(redis_server) - reloads_before
    # A new entry applies where it was set without re-reading the box: only the refresh
    # loop reads it, at most once per refresh_interval (before: once per new entry).
    assert reloads <= (time.monotonic() - started) / 1.0 + 2 < clients

    # Nothing the clients sent is in Redis: no key name, hash field or value.
    secrets = [b"sk_live_SECRET", b"198.51.100."]
    box: dict[bytes, bytes] = {}
    async for name in redis_client.scan_iter(count=1000):
        assert not any(s in name for s in secrets)
        if await redis_client.type(name) == b"hash":
            fields = await redis_client.hgetall(name)
            for field, value in fields.items():
                assert not any(s in field or s in value for s in secrets)
            if b"penalty" in name:
                box = fields
    entries = {f: json.loads(value) for f, value in box.items() if not f.startswith(b"#")}
    assert len(entries) == clients
    assert all(len(field) == 32 for field in entries)  # digests
    assert all(math.isfinite(entry["expires_at"]) for entry in entries.values())

    # Expired entries go: the next penalty prunes them, cleanup() removes what is left.
    deadline = max(entry["expires_at"] for entry in entries.values())
    await asyncio.sleep(deadline - time.time() + 0.01)  # wall-clock expiry, nothing else
    await _penalise(app, "198.51.100.250", "sk_live_SECRET_last")
    key = (await redis_client.keys("*penalty*"))[0]
    assert await redis_client.hlen(key) == 3  # the new entry, "#version" and "#epoch"
    last = json.loads(
        next(v for f, v in (await redis_client.hgetall(key)).items() if not f.startswith(b"#"))
    )
    await asyncio.sleep(last["expires_at"] - time.time() + 0.01)
    assert await limiter.operator.cleanup() == 1
    assert await redis_client.hlen(key) == 2
    await limiter.aclose()


async def test_a_made_up_api_key_never_escapes_the_penalty_box_or_the_abusive_factor() -> None:
    behaviour = BehaviourTracker(penalty_violations=2, penalty_duration=300)
    limiter = RateLimiter(
        ip_limit="100/minute",
        api_key_limit="1/minute",
        dynamic=DynamicLimits(behaviour=behaviour),
    )
    app = behaviour_app(limiter)
    async with client_for(app, ip="198.51.100.9") as client:
        statuses = [
            (await client.get("/work", headers={"x-api-key": "k1"})).status_code for _ in range(3)
        ]
        assert statuses == [200, 429, 429]
        for i in range(3):
            fresh = await client.get("/work", headers={"x-api-key": f"random-{i}"})
            assert fresh.status_code == 429
            assert fresh.json()["violated-policies"] == ["penalty-box"]


async def test_a_made_up_api_key_keeps_the_abusive_factor() -> None:
    limiter = RateLimiter(
        ip_limit="100/minute",
        api_key_limit="10/minute",
        dynamic=DynamicLimits(behaviour=BehaviourTracker()),
    )
    app = behaviour_app(limiter)
    async with client_for(app, ip="198.51.100.10") as client:
        for _ in range(30):  # 10 allowed, 20 refused: over half refused, abusive
            await client.get("/work", headers={"x-api-key": "k1"})
        fresh = await client.get("/work", headers={"x-api-key": "random"})
        assert policies(fresh)["api_key"]["q"] == 3  # 10 x 0.3, not a fresh record's 10


@pytest.mark.redis
async def test_allow_never_answers_503_when_redis_dies_with_a_penalty_box() -> None:
    server = RedisServer(name="redis-dying")
    server.start()
    try:
        behaviour = BehaviourTracker(penalty_violations=2, penalty_duration=300)
        backend = RedisBackend.from_url(server.url, timeout=0.5)
        limiter = RateLimiter(
            backend=backend,
            ip_limit="1/minute",
            endpoint_breaker=EndpointBreaker(min_requests=2),
            dynamic=DynamicLimits(behaviour=behaviour),
            on_backend_error="allow",
            fallback=True,
            shadow={"global"},
            global_limit="1000/minute",
        )
        app = behaviour_app(limiter)
        async with client_for(app, ip="198.51.100.11") as client:
            assert (await client.get("/work")).status_code == 200  # the mirrors are loaded
            server.stop()
            statuses = [(await client.get("/work")).status_code for _ in range(12)]
            # The fallback limits per process; the penalty cannot be shared, but it still
            # applies here, and nothing becomes a 503.
            assert 503 not in statuses
            assert statuses[-1] == 429
            assert limiter.breaker is not None
            assert limiter.breaker.state != "closed"
        await limiter.aclose()
    finally:
        server.close()


# -- 2. the query-string API key: every field read, the value the app sees ----------------


def query_key_app(limiter: RateLimiter) -> Starlette:
    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.query_params.get("api_key", ""))

    app = Starlette(routes=[Route("/echo", echo)])
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


def query_limiter() -> RateLimiter:
    return RateLimiter(
        api_key_limit="1/minute",
        api_key_header=None,
        api_key_query="api_key",
        access_lists=True,
    )


async def test_padding_the_query_string_never_hides_the_api_key() -> None:
    limiter = query_limiter()
    await limiter.operator.block("api_key", "blocked-key")
    app = query_key_app(limiter)
    padding = "&" * 100 + "x=1&" * 100
    async with client_for(app) as client:
        assert (await client.get(f"/echo?{padding}api_key=blocked-key")).status_code == 403
        first = await client.get(f"/echo?{padding}api_key=real")
        assert (first.status_code, first.text) == (200, "real")
        assert (await client.get(f"/echo?api_key=real&{padding}")).status_code == 429


async def test_a_decoy_before_the_api_key_counts_for_nothing() -> None:
    app = query_key_app(query_limiter())
    async with client_for(app) as client:
        first = await client.get("/echo?api_key=decoy-1&api_key=real")
        assert (first.status_code, first.text) == (200, "real")  # what the app sees: the last
        second = await client.get("/echo?api_key=decoy-2&api_key=real")
        assert second.status_code == 429  # the real key's level, whatever the decoy
        assert (await client.get("/echo?api_key=real&api_key=other")).status_code == 200


async def raw_get(app: Any, path: str, query: bytes) -> dict[str, Any]:
    """One GET through raw ASGI (httpx refuses URLs as long as some servers accept); returns
    the response's start message."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver")],
        "client": ("203.0.113.7", 1),
        "server": ("testserver", 80),
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent[0]


OVERSIZED_QUERY = b"x=" + b"a" * MAX_QUERY_BYTES + b"&api_key=real"


async def test_an_oversized_query_string_is_a_400_not_a_request_without_its_key() -> None:
    start = await raw_get(query_key_app(query_limiter()), "/echo", OVERSIZED_QUERY)
    assert start["status"] == 400
    assert (b"content-type", b"application/problem+json") in start["headers"]


async def test_a_route_guard_without_the_middleware_answers_an_oversized_query_400() -> None:
    limiter = RateLimiter(api_key_header=None, api_key_query="api_key")
    app = FastAPI()

    @app.get(
        "/guarded", dependencies=[Depends(RateLimit("5/minute", scope="api_key", limiter=limiter))]
    )
    async def guarded() -> dict[str, str]:
        return {"ok": "yes"}

    assert (await raw_get(app, "/guarded", b"api_key=real"))["status"] == 200
    assert (await raw_get(app, "/guarded", OVERSIZED_QUERY))["status"] == 400


@pytest.mark.parametrize(
    "query",
    [
        b"api_key=a&api_key=b",
        b"api_key=a&api_key=",
        b"api_key=a&api_key",
        b"api%5Fkey=enc&x=1",
        b"api_key=a+b%20c",
        b"api_key=%ZZ%E2%82%AC%FF",
        b"api_key=a=b",
        b"&&&api_key=%20padded%20&&&",
        b"api_key=a;api_key=b",
        b"api+key=no&api_key=yes",
        b"API_KEY=no",
    ],
)
def test_the_query_key_is_exactly_the_value_the_app_reads(query: bytes) -> None:
    seen_by_app = QueryParams(query).get("api_key")
    expected = (seen_by_app or "").strip(" \t") or None
    scope = {"headers": [], "query_string": query}
    assert api_key_from_scope(scope, b"", "api_key") == expected


# -- 7. bounded per-process memory under hostile input (the class-level test) --------------

#: RSS growth allowed while 100k hostile requests go through an app with every feature on,
#: every structure at its default bound (docs/security.md, "Memory under hostile input": the
#: figure measured is quoted there).
RSS_CEILING = 160 * 1024 * 1024


def everything_app(limiter: RateLimiter) -> Starlette:
    async def fail(request: Request) -> PlainTextResponse:
        return PlainTextResponse("down", status_code=500)

    api = Router(
        routes=[
            Route("/ocr/process", _ok, methods=["POST"]),
            Mount("/v1", routes=[Route("/jobs/{id}", _ok, methods=["GET", "POST"])]),
        ]
    )
    app = Starlette(
        routes=[
            Host("api.example.com", app=api),
            Route("/items/{id}", _ok, methods=["GET", "POST", "PURGE"]),
            Route("/fail", fail, methods=["GET"]),
        ]
    )
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


def hostile_scope(rng: random.Random, i: int) -> dict[str, Any]:
    def junk(n: int) -> str:
        return "".join(rng.choices(string.ascii_letters, k=n))

    kind = i % 4
    method = ["GET", "POST", junk(rng.randint(8, 2000)), "PURGE"][kind]
    path = ["/items/" + junk(8), "/" + junk(rng.randint(1, 2000)), "/v1/jobs/1", "/fail"][
        i // 4 % 4
    ]
    host = ["api.example.com", junk(rng.randint(1, 300)) + ".example", "testserver"][i % 3]
    # A few recurring clients (they end up in the penalty box), and a new one for the rest.
    ip = f"192.0.2.{i % 50}" if i % 10 == 0 else f"2001:db8:{i:x}::1"
    headers = [
        (b"host", host.encode()),
        (b"x-forwarded-for", ip.encode()),
        (b"x-api-key", junk(rng.randint(1, 4000)).encode()),
        (b"x-user", junk(rng.randint(1, 64)).encode()),
    ]
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"api_key=" + junk(64).encode(),
        "headers": headers,
        "client": ("10.0.0.1", 40000),
        "server": ("testserver", 80),
    }


def _user_from_header(connection: Any) -> str | None:
    return connection.headers.get("x-user")


async def test_100k_hostile_requests_keep_every_structure_under_its_bound() -> None:
    psutil = pytest.importorskip("psutil")
    backend = MemoryBackend()
    behaviour = BehaviourTracker(penalty_violations=2)
    breaker = EndpointBreaker(min_requests=2)
    limiter = RateLimiter(
        backend=backend,
        global_limit="10000000/minute",
        ip_limit="5/minute",
        api_key_limit="5/minute",
        endpoint_limits={"POST /ocr/process": "100000/minute", "* /items/{id}": "100000/minute"},
        composite_limits=[CompositeLimit(("ip", "endpoint"), "100/minute")],
        costs={"POST /ocr/process": 2},
        tiers=DEFAULT_TIERS,
        user_resolver=_user_from_header,
        api_key_query="api_key",
        access_lists=True,
        endpoint_breaker=breaker,
        dynamic=DynamicLimits(load=LoadMonitor(sampler=lambda: (10.0, 10.0)), behaviour=behaviour),
        trusted_proxies=["10.0.0.0/8"],
    )
    await limiter.operator.block("ip", "198.51.100.0/24")  # the lists are not empty: they are read
    app = everything_app(limiter)
    statuses: dict[int, int] = {}

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses[message["status"]] = statuses.get(message["status"], 0) + 1

    rng = random.Random(13)
    process = psutil.Process()
    for i in range(2000):  # warm up: imports, caches of fixed size, the allocator's arenas
        await app(hostile_scope(rng, i), receive, send)
    gc.collect()
    rss_before = process.memory_info().rss
    for i in range(2000, 100_000):
        await app(hostile_scope(rng, i), receive, send)
    gc.collect()
    growth = process.memory_info().rss - rss_before

    assert not any(500 < status < 600 and status != 503 for status in statuses), statuses
    assert statuses.get(429, 0) > 0  # the recurring clients were limited (and boxed)
    # Each structure at or under its documented bound, whatever the clients sent.
    routes = limiter.pricing.routes._cache
    assert len(routes) <= 4096
    assert all(len(key[5]) <= 512 and len(key[6]) <= 256 for key in routes)
    endpoints = set(limiter.levels.plans)
    assert len(endpoints) <= 64  # route templates x methods, never client strings
    assert all(len(endpoint) <= 64 for endpoint in endpoints)
    assert "OTHER /items/{id}" in endpoints
    assert "PURGE /items/{id}" in endpoints  # a method the route declares keeps its name
    assert len(breaker._windows) <= MAX_ENDPOINTS
    assert set(breaker._windows) <= endpoints
    assert len(breaker._local_open) <= MAX_ENDPOINTS
    assert len(behaviour._stats) <= 100_000
    assert len(behaviour._violations) <= 100_000
    assert len(behaviour._penalised) <= 100_000
    assert all(len(key) == 32 for key in behaviour._stats)  # digests, not client input
    assert len(backend) <= backend.max_keys
    assert len(backend.key_builder.cached) <= 8192
    assert len(limiter.identifier.client_ip._cache) <= 4096
    assert len(limiter.identifier.client_ip._chains) <= 4096
    assert growth < RSS_CEILING, f"RSS grew by {growth / 2**20:.0f} MiB"
    await limiter.aclose()


# -- 12a. the admin API takes raw API keys in bodies, never in URLs ------------------------

ADMIN_TOKEN = "s3cret-admin-token-0123"
RAW_KEY = "sk_live_0123456789abcdef"


class AccessLog:
    """Records each request's URL as uvicorn's access log prints it."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.lines: list[str] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.lines.append(get_path_with_query_string(scope))
        await self.app(scope, receive, send)


async def test_the_admin_api_never_needs_a_raw_api_key_in_a_url() -> None:
    limiter = RateLimiter(api_key_limit="100/minute", tiers=DEFAULT_TIERS, access_lists=True)
    admin = FastAPI()
    admin.include_router(admin_router(limiter, token=ADMIN_TOKEN), prefix="/admin")
    logged = AccessLog(admin)
    auth = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    key = {"x-api-key": RAW_KEY}
    async with client_for(logged) as ops, client_for(work_app(limiter)) as user:
        body = {"kind": "api_key", "identity": RAW_KEY}
        put = await ops.put("/admin/tiers", json={**body, "tier": "pro"}, headers=auth)
        assert put.status_code == 200
        got = await ops.post("/admin/tiers/get", json=body, headers=auth)
        assert got.json()["tier"] == "pro"
        cleared = await ops.post("/admin/tiers/clear", json=body, headers=auth)
        assert cleared.json() == {"cleared": True}
        entry = {"kind": "api_key", "value": RAW_KEY}
        assert (await ops.post("/admin/block", json=entry, headers=auth)).status_code == 200
        assert (await user.get("/work", headers=key)).status_code == 403
        removed = await ops.post("/admin/block/remove", json=entry, headers=auth)
        assert removed.json() == {"removed": True}
        assert (await user.get("/work", headers=key)).status_code == 200
        for action in ("inspect", "reset"):
            done = await ops.post(f"/admin/{action}", json={"api_key": RAW_KEY}, headers=auth)
            assert done.status_code == 200
        assert len(logged.lines) == 7
        assert not any(RAW_KEY in line for line in logged.lines)

        # The URL forms take users and IPs only: an API key there is refused, not applied.
        path_form = await ops.put(
            f"/admin/tiers/api_key/{RAW_KEY}", json={"tier": "pro"}, headers=auth
        )
        assert path_form.status_code == 422
        assert await limiter.operator.get_tier(RAW_KEY, kind="api_key") is None
        await ops.post("/admin/block", json=entry, headers=auth)
        query_form = await ops.delete(
            "/admin/block", params={"kind": "api_key", "value": RAW_KEY}, headers=auth
        )
        assert query_form.status_code == 422
        assert (await user.get("/work", headers=key)).status_code == 403  # still blocked


@pytest.mark.redis
async def test_the_cli_cleanup_removes_expired_penalties_and_breakers(redis_url: str) -> None:
    backend = RedisBackend.from_url(redis_url)
    now = time.time()
    for namespace in ("penalty", "breakers"):
        await backend.control_put(namespace, "gone", json.dumps({"expires_at": now - 1}))
        await backend.control_put(namespace, "kept", json.dumps({"expires_at": now + 600}))
    done = await asyncio.to_thread(cli, redis_url, "--json", "cleanup")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"removed": 2}
    for namespace in ("penalty", "breakers"):
        assert set((await backend.control_load(namespace))[1]) == {"kept"}
    await backend.aclose()


async def test_the_shared_penalty_box_stays_under_its_bound(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(dynamic, "MAX_SHARED_PENALTIES", 5)
    backend = MemoryBackend()
    limiter = RateLimiter(
        backend=backend,
        ip_limit="1/minute",
        dynamic=DynamicLimits(behaviour=BehaviourTracker(penalty_violations=2)),
    )
    app = behaviour_app(limiter)
    for i in range(8):
        await _penalise(app, f"198.51.100.{i}", f"key-{i}")  # each one is boxed
    assert len((await backend.control_load("penalty"))[1]) == 5
    await limiter.aclose()
