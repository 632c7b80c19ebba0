"""Regression tests from a security review: odd user objects, duplicate route limits and
out-of-range TTLs must never turn into a 500 (or a stored value that breaks operators)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from fastapi import APIRouter, Depends, FastAPI
from http_helpers import client_for
from starlette.authentication import BaseUser
from starlette.types import ASGIApp, Receive, Scope, Send

from fastapi_ratelimit import (
    DEFAULT_TIERS,
    ConfigurationError,
    MemoryBackend,
    RateLimit,
    RateLimiter,
    RateLimitMiddleware,
    rate_limit,
)
from fastapi_ratelimit.access import ListEntry
from fastapi_ratelimit.admin import admin_router
from fastapi_ratelimit.cli import _short as cli_short
from fastapi_ratelimit.cli import main as cli_main
from fastapi_ratelimit.dynamic import DynamicLimits
from fastapi_ratelimit.identify import user_identity

TOKEN = "s3cret-admin-token-0123"
MAX_TTL = 10 * 365 * 86400.0  # the longest TTL accepted: ten years

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


class ObjectIdLike:
    """An id type with a string form of its own, as bson.ObjectId has."""

    def __str__(self) -> str:
        return "65a1f0c2e4b0a1b2c3d4e5f6"


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
        (Odd(id=ObjectIdLike()), "65a1f0c2e4b0a1b2c3d4e5f6"),
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


# -- 3. TTLs: finite, positive, at most ten years -----------------------------------------------

BAD_TTLS: list[Any] = [math.inf, float("1e400"), math.nan, -1, 0, 1e12, True, "60", 10**400]


@pytest.mark.parametrize("ttl", BAD_TTLS)
@pytest.mark.parametrize("method", ["allow", "block"])
async def test_python_api_rejects_bad_list_ttls(method: str, ttl: Any) -> None:
    limiter = RateLimiter(access_lists=True)
    with pytest.raises(ConfigurationError) as raised:
        await getattr(limiter.operator, method)("ip", "192.0.2.0/24", ttl=ttl)
    assert raised.value.field == "ttl"
    assert await limiter.operator.blocked() == []
    assert await limiter.operator.allowed() == []
    entry = await getattr(limiter.operator, method)("ip", "192.0.2.0/24", ttl=MAX_TTL)
    assert entry.expires_at is not None


@pytest.mark.parametrize("ttl", BAD_TTLS)
async def test_tier_and_override_ttls_are_checked_too(ttl: Any) -> None:
    limiter = RateLimiter(tiers=DEFAULT_TIERS, dynamic=DynamicLimits())
    with pytest.raises(ConfigurationError, match="ttl"):
        await limiter.operator.set_tier("alice", "pro", ttl=ttl)
    assert limiter.dynamic is not None
    with pytest.raises(ConfigurationError, match="ttl"):
        await limiter.dynamic.set_override(0.5, ttl=ttl)


@pytest.mark.parametrize("ttl", ["1e400", "-1e400", "NaN", "-5", "0", "1e12"])
@pytest.mark.parametrize("path", ["allow", "block"])
async def test_admin_api_rejects_bad_ttls_with_a_422(path: str, ttl: str) -> None:
    limiter = RateLimiter(access_lists=True)
    app = FastAPI()
    app.include_router(admin_router(limiter, token=TOKEN), prefix="/admin")
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    body = f'{{"kind": "ip", "value": "192.0.2.0/24", "ttl": {ttl}}}'
    async with client_for(app) as client:
        response = await client.post(f"/admin/{path}", content=body, headers=auth)
        assert response.status_code == 422, response.text
        assert "ttl" in response.text
        listing = await client.get(f"/admin/{path}", headers=auth)
        assert listing.status_code == 200
        assert listing.json() == {"entries": []}


async def test_admin_tier_and_override_ttls_are_checked() -> None:
    limiter = RateLimiter(tiers=DEFAULT_TIERS, dynamic=DynamicLimits())
    app = FastAPI()
    app.include_router(admin_router(limiter, token=TOKEN), prefix="/admin")
    auth = {"authorization": f"Bearer {TOKEN}", "content-type": "application/json"}
    async with client_for(app) as client:
        for path, body in [
            ("/admin/tiers/user/alice", '{"tier": "pro", "ttl": 1e400}'),
            ("/admin/override", '{"factor": 0.5, "ttl": 1e400}'),
        ]:
            response = await client.put(path, content=body, headers=auth)
            assert response.status_code == 422, (path, response.text)
            assert "ttl" in response.text


@pytest.mark.parametrize("ttl", ["inf", "1e400", "nan", "-1", "0", "1e12", "soon"])
@pytest.mark.parametrize(
    "command",
    [
        ["block", "add", "ip", "192.0.2.0/24"],
        ["allow", "add", "ip", "192.0.2.0/24"],
        ["tier", "set", "user", "alice", "pro"],
        ["override", "set", "0.5"],
    ],
)
def test_cli_rejects_bad_ttls_with_exit_code_2(
    command: list[str], ttl: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--redis-url", "redis://127.0.0.1:1/0", *command, "--ttl", ttl]
    with pytest.raises(SystemExit) as exited:
        cli_main(argv)
    assert exited.value.code == 2
    assert "--ttl" in capsys.readouterr().err


def test_entries_stored_with_an_infinite_ttl_still_list() -> None:
    # Stored before TTLs were checked: read back as permanent, listed without crashing.
    entry = ListEntry.from_mapping(
        {"kind": "ip", "value": "192.0.2.0/24", "added_at": 1.0, "expires_at": math.inf}
    )
    assert entry is not None
    assert entry.expires_at is None
    assert cli_short(math.inf) == "inf"
    assert cli_short(1e300) == "1e+300"
