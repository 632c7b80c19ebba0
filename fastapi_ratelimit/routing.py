"""Which route a request will reach, before the app routes it.

The endpoint level and the cost table are keyed by the *route template* plus method
(``"GET /users/{id}"``), never by the raw path: ``/users/1`` and ``/users/2`` are one
endpoint, and a client cannot mint new buckets by inventing paths. Routes added with
``include_router`` (FastAPI flattens them), mounted sub-apps and hosts are followed.
Unmatched requests (404s) share one ``"<METHOD> <unmatched>"`` endpoint.

Methods are a client's choice too (h11 accepts 8,000-character ones): an endpoint key holds
a standard method, one the matched route declares, or ``"OTHER"``, so methods cannot mint
endpoints either.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from starlette.routing import BaseRoute, Host, Match, Mount

from ._types import Scope
from .costs import endpoint_key

__all__ = ["ResolvedRoute", "RouteResolver", "request_method"]

UNMATCHED = "<unmatched>"
#: The method of an endpoint key for a method that is neither standard nor declared by the
#: route it matched.
OTHER_METHOD = "OTHER"
#: The methods an endpoint key (and a metrics label) may carry by name.
STANDARD_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "WEBSOCKET")
)
#: Most entries in the route cache; paths longer than _MAX_CACHED_PATH are resolved, never
#: cached, so the cache holds at most about 4096 x (512 + 256) bytes of client input.
_CACHE_SIZE = 4096
_MAX_CACHED_PATH = 512


@dataclass(frozen=True, slots=True)
class ResolvedRoute:
    """The template (``"/users/{id}"``) and the leaf route object, if any route matched, and
    the endpoint they make with the request's method (``"GET /users/{id}"``)."""

    template: str
    route: BaseRoute | None
    endpoint: str = ""


_UNMATCHED = ResolvedRoute(UNMATCHED, None)
#: A longer Host header is matched but not cached (it cannot be a real host name).
_MAX_CACHED_HOST = 256


class RouteResolver:
    """Matches requests to routes, with its own caches (one per limiter, never shared by the
    apps of a process)."""

    __slots__ = ("_cache", "_host_routed")

    def __init__(self) -> None:
        # (routes id, routes count, type, method, root_path, path, host) -> (routes, resolved).
        # The key holds everything matching reads, so what one client sends decides only its
        # own entry. Emptied when full, so random paths cost a route scan, never memory. The
        # value holds the routes list itself: while cached it cannot be freed and its id
        # reused; the count catches added routes.
        self._cache: dict[
            tuple[int, int, str, str, str, str, bytes], tuple[object, ResolvedRoute]
        ] = {}
        # routes id -> (routes, routes count, whether a Host route is anywhere in the tree).
        self._host_routed: dict[int, tuple[object, int, bool]] = {}

    def resolve(self, routes: Sequence[BaseRoute], scope: Scope) -> ResolvedRoute:
        """Match ``scope`` against ``routes`` the way Starlette's router will."""
        # Only where Host routes exist does the Host header change the match: elsewhere it
        # is left out of the key, so hostile hosts cannot churn the cache.
        host = _host_header(scope) if self.uses_host(routes) else b""
        cache_key = (
            id(routes),
            len(routes),
            scope["type"],
            scope.get("method", ""),
            scope.get("root_path", ""),
            scope["path"],
            host,
        )
        cached = self._cache.get(cache_key)
        if cached is not None and cached[0] is routes:
            return cached[1]
        found = _search(routes, scope, "") or _UNMATCHED
        method = request_method(scope)
        if method is OTHER_METHOD and found.route is not None:
            # A method outside the standard set keeps its name only where the app declares it.
            declared = getattr(found.route, "methods", None)
            raw = scope.get("method")
            if isinstance(raw, str) and isinstance(declared, (set, frozenset)) and raw in declared:
                method = raw
        # The endpoint string is built here, once per cached path, not per request.
        found = ResolvedRoute(found.template, found.route, endpoint_key(method, found.template))
        if (
            method is not OTHER_METHOD
            and len(host) <= _MAX_CACHED_HOST
            and len(cache_key[5]) <= _MAX_CACHED_PATH
        ):
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()
            self._cache[cache_key] = (routes, found)
        return found

    def uses_host(self, routes: Sequence[BaseRoute]) -> bool:
        """Whether any route (mounted ones included) routes by ``Host``."""
        known = self._host_routed.get(id(routes))
        if known is not None and known[0] is routes and known[1] == len(routes):
            return known[2]
        found = _has_host(routes, 0)
        if len(self._host_routed) >= 64:  # one entry per app (and per routes list)
            self._host_routed.clear()
        self._host_routed[id(routes)] = (routes, len(routes), found)
        return found


def _has_host(routes: Iterable[BaseRoute], depth: int) -> bool:
    if depth > 16:
        return True  # deeper than any real app: assume the worst (key on the host)
    for route in routes:
        if isinstance(route, Host):
            return True
        if isinstance(route, Mount) and _has_host(route.routes, depth + 1):
            return True
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts) and _has_host(_flattened(contexts()), depth + 1):
            return True
    return False


def _host_header(scope: Scope) -> bytes:
    # The first Host header: the one Starlette's Host route reads.
    for name, value in scope.get("headers") or ():
        if name == b"host":
            return value if isinstance(value, bytes) else b""
    return b""


def request_method(scope: Scope) -> str:
    """The method an endpoint key uses: a WebSocket handshake is ``"WEBSOCKET"``, a method
    outside the standard set is :data:`OTHER_METHOD` (see :meth:`RouteResolver.resolve` for methods
    a route declares)."""
    if scope["type"] != "http":
        return "WEBSOCKET"
    method = scope.get("method")
    return method if isinstance(method, str) and method in STANDARD_METHODS else OTHER_METHOD


def _search(routes: Iterable[BaseRoute], scope: Scope, prefix: str) -> ResolvedRoute | None:
    partial: ResolvedRoute | None = None
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            # FastAPI >= 0.16x keeps included routers lazy (`_IncludedRouter`); each yields
            # route contexts that match like routes and carry the full path, endpoint and
            # dependant.
            inner = _search(_flattened(contexts()), scope, prefix)
            if inner is not None and inner.route is not None:
                if _is_full(inner, scope):
                    return inner
                partial = partial or inner
            continue
        try:
            match, child_scope = route.matches(scope)
        except Exception:  # a custom route must not turn rate limiting into a 500
            continue
        if match is Match.NONE:
            continue
        if isinstance(route, (Mount, Host)):
            if match is not Match.FULL:
                continue
            inner = _search(route.routes, {**scope, **child_scope}, prefix + _mount_path(route))
            if inner is not None:
                return inner
            # A mounted app without routes (a plain ASGI app): the mount is the endpoint.
            return ResolvedRoute(prefix + (_mount_path(route) or "/"), route)
        path: Any = getattr(route, "path", None)
        resolved = ResolvedRoute(prefix + (path if isinstance(path, str) else ""), route)
        if match is Match.FULL:
            return resolved
        # PARTIAL: the path matches but not the method (a 405); keep looking for a full match.
        partial = partial or resolved
    return partial


def _flattened(contexts: Iterable[Any]) -> list[BaseRoute]:
    flat: list[BaseRoute] = []
    for context in contexts:
        starlette_route = getattr(context, "starlette_route", None)
        flat.append(starlette_route if starlette_route is not None else context)
    return flat


def _is_full(resolved: ResolvedRoute, scope: Scope) -> bool:
    assert resolved.route is not None
    try:
        return resolved.route.matches(scope)[0] is Match.FULL
    except Exception:
        return False


def _mount_path(route: Mount | Host) -> str:
    return route.path if isinstance(route, Mount) else ""
