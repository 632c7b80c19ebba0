"""``frl-memory-1``: fastapi_ratelimit, memory backend, the IP level only.

Behind a proxy the client IP comes from ``X-Forwarded-For``: uvicorn's proxy headers (on by
default, trusting 127.0.0.1, which ``bench_http.py`` also passes explicitly) have already put
the forwarded address into ``scope["client"]`` before any middleware runs, so the limiter's
peer *is* the client and ``trusted_proxies`` stays empty (listing 127.0.0.1 there too would
change nothing: the peer it sees is no longer 127.0.0.1).
"""

import os

from fastapi import FastAPI

from fastapi_ratelimit import MemoryBackend, RateLimiter, RateLimitMiddleware

limiter = RateLimiter(backend=MemoryBackend(), ip_limit="1000000000/minute")

if os.environ.get("BENCH_GENERAL") == "1":
    # The "-general" variants: the same app with the express path off (express.py), as the
    # library was before it, for a before-and-after in one run.
    from fastapi_ratelimit.express import Express

    Express.applies = staticmethod(lambda limiter: False)  # type: ignore[method-assign]

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
