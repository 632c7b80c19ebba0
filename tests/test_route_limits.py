"""@rate_limit and the Depends guard, with and without the middleware."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import PlainTextResponse
from http_helpers import RATE_HEADERS, client_for, header_counts, policies, remaining
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from fastapi_ratelimit import (
    ConfigurationError,
    FakeClock,
    MemoryBackend,
    RateLimit,
    RateLimiter,
    RateLimitExceeded,
    RateLimitMiddleware,
    rate_limit,
    rate_limit_exceeded_handler,
)


def common() -> int:
    return 7


class Item:
    """A type only resolvable in this module's globals (tests the decorator's hint resolution)."""


def build(limiter: RateLimiter, *, middleware: bool) -> FastAPI:
    app = FastAPI()
    bound = None if middleware else limiter

    @app.get("/async/{item_id}")
    @rate_limit("2/minute", scope="ip", limiter=bound)
    async def async_endpoint(item_id: int, q: Annotated[int, Depends(common)]) -> dict[str, int]:
        return {"id": item_id, "q": q}

    @app.get("/sync")
    @rate_limit("2/minute", scope="ip", limiter=bound)
    def sync_endpoint() -> dict[str, str]:
        return {"sync": "yes"}

    @app.get("/with-request")
    @rate_limit("1/minute", limiter=bound, cost=1)
    async def with_request(request: Request) -> dict[str, str]:
        return {"path": request.url.path}

    @app.get("/guarded", dependencies=[Depends(RateLimit("2/minute", limiter=bound))])
    async def guarded() -> dict[str, str]:
        return {"guarded": "yes"}

    @app.get("/both", dependencies=[Depends(RateLimit("3/minute", limiter=bound))])
    @rate_limit("2/minute", limiter=bound)
    async def both() -> dict[str, str]:
        return {"both": "yes"}

    if middleware:
        app.add_middleware(RateLimitMiddleware, limiter=limiter)
    else:
        app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    return app


@pytest.mark.parametrize("middleware", [True, False])
async def test_decorator_on_async_and_sync_endpoints(middleware: bool) -> None:
    app = build(RateLimiter(), middleware=middleware)
    async with client_for(app) as client:
        first = await client.get("/async/1")
        assert first.status_code == 200
        assert first.json() == {"id": 1, "q": 7}
        assert remaining(first) == "1"
        assert (await client.get("/async/2")).status_code == 200
        denied = await client.get("/async/3")
        assert denied.status_code == 429
        assert denied.headers["content-type"] == "application/problem+json"
        assert int(denied.headers["retry-after"]) >= 1
        assert (await client.get("/sync")).json() == {"sync": "yes"}
        assert (await client.get("/sync")).status_code == 200
        assert (await client.get("/sync")).status_code == 429
        assert (await client.get("/with-request")).json() == {"path": "/with-request"}
        assert (await client.get("/with-request")).status_code == 429


@pytest.mark.parametrize("middleware", [True, False])
async def test_guard(middleware: bool) -> None:
    app = build(RateLimiter(), middleware=middleware)
    async with client_for(app) as client:
        statuses = [(await client.get("/guarded")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_middleware_and_route_limits_count_once_with_headers_once() -> None:
    backend = MemoryBackend()
    limiter = RateLimiter(backend=backend, ip_limit="10/minute", headers="both")
    app = build(limiter, middleware=True)
    async with client_for(app) as client:
        first = await client.get("/both")
        assert first.status_code == 200
        # ip level, the guard (3/minute) and the decorator (2/minute): one decision each.
        assert set(policies(first)) == {"ip", "route-ip-3-60s", "route-ip-2-60s"}
        assert remaining(first) == "1"
        counts = header_counts(first)
        assert all(counts.get(name, 0) == 1 for name in RATE_HEADERS)
        assert (await client.get("/both")).status_code == 200
        denied = await client.get("/both")
        assert denied.status_code == 429
        assert denied.json()["violated-policies"] == ["route-ip-2-60s"]
    # Each limit was charged once per admitted request: the ip level shows 2 used.
    async with client_for(app) as client:
        assert remaining(await client.get("/guarded")) == "1"


async def test_openapi_is_unchanged_by_the_decorator() -> None:
    def make(decorate: bool) -> FastAPI:
        app = FastAPI()

        async def endpoint(
            item_id: int, q: Annotated[int, Depends(common)], name: str = "x"
        ) -> dict[str, int]:
            return {"id": item_id}

        if decorate:
            endpoint = rate_limit("5/minute")(endpoint)
        app.get("/items/{item_id}")(endpoint)
        return app

    assert make(True).openapi() == make(False).openapi()


async def test_decorator_on_plain_starlette_routes() -> None:
    limiter = RateLimiter()

    @rate_limit("1/minute", limiter=limiter)
    async def home(request: Request) -> JSONResponse:
        return JSONResponse({"home": True})

    @rate_limit("1/minute", limiter=limiter)
    def sync_home(request: Request) -> JSONResponse:
        return JSONResponse({"sync": True})

    app = Starlette(routes=[Route("/", home), Route("/sync", sync_home)])
    app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)
    async with client_for(app) as client:
        assert (await client.get("/")).json() == {"home": True}
        assert (await client.get("/")).status_code == 429
        assert (await client.get("/sync")).json() == {"sync": True}
        assert (await client.get("/sync")).status_code == 429


async def test_guard_on_router_and_app() -> None:
    limiter = RateLimiter()
    router = APIRouter(prefix="/r", dependencies=[Depends(RateLimit("1/minute", limiter=limiter))])

    @router.get("/a")
    async def a() -> dict[str, str]:
        return {"a": "a"}

    @router.get("/b")
    async def b() -> dict[str, str]:
        return {"b": "b"}

    app = FastAPI(dependencies=[Depends(RateLimit("3/minute", scope="global", limiter=limiter))])
    app.include_router(router)

    @app.get("/c")
    async def c() -> dict[str, str]:
        return {"c": "c"}

    async with client_for(app) as client:
        # Quotas are per route: /r/a and /r/b each get one from the router's guard.
        assert (await client.get("/r/a")).status_code == 200
        assert (await client.get("/r/a")).status_code == 429
        assert (await client.get("/r/b")).status_code == 200
        assert (await client.get("/c")).status_code == 200
        assert (await client.get("/c")).status_code == 200


async def current_user(request: Request) -> dict[str, str]:
    """Module level: with postponed annotations FastAPI resolves names in module globals."""
    return {"id": request.headers.get("x-token", "anonymous")}


async def test_guard_takes_the_user_from_another_dependency() -> None:
    limiter = RateLimiter()
    app = FastAPI()

    @app.get(
        "/me",
        dependencies=[Depends(RateLimit("1/minute", scope="user", user=current_user))],
    )
    async def me(user: Annotated[dict[str, str], Depends(current_user)]) -> dict[str, str]:
        return user

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        alice = {"x-token": "alice"}
        assert (await client.get("/me", headers=alice)).status_code == 200
        denied = await client.get("/me", headers=alice)
        assert denied.status_code == 429
        assert denied.headers["content-type"] == "application/problem+json"
        assert (await client.get("/me", headers={"x-token": "bob"})).status_code == 200


def failed(status: int) -> bool:
    return status >= 400


def self_checking_guards_app() -> FastAPI:
    """Guards that take the user from another dependency: they check themselves, inside the
    app, after the middleware admitted the request on the limiter's own levels."""
    limiter = RateLimiter(
        backend=MemoryBackend(clock=FakeClock()), global_limit="100/minute", ip_limit="5/minute"
    )
    app = FastAPI()

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

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    return app


async def test_a_self_checking_guards_denial_is_problem_json_with_every_level() -> None:
    app = self_checking_guards_app()
    alice = {"x-token": "alice"}
    async with client_for(app) as client:
        answers = [await client.get("/me", headers=alice) for _ in range(3)]
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[1].json() == {"id": "alice"}
    denied = answers[2]
    assert denied.headers["content-type"] == "application/problem+json"
    assert denied.json()["violated-policies"] == ["route-user-2-60s"]
    assert header_counts(denied)["ratelimit"] == 1
    assert int(denied.headers["retry-after"]) >= 1
    # The guard's own decision joins the middleware's levels in RateLimit-Policy.
    expected = {"global", "ip", "route-user-2-60s"}
    assert set(policies(answers[0])) == set(policies(answers[1])) == expected


async def test_a_self_checking_guards_refund_is_made_after_the_response() -> None:
    app = self_checking_guards_app()
    alice = {"x-token": "alice"}
    async with client_for(app) as client:
        answers = [await client.get("/failing", headers=alice) for _ in range(4)]
    # Without the refunds the guard's 2/minute would run out: the third would be a 429.
    assert [r.status_code for r in answers] == [400] * 4
    # The guard is back at 1 of 2 each time (refunded after each response) while the IP
    # level's 5 run down; the header names the tighter of the two by share left.
    assert [r.headers["ratelimit"] for r in answers] == [
        '"route-user-2-60s";r=1;t=100',
        '"route-user-2-60s";r=1;t=100',
        '"ip";r=2;t=100',
        '"ip";r=1;t=100',
    ]


async def test_custom_key_function() -> None:
    limiter = RateLimiter()
    app = FastAPI()

    @app.get("/tenant")
    @rate_limit("1/minute", scope="tenant", key=lambda c: c.headers.get("x-tenant"))
    async def tenant() -> dict[str, str]:
        return {"ok": "yes"}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        assert (await client.get("/tenant", headers={"x-tenant": "t1"})).status_code == 200
        assert (await client.get("/tenant", headers={"x-tenant": "t1"})).status_code == 429
        assert (await client.get("/tenant", headers={"x-tenant": "t2"})).status_code == 200
        # No tenant: the limit does not apply.
        assert (await client.get("/tenant")).status_code == 200
        assert (await client.get("/tenant")).status_code == 200


async def test_route_limit_without_any_limiter_is_a_clear_error() -> None:
    app = FastAPI()

    @app.get("/x")
    @rate_limit("1/minute")
    async def x() -> dict[str, str]:
        return {}

    with pytest.raises(RuntimeError, match="no RateLimiter"):
        async with client_for(app) as client:
            await client.get("/x")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"scope": "planet"}, "RateLimit: scope"),
        ({"cost": 0}, "RateLimit: cost"),
        ({"key": "not callable"}, "RateLimit: key"),
        ({"refund_when": 3}, "RateLimit: refund_when"),
    ],
)
def test_guard_configuration_errors(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimit("1/minute", **kwargs)
    assert info.value.field == field
    with pytest.raises(ConfigurationError, match=r"@rate_limit on .*: rate\.limit"):
        rate_limit("0/minute")(common)


def test_item_type_is_resolvable() -> None:
    @rate_limit("1/minute")
    async def endpoint(item: Item) -> Item:
        return item

    assert endpoint.__signature__.parameters["item"].annotation is Item  # type: ignore[attr-defined]


async def test_guard_under_a_failing_backend_never_answers_500() -> None:
    from fastapi_ratelimit import BackendError, MemoryBackend, Verdict

    class Down(MemoryBackend):
        async def hit(self, checks: Any) -> Verdict:
            raise BackendError("Redis script failed: ConnectionError")

    for policy, status in (("deny", 503), ("allow", 200)):
        limiter = RateLimiter(backend=Down(), on_backend_error=policy, breaker=None)
        app = FastAPI()

        @app.get("/g", dependencies=[Depends(RateLimit("1/minute", limiter=limiter))])
        async def g() -> dict[str, str]:
            return {"ok": "yes"}

        async with client_for(app) as client:
            response = await client.get("/g")
        assert response.status_code == status
        if status == 503:
            assert int(response.headers["retry-after"]) >= 1
