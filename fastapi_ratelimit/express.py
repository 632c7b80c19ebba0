"""The express path: a request's steps 1 to 6 for the commonest configuration, with what does
not change between requests to one path worked out once per path.

The general path (``middleware.py``) asks every request a dozen questions whose answers only
change with the path: is it exempt, which route and endpoint, what cost, which route limits,
which checks, which ``RateLimit-Policy``. Here they are answered once per (method, root path,
path) and kept in an :class:`_Entry`; a request then costs its identification, one pass over
its levels in the memory store (:meth:`MemoryBackend.admit_levels`) and two header lines.
On production-shaped traffic that is a quarter less of our own work per request (3 levels
through uvicorn: 110,900 instructions against 149,800; ``bench/results/profile.md``).

It serves a request only when that request would meet nothing else:

* the limiter (fixed at construction): every level a sliding window counter (the default
  algorithm), no tiers, composite levels, cost function, dynamic limits, limits changed at
  run time, shadow levels, delays, endpoint breaker or ``refund_when``;
* the request (read each time): the memory backend, no access-list entries, an
  HTTP method other than ``OPTIONS`` (preflights), a path of at most 512 characters, an app
  without host routing, and a route with no ``@rate_limit`` or ``RateLimit`` guard.

Everything else goes to the general path. A request a level refuses has changed nothing when
that is known, and goes on from step 5 as the general path would (its decision, its denial).
``tests/test_express.py`` holds the two paths to the same statuses, headers, bodies, stored
counters and metrics.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any, cast

from ._types import ASGIApp, Receive, Scope, Send
from .after import after_response
from .backends.memory import Level, MemoryBackend
from .context import SCOPE_KEY
from .decision import new_verdict
from .headers import HeaderStyle, ietf_admitted, policy_header
from .policy import Algorithm
from .respond import Responder, deny
from .route_limits import RouteLimitsCache
from .routing import STANDARD_METHODS

if TYPE_CHECKING:
    from .limiter import RateLimiter

__all__ = ["Express"]

#: Paths cached at most (a client can send any path: a full cache starts again).
_MAX_ENTRIES = 4096
_MAX_PATH = 512
_SLIDING = Algorithm.SLIDING_WINDOW_COUNTER
_IETF = HeaderStyle.IETF  # a module constant: Enum member lookups run Python code
#: The identity slots of per-client levels (see :meth:`MemoryBackend.admit_levels`).
_IP, _API_KEY, _USER = 0, 1, 2


class _Entry:
    """What the express path knows about one (method, root path, path)."""

    __slots__ = (
        "backend",
        "cost",
        "count",
        "endpoint",
        "general",
        "levels",
        "policies",
        "route",
        "routes",
        "size",
    )

    def __init__(
        self,
        routes: list[Any],
        backend: Any,
        endpoint: str,
        route: Any,
        cost: int,
        levels: tuple[Level, ...],
        general: bool = False,
    ) -> None:
        # The app's route list as it was, and the backend whose store keys the levels hold:
        # the entry is stale once either changes.
        self.routes = routes
        self.size = len(routes)
        self.backend = backend
        self.endpoint = endpoint
        self.route = route
        self.cost = cost
        self.levels = levels
        self.count = len(levels)
        #: The path needs the general path (its route has guards, or its endpoint a
        #: per-client limit): kept so that it is not looked into again on every request.
        self.general = general
        #: ``RateLimit-Policy`` by which per-client levels applied (at most 8 combinations).
        self.policies: dict[tuple[str, ...], bytes] = {}


#: The entry of an exempt path: served without limiting or counting.
_EXEMPT = _Entry([], None, "", None, 0, ())


class Express:
    """The express path of one middleware (``None`` there when the limiter's configuration
    rules it out, see :meth:`applies`)."""

    __slots__ = ("_app", "_entries", "_limiter", "_route_limits", "_skip")

    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        route_limits: RouteLimitsCache,
        skip: Callable[[Scope], bool],
    ) -> None:
        self._app = app
        self._limiter = limiter
        self._route_limits = route_limits
        #: The middleware's exemption rule (paths and preflights).
        self._skip = skip
        self._entries: dict[tuple[str, str, str], _Entry] = {}

    @staticmethod
    def applies(limiter: RateLimiter) -> bool:
        """Whether ``limiter``'s configuration leaves anything for the express path."""
        levels = limiter.levels
        shared = (levels.global_, levels.ip, levels.api_key, levels.user)
        return (
            limiter.runs_now  # simple enforcer, no dynamic limits or overrides, memory backend
            and limiter.endpoint_breaker is None
            and not limiter.after_every_response
            and not limiter.pricing.has_cost_function
            and levels.tiers is None
            and limiter.identifier.tiers is None
            and not levels.has_composites
            and all(p is None or p.algorithm is _SLIDING for p in shared)
        )

    def entry(self, scope: Scope) -> _Entry | None:
        """The entry for this request, or ``None`` when the general path must serve it."""
        limiter = self._limiter
        backend = limiter.backend
        if type(backend) is not MemoryBackend or (
            limiter.lists is not None and not limiter.lists.known_empty()
        ):
            return None
        key = (scope["method"], scope.get("root_path", ""), scope["path"])
        entry = self._entries.get(key)
        if entry is _EXEMPT:
            return entry
        routes = getattr(scope.get("app"), "routes", None)
        if (
            entry is not None
            and entry.routes is routes
            and entry.size == len(routes)
            and entry.backend is backend
        ):
            return None if entry.general else entry
        return self._new_entry(key, routes, scope)

    def _new_entry(self, key: tuple[str, str, str], routes: Any, scope: Scope) -> _Entry | None:
        method, _, path = key
        if method not in STANDARD_METHODS or method == "OPTIONS" or len(path) > _MAX_PATH:
            return None
        limiter = self._limiter
        entry: _Entry
        if self._skip(scope):
            entry = _EXEMPT
        elif not isinstance(routes, list) or limiter.pricing.routes.uses_host(routes):
            return None
        else:
            entry = self._plan(routes, scope)
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        self._entries[key] = entry
        return None if entry.general else entry

    def _plan(self, routes: list[Any], scope: Scope) -> _Entry:
        limiter = self._limiter
        backend = limiter.backend
        assert isinstance(backend, MemoryBackend)
        resolved = limiter.pricing.routes.resolve(routes, scope)
        levels = limiter.levels
        plan = levels.plans.get(resolved.endpoint) or levels.plan(resolved.endpoint)
        if (
            self._route_limits.guarded(resolved.route)
            or plan.client_limits
            or (plan.policy is not None and plan.policy.algorithm is not _SLIDING)
        ):
            return _Entry(routes, backend, "", None, 0, (), general=True)
        # In the order Levels.checks gives them: global, IP, endpoint, API key, user.
        rows: list[Level] = []
        for policy, scope_name, slot, identity in (
            (levels.global_, "global", -1, ""),
            (levels.ip, "ip", _IP, None),
            (plan.policy, "endpoint", -1, resolved.endpoint),
            (levels.api_key, "api_key", _API_KEY, None),
            (levels.user, "user", _USER, None),
        ):
            if policy is None:
                continue
            rows.append(backend.level(policy, scope_name, slot, identity))
        return _Entry(routes, backend, resolved.endpoint, resolved.route, plan.cost, tuple(rows))

    async def serve(
        self, entry: _Entry, scope: Scope, receive: Receive, send: Send, started: float
    ) -> None:
        """Serve the request. ``started``: its ``perf_counter()`` at arrival, when metrics
        are on.

        Raises:
            QueryTooLong: as identification does; the middleware answers it.
        """
        if entry is _EXEMPT:
            await self._app(scope, receive, send)
            return
        limiter = self._limiter
        identifier = limiter.identifier
        if identifier.sync:
            context = identifier.identify_now(limiter, scope)
        else:
            context = await identifier.identify(limiter, scope)
        cost = entry.cost
        context.endpoint = entry.endpoint
        context.route = entry.route
        context.cost = cost
        context.middleware = True
        backend = cast(MemoryBackend, limiter.backend)  # entry() saw to it
        decided = backend.admit_levels(
            entry.levels, (context.ip, context.api_key, context.user), cost
        )
        recorder = limiter.recorder
        headers = None
        if decided is None:
            # A level refuses (nothing has changed): the general path's decision and
            # denial, from step 5 on, with the checks of step 4.
            verdict = limiter.enforcer.run_now(
                limiter.levels.checks(context), context, refused=True
            )
            if recorder is not None:
                recorder.request(context, verdict, perf_counter() - started)
            if not verdict.allowed:
                await deny(scope, receive, send, limiter, context, verdict)
                return
            # Admitted after all (a window turned in between): recorded, charged included.
            unrecorded = False
        else:
            decisions, binding = decided
            context.decisions = decisions
            if recorder is not None:
                # No level applied (an anonymous caller, only a user level): no verdict, as
                # on the general path.
                admitted = new_verdict((decisions, True)) if decisions else None
                recorder.request(context, admitted, perf_counter() - started)
            # Read per request, as the general path does: the limiter's attributes are public.
            if decisions and limiter.header_style == _IETF:
                # Which per-client levels applied (all of them, usually: the empty key).
                shape = () if len(decisions) == entry.count else tuple([d.scope for d in decisions])
                policies = entry.policies.get(shape)
                if policies is None:
                    policies = entry.policies[shape] = policy_header(decisions)
                headers = ietf_admitted(policies, decisions[binding])
            # What the general path records as charged is built only if it is ever read.
            unrecorded = True
        scope[SCOPE_KEY] = context
        responder = Responder(self._app, context, send, headers)
        try:
            await self._app(scope, receive, responder.send)
        except Exception:
            # As on the general path: an error escaping the app is not charged.
            if unrecorded:
                context.charged = (*limiter.levels.checks(context), *context.charged)
            await after_response(limiter, context, 500)
            raise
        status = responder.status
        # needs_after_response(): nothing is refundable on a route without guards, and
        # applies() ruled out refunds by status and the endpoint breaker.
        if context.reported_cost is not None or (status is not None and status >= 500):
            if unrecorded:
                context.charged = (*limiter.levels.checks(context), *context.charged)
            await after_response(limiter, context, status)
