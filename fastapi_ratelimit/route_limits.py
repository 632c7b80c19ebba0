"""Limits attached to routes: the one enforcement path behind ``@rate_limit`` and the
``Depends`` guard.

Under :class:`~fastapi_ratelimit.middleware.RateLimitMiddleware`, the middleware finds a
route's limits (decorator marks on the endpoint, guards among its dependencies) and checks
them in the *same* backend call as its own levels, before the app runs; the decorator or
guard then sees its limit already handled and does nothing, so nothing counts twice and every
header appears once. Without the middleware, they check for themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loguru import logger
from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from .backends.base import Check, storage_key
from .context import SCOPE_KEY, RequestContext
from .decision import never
from .errors import BackendError, ConfigurationError
from .headers import rate_limit_headers, retry_after_value
from .identity import QUERY_TOO_LONG, QueryTooLong
from .keys import Identity
from .policy import Algorithm, Policy
from .rate import Rate, parse_rate
from .responses import quota_exceeded_response

if TYPE_CHECKING:
    from .decision import Verdict
    from .limiter import RateLimiter

__all__ = ["RateLimitExceeded", "RouteLimit", "rate_limit_exceeded_handler"]

KeyFunc = Callable[[HTTPConnection], "str | Awaitable[str | None] | None"]
ROUTE_LIMITS_ATTR = "__fastapi_ratelimit__"
PARTS = frozenset({"ip", "user", "api_key", "global", "endpoint"})


class RateLimitExceeded(HTTPException):
    """Raised by a guard or decorator that denies a request. Under the middleware the client
    gets the problem+json 429; elsewhere register :func:`rate_limit_exceeded_handler`."""

    def __init__(self, verdict: Verdict, headers: dict[str, str]) -> None:
        binding = verdict.binding
        scope = binding.scope if binding is not None else "route"
        super().__init__(429, f"Rate limit exceeded at the {scope} level.", headers)
        self.verdict = verdict


async def rate_limit_exceeded_handler(request: Request, exc: Exception) -> Response:
    """Exception handler rendering :class:`RateLimitExceeded` as problem+json:
    ``app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)``."""
    if not isinstance(exc, RateLimitExceeded):  # pragma: no cover - registered for it only
        raise exc
    decisions = exc.verdict.decisions
    return quota_exceeded_response(decisions, headers=_raw(dict(exc.headers or {})))


@dataclass(frozen=True, slots=True, eq=False)
class RouteLimit:
    """One limit attached to a route. ``scope`` names whose quota it is: ``"ip"``,
    ``"user"``, ``"api_key"``, ``"global"`` (everyone shares it), or a combination such as
    ``"user+ip"``; with ``key`` it is just the label of a custom identity."""

    policy: Policy
    scope: str
    parts: tuple[str, ...]
    cost: int | None
    key: KeyFunc | None
    limiter: RateLimiter | None
    refund_when: Callable[[int], bool] | None
    #: ``algorithm=`` was given; otherwise the limiter's ``algorithm`` applies.
    algorithm_given: bool = True
    #: The policy under other limiters' default algorithms, built once each.
    variants: dict[Algorithm, Policy] = field(default_factory=dict, repr=False)

    @classmethod
    def build(
        cls,
        rate: str | Rate | Policy,
        *,
        scope: str,
        cost: int | None,
        key: KeyFunc | None,
        name: str | None,
        algorithm: Algorithm | str | None,
        limiter: RateLimiter | None,
        refund_when: Callable[[int], bool] | None,
        where: str,
    ) -> RouteLimit:
        if not isinstance(scope, str) or not scope:
            raise ConfigurationError(f"{where}: scope", scope, "must be a non-empty string")
        parts = tuple(scope.split("+"))
        if key is None and not set(parts) <= PARTS:
            raise ConfigurationError(
                f"{where}: scope",
                scope,
                f"must combine {', '.join(sorted(PARTS))} with '+', or come with key=",
            )
        if key is not None and not callable(key):
            raise ConfigurationError(f"{where}: key", key, "must be a callable")
        if cost is not None and (isinstance(cost, bool) or not isinstance(cost, int) or cost < 1):
            raise ConfigurationError(f"{where}: cost", cost, "must be a whole number >= 1")
        if refund_when is not None and not callable(refund_when):
            raise ConfigurationError(f"{where}: refund_when", refund_when, "must be a callable")
        if isinstance(rate, Policy):
            policy = rate
        else:
            parsed = (
                rate if isinstance(rate, Rate) else parse_rate(rate, field_name=f"{where}: rate")
            )
            default_name = f"route-{scope.replace('+', '-')}-{parsed.limit}-{parsed.period:g}s"
            # Without algorithm=, the limiter's default applies (see policy_for); until a
            # limiter is known, the library's default stands in.
            policy = Policy(
                name or default_name.replace(".", "_"),
                parsed,
                algorithm if algorithm is not None else Algorithm.SLIDING_WINDOW_COUNTER,
            )
        if cost is not None and cost > policy.limit:
            raise ConfigurationError(
                f"{where}: cost",
                cost,
                f"exceeds policy {policy.name!r}, which admits at most {policy.limit} units at "
                "once: such a request could never pass",
            )
        given = algorithm is not None or isinstance(rate, Policy)
        parts = parts if key is None else ()
        return cls(policy, scope, parts, cost, key, limiter, refund_when, given)

    def policy_for(self, limiter: RateLimiter) -> Policy:
        """The policy as ``limiter`` enforces it: under its default algorithm, unless this
        limit named one."""
        policy = self.policy
        algorithm = limiter.algorithm
        if self.algorithm_given or algorithm is policy.algorithm:
            return policy
        variant = self.variants.get(algorithm)
        if variant is None:
            variant = self.variants[algorithm] = Policy(policy.name, policy.rate, algorithm)
        return variant

    @property
    def needs_key(self) -> bool:
        return self.key is not None

    async def key_value(self, connection: HTTPConnection) -> str | None:
        if self.key is None:
            return None
        value = self.key(connection)
        if inspect.isawaitable(value):
            value = await value
        return None if value is None else str(value)

    def check(
        self, context: RequestContext, key_value: str | None = None, user: str | None = None
    ) -> Check | None:
        """This limit's check for one request; ``None`` if a custom key gave no identity."""
        identity: list[str] = [context.endpoint]
        if self.key is not None:
            if key_value is None:
                return None
            identity += ("key", key_value)
        user = user if user is not None else context.user
        for part in self.parts:
            if part == "ip":
                identity += ("ip", context.ip)
            elif part == "user":
                # Anonymous callers share nothing with users: they are limited by IP.
                identity += ("user", user) if user is not None else ("anon-ip", context.ip)
            elif part == "api_key":
                key = context.api_key
                identity += ("api_key", key) if key is not None else ("no-key-ip", context.ip)
        cost = self.cost if self.cost is not None else context.cost
        ident: Identity = tuple(identity)
        policy = self.policy_for(self.limiter or context.limiter)
        return Check(policy, self.scope if self.key is None else "route", ident, cost)


async def enforce(
    limit: RouteLimit,
    connection: HTTPConnection,
    *,
    user: str | None = None,
    response: Response | None = None,
) -> Check | None:
    """Check ``limit`` for this request unless the middleware already did. Returns the check
    it charged, if any (the decorator refunds it when the endpoint fails)."""
    scope = connection.scope
    context = scope.get(SCOPE_KEY)
    if isinstance(context, RequestContext) and (context.exempt or id(limit) in context.handled):
        return None
    limiter = limit.limiter or (context.limiter if isinstance(context, RequestContext) else None)
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
    check = limit.check(context, await limit.key_value(connection), user)
    if check is None:
        return None
    if context.charged:
        # A decorator and a guard with the same rate and scope are one limit: count it once.
        key = storage_key(check)
        if any(storage_key(c) == key for c in context.charged):
            return None
    try:
        verdict = await limiter.run([check], context)
    except BackendError:
        # on_backend_error="deny": a 503, never a 500 from inside a dependency.
        wait = str(limiter.retry_after_unavailable())
        raise HTTPException(
            503, "Rate limiting is temporarily unavailable.", {"Retry-After": wait}
        ) from None
    if verdict is None:  # backend failed under on_backend_error="allow"
        return None
    if limit.refund_when is not None:
        context.refundable = (*context.refundable, (limit, check))
    if not verdict.allowed:
        if never(verdict.decisions):
            # No wait would help: no Retry-After, and not a 429 that invites one.
            raise HTTPException(
                403,
                f"This request costs {check.cost} units; policy {check.policy.name!r} admits "
                f"at most {check.policy.limit} at once, so it can never pass.",
            )
        context.denial = verdict
        headers = rate_limit_headers(context.decisions, limiter.header_style, now=limiter.now())
        retry = retry_after_value(verdict.decisions)
        raise RateLimitExceeded(verdict, {**_str(headers), "Retry-After": str(retry)})
    if response is not None and not context.middleware:
        decisions = (*context.decisions, *context.shadow)
        for name, value in rate_limit_headers(decisions, limiter.header_style, now=limiter.now()):
            response.headers[name.decode("latin-1")] = value.decode("latin-1")
    return check


def server_error(exc: BaseException) -> bool:
    """Whether ``exc``, escaping an endpoint, becomes a 5xx response."""
    if isinstance(exc, HTTPException):
        return exc.status_code >= 500
    return isinstance(exc, Exception)


async def refund_server_error(limiter: RateLimiter, checks: Sequence[Check]) -> None:
    """Give back what a request that ended in a server error was charged: a client never
    pays for the server's failure. Best effort: a failing backend is only logged."""
    if not checks:
        return
    try:
        await limiter.backend.refund(checks)
    except BackendError as exc:
        logger.warning("rate-limit refund after a server error failed: {}", exc)


def _str(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in headers}


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def attached_limits(endpoint: Any) -> tuple[RouteLimit, ...]:
    limits = getattr(endpoint, ROUTE_LIMITS_ATTR, ())
    return limits if isinstance(limits, tuple) else ()


def mark(endpoint: Any, limit: RouteLimit) -> None:
    setattr(endpoint, ROUTE_LIMITS_ATTR, (*attached_limits(endpoint), limit))
