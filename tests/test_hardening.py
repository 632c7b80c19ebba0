"""Regression tests from a security review: odd user objects, duplicate route limits and
out-of-range TTLs must never turn into a 500 (or a stored value that breaks operators)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI
from http_helpers import client_for
from starlette.authentication import BaseUser
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_ratelimit import MemoryBackend, RateLimit, RateLimiter, RateLimitMiddleware, rate_limit
from fastapi_ratelimit.limiter import user_identity

# -- 1. user objects whose identity raises ----------------------------------------------------


class UserWithoutIdentity(BaseUser):
    """Authenticated, but ``identity`` is Starlette's: it raises NotImplementedError."""

    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def display_name(self) -> str:
        return "someone"


class SetUser:
    """What Starlette's AuthenticationMiddleware does: ``scope["user"] = <user>``."""

    def __init__(self, app: ASGIApp, user: Any) -> None:
        self.app, self.user = app, user

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope["user"] = self.user
        await self.app(scope, receive, send)


def user_app(limiter: RateLimiter, user: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        return {"hello": "world"}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    app.add_middleware(SetUser, user=user)  # outermost: sets the user before the limiter
    return app


async def test_a_user_whose_identity_raises_is_limited_by_ip_not_a_500() -> None:
    with pytest.raises(NotImplementedError):
        UserWithoutIdentity().identity  # noqa: B018 (the premise)
    limiter = RateLimiter(ip_limit="3/minute", user_limit="1/minute")
    app = user_app(limiter, UserWithoutIdentity())
    async with client_for(app, ip="198.51.100.1") as a, client_for(app, ip="198.51.100.2") as b:
        statuses = [(await a.get("/hello")).status_code for _ in range(4)]
        assert statuses == [200, 200, 200, 429]  # the IP level, not the user level
        assert (await b.get("/hello")).status_code == 200


class Odd:
    def __init__(self, **attributes: Any) -> None:
        self.__dict__.update(attributes)


class Raising:
    @property
    def id(self) -> str:
        raise RuntimeError("secret-user-data")

    @property
    def username(self) -> str:
        return "bob"


class RaisingEverywhere:
    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # pytest plugins look at dunders
            raise AttributeError(name)
        raise ValueError("secret-user-data")


class BadAuthenticated:
    @property
    def is_authenticated(self) -> bool:
        raise NotImplementedError

    id = "x"


@pytest.mark.parametrize(
    ("user", "expected"),
    [
        (Raising(), "bob"),  # the next attribute is tried
        (RaisingEverywhere(), None),
        (Odd(id=object(), username="carol"), "carol"),  # not a str/int: next attribute
        (Odd(id=["a"]), None),
        (Odd(id="u" * 100_000), None),  # absurdly long: anonymous
        (Odd(id=10**5000), None),  # str() of it raises ValueError
        (Odd(id=""), None),
        (Odd(id=7), "7"),
        ({"sub": "dave"}, "dave"),
    ],
)
def test_user_identity_never_raises(user: Any, expected: str | None) -> None:
    assert user_identity(user) == expected


@pytest.mark.parametrize("user", [BadAuthenticated(), RaisingEverywhere(), Odd(id=object())])
async def test_odd_scope_users_never_cause_5xx(user: Any) -> None:
    app = user_app(RateLimiter(ip_limit="2/minute", user_limit="1/minute"), user)
    async with client_for(app) as client:
        statuses = [(await client.get("/hello")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


async def test_a_failing_user_resolver_means_anonymous_not_a_500() -> None:
    calls = 0

    async def resolver(connection: Any) -> str:
        nonlocal calls
        calls += 1
        raise RuntimeError("auth service down")

    limiter = RateLimiter(ip_limit="2/minute", user_limit="1/minute", user_resolver=resolver)
    app = user_app(limiter, None)
    async with client_for(app) as client:
        statuses = [(await client.get("/hello")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert calls == 3


async def test_a_failing_tier_resolver_means_the_default_tier_not_a_500() -> None:
    def resolver(connection: Any) -> str:
        raise RuntimeError("billing down")

    limiter = RateLimiter(
        ip_limit="100/minute",
        tiers={"free": "2/minute", "pro": "100/minute"},
        default_tier="free",
        user_resolver=lambda connection: "alice",
        tier_resolver=resolver,
    )
    app = user_app(limiter, None)
    async with client_for(app) as client:
        statuses = [(await client.get("/hello")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


# -- 2. a decorator and a guard with the same rate and scope on one route ---------------------


@pytest.mark.parametrize("middleware", [True, False])
async def test_decorator_and_router_guard_with_the_same_limit_count_once(
    middleware: bool,
) -> None:
    limiter = RateLimiter(backend=MemoryBackend())
    router = APIRouter(dependencies=[Depends(RateLimit("3/minute", scope="ip", limiter=limiter))])

    @router.get("/both")
    @rate_limit("3/minute", scope="ip", limiter=limiter)
    async def both() -> dict[str, str]:
        return {"ok": "yes"}

    app = FastAPI()
    app.include_router(router)
    if middleware:
        app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        statuses = [(await client.get("/both")).status_code for _ in range(4)]
    # Counted once (not a 500 under the middleware, not twice without it).
    assert statuses == [200, 200, 200, 429]
