"""The live dashboard: a mountable Starlette app with one HTML page and a Server-Sent Events
feed of :class:`~fastapi_ratelimit.stats.LiveStats` summaries.

    stats = LiveStats(limiter)
    app.mount("/ratelimit/dashboard", dashboard_app(stats, token=os.environ["DASHBOARD_TOKEN"]))

Like the admin router it refuses everything unless a ``token`` is configured. Open
``/ratelimit/dashboard/?token=...`` once: the token is swapped for an HttpOnly, SameSite=Strict
cookie (holding an HMAC of the token, not the token) and the page reloads without it in the
address. Scripts and styles are files of this package (no CDN); the Content-Security-Policy
allows nothing else, and the page's script writes every value as text, never as HTML.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from importlib.resources import files

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from ..errors import ConfigurationError
from ..stats import LiveStats

__all__ = ["dashboard_app"]

_COOKIE = "frl_dashboard"
_SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}
_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def dashboard_app(stats: LiveStats, *, token: str | None = None) -> Starlette:
    """The dashboard for ``stats``; disabled (403) unless ``token`` is given."""
    if not isinstance(stats, LiveStats):
        raise ConfigurationError("stats", stats, "must be a LiveStats")
    if token is not None and (not isinstance(token, str) or len(token) < 16):
        raise ConfigurationError("token", "<hidden>", "must be a string of at least 16 characters")
    cookie = (
        hmac.new(token.encode(), b"fastapi_ratelimit dashboard", hashlib.sha256).hexdigest()
        if token is not None
        else None
    )
    assets = {name: (files(__package__) / name).read_bytes() for name in _FILES}

    def refusal(request: Request) -> Response | None:
        if token is None or cookie is None:
            return _respond(b"dashboard disabled: configure a token\n", "text/plain", 403)
        given = request.cookies.get(_COOKIE, "")
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        if hmac.compare_digest(given.encode("utf-8", "replace"), cookie.encode()):
            return None
        if scheme.lower() == "bearer" and hmac.compare_digest(
            bearer.encode("utf-8", "replace"), token.encode()
        ):
            return None
        return _respond(b"unauthorised\n", "text/plain", 401)

    async def page(request: Request) -> Response:
        given = request.query_params.get("token")
        if given is not None and token is not None and cookie is not None:
            if not hmac.compare_digest(given.encode("utf-8", "replace"), token.encode()):
                return _respond(b"unauthorised\n", "text/plain", 401)
            # Swap the token in the address for a cookie, and drop it from the address (and
            # so from the history and any Referer).
            redirect = RedirectResponse(request.url.remove_query_params("token"), 303)
            redirect.set_cookie(
                _COOKIE,
                cookie,
                path=request.scope.get("root_path", "") + "/",
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            redirect.headers.update(_SECURITY_HEADERS)
            return redirect
        return refusal(request) or _asset(assets, "index.html")

    async def asset(request: Request) -> Response:
        return refusal(request) or _asset(assets, request.url.path.rsplit("/", 1)[-1])

    async def summary(request: Request) -> Response:
        refused = refusal(request)
        if refused is not None:
            return refused
        stats.ensure_started()
        return _respond(json.dumps(await stats.summary()).encode(), "application/json")

    async def events(request: Request) -> Response:
        refused = refusal(request)
        if refused is not None:
            return refused
        stats.ensure_started()
        return StreamingResponse(
            _feed(stats), media_type="text/event-stream", headers=_SECURITY_HEADERS
        )

    return Starlette(
        routes=[
            Route("/", page),
            Route("/app.js", asset),
            Route("/style.css", asset),
            Route("/summary", summary),
            Route("/events", events),
        ]
    )


async def _feed(stats: LiveStats) -> AsyncIterator[str]:
    """A summary now, then one after every tick (or every 5 s if none comes)."""
    while True:
        changed = stats.changed
        yield f"data: {json.dumps(await stats.summary())}\n\n"
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), 5)


def _asset(assets: dict[str, bytes], name: str) -> Response:
    return _respond(assets[name], _FILES[name])


def _respond(body: bytes, media_type: str, status: int = 200) -> Response:
    return Response(body, status, headers=_SECURITY_HEADERS, media_type=media_type)
