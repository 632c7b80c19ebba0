"""Step 6 of a request: the answer. A refused request gets its denial (429, 403 for a cost no
wait would help, the 503s) before the app runs; an admitted one passes through a per-request
:class:`Responder` that adds the rate-limit headers (formatted in :mod:`.headers`) to
``http.response.start`` and forwards everything else untouched."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from operator import itemgetter, methodcaller
from typing import TYPE_CHECKING, Any

from starlette.responses import Response

from ._types import ASGIApp, Message, Receive, Scope, Send
from .context import RequestContext
from .decision import Verdict, never
from .dynamic import LoadMonitor
from .headers import HEADER_NAMES, HeaderStyle, rate_limit_headers, retry_after_value
from .responses import (
    backend_unavailable_response,
    cost_exceeds_limit_response,
    default_response,
    quota_exceeded_parts,
    reduced_capacity_response,
)

if TYPE_CHECKING:
    from .limiter import RateLimiter

__all__ = ["Responder", "denial_response", "deny", "refuse", "unavailable_response"]

_NAME = itemgetter(0)
_LOWER = methodcaller("lower")  # bytes as ASGI says; a str from a sloppy app must not raise
_NO_HEADERS = HeaderStyle.NONE  # a module constant: Enum member lookups run Python code
#: The names an app's own copies of our headers may come under: ASGI says bytes, but a
#: sloppy app's str names reach clients too (h11 takes them), and must be replaced as well.
_REPLACED = {
    style: names | {name.decode("latin-1") for name in names}
    for style, names in HEADER_NAMES.items()
}


def denial_response(limiter: RateLimiter, context: RequestContext, verdict: Verdict) -> Response:
    """The response for a request the limiter's levels refused."""
    if never(verdict.decisions):
        return cost_exceeds_limit_response(verdict.decisions, context.cost)
    headers = rate_limit_headers(context.decisions, limiter.header_style, now=time.time())
    dynamic = limiter.dynamic
    if (
        context.reduced
        and dynamic is not None
        and dynamic.reduced_capacity_status
        and any(d.scope != "client" for d in verdict.denied)
    ):
        # Refused because load (or an operator) shrank the quotas: the draft's 503.
        retry = retry_after_value(verdict.decisions)
        return reduced_capacity_response(retry, headers=headers)
    return limiter.response_builder(verdict.decisions, headers)


async def deny(
    scope: Scope,
    receive: Receive,
    send: Send,
    limiter: RateLimiter,
    context: RequestContext,
    verdict: Verdict,
) -> None:
    """Answer a request the limiter's levels refused: :func:`denial_response`, refused."""
    if (
        scope["type"] == "http"
        and limiter.response_builder is default_response
        and not context.reduced
        and not never(verdict.decisions)
    ):
        # The usual 429, and under a flood nearly every answer: the two messages the
        # Response would send, byte for byte, without building one.
        headers = rate_limit_headers(context.decisions, limiter.header_style, now=time.time())
        raw, body = quota_exceeded_parts(verdict.decisions, headers)
        await send({"type": "http.response.start", "status": 429, "headers": raw})
        await send({"type": "http.response.body", "body": body})
        return
    await refuse(scope, receive, send, denial_response(limiter, context, verdict))


def unavailable_response(limiter: RateLimiter) -> Response:
    """The 503 for a request the failure policy refuses."""
    return backend_unavailable_response(limiter.retry_after_unavailable())


async def refuse(scope: Scope, receive: Receive, send: Send, response: Any) -> None:
    """Send a refusal over HTTP, or refuse a WebSocket handshake before accept."""
    if scope["type"] == "http":
        await response(scope, receive, send)
        return
    # WebSocket: servers with the denial-response extension get the real 429; the others a
    # close with 1008 (policy violation), which they answer with 403.
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


class Responder:
    """One per request (per-request state never lives on the middleware)."""

    __slots__ = ("_decided", "_headers", "_send", "app", "context", "replaced", "status")

    def __init__(
        self,
        app: ASGIApp,
        context: RequestContext,
        send: Send,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.app = app
        self.context = context
        self._send = send
        self.status: int | None = None
        self.replaced = False
        #: Our headers, built already (the express path), for the decisions as they are now:
        #: used unless a guard adds decisions while the app runs.
        self._headers = headers
        self._decided = context.decisions

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
                ours = self._headers
                if ours is None or decisions is not self._decided:
                    ours = rate_limit_headers(decisions, style, now=time.time())
                headers = message.get("headers", ())
                if type(headers) is not list and type(headers) is not tuple:
                    headers = list(headers)  # any iterable, read once (as uvicorn does)
                names = _REPLACED[style]
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
    """A route guard's denial, as problem+json with our headers, or as the limiter's own
    ``response_builder`` makes it."""
    limiter = context.limiter
    headers = rate_limit_headers(context.decisions, limiter.header_style, now=time.time())
    if limiter.response_builder is not default_response:
        response = limiter.response_builder(denial.decisions, headers)
        raw = response.raw_headers
        await send({"type": "http.response.start", "status": response.status_code, "headers": raw})
        await send({"type": "http.response.body", "body": getattr(response, "body", b"")})
        return
    raw, body = quota_exceeded_parts(denial.decisions, headers)
    await send({"type": "http.response.start", "status": 429, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def _nothing() -> None:
    """An awaitable that does nothing: a dropped message."""
