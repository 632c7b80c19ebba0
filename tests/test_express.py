"""The express path (express.py) decides exactly as the general path: the same traffic through
two apps that differ only in whether the middleware may take it gives the same statuses,
headers and bodies, and leaves the same counters in the memory store. Configurations it does
not cover never reach it."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, HTTPException, Request
from prometheus_client import CollectorRegistry

from fastapi_ratelimit import (
    CompositeLimit,
    FakeClock,
    MemoryBackend,
    RateLimit,
    RateLimiter,
    RateLimitMiddleware,
    rate_limit,
    report_cost,
)
from fastapi_ratelimit.express import _MAX_ENTRIES, Express
from fastapi_ratelimit.headers import HeaderStyle
from fastapi_ratelimit.metrics import RateLimitMetrics

pytestmark = pytest.mark.asyncio

Config = dict[str, Any]
OURS = ("ratelimit", "ratelimit-policy", "retry-after", "content-type")


def _app(config: Config, clock: FakeClock, guard: bool = False) -> tuple[FastAPI, RateLimiter]:
    limiter = RateLimiter(backend=MemoryBackend(clock=clock, max_keys=500), **config)
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    @app.get("/items/{item_id}")
    async def item(item_id: int, request: Request) -> dict[str, int]:
        if item_id == 500:
            raise HTTPException(500, "boom")
        if item_id == 7:
            report_cost(request, 3)
        return {"item": item_id}

    @app.post("/ocr")
    async def ocr() -> dict[str, str]:
        return {"ocr": "done"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/own-headers")
    async def own_headers() -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({}, headers={"RateLimit": "app's own", "X-Other": "kept"})

    if guard:

        @app.get("/guarded", dependencies=[Depends(RateLimit("2/minute", scope="ip"))])
        async def guarded() -> dict[str, str]:
            return {}

        @app.get("/decorated")
        @rate_limit("2/minute", scope="user")
        async def decorated(request: Request) -> dict[str, str]:
            return {}

    return app, limiter


def _middleware(app: FastAPI) -> RateLimitMiddleware:
    layer: Any = app.middleware_stack
    while not isinstance(layer, RateLimitMiddleware):
        layer = layer.app
    return layer


def _express(app: FastAPI) -> Express:
    """The express path of ``app``'s middleware (the stack is built by a first request)."""
    express = _middleware(app)._express
    assert express is not None
    return express


def _traffic(count: int, seed: int) -> list[tuple[str, str, dict[str, str]]]:
    rng = random.Random(seed)
    paths = [("GET", "/hello")] * 6 + [
        ("GET", "/items/1"),
        ("GET", "/items/2"),
        ("GET", "/items/7"),
        ("GET", "/items/500"),
        ("POST", "/ocr"),
        ("GET", "/nowhere"),
        ("GET", "/health"),
        ("DELETE", "/hello"),
        ("HEAD", "/hello"),
        ("GET", "/own-headers"),
        ("OPTIONS", "/hello"),
    ]
    requests = []
    for _ in range(count):
        method, path = rng.choice(paths)
        headers = {"x-forwarded-for": f"10.0.0.{rng.randrange(6)}"}
        if rng.random() < 0.7:
            headers["x-api-key"] = rng.choice(["k1", "k2", "k3", "x" * 200])
        if rng.random() < 0.7:
            headers["x-user"] = rng.choice(["alice", "bob", "u" * 100])
        requests.append((method, path, headers))
    return requests


def _user(connection: Any) -> Any:
    return connection.headers.get("x-user")


CONFIGS: dict[str, Config] = {
    "three levels": {
        "global_limit": "60/minute",
        "ip_limit": "12/minute",
        "endpoint_limits": {"GET /hello": "30/minute"},
    },
    "five levels, both header styles": {
        "global_limit": "200/minute",
        "ip_limit": "20/minute",
        "endpoint_limits": {"* /items/{item_id}": "25/minute", "POST /ocr": "10/minute"},
        "api_key_limit": "15/minute",
        "user_limit": "10/minute",
        "user_resolver": _user,
        "headers": "both",
        "costs": {"POST /ocr": 4},
    },
    "per-second windows and legacy headers": {
        "ip_limit": "3/second",
        "api_key_limit": "5/2seconds",
        "headers": "legacy",
    },
    "x-ratelimit headers, user from a resolver only": {
        "user_limit": "4/minute",
        "user_resolver": _user,
        "headers": "x-ratelimit",
    },
    "no headers": {"ip_limit": "5/minute", "headers": "none"},
    # Anonymous callers meet no level at all: no decision, no header.
    "a user level only": {"user_limit": "4/minute", "user_resolver": _user},
    # Levels left with the same share and units: the binding one is the first.
    "ties": {
        "global_limit": "40/minute",
        "endpoint_limits": {"* /hello": "40/minute", "* /items/{item_id}": "40/minute"},
        "ip_limit": "40/minute",
    },
}


class _Counting:
    """The middleware's express path, counting the requests it serves itself."""

    def __init__(self, inner: Express) -> None:
        self.inner = inner
        self.served = 0

    def entry(self, scope: Any) -> Any:
        return self.inner.entry(scope)

    async def serve(self, *args: Any) -> Any:
        context = await self.inner.serve(*args)
        self.served += context is None
        return context


async def _run(
    config: Config, express: bool, guard: bool = False, metrics: bool = False
) -> tuple[list[Any], Any, int]:
    clock = FakeClock()
    app, limiter = _app(config, clock, guard)
    if metrics:
        RateLimitMetrics(limiter, registry=CollectorRegistry())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("10.9.9.9", 1)), base_url="http://t"
    ) as client:
        await client.get("/health")  # builds the middleware stack
        middleware = _middleware(app)
        counting = None
        if express:
            assert middleware._express is not None
            counting = _Counting(middleware._express)
            middleware._express = counting  # type: ignore[assignment]
        else:
            middleware._express = None
        seen = []
        for method, path, headers in _traffic(400, seed=len(str(config))):
            clock.advance(0.35)
            response = await client.request(method, path, headers=headers)
            ours = {k: v for k, v in response.headers.items() if k in OURS or "ratelimit" in k}
            # An epoch from the wall clock, not the fake one: compared to the second it
            # would depend on when each run happened.
            ours.pop("x-ratelimit-reset", None)
            seen.append((method, path, response.status_code, ours, response.content))
    backend = limiter.backend
    assert isinstance(backend, MemoryBackend)
    if metrics:
        # What the metrics counted, beside what the store holds.
        recorder = limiter.recorder
        assert recorder is not None
        seen.append((dict(recorder.requests), dict(recorder.scopes)))
    return seen, dict(backend._data), counting.served if counting is not None else 0


@pytest.mark.parametrize("metrics", [False, True], ids=["", "metrics on"])
@pytest.mark.parametrize("name", list(CONFIGS))
async def test_the_express_path_answers_and_counts_as_the_general_path(
    name: str, metrics: bool
) -> None:
    config = CONFIGS[name]
    general, general_store, _ = await _run(config, express=False, metrics=metrics)
    express, express_store, served = await _run(config, express=True, metrics=metrics)
    for one, other in zip(general, express, strict=True):
        assert one == other
    assert express_store == general_store
    # Both outcomes happened, and the express path served most admitted requests.
    statuses = [row[2] for row in general if len(row) == 5]
    assert 429 in statuses
    assert served >= statuses.count(200) // 2


async def test_routes_with_guards_or_decorators_go_the_general_way_and_agree() -> None:
    config = CONFIGS["five levels, both header styles"]
    app, _ = _app(config, FakeClock(), guard=True)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        await client.get("/health")
        express = _express(app)
        statuses = [(await client.get("/guarded")).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        headers = {"x-user": "carol"}
        statuses = [(await client.get("/decorated", headers=headers)).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        assert (await client.get("/hello")).status_code == 200
    # Only /health and /hello were taken by the express path; the guarded routes are known
    # to need the general one, and are not looked into again.
    served = {path for (_, _, path), entry in express._entries.items() if not entry.general}
    assert served == {"/health", "/hello"}
    assert {path for _, _, path in express._entries} == {
        "/health",
        "/hello",
        "/guarded",
        "/decorated",
    }


def _limiter(**config: Any) -> RateLimiter:
    return RateLimiter(backend=MemoryBackend(), **config)


@pytest.mark.parametrize(
    "config",
    [
        {"ip_limit": "5/minute", "algorithm": "token_bucket"},
        {"ip_limit": "5/minute", "tiers": {"free": "5/minute"}},
        {"ip_limit": "5/minute", "cost_function": lambda request: 1},
        {"ip_limit": "5/minute", "shadow": True},
        {"ip_limit": "5/minute", "delay": {"ip": 1.0}},
        {"ip_limit": "5/minute", "refund_when": lambda status: status < 400},
        {"ip_limit": "5/minute", "composite_limits": [CompositeLimit(("ip", "user"), "5/minute")]},
        {"ip_limit": "5/minute", "limit_overrides": True},
    ],
    ids=[
        "token bucket",
        "tiers",
        "cost function",
        "shadow",
        "delay",
        "refund_when",
        "composite",
        "overrides",
    ],
)
async def test_configurations_it_does_not_cover_never_reach_it(config: Config) -> None:
    assert not Express.applies(_limiter(**config))
    assert Express.applies(_limiter(ip_limit="5/minute"))


async def test_per_request_conditions_send_requests_the_general_way() -> None:
    limiter = RateLimiter(backend=MemoryBackend(), ip_limit="5/minute", access_lists=True)
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {}

    transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/hello")).status_code == 200
        express = _express(app)
        scope = {"type": "http", "method": "GET", "path": "/hello", "root_path": "", "app": app}
        assert express.entry(scope) is not None
        # An allow-list entry: the lists must be asked, so the general path serves.
        await limiter.operator.allow("ip", "10.0.0.1")
        assert express.entry(scope) is None
        for _ in range(8):
            response = await client.get("/hello")
            assert response.status_code == 200
            assert "ratelimit" not in response.headers  # allow-listed: not limited at all


async def test_the_path_cache_is_bounded_whatever_paths_clients_send() -> None:
    limiter = _limiter(global_limit="1000000/minute")
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    @app.get("/items/{item_id}")
    async def item(item_id: str) -> dict[str, str]:
        return {}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        await client.get("/items/0")
        express = _express(app)
        peak = 0
        for i in range(100_000):
            scope = {
                "type": "http",
                "method": "GET",
                "path": f"/items/{i}",
                "root_path": "",
                "app": app,
                "headers": [],
            }
            assert express.entry(scope) is not None
            peak = max(peak, len(express._entries))
        assert peak == _MAX_ENTRIES
        # Every one of those paths is one endpoint: one template, one counter.
        assert (await client.get("/items/x")).headers["ratelimit"].startswith('"global";r=')


async def test_a_long_path_or_odd_method_goes_the_general_way() -> None:
    app, _ = _app(CONFIGS["three levels"], FakeClock())
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        await client.get("/health")
        express = _express(app)
        base: dict[str, Any] = {"type": "http", "root_path": "", "app": app, "headers": []}
        assert express.entry({**base, "method": "GET", "path": "/" + "a" * 600}) is None
        assert express.entry({**base, "method": "BREW", "path": "/hello"}) is None
        assert express.entry({**base, "method": "OPTIONS", "path": "/hello"}) is None
        assert express.entry({**base, "method": "GET", "path": "/hello"}) is not None
        response = await client.request("BREW", "/hello")
        assert response.status_code == 405


async def test_a_replaced_backend_or_header_style_is_followed_at_once() -> None:
    long_path = "/" + "a" * 80  # an endpoint identity too long to keep raw: hashed
    limiter = RateLimiter(
        backend=MemoryBackend(prefix="one"), endpoint_limits={f"GET {long_path}": "100/minute"}
    )
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    @app.get(long_path)
    async def endpoint() -> dict[str, str]:
        return {}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        assert (await client.get(long_path)).headers["ratelimit"].startswith('"endpoint";r=99;')
        _express(app)
        replaced = MemoryBackend(prefix="two", key_secret=b"s" * 32)
        limiter.backend = replaced
        response = await client.get(long_path)
        assert response.headers["ratelimit"].startswith('"endpoint";r=99;')  # a fresh store
        policy = limiter.levels.endpoints[f"GET {long_path}"]
        key = replaced.store_key("endpoint", policy.bucket, policy.code, f"GET {long_path}")
        assert isinstance(key, str)
        assert key.startswith("two")
        assert list(replaced._data) == [key]
        limiter.header_style = HeaderStyle.X_RATELIMIT
        response = await client.get(long_path)
        assert "ratelimit" not in response.headers
        assert response.headers["x-ratelimit-remaining"] == "98"


class _SteppingClock:
    """Answers each reading with the next of ``times`` (seconds), then the last forever."""

    def __init__(self, *times: float) -> None:
        self._times = [round(t * 1_000_000) for t in times]

    def now_us(self) -> int:
        return self._times.pop(0) if len(self._times) > 1 else self._times[0]


async def test_a_refusal_that_a_turning_window_lifts_is_admitted_and_charged() -> None:
    start = 1_700_000_000.0
    clock = _SteppingClock(start, start + 1, start + 121)
    limiter = RateLimiter(backend=MemoryBackend(clock=clock), ip_limit="1/minute")
    app = FastAPI()
    app.add_middleware(RateLimitMiddleware, limiter=limiter)

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        if item_id == 500:
            raise HTTPException(500, "boom")
        return {}

    transport = httpx.ASGITransport(app=app, client=("10.0.0.1", 1))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/items/1")).status_code == 200  # the one unit, at start
        # At start + 1 the express path finds it spent; the general decision, read at
        # start + 121, finds a new window: admitted, with its headers, and charged, so the
        # server error gives the unit back.
        response = await client.get("/items/500")
        assert response.status_code == 500
        assert response.headers["ratelimit"].startswith('"ip";r=0;t=')
    backend = limiter.backend
    assert isinstance(backend, MemoryBackend)
    (state,) = [entry[1] for entry in backend._data.values()]
    assert state[1] == 0  # refunded: this window's count is back to nothing
