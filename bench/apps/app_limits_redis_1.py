"""``limits-redis-1``: a yardstick, not a product: about the least a Redis rate limiter can do
per request. The ``limits`` library's async Redis storage (``limits.aio.storage.RedisStorage``,
its default coredis client) with the fixed window strategy, one limit keyed on the client IP
(``scope["client"]``, which uvicorn's proxy headers have set from ``X-Forwarded-For``), inside
a small pure-ASGI middleware (no ``BaseHTTPMiddleware``) that adds one
``X-RateLimit-Remaining`` header and answers 429 when over.

``FixedWindowRateLimiter.hit`` is ``storage.incr(key, expiry) <= amount``: one ``INCRBY``
round trip (plus an ``EXPIRE`` when the increment created the key, once per client and
window). It returns only the bool, and ``get_window_stats`` would cost two more round trips,
so :func:`hit` runs the same ``incr`` and keeps the count for the header.
"""

import os
from typing import Any

from fastapi import FastAPI
from limits import parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter

LIMIT = parse("1000000000/minute")
EXPIRY = LIMIT.get_expiry()

strategy = FixedWindowRateLimiter(RedisStorage("async+" + os.environ["BENCH_REDIS_URL"]))

TOO_MANY = b'{"detail":"Too Many Requests"}'


async def hit(identity: str) -> tuple[bool, int]:
    """``FixedWindowRateLimiter.hit`` for ``LIMIT``, also returning the remaining count."""
    count = await strategy.storage.incr(LIMIT.key_for(identity), EXPIRY)
    return count <= LIMIT.amount, max(LIMIT.amount - count, 0)


class LimitsMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        allowed, remaining = await hit(client[0] if client else "unknown")
        header = (b"x-ratelimit-remaining", str(remaining).encode("ascii"))
        if not allowed:
            await send(
                {
                    "type": "http.response.start",
                    "status": 429,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(TOO_MANY)).encode("ascii")),
                        (b"retry-after", str(EXPIRY).encode("ascii")),
                        header,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": TOO_MANY})
            return

        async def send_with_header(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_header)


app = FastAPI()
app.add_middleware(LimitsMiddleware)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
