"""``RateLimitMiddleware``: pure ASGI, in the shape of Starlette's ``trustedhost.py`` and
``cors.py``.

Everything is decided before the app runs: the limiter's levels and the limits attached to
the matched route go to the backend in one call. A denied request never reaches the app (its
handler and background tasks never run). An admitted one passes through with a ``send``
wrapper that only edits ``http.response.start`` (streaming, files and background tasks are
untouched) and, after the response, refunds or adjusts by status or reported cost.

Add it *inside* ``CORSMiddleware`` (that is, add it first: Starlette runs the last added
middleware outermost), so that a 429 still gets CORS headers and preflights are answered by
CORS without ever reaching the limiter.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Iterable
from operator import itemgetter, methodcaller
from time import perf_counter
from typing import Any

from starlette.requests import HTTPConnection

from ._types import ASGIApp, Message, Receive, Scope, Send
from .backends.base import storage_key
from .context import SCOPE_KEY, RequestContext
from .decision import Verdict
from .dynamic import LoadMonitor
from .errors import BackendError, ConfigurationError
from .headers import HEADER_NAMES, HeaderStyle, rate_limit_headers
from .identity import QUERY_TOO_LONG, QueryTooLong
from .limiter import RateLimiter
from .responses import (
    bad_request_response,
    blocked_response,
    endpoint_unavailable_response,
    quota_exceeded_response,
)
from .route_limits import RouteLimit, attached_limits

__all__ = ["DEFAULT_EXEMPT", "RateLimitMiddleware"]

DEFAULT_EXEMPT = ("/health", "/metrics", "/docs", "/redoc", "/openapi.json")
_NAME = itemgetter(0)
_LOWER = methodcaller("lower")  # bytes as ASGI says; a str from a sloppy app must not raise
_NO_HEADERS = HeaderStyle.NONE  # a module constant: Enum member lookups run Python code
# id(route) -> (route, its limits). Holding the route keeps its id from being reused.
_route_limits_cache: dict[int, tuple[Any, tuple[RouteLimit, ...]]] = {}


class RateLimitMiddleware:
    """Rate-limit every HTTP request and WebSocket handshake of ``app``.

    Args:
        app: the ASGI app.
        limiter: the shared :class:`RateLimiter`.
        exempt: paths (and everything below them) never limited nor counted, in addition to
            :data:`DEFAULT_EXEMPT` (health, metrics and the API docs).
        default_exempt: ``False`` drops :data:`DEFAULT_EXEMPT`: then only ``exempt`` is exempt.
        websockets: limit WebSocket handshakes (a denied one is refused before accept).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        limiter: RateLimiter,
        exempt: Iterable[str] = (),
        default_exempt: bool = True,
        websockets: bool = True,
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
        self._exact = frozenset(p.rstrip("/") or "/" for p in paths)
        self._prefixes = tuple((p.rstrip("/") + "/") for p in paths if p != "/")
        self._websockets = websockets

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http" and (kind != "websocket" or not self._websockets):
            await self.app(scope, receive, send)
            return
        if self._skip(scope):
            await self.app(scope, receive, send)
            return
        limiter = self.limiter
        # Metrics (see recorder.py): a few dict increments per request, only when enabled.
        recorder = limiter.recorder
        started = perf_counter() if recorder is not None else 0.0
        try:
            if limiter.sync_context:
                context = limiter.build_context(scope)
            else:
                context = await limiter.context(scope)
        except QueryTooLong:
            await self._refuse(scope, receive, send, bad_request_response(QUERY_TOO_LONG))
            return
        context.middleware = True
        breaker = limiter.endpoint_breaker
        if breaker is not None:
            until = await breaker.open_until(context.endpoint)
            if until is not None:
                retry = max(1, math.ceil(until - time.time()))
                if recorder is not None:
                    recorder.refused(context, "endpoint_breaker", perf_counter() - started)
                await self._refuse(scope, receive, send, endpoint_unavailable_response(retry))
                return
        lists = limiter.lists
        # Empty lists (the usual case) cost no coroutine.
        listed = None if lists is None or lists.known_empty() else await limiter.access(context)
        if listed == "block":
            if recorder is not None:
                recorder.refused(context, "blocklist", perf_counter() - started)
            await self._refuse(scope, receive, send, blocked_response())
            return
        if listed == "allow":
            # Allow-listed: no limiting, no counting, no headers; route guards stand down too.
            context.exempt = True
            if recorder is not None:
                recorder.request(context, None, perf_counter() - started)
            scope[SCOPE_KEY] = context
            await self.app(scope, receive, send)
            return
        checks = limiter.level_checks(context)
        seen: set[tuple[object, ...]] | None = None
        for limit in _route_limits(context.route):
            if limit.limiter is not None and limit.limiter is not limiter:
                continue  # bound to another limiter: it checks for itself
            key_value = await limit.key_value(HTTPConnection(scope)) if limit.needs_key else None
            check = limit.check(context, key_value)
            context.handled = context.handled | {id(limit)}
            if check is not None:
                # A decorator and a guard with the same rate and scope on one route are one
                # limit: the same storage key twice in one backend call would be refused
                # (backends.base.ensure_distinct), a 500 on every request. Count it once.
                if seen is None:
                    seen = {storage_key(c) for c in checks}
                key = storage_key(check)
                if key in seen:
                    continue
                seen.add(key)
                checks.append(check)
                if limit.refund_when is not None:
                    context.refundable = (*context.refundable, (limit, check))
        if not checks:
            verdict = None
        elif limiter.runs_now:
            verdict = limiter.run_now(checks, context)
        else:
            try:
                verdict = await limiter.run(checks, context)
            except BackendError:
                if recorder is not None:
                    recorder.refused(context, "backend_unavailable", perf_counter() - started)
                await self._refuse(scope, receive, send, limiter.unavailable_response())
                return
        if recorder is not None:
            recorder.request(context, verdict, perf_counter() - started)
        if verdict is not None and not verdict.allowed:
            await self._refuse(scope, receive, send, limiter.denial_response(context, verdict))
            return
        scope[SCOPE_KEY] = context
        if kind == "websocket":
            await self.app(scope, receive, send)
            return
        responder = _Responder(self.app, context, send)
        load = limiter.dynamic.load if limiter.dynamic is not None else None
        try:
            if load is not None:
                await responder.run_measured(scope, receive, load)
            else:
                await self.app(scope, receive, responder.send)
        except Exception:
            # An error escaping the app becomes a 500 further out: not charged either.
            await limiter.after_response(context, 500)
            raise
        status = responder.status
        if limiter.needs_after_response(context) or (status is not None and status >= 500):
            await limiter.after_response(context, status)

    def _skip(self, scope: Scope) -> bool:
        path: str = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path in self._exact or path.startswith(self._prefixes):
            return True
        # A CORS preflight is neither limited nor counted.
        if scope.get("method") == "OPTIONS":
            for name, _ in scope.get("headers", ()):
                if name == b"access-control-request-method":
                    return True
        return False

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, response: Any) -> None:
        if scope["type"] == "http":
            await response(scope, receive, send)
            return
        # WebSocket: refuse before accept. Servers with the denial-response extension get the
        # real 429; the others a close with 1008 (policy violation), which they answer with 403.
        if "websocket.http.response" in scope.get("extensions", {}):
            await send(
                {
                    "type": "websocket.http.response.start",
                    "status": response.status_code,
                    "headers": response.raw_headers,
                }
            )
            await send({"type": "websocket.http.response.body", "body": response.body})
            return
        message = await receive()
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.close", "code": 1008, "reason": "rate limit exceeded"})


class _Responder:
    """One per request (per-request state never lives on the middleware)."""

    __slots__ = ("_send", "app", "context", "replaced", "status")

    def __init__(self, app: ASGIApp, context: RequestContext, send: Send) -> None:
        self.app = app
        self.context = context
        self._send = send
        self.status: int | None = None
        self.replaced = False

    async def run_measured(self, scope: Scope, receive: Receive, load: LoadMonitor) -> None:
        """Run the app, feeding the load monitor its in-flight count, status and latency."""
        started = time.monotonic()
        load.in_flight += 1
        try:
            await self.app(scope, receive, self.send)
        finally:
            load.in_flight -= 1
            # An exception that escaped the app is a 500 as far as load goes.
            load.record(self.status or 500, time.monotonic() - started)

    def send(self, message: Message) -> Awaitable[None]:
        # Not a coroutine function: it edits the message and hands back the next ``send``'s
        # awaitable, so passing a message on costs no coroutine of its own.
        kind = message["type"]
        if kind == "http.response.start":
            self.status = status = message["status"]
            context = self.context
            if status == 429 and context.denial is not None:
                # A route guard denied: send the problem+json 429 instead of the framework's
                # rendering of the exception, and drop the app's body.
                self.replaced = True
                return _send_denial(self._send, context, context.denial)
            style = context.limiter.header_style
            decisions = context.decisions
            if context.shadow:
                decisions = (*decisions, *context.shadow)
            if decisions and style is not _NO_HEADERS:
                ours = rate_limit_headers(decisions, style, now=time.time())
                headers = message.get("headers", ())
                names = HEADER_NAMES[style]
                # Replace, never append: each header appears once even if the app set one.
                # The check is C code alone (map, lower, isdisjoint); a new list, since
                # the app's own list may be reused for other responses.
                if names.isdisjoint(map(_LOWER, map(_NAME, headers))):
                    message["headers"] = [*headers, *ours]
                else:
                    message["headers"] = [
                        header for header in headers if header[0].lower() not in names
                    ] + ours
        elif self.replaced and kind == "http.response.body":
            return _nothing()
        return self._send(message)


async def _send_denial(send: Send, context: RequestContext, denial: Verdict) -> None:
    """A route guard's denial, as problem+json with our headers."""
    limiter = context.limiter
    headers = rate_limit_headers(context.decisions, limiter.header_style, now=limiter.now())
    response = quota_exceeded_response(denial.decisions, headers=headers)
    await send({"type": "http.response.start", "status": 429, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


async def _nothing() -> None:
    """An awaitable that does nothing: a dropped message."""


def _route_limits(route: Any) -> tuple[RouteLimit, ...]:
    """Decorator marks on the endpoint and guards among the route's dependencies (FastAPI
    merges router- and app-level dependencies into each route). Guards that take the user
    from another dependency can't be checked before the app runs: they check themselves."""
    if route is None:
        return ()
    cached = _route_limits_cache.get(id(route))
    if cached is not None and cached[0] is route:
        return cached[1]
    from .dependencies import RateLimit

    limits = list(attached_limits(getattr(route, "endpoint", None)))
    seen: set[int] = set()
    stack = list(getattr(getattr(route, "dependant", None), "dependencies", ()))
    while stack:
        dependant = stack.pop()
        call = getattr(dependant, "call", None)
        if isinstance(call, RateLimit) and call.user_dependency is None and id(call) not in seen:
            seen.add(id(call))
            limits.append(call.limit)
        stack.extend(getattr(dependant, "dependencies", ()))
    result = tuple(limits)
    if len(_route_limits_cache) >= 4096:
        _route_limits_cache.clear()
    _route_limits_cache[id(route)] = (route, result)
    return result
