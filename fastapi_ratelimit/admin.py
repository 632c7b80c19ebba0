"""A mountable admin API for operators (needs FastAPI):

    app.include_router(admin_router(limiter, token=os.environ["RATELIMIT_ADMIN_TOKEN"]),
                       prefix="/ratelimit/admin")

It refuses everything unless you configure a ``token`` (sent as ``Authorization: Bearer``)
or your own ``dependency`` (for example your app's admin check). Every change writes an
audit line through loguru.

Raw API keys travel only in request bodies, never in a URL: URLs end up in access logs
(uvicorn prints the path and query of every request). The routes that name an identity in the
path or the query take users and IPs only; their body forms (``PUT /tiers``,
``POST /tiers/get``, ``POST /tiers/clear``, ``POST /block/remove``, ...) take every kind.
"""

# No `from __future__ import annotations` here: FastAPI must see the real annotations of
# endpoints defined inside admin_router (they refer to its local `Operator` type).
import hmac
from collections.abc import Callable
from dataclasses import asdict
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, Field

from .dynamic import DynamicLimits
from .errors import BackendError, ConfigurationError
from .limiter import RateLimiter

__all__ = ["admin_router"]


# TTLs are checked where they are used (errors.check_ttl: finite, > 0, <= 10 years), which
# answers a 422 naming the field. Not with Field(gt=..., allow_inf_nan=False): FastAPI's 422
# echoes the input, and an inf or NaN input can't be encoded as JSON (a 500 instead).


class TierBody(BaseModel):
    tier: str = Field(max_length=64)
    ttl: float | None = None


class TierRef(BaseModel):
    kind: Literal["user", "api_key"]
    identity: str = Field(min_length=1, max_length=4096)


class TierSetBody(TierRef):
    tier: str = Field(max_length=64)
    ttl: float | None = None


class EntryRef(BaseModel):
    kind: Literal["ip", "user", "api_key"]
    value: str = Field(min_length=1, max_length=4096)


class EntryBody(BaseModel):
    kind: Literal["ip", "user", "api_key"]
    value: str = Field(min_length=1, max_length=4096)
    reason: str = Field(default="", max_length=500)
    ttl: float | None = None


class OverrideBody(BaseModel):
    # Checked where it is used (DynamicLimits.set_override), like the TTLs: see above.
    factor: float
    ttl: float | None = None


class LimitTarget(BaseModel):
    level: Literal["global", "ip", "api_key", "user", "endpoint"]
    endpoint: str | None = Field(default=None, max_length=1024)


class LimitBody(LimitTarget):
    rate: str = Field(max_length=200)


class IdentityBody(BaseModel):
    ip: str | None = Field(default=None, max_length=100)
    user: str | None = Field(default=None, max_length=1024)
    api_key: str | None = Field(default=None, max_length=4096)
    endpoint: str | None = Field(default=None, max_length=1024)


def admin_router(
    limiter: RateLimiter,
    *,
    token: str | None = None,
    dependency: Callable[..., Any] | None = None,
) -> APIRouter:
    """Build the admin router for ``limiter``.

    Args:
        token: a shared secret; requests must send ``Authorization: Bearer <token>``.
        dependency: your own FastAPI dependency; it must raise to refuse, and may return the
            operator's name (a ``str``) for the audit log.
    """
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        raise ConfigurationError("token", "<hidden>", "must be a string of at least 16 characters")
    if dependency is not None and not callable(dependency):
        raise ConfigurationError("dependency", dependency, "must be a FastAPI dependency")

    async def authorise(request: Request) -> str:
        if token is None:
            raise HTTPException(403, "admin API disabled: configure a token or a dependency")
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), token.encode()
        ):
            raise HTTPException(401, "bad or missing admin token", {"WWW-Authenticate": "Bearer"})
        return "token"

    # Every route is one call into the limiter's operator API (operations.py).
    ops = limiter.operator
    guard = dependency if dependency is not None else authorise
    Operator = Annotated[Any, Depends(guard)]
    router = APIRouter(tags=["rate limiting admin"])

    def who(operator: Any) -> str:
        return operator if isinstance(operator, str) else "admin"

    # Users by path (a user id is no secret); every kind, API keys included, by body.
    @router.get("/tiers/{kind}/{identity}")
    async def get_tier(kind: Literal["user"], identity: str, operator: Operator) -> dict[str, Any]:
        return {"kind": kind, "tier": await _call(ops.get_tier(identity, kind=kind))}

    @router.put("/tiers/{kind}/{identity}")
    async def set_tier(
        kind: Literal["user"], identity: str, body: TierBody, operator: Operator
    ) -> dict[str, Any]:
        await _call(ops.set_tier(identity, body.tier, kind=kind, ttl=body.ttl, by=who(operator)))
        return {"kind": kind, "tier": body.tier, "ttl": body.ttl}

    @router.delete("/tiers/{kind}/{identity}")
    async def clear_tier(
        kind: Literal["user"], identity: str, operator: Operator
    ) -> dict[str, bool]:
        return {"cleared": await _call(ops.clear_tier(identity, kind=kind, by=who(operator)))}

    @router.post("/tiers/get")
    async def get_tier_by_body(body: TierRef, operator: Operator) -> dict[str, Any]:
        tier = await _call(ops.get_tier(body.identity, kind=body.kind))
        return {"kind": body.kind, "tier": tier}

    @router.put("/tiers")
    async def set_tier_by_body(body: TierSetBody, operator: Operator) -> dict[str, Any]:
        await _call(
            ops.set_tier(body.identity, body.tier, kind=body.kind, ttl=body.ttl, by=who(operator))
        )
        return {"kind": body.kind, "tier": body.tier, "ttl": body.ttl}

    @router.post("/tiers/clear")
    async def clear_tier_by_body(body: TierRef, operator: Operator) -> dict[str, bool]:
        cleared = await _call(ops.clear_tier(body.identity, kind=body.kind, by=who(operator)))
        return {"cleared": cleared}

    for list_name in ("allow", "block"):
        _list_routes(router, limiter, list_name, Operator, who)

    @router.get("/override")
    async def get_override(operator: Operator) -> dict[str, float]:
        return {"factor": await _call(_dynamic(limiter).override_factor())}

    @router.put("/override")
    async def set_override(body: OverrideBody, operator: Operator) -> dict[str, Any]:
        await _call(_dynamic(limiter).set_override(body.factor, ttl=body.ttl, by=who(operator)))
        return {"factor": body.factor, "ttl": body.ttl}

    @router.delete("/override")
    async def clear_override(operator: Operator) -> dict[str, bool]:
        return {"cleared": await _call(_dynamic(limiter).clear_override(by=who(operator)))}

    @router.get("/limits")
    async def changed_limits(operator: Operator) -> dict[str, Any]:
        _limits_on(limiter)
        return {"limits": await _call(ops.changed_limits())}

    @router.put("/limits")
    async def set_limit(body: LimitBody, operator: Operator) -> dict[str, Any]:
        # In the body, not the URL: an endpoint holds spaces and slashes.
        _limits_on(limiter)
        await _call(ops.set_limit(body.level, body.rate, endpoint=body.endpoint, by=who(operator)))
        return body.model_dump()

    @router.post("/limits/clear")
    async def clear_limit(body: LimitTarget, operator: Operator) -> dict[str, bool]:
        _limits_on(limiter)
        cleared = ops.clear_limit(body.level, endpoint=body.endpoint, by=who(operator))
        return {"cleared": await _call(cleared)}

    @router.post("/lists/cleanup")
    async def cleanup(operator: Operator) -> dict[str, int]:
        _lists_on(limiter)
        return {"removed": await _call(ops.cleanup())}

    @router.post("/inspect")
    async def inspect(body: IdentityBody, operator: Operator) -> dict[str, Any]:
        decisions = await _call(ops.inspect(**body.model_dump()))
        return {"levels": [d._asdict() for d in decisions]}

    @router.post("/reset")
    async def reset(body: IdentityBody, operator: Operator) -> dict[str, int]:
        return {"levels": await _call(ops.reset(**body.model_dump(), by=who(operator)))}

    return router


def _list_routes(
    router: APIRouter, limiter: RateLimiter, name: str, operator_type: Any, who: Any
) -> None:
    ops = limiter.operator
    add = ops.allow if name == "allow" else ops.block
    remove = ops.unallow if name == "allow" else ops.unblock
    listing = ops.allowed if name == "allow" else ops.blocked

    async def list_entries(operator: operator_type) -> dict[str, Any]:
        _lists_on(limiter)
        return {"entries": [asdict(e) for e in await _call(listing())]}

    async def add_entry(body: EntryBody, operator: operator_type) -> dict[str, Any]:
        _lists_on(limiter)
        entry = await _call(
            add(body.kind, body.value, reason=body.reason, by=who(operator), ttl=body.ttl)
        )
        return asdict(entry)

    async def remove_entry(
        operator: operator_type,
        # Not api_key: the query string is in every access log (use POST .../remove).
        kind: Literal["ip", "user"] = Query(),
        value: str = Query(min_length=1, max_length=4096),
    ) -> dict[str, bool]:
        _lists_on(limiter)
        return {"removed": await _call(remove(kind, value, by=who(operator)))}

    async def remove_entry_by_body(body: EntryRef, operator: operator_type) -> dict[str, bool]:
        _lists_on(limiter)
        return {"removed": await _call(remove(body.kind, body.value, by=who(operator)))}

    router.add_api_route(f"/{name}", list_entries, methods=["GET"], name=f"list_{name}")
    router.add_api_route(f"/{name}", add_entry, methods=["POST"], name=f"add_{name}")
    router.add_api_route(f"/{name}", remove_entry, methods=["DELETE"], name=f"remove_{name}")
    router.add_api_route(
        f"/{name}/remove", remove_entry_by_body, methods=["POST"], name=f"remove_{name}_by_body"
    )


def _lists_on(limiter: RateLimiter) -> None:
    # Static entries alone (allow=/block=) make lists too, but nothing stored applies.
    if limiter.lists is None or not limiter.lists.mirrored:
        raise HTTPException(
            409, "this limiter applies no allow/block lists (RateLimiter(access_lists=True))"
        )


def _limits_on(limiter: RateLimiter) -> None:
    if limiter.limit_overrides is None:
        raise HTTPException(
            409,
            "this limiter applies no limits changed at run time "
            "(RateLimiter(limit_overrides=True))",
        )


def _dynamic(limiter: RateLimiter) -> DynamicLimits:
    if limiter.dynamic is None:
        raise HTTPException(409, "this limiter has no dynamic limits (RateLimiter(dynamic=...))")
    return limiter.dynamic


async def _call(awaitable: Any) -> Any:
    # Operator mistakes are 422s naming the field; backend trouble is a 503, never a 500.
    try:
        return await awaitable
    except ConfigurationError as exc:
        raise HTTPException(422, str(exc)) from None
    except BackendError:
        raise HTTPException(503, "rate-limit backend unavailable") from None
