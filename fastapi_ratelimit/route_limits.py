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

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from ._types import Scope
from .backends.base import Check, storage_key
from .context import RequestContext
from .errors import ConfigurationError
from .keys import Identity
from .logs import log_limited
from .policy import Algorithm, Policy
from .rate import Rate, parse_rate
from .responses import cost_exceeds_limit_response, quota_exceeded_response

if TYPE_CHECKING:
    from .decision import Verdict

__all__ = ["RateLimitExceeded", "RouteLimit", "rate_limit_exceeded_handler"]

KeyFunc = Callable[[HTTPConnection], "str | Awaitable[str | None] | None"]
ROUTE_LIMITS_ATTR = "__fastapi_ratelimit__"
PARTS = frozenset({"ip", "user", "api_key", "global", "endpoint"})


class RateLimitExceeded(HTTPException):
    """Raised by a guard or decorator that denies a request: a 429, or a 403 when the request
    costs more than a level ever admits (``cost`` is then set: no wait would help). Under the
    middleware the client gets the problem+json 429; elsewhere register
    :func:`rate_limit_exceeded_handler`."""

    def __init__(
        self, verdict: Verdict, headers: dict[str, str], *, cost: int | None = None
    ) -> None:
        self.verdict = verdict
        self.cost = cost
        if cost is not None:
            first = next(d for d in verdict.decisions if not d.allowed)
            super().__init__(
                403,
                f"This request costs {cost} units; policy {first.policy!r} admits at most "
                f"{first.limit} at once, so it can never pass.",
                headers,
            )
            return
        binding = verdict.binding
        scope = binding.scope if binding is not None else "route"
        super().__init__(429, f"Rate limit exceeded at the {scope} level.", headers)


async def rate_limit_exceeded_handler(request: Request, exc: Exception) -> Response:
    """Exception handler rendering :class:`RateLimitExceeded` as problem+json (the 429, or
    the 403 of a cost no wait would help):
    ``app.add_exception_handler(RateLimitExceeded, rate_limit_exceeded_handler)``."""
    if not isinstance(exc, RateLimitExceeded):  # pragma: no cover - registered for it only
        raise exc
    decisions = exc.verdict.decisions
    if exc.cost is not None:
        return cost_exceeds_limit_response(decisions, exc.cost)
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
    #: The RateLimiter it is bound to (``limiter=``), or ``None`` for the one in charge.
    #: Typed loosely: the limiter sits above this module.
    limiter: Any
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
        limiter: Any,
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
            # The period in plain digits: ``:g`` turns 30 days into 2.592e+06, not a name.
            period = f"{parsed.period:f}".rstrip("0").rstrip(".")
            default_name = f"route-{scope.replace('+', '-')}-{parsed.limit}-{period}s"
            if parsed.burst is not None and parsed.burst != parsed.limit:
                # Two limits of one rate and different bursts are two limits (the name keys
                # the stored state, and equal keys count once).
                default_name += f"-b{parsed.burst}"
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

    def policy_for(self, algorithm: Algorithm) -> Policy:
        """The policy as a limiter whose default is ``algorithm`` enforces it: under that
        algorithm, unless this limit named one."""
        policy = self.policy
        if self.algorithm_given or algorithm is policy.algorithm:
            return policy
        variant = self.variants.get(algorithm)
        if variant is None:
            try:
                variant = Policy(policy.name, policy.rate, algorithm)
            except ConfigurationError as exc:
                # A rate that algorithm cannot keep (GCRA over 100,000 a second): found on a
                # request, which must not fail for it. The limit keeps its own algorithm.
                log_limited("WARNING", "route-limit-algorithm", "{}; kept {}", exc, policy.code)
                variant = policy
            self.variants[algorithm] = variant
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
        policy = self.policy_for((self.limiter or context.limiter).algorithm)
        return Check(policy, self.scope if self.key is None else "route", ident, cost)


def server_error(exc: BaseException, scope: Scope) -> bool:
    """Whether ``exc``, escaping an endpoint (or, for a ``Depends`` guard, the dependencies
    after it) in the HTTP request ``scope``, becomes a 5xx response: an ``HTTPException`` by
    its status; an exception the app has a handler for (FastAPI's validation errors, the
    app's own: their answers are usually a 4xx, and a limit must not be dodged by them) is
    not; any other exception is, as Starlette answers it with a 500."""
    if isinstance(exc, HTTPException):
        return exc.status_code >= 500
    if not isinstance(exc, Exception):
        return False
    # Starlette's ExceptionMiddleware leaves its handlers in the scope (a handler for
    # Exception or 500 is the server-error middleware's, never among them).
    handlers = scope.get("starlette.exception_handlers")
    if handlers:
        return not any(cls in handlers[0] for cls in type(exc).__mro__)
    return True


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


def attached_limits(endpoint: Any) -> tuple[RouteLimit, ...]:
    limits = getattr(endpoint, ROUTE_LIMITS_ATTR, ())
    return limits if isinstance(limits, tuple) else ()


def mark(endpoint: Any, limit: RouteLimit) -> None:
    setattr(endpoint, ROUTE_LIMITS_ATTR, (*attached_limits(endpoint), limit))


class RouteLimitsCache:
    """The limits attached to each route, found once per route (one cache per middleware).

    Decorator marks on the endpoint and guards among the route's dependencies (FastAPI merges
    router- and app-level dependencies into each route). Guards that take the user from
    another dependency can't be checked before the app runs: they check themselves."""

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        # id(route) -> (route, its limits, whether it has any guard or mark at all). Holding
        # the route keeps its id from being reused.
        self._cache: dict[int, tuple[Any, tuple[RouteLimit, ...], bool]] = {}

    def of(self, route: Any) -> tuple[RouteLimit, ...]:
        """The limits attached to ``route`` (``()`` for ``None``)."""
        if route is None:
            return ()
        cached = self._cache.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[1]
        return self._find(route)[1]

    def guarded(self, route: Any) -> bool:
        """Whether ``route`` has any route limit, including guards that check themselves
        (those taking the user from another dependency)."""
        if route is None:
            return False
        cached = self._cache.get(id(route))
        if cached is not None and cached[0] is route:
            return cached[2]
        return self._find(route)[2]

    def _find(self, route: Any) -> tuple[Any, tuple[RouteLimit, ...], bool]:
        limits = list(attached_limits(getattr(route, "endpoint", None)))
        guarded = bool(limits)
        seen: set[int] = set()
        stack = list(getattr(getattr(route, "dependant", None), "dependencies", ()))
        while stack:
            dependant = stack.pop()
            call = getattr(dependant, "call", None)
            # A RateLimit guard (found by shape: dependencies.py imports this module).
            limit = getattr(call, "limit", None)
            if isinstance(limit, RouteLimit):
                guarded = True
                if getattr(call, "user_dependency", True) is None and id(call) not in seen:
                    seen.add(id(call))
                    limits.append(limit)
            stack.extend(getattr(dependant, "dependencies", ()))
        found = (route, tuple(limits), guarded)
        if len(self._cache) >= 4096:
            self._cache.clear()
        self._cache[id(route)] = found
        return found


async def add_route_checks(
    checks: list[Check],
    limits: Sequence[RouteLimit],
    context: RequestContext,
    limiter: Any,
    connection: HTTPConnection,
) -> None:
    """Add the checks of ``limits`` (a route's) to ``checks`` (the limiter's levels), so that
    all of them go to the backend in one call; the guards then see them handled."""
    seen: set[tuple[object, ...]] | None = None
    for limit in limits:
        if limit.limiter is not None and limit.limiter is not limiter:
            continue  # bound to another limiter: it checks for itself
        key_value = await limit.key_value(connection) if limit.needs_key else None
        check = limit.check(context, key_value)
        context.handled = context.handled | {id(limit)}
        if check is None:
            continue
        # A decorator and a guard with the same rate and scope on one route are one limit:
        # the same storage key twice in one backend call would be refused
        # (backends.base.ensure_distinct), a 500 on every request. Count it once.
        if seen is None:
            seen = {storage_key(c) for c in checks}
        key = storage_key(check)
        if key in seen:
            continue
        seen.add(key)
        checks.append(check)
        if limit.refund_when is not None:
            context.refundable = (*context.refundable, (limit.refund_when, check))
