"""The lifespan scope under :class:`~fastapi_ratelimit.middleware.RateLimitMiddleware`: it
passes through to the app, and the limiter warms up (:meth:`RateLimiter.warm_up
<fastapi_ratelimit.RateLimiter.warm_up>`) when the app reports its start-up complete, before
the server hears of it. So the first request finds the backend connected and its scripts
loaded, and the app's own start-up may still build or replace the limiter's backend.

Only lifespan scopes are touched: HTTP requests pay nothing for it. A server that sends no
lifespan scope (``uvicorn --lifespan off``) gets no warm-up; the first request then sets up
the backend, as it always did.
"""

from __future__ import annotations

from ._types import Message, Send
from .limiter import RateLimiter

__all__ = ["warm_up_on_startup"]


def warm_up_on_startup(limiter: RateLimiter, send: Send) -> Send:
    """``send`` for the app's lifespan scope: ``lifespan.startup.complete`` goes out once
    ``limiter.warm_up()`` is done (bounded, never raising); everything else at once."""

    async def send_after_warm_up(message: Message) -> None:
        if message["type"] == "lifespan.startup.complete":
            await limiter.warm_up()
        await send(message)

    return send_after_warm_up
