"""``RateLimitMiddleware``: pure ASGI, in the shape of Starlette's ``trustedhost.py`` and
``cors.py``.

Everything is decided before the app runs: the limiter's levels and the limits attached to
the matched route go to the backend in one call. A denied request never reaches the app (its
handler and background tasks never run). An admitted one passes through with a ``send``
wrapper that only edits ``http.response.start`` (streaming, files and background tasks are
untouched) and, after the response, refunds or adjusts by status or reported cost.

:meth:`RateLimitMiddleware.__call__` shows a request's steps in order, each a call into the
module that owns it (see ``docs/architecture.md``). The commonest requests take the express
path first (``express.py``): the same steps, worked out once per path.

At lifespan start-up it warms the limiter up (:meth:`RateLimiter.warm_up`, see
``lifespan.py``): the backend connects and loads its scripts before the first request.

Add it *inside* ``CORSMiddleware`` (that is, add it first: Starlette runs the last added
middleware outermost), so that a 429 still gets CORS headers and preflights are answered by
CORS without ever reaching the limiter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from time import perf_counter

from starlette.applications import Starlette
from starlette.requests import HTTPConnection

from ._types import ASGIApp, Receive, Scope, Send
from .after import after_response, needs_after_response
from .context import SCOPE_KEY
from .errors import BackendError, ConfigurationError
from .express import Express
from .identity import QUERY_TOO_LONG, QueryTooLong
from .lifespan import warm_up_on_startup
from .limiter import RateLimiter
from .respond import Responder, deny, refuse, unavailable_response
from .responses import bad_request_response, blocked_response, endpoint_unavailable_response
from .route_limits import RouteLimitsCache, add_route_checks

__all__ = ["DEFAULT_EXEMPT", "RateLimitMiddleware"]

DEFAULT_EXEMPT = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json")


class RateLimitMiddleware:
    """Rate-limit every HTTP request and WebSocket handshake of ``app``.

    At lifespan start-up, once the app reports it complete, it runs
    :meth:`RateLimiter.warm_up` (at most 5 s, never failing the start-up; ``warm_up=False``
    turns it off), so the backend is connected and its scripts loaded before the first
    request.

    Args:
        app: the ASGI app.
        limiter: the shared :class:`RateLimiter`.
        exempt: paths (and everything below them) never limited nor counted, in addition to
            :data:`DEFAULT_EXEMPT` (health, metrics and the API docs).
        default_exempt: ``False`` drops :data:`DEFAULT_EXEMPT`: then only ``exempt`` is exempt.
        websockets: limit WebSocket handshakes (a denied one is refused before accept).
        warm_up: ``False`` leaves lifespan start-up alone: the backend then connects on the
            first request, inside that request's timeout (for an app that warms the limiter
            up itself, or must start within milliseconds whatever Redis does).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter,
        exempt: Iterable[str] = (),
        default_exempt: bool = True,
        websockets: bool = True,
        warm_up: bool = True,
    ) -> None:
        if not isinstance(limiter, RateLimiter):
            raise ConfigurationError("limiter", limiter, "must be a RateLimiter")
        if isinstance(exempt, str):
            raise ConfigurationError("exempt", exempt, "must be a list of paths, not one string")
        paths = (*DEFAULT_EXEMPT, *exempt) if default_exempt else tuple(exempt)
        for path in paths:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigurationError("exempt", path, "paths must start with '/'")
        self.app = app
        self.limiter = limiter
        #: The Starlette (or FastAPI) app this middleware wraps itself, if it does
        #: (``RateLimitMiddleware(app, ...)``, outermost or given to ``Mount``): its routes
        #: are the ones to resolve, while ``scope["app"]`` is missing or the parent app's
        #: until Starlette sets it inside. Under ``add_middleware`` the app is set already.
        self._wrapped = app if isinstance(app, Starlette) else None
        self._exact = frozenset(p.rstrip("/") or "/" for p in paths)
        self._prefixes = tuple((p.rstrip("/") + "/") for p in paths if p != "/")
        self._websockets = websockets
        if not isinstance(warm_up, bool):
            raise ConfigurationError("warm_up", warm_up, "must be True or False")
        self._warm_up = warm_up
        self._route_limits = RouteLimitsCache()
        #: The express path (express.py), when the limiter's configuration allows it.
        self._express = (
            Express(app, limiter, self._route_limits, self._skip)
            if Express.applies(limiter)
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._wrapped is not None:
            scope["app"] = self._wrapped  # as the app itself is about to do
        # Metrics (see recorder.py): a few dict increments per request, only when enabled.
        recorder = self.limiter.recorder
        started = perf_counter() if recorder is not None else 0.0
        # The express path (express.py): the commonest requests, the same steps worked out
        # once per path.
        express = self._express
        if express is not None and scope["type"] == "http":
            entry = express.entry(scope)
            if entry is not None:
                try:
                    await express.serve(entry, scope, receive, send, started)
                except QueryTooLong:
                    await refuse(scope, receive, send, bad_request_response(QUERY_TOO_LONG))
                return
        kind = scope["type"]
        if kind != "http" and (kind != "websocket" or not self._websockets):
            if kind == "lifespan" and self._warm_up:
                # Connect and load scripts before the first request (lifespan.py).
                send = warm_up_on_startup(self.limiter, send)
            await self.app(scope, receive, send)
            return
        if self._skip(scope):
            await self.app(scope, receive, send)
            return
        limiter = self.limiter

        # 1. Identify: IP, API key, user, tiers (identify.py).
        identifier = limiter.identifier
        try:
            if identifier.sync:
                context = identifier.identify_now(limiter, scope)
            else:
                context = await identifier.identify(limiter, scope)
        except QueryTooLong:
            await refuse(scope, receive, send, bad_request_response(QUERY_TOO_LONG))
            return
        # 2. Route and cost (pricing.py).
        limiter.pricing.price(context, scope)
        context.middleware = True
        # An endpoint whose breaker is open (breaker.py) is refused before anything counts.
        breaker = limiter.endpoint_breaker
        if breaker is not None:
            until = await breaker.open_until(context.endpoint)
            if until is not None:
                retry = max(1, math.ceil(until - time.time()))
                if recorder is not None:
                    recorder.refused(context, "endpoint_breaker", perf_counter() - started)
                await refuse(scope, receive, send, endpoint_unavailable_response(retry))
                return

        # 3. Access lists (access.py). Empty lists (the usual case) cost no coroutine.
        lists = limiter.lists
        listed = None if lists is None or lists.known_empty() else await lists.decide(context)
        if listed == "block":
            if recorder is not None:
                recorder.refused(context, "blocklist", perf_counter() - started)
            await refuse(scope, receive, send, blocked_response())
            return
        if listed == "allow":
            # Allow-listed: no limiting, no counting, no headers; route guards stand down too.
            context.exempt = True
            if recorder is not None:
                recorder.request(context, None, perf_counter() - started)
            scope[SCOPE_KEY] = context
            await self.app(scope, receive, send)
            return

        # 4. Assemble the checks: the limiter's levels (levels.py), the route's (route_limits.py).
        checks = limiter.levels.checks(context)
        route_limits = self._route_limits.of(context.route)
        if route_limits:
            connection = HTTPConnection(scope)
            await add_route_checks(checks, route_limits, context, limiter, connection)

        # 5. Enforce (enforce.py; the backend call and its failure policy in failure.py).
        if not checks:
            verdict = None
        elif limiter.runs_now:
            verdict = limiter.enforcer.run_now(checks, context)
        else:
            try:
                verdict = await limiter.enforcer.run(checks, context)
            except BackendError:
                if recorder is not None:
                    recorder.refused(context, "backend_unavailable", perf_counter() - started)
                await refuse(scope, receive, send, unavailable_response(limiter))
                return
        if recorder is not None:
            recorder.request(context, verdict, perf_counter() - started)

        # 6. Respond (respond.py): the denial, or the app with our headers on its response.
        if verdict is not None and not verdict.allowed:
            await deny(scope, receive, send, limiter, context, verdict)
            return
        scope[SCOPE_KEY] = context
        if kind == "websocket":
            await self.app(scope, receive, send)
            return
        responder = Responder(self.app, context, send)
        load = limiter.dynamic.load if limiter.dynamic is not None else None
        try:
            if load is not None:
                await responder.run_measured(scope, receive, load)
            else:
                await self.app(scope, receive, responder.send)
        except Exception:
            # An error escaping the app becomes a 500 further out: not charged either.
            await after_response(limiter, context, 500)
            raise

        # 7. After the response (after.py): refunds, reported cost, the endpoint breaker.
        status = responder.status
        if needs_after_response(limiter, context) or (status is not None and status >= 500):
            await after_response(limiter, context, status)

    def _skip(self, scope: Scope) -> bool:
        path: str = scope["path"]
        root = scope.get("root_path", "")
        # As Starlette routes (get_route_path): the root comes off at a "/" boundary only, so
        # that root_path="/" leaves "/health" whole.
        if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
            path = path[len(root) :] or "/"
        if path in self._exact or path.startswith(self._prefixes):
            return True
        # A CORS preflight is neither limited nor counted. It carries both headers (as
        # Starlette's CORSMiddleware requires before it answers one): an OPTIONS without an
        # Origin is no preflight, and must not reach an app's OPTIONS handler unlimited.
        if scope.get("method") == "OPTIONS":
            names = {name for name, _ in scope.get("headers", ())}
            return b"origin" in names and b"access-control-request-method" in names
        return False
