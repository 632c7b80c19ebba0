"""The middleware's lanes (``_speedups.lane_admit``): a request seen before is decided in one
C call. Every test here first makes sure a lane exists, then changes one thing a lane must
notice, and checks the answer is the one the Python path gives."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import types
from typing import Annotated, Any

import pytest
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from http_helpers import client_for, header_counts, policies, ratelimit, remaining

from fastapi_ratelimit import (
    FakeClock,
    MemoryBackend,
    RateLimit,
    RateLimiter,
    RateLimitMiddleware,
    rate_limit,
    report_cost,
)
from fastapi_ratelimit import middleware as middleware_module
from fastapi_ratelimit._accel import ACCELERATED
from fastapi_ratelimit.middleware import _Lane

pytestmark = pytest.mark.skipif(not ACCELERATED, reason="lanes need the C speedups (not in use)")


@pytest.fixture
def lane_hits(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The endpoint of every request a lane decided (the real C function, observed)."""
    hits: list[str] = []
    real = middleware_module._lane_admit
    assert real is not None

    def observed(*args: Any) -> Any:
        run = real(*args)
        if run is not None:
            hits.append(run.sender.context.endpoint)
        return run

    monkeypatch.setattr(middleware_module, "_lane_admit", observed)
    return hits


def limiter(**options: Any) -> RateLimiter:
    defaults: dict[str, Any] = {
        "backend": MemoryBackend(clock=FakeClock()),
        "global_limit": "100/minute",
        "ip_limit": "5/minute",
        "endpoint_limits": {"GET /hello": "50/minute"},
    }
    defaults.update(options)
    return RateLimiter(**defaults)


def make_app(
    rl: RateLimiter, *, login: bool = False, **middleware: Any
) -> tuple[FastAPI, RateLimitMiddleware]:
    app = FastAPI()
    app.state.calls = 0
    app.state.gate = asyncio.Event()
    app.state.waiting = asyncio.Event()
    app.state.finished = 0

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        app.state.calls += 1
        return {"hello": "world"}

    @app.get("/reported")
    async def reported(request: Request) -> dict[str, str]:
        report_cost(request, 0)
        return {"cost": "0"}

    @app.get(
        "/me",
        dependencies=[Depends(RateLimit("2/minute", scope="user", user=current_user))],
    )
    async def me(user: Annotated[dict[str, str], Depends(current_user)]) -> dict[str, str]:
        return user

    @app.get(
        "/failing",
        dependencies=[
            Depends(RateLimit("2/minute", scope="user", user=current_user, refund_when=failed))
        ],
    )
    async def failing() -> PlainTextResponse:
        return PlainTextResponse("no", status_code=400)

    @app.get("/wait")
    async def wait(request: Request) -> dict[str, str]:
        app.state.waiting.set()
        try:
            await app.state.gate.wait()
        except ValueError:
            report_cost(request, 0)  # thrown in and handled: give it all back afterwards
        finally:
            app.state.finished += 1
        return {"waited": "yes"}

    @app.get("/own-headers")
    async def own_headers() -> PlainTextResponse:
        # An app that sets headers of ours itself (in another case): ours replace them.
        return PlainTextResponse("x", headers={"RateLimit-Policy": "mine", "X-Other": "kept"})

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks() -> Any:
            for chunk in (b"one ", b"two ", b"three"):
                yield chunk

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/who")
    async def who(request: Request) -> dict[str, Any]:
        context = request.scope["fastapi_ratelimit"]
        return {"key": context.api_key, "user": context.user, "ip": context.ip}

    @app.get("/decorated")
    @rate_limit("2/minute")
    async def decorated() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(RateLimitMiddleware, limiter=rl, **middleware)
    if login:
        # Outside the limiter: ?user=NAME logs in as NAME (request.state.user).

        @app.middleware("http")
        async def log_in(request: Request, call_next: Any) -> Any:
            if "user" in request.query_params:
                request.state.user = request.query_params["user"]
            return await call_next(request)

    return app, middleware_of(app)


def failed(status: int) -> bool:
    return status >= 400


async def current_user(request: Request) -> dict[str, str]:
    return {"id": request.headers.get("x-token", "anonymous")}


def middleware_of(app: FastAPI) -> RateLimitMiddleware:
    """The app's RateLimitMiddleware instance (the stack is built here, once, as Starlette
    would on the first request)."""
    app.middleware_stack = app.build_middleware_stack()
    layer: Any = app.middleware_stack
    while not isinstance(layer, RateLimitMiddleware):
        layer = layer.app
    return layer


async def test_a_lane_serves_repeat_requests_with_the_same_answers(lane_hits: list[str]) -> None:
    rl = limiter()
    app, middleware = make_app(rl)
    async with client_for(app) as client:
        first = await client.get("/hello")
        assert len(middleware._lanes) == 1
        lane = next(iter(middleware._lanes.values()))
        assert isinstance(lane, _Lane)
        assert (lane.ip, lane.endpoint, lane.cost) == ("203.0.113.7", "GET /hello", 1)
        answers = [await client.get("/hello") for _ in range(4)]
        denied = await client.get("/hello")  # the sixth: the IP level (5/minute) refuses
    assert first.status_code == 200
    assert lane_hits == ["GET /hello"] * 4  # the first made the lane; the sixth was refused
    assert [remaining(r) for r in answers] == ["3", "2", "1", "0"]
    assert set(policies(answers[0])) == {"global", "ip", "endpoint"}
    assert denied.status_code == 429
    assert ratelimit(denied)[0] == "ip"
    assert app.state.calls == 5
    # Exactly what the store holds: 5 on each of the three levels.
    peeked = await rl.backend.peek(lane.checks)
    assert [d.remaining for d in peeked.decisions] == [95, 0, 45]


async def test_each_peer_and_path_has_its_own_lane() -> None:
    rl = limiter()
    app, middleware = make_app(rl)
    for ip in ("198.51.100.1", "198.51.100.2"):
        async with client_for(app, ip=ip) as client:
            for _ in range(3):
                assert (await client.get("/hello")).status_code == 200
    assert len(middleware._lanes) == 2
    async with client_for(app, ip="198.51.100.1") as client:
        response = await client.get("/hello")
    # Per IP: 4 of 5 used by this peer, not 7 (the other peer's 3 are its own).
    assert remaining(response) == "1"


async def test_a_replaced_backend_is_used_at_once() -> None:
    rl = limiter()
    app, middleware = make_app(rl)
    async with client_for(app) as client:
        for _ in range(3):
            await client.get("/hello")
        assert middleware._lanes
        rl.backend = MemoryBackend(clock=FakeClock())
        response = await client.get("/hello")
    assert remaining(response) == "4"  # a fresh store


async def test_block_and_allow_lists_are_consulted() -> None:
    rl = limiter()
    app, middleware = make_app(rl)
    async with client_for(app) as client:
        await client.get("/hello")
        await client.get("/hello")
        assert middleware._lanes
        await rl.block("ip", "203.0.113.7")
        assert (await client.get("/hello")).status_code == 403
        await rl.unblock("ip", "203.0.113.7")
        await rl.allow("ip", "203.0.113.7")
        allowed = await client.get("/hello")
    assert allowed.status_code == 200
    assert "ratelimit" not in allowed.headers  # allow-listed: not limited, not counted
    await rl.aclose()


async def test_a_user_or_an_api_key_leaves_the_lane(lane_hits: list[str]) -> None:
    rl = limiter(user_limit="3/minute", api_key_limit="2/minute")
    app, _ = make_app(rl, login=True)
    async with client_for(app) as client:
        await client.get("/hello")
        await client.get("/hello")
        user = await client.get("/hello", params={"user": "alice"})
        keyed = await client.get("/hello", headers={"X-API-Key": "k-123"})
        blank_key = await client.get("/hello", headers={"X-API-Key": " \t"})
    assert lane_hits == ["GET /hello", "GET /hello"]  # the second and the blank key
    assert "user" in policies(user)
    assert "api_key" in policies(keyed)
    assert "api_key" not in policies(blank_key)  # a blank key is no key, as in Python
    assert remaining(blank_key) == "0"  # and the IP level counted all five


async def test_an_api_key_without_a_level_of_its_own_stays_in_the_context(
    lane_hits: list[str],
) -> None:
    """No API-key level: a keyed request is served by the lane, and the context still carries
    the key, as the Python path's does (route guards may key on it)."""
    rl = limiter()
    app, _ = make_app(rl)
    async with client_for(app) as client:
        first = await client.get("/who", headers={"X-API-Key": "k-1"})
        again = await client.get("/who", headers={"X-API-Key": "\tk-2 "})
        blank = await client.get("/who", headers={"X-API-Key": "  "})
        latin = await client.get("/who", headers={"X-API-Key": "caf\xe9".encode("latin-1")})
        bare = await client.get("/who")
    assert lane_hits == ["GET /who"] * 4
    assert [r.json()["key"] for r in (first, again, blank, latin, bare)] == [
        "k-1",
        "k-2",
        None,
        "caf\xe9",
        None,
    ]
    assert [remaining(r) for r in (first, again, blank, latin, bare)] == ["4", "3", "2", "1", "0"]


async def test_a_denial_on_a_lane_is_the_python_paths_problem_json() -> None:
    rl = limiter(ip_limit="2/minute")
    app, _ = make_app(rl)
    async with client_for(app) as client:
        await client.get("/hello")
        await client.get("/hello")
        denied = await client.get("/hello")
    assert denied.status_code == 429
    assert denied.headers["content-type"] == "application/problem+json"
    assert int(denied.headers["retry-after"]) >= 1
    assert app.state.calls == 2


async def test_reported_cost_is_adjusted_after_a_lane_request() -> None:
    rl = limiter()
    app, middleware = make_app(rl)
    async with client_for(app) as client:
        for _ in range(6):
            response = await client.get("/reported")  # reports a cost of 0 each time
            assert response.status_code == 200
    assert any(lane.endpoint == "GET /reported" for lane in middleware._lanes.values())
    # Each request was refunded after its response: the sixth still sees the IP level full
    # but for itself.
    assert remaining(response) == "4"


async def test_routes_with_their_own_limits_get_no_lane() -> None:
    rl = limiter()
    app, middleware = make_app(rl)
    async with client_for(app) as client:
        statuses = [(await client.get("/decorated")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert middleware._lanes == {}


async def test_exempt_paths_and_preflights_are_never_counted() -> None:
    rl = limiter(ip_limit="2/minute")
    app, middleware = make_app(rl)
    preflight = {"Origin": "http://a.example", "Access-Control-Request-Method": "GET"}
    async with client_for(app) as client:
        await client.get("/hello")
        assert middleware._lanes
        for _ in range(5):
            # No CORSMiddleware here: the app answers 405, and the limiter lets it through.
            assert (await client.options("/hello", headers=preflight)).status_code == 405
            assert (await client.get("/docs")).status_code == 200
        last = await client.get("/hello")
    assert last.status_code == 200
    assert remaining(last) == "0"


async def test_forwarded_headers_from_a_trusted_proxy_never_use_a_lane() -> None:
    rl = limiter(trusted_proxies=["10.0.0.0/8"], ip_limit="2/minute")
    app, middleware = make_app(rl)
    async with client_for(app, ip="10.1.2.3") as client:
        for n in range(4):
            # Each request from a different client behind the proxy: its own IP budget.
            response = await client.get("/hello", headers={"X-Forwarded-For": f"192.0.2.{n}"})
            assert response.status_code == 200
            assert remaining(response) == "1"
    assert middleware._lanes == {}


async def test_routes_added_later_are_resolved_afresh() -> None:
    rl = limiter()
    app, _ = make_app(rl)
    async with client_for(app) as client:
        assert (await client.get("/late")).status_code == 404
        assert (await client.get("/late")).status_code == 404

        @app.get("/late")
        async def late() -> dict[str, str]:
            return {"late": "yes"}

        response = await client.get("/late")
    assert response.status_code == 200
    assert response.json() == {"late": "yes"}


async def test_hostile_scope_values_fall_back_without_errors() -> None:
    """Odd values a lane cannot key on (a list as root_path, a non-string host) take the
    Python path: no exception, no 5xx."""
    rl = limiter()
    app, middleware = make_app(rl)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    base = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/hello", "raw_path": b"/hello", "query_string": b"",
        "root_path": "", "headers": [(b"host", b"x")], "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    await app({**base}, receive, send)
    await app({**base}, receive, send)
    assert middleware._lanes
    for odd in (
        {"client": (["127.0.0.1"], 5000)},
        {"client": None},
        {"headers": [("x-api-key", "text, not bytes")]},
        {"state": {"user": "bob"}},
    ):
        await app({**base, **odd}, receive, send)
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert statuses == [200] * 6


async def test_a_guard_denial_on_a_lane_request_is_problem_json(lane_hits: list[str]) -> None:
    """A guard that takes its user from another dependency checks itself, inside the app:
    its denial reaches the lane's C send wrapper, which answers with problem+json."""
    rl = limiter()
    app, _ = make_app(rl)
    alice = {"x-token": "alice"}
    async with client_for(app) as client:
        answers = [await client.get("/me", headers=alice) for _ in range(3)]
    assert lane_hits == ["GET /me", "GET /me"]
    assert [r.status_code for r in answers] == [200, 200, 429]
    denied = answers[2]
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.json()["violated-policies"] == ["route-user-2-60s"]
    assert header_counts(denied)["ratelimit"] == 1
    assert int(denied.headers["retry-after"]) >= 1
    assert answers[1].json() == {"id": "alice"}
    # The guard's own decision joins the lane's in RateLimit-Policy (the lane's precomputed
    # value covers only its own levels), as on the Python path.
    expected = {"global", "ip", "route-user-2-60s"}
    assert set(policies(answers[0])) == set(policies(answers[1])) == expected


async def test_a_guard_refund_on_a_lane_request_is_made(lane_hits: list[str]) -> None:
    """A guard that checks itself inside a lane request and refunds failures: its refund
    runs after the response, as on the Python path (its 2/minute never runs out)."""
    rl = limiter()
    app, _ = make_app(rl)
    alice = {"x-token": "alice"}
    async with client_for(app) as client:
        answers = [await client.get("/failing", headers=alice) for _ in range(4)]
    assert lane_hits == ["GET /failing"] * 3
    # Without the lane's refunds the guard's 2/minute ran out: the fourth was a 429.
    assert [r.status_code for r in answers] == [400] * 4
    # The guard is back at 1 of 2 each time (refunded after each response) while the IP
    # level's 5 run down; the header names the tighter of the two by share left.
    assert [r.headers["ratelimit"] for r in answers] == [
        '"route-user-2-60s";r=1;t=100',
        '"route-user-2-60s";r=1;t=100',
        '"ip";r=2;t=100',
        '"ip";r=1;t=100',
    ]


async def test_the_lane_send_wrapper_replaces_the_apps_own_headers(lane_hits: list[str]) -> None:
    rl = limiter(headers="both")
    app, _ = make_app(rl)
    async with client_for(app) as client:
        answers = [await client.get("/own-headers") for _ in range(2)]
    assert lane_hits == ["GET /own-headers"]
    for response in answers:
        counts = header_counts(response)
        assert counts["ratelimit-policy"] == 1
        assert counts["x-ratelimit-limit"] == 1
        assert response.headers["x-other"] == "kept"
        assert set(policies(response)) == {"global", "ip"}
    assert answers[1].headers["x-ratelimit-remaining"] == "3"


async def test_streaming_through_a_lane(lane_hits: list[str]) -> None:
    rl = limiter()
    app, _ = make_app(rl)
    async with client_for(app) as client:
        answers = [await client.get("/stream") for _ in range(3)]
    assert lane_hits == ["GET /stream"] * 2
    assert [r.text for r in answers] == ["one two three"] * 3
    assert [remaining(r) for r in answers] == ["4", "3", "2"]


async def test_a_lane_builds_the_context_the_python_path_builds(lane_hits: list[str]) -> None:
    """The lane makes its RequestContext slot by slot in C: field for field what
    RequestContext(...) plus recording the admitted verdict gives."""
    rl = limiter()
    app, _ = make_app(rl)
    seen: list[Any] = []

    @app.get("/capture")
    async def capture(request: Request) -> dict[str, str]:
        seen.append(request.scope["fastapi_ratelimit"])
        return {}

    async with client_for(app) as client:
        for _ in range(2):
            await client.get("/capture", headers={"X-API-Key": "k"})
    assert lane_hits == ["GET /capture"]
    python, lane = seen
    assert type(lane) is type(python)
    for field in dataclasses.fields(python):
        ours, theirs = getattr(lane, field.name), getattr(python, field.name)
        if field.name == "decisions":
            # One more request counted: the same levels, one unit less left.
            assert [(d.policy, d.remaining - 1) for d in theirs] == [
                (d.policy, d.remaining) for d in ours
            ]
        elif field.name in ("limiter", "route"):
            assert ours is theirs
        else:
            assert ours == theirs, field.name
            assert type(ours) is type(theirs), field.name
    lane.handled.add(1)  # fresh containers, not shared with the lane or another request
    assert python.handled == set()


def test_servers_see_a_coroutine_function() -> None:
    """The class's __call__ returns an awaitable without being a coroutine function (a lane
    request costs no coroutine of ours); what servers inspect must still say ASGI 3."""
    _, middleware = make_app(limiter())
    assert inspect.iscoroutinefunction(middleware.__call__)
    assert asyncio.iscoroutinefunction(middleware.__call__)
    config = uvicorn.Config(middleware, log_config=None)
    config.load()
    assert config.interface == "asgi3"


def wait_scope(app: FastAPI) -> dict[str, Any]:
    """GET /wait as the middleware sees it inside the app (Starlette has set scope["app"])."""
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/wait", "raw_path": b"/wait", "query_string": b"",
        "root_path": "", "headers": [(b"host", b"testserver")], "app": app,
        "client": ("203.0.113.7", 40000), "server": ("testserver", 80),
    }  # fmt: skip


async def test_a_lane_request_is_cancelled_closed_and_thrown_into_like_a_coroutine(
    lane_hits: list[str],
) -> None:
    rl = limiter()
    app, middleware = make_app(rl)
    app.state.gate.set()
    async with client_for(app) as client:
        assert (await client.get("/wait")).status_code == 200  # the lane is made
    app.state.gate.clear()
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    # Cancelled while the endpoint waits: CancelledError reaches it and comes back out.
    app.state.waiting.clear()
    task = asyncio.ensure_future(middleware(wait_scope(app), receive, send))
    await app.state.waiting.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert app.state.finished == 2
    # Closed: the endpoint's finally runs, nothing is sent.
    run = middleware(wait_scope(app), receive, send)
    assert type(run).__name__ == "LaneRun"
    run.send(None)  # up to the endpoint's wait
    run.close()
    assert app.state.finished == 3
    with pytest.raises(RuntimeError, match="already awaited"):
        run.send(None)
    # Thrown into and not handled: the exception comes out.
    run = middleware(wait_scope(app), receive, send)
    run.send(None)
    with pytest.raises(KeyError):
        run.throw(KeyError("boom"))
    assert app.state.finished == 4
    assert sent == []
    # Thrown into and handled: the endpoint answers and reports a cost of 0, so the
    # after-response step runs and refunds it. The IP level's 5/minute has then counted four
    # requests (the first, the cancelled, the closed, the failed), so a sixth still passes.
    run = middleware(wait_scope(app), receive, send)
    run.send(None)
    with pytest.raises(StopIteration):
        run.throw(ValueError("handled"))
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [200]
    app.state.gate.set()
    async with client_for(app) as client:
        response = await client.get("/wait")
    assert lane_hits == ["GET /wait"] * 5
    assert response.status_code == 200
    assert remaining(response) == "0"


async def test_an_inner_app_answering_with_a_generator_based_coroutine(
    lane_hits: list[str],
) -> None:
    """What the app returns is awaited as `await` would: a @types.coroutine generator too."""

    class Legacy:
        def __init__(self, app: Any) -> None:
            self.app = app

        def __call__(self, scope: Any, receive: Any, send: Any) -> Any:
            @types.coroutine
            def run() -> Any:
                return (yield from self.app(scope, receive, send).__await__())

            return run()

    rl = limiter()
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    app.add_middleware(Legacy)
    app.add_middleware(RateLimitMiddleware, limiter=rl)
    async with client_for(app) as client:
        answers = [await client.get("/hello") for _ in range(3)]
    assert lane_hits == ["GET /hello"] * 2
    assert [r.status_code for r in answers] == [200] * 3
    assert [remaining(r) for r in answers] == ["4", "3", "2"]
