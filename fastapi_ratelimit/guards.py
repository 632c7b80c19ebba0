"""The route guards' path: ``@rate_limit`` and the ``RateLimit`` dependency check their limit
here, unless the middleware already did (then they see it handled and do nothing). Without
the middleware, the same steps run here for one limit: identify, route and cost, access lists,
enforce, and headers on the endpoint's response."""

from __future__ import annotations

import time
from typing import Any

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection
from starlette.responses import Response

from .backends.base import Check, storage_key
from .context import SCOPE_KEY, RequestContext
from .decision import never
from .errors import BackendError
from .headers import rate_limit_headers, retry_after_value
from .identify import user_identity
from .identity import QUERY_TOO_LONG, QueryTooLong
from .limiter import RateLimiter
from .logs import log_limited
from .route_limits import RateLimitExceeded, RouteLimit, server_error

__all__ = ["add_headers", "after_endpoint", "enforce"]


async def enforce(
    limit: RouteLimit,
    connection: HTTPConnection,
    *,
    user: Any = None,
    response: Response | None = None,
) -> Check | None:
    """Check ``limit`` for this request unless the middleware already did. ``user``: the
    user object a guard's user dependency gave (``None``: the request's user). Returns the
    check it charged, if any (the decorator refunds it when the endpoint fails)."""
    scope = connection.scope
    context = scope.get(SCOPE_KEY)
    if isinstance(context, RequestContext) and (context.exempt or id(limit) in context.handled):
        return None
    limiter: RateLimiter | None = limit.limiter or (
        context.limiter if isinstance(context, RequestContext) else None
    )
    if limiter is None:
        raise RuntimeError(
            "fastapi_ratelimit: this route limit has no RateLimiter. Add RateLimitMiddleware "
            "to the app or pass limiter= to @rate_limit / RateLimit."
        )
    if not isinstance(context, RequestContext):
        try:
            context = await limiter.context(scope)
        except QueryTooLong:
            raise HTTPException(400, QUERY_TOO_LONG) from None
        scope[SCOPE_KEY] = context
        listed = await limiter.access(context)
        if listed == "block":
            raise HTTPException(403, "Access denied.")
        if listed == "allow":
            context.exempt = True
            return None
    context.handled = context.handled | {id(limit)}
    identity = user_identity(user, limiter.identifier.warn) if user is not None else None
    check = limit.check(context, await limit.key_value(connection), identity)
    if check is None:
        return None
    if context.charged:
        # A decorator and a guard with the same rate and scope are one limit: count it once.
        key = storage_key(check)
        if any(storage_key(c) == key for c in context.charged):
            return None
    try:
        verdict = await limiter.enforcer.run([check], context)
    except BackendError:
        # on_backend_error="deny": a 503, never a 500 from inside a dependency.
        wait = str(limiter.retry_after_unavailable())
        raise HTTPException(
            503, "Rate limiting is temporarily unavailable.", {"Retry-After": wait}
        ) from None
    if verdict is None:  # backend failed under on_backend_error="allow"
        return None
    if limit.refund_when is not None:
        context.refundable = (*context.refundable, (limit.refund_when, check))
        if not context.middleware:
            # Only the middleware sees the status a response goes out with. Said at run
            # time because nothing at construction knows whether the middleware will be there.
            log_limited(
                "WARNING",
                "refund_when",
                "refund_when of the route limit {!r} needs RateLimitMiddleware: without it "
                "no response status is seen, so only server errors are given back",
                check.policy.name,
            )
    if not verdict.allowed:
        if never(verdict.decisions):
            # No wait would help: a 403 without Retry-After, not a 429 that invites one.
            raise RateLimitExceeded(verdict, {}, cost=check.cost)
        context.denial = verdict
        headers = rate_limit_headers(context.decisions, limiter.header_style, now=time.time())
        retry = retry_after_value(verdict.decisions)
        raise RateLimitExceeded(verdict, {**_str(headers), "Retry-After": str(retry)})
    if response is not None and not context.middleware:
        add_headers(response, limiter, context)
    return check


def add_headers(response: Response, limiter: RateLimiter, context: RequestContext) -> None:
    """Put the rate-limit headers of every decision so far on ``response`` (without the
    middleware, which otherwise adds them as the response goes out)."""
    decisions = (*context.decisions, *context.shadow)
    for name, value in rate_limit_headers(decisions, limiter.header_style, now=time.time()):
        response.headers[name.decode("latin-1")] = value.decode("latin-1")


async def after_endpoint(
    limit: RouteLimit,
    connection: HTTPConnection,
    charged: Check | None,
    *,
    error: Exception | None = None,
    status: int | None = None,
) -> None:
    """A route limit's part once the endpoint is done (for a guard: what follows it), without
    the middleware (under it, the middleware does this for every level). What :func:`enforce`
    charged is given back when another route limit refused the request (a refused request
    consumes nothing, as in the middleware's one call) or when it ends in a server error (a
    5xx is never charged): ``error`` escaped (see :func:`server_error`), or the endpoint's
    response has ``status``. Anything else, a 4xx included, stays charged."""
    context = connection.scope.get(SCOPE_KEY)
    if charged is None or not isinstance(context, RequestContext) or context.middleware:
        return
    if isinstance(error, RateLimitExceeded):
        refund = True
    elif connection.scope["type"] != "http":
        refund = False  # an accepted WebSocket handshake stays charged, as under the middleware
    elif error is not None:
        refund = server_error(error, connection.scope)
    else:
        refund = status is not None and status >= 500
    if refund:
        limiter: RateLimiter = limit.limiter or context.limiter
        await limiter.polling.write("a route limit's refund", [charged], limiter.backend.refund)


def _str(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}
