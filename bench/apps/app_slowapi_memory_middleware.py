"""``slowapi-memory-middleware``: slowapi's ``SlowAPIMiddleware`` with ``default_limits``,
memory storage (the endpoint itself is undecorated)."""

from fastapi import FastAPI
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.middleware import SlowAPIMiddleware
from slowapi.util import get_remote_address

limiter = Limiter(
    key_func=get_remote_address, default_limits=["1000000000/minute"], storage_uri="memory://"
)

app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)
app.add_middleware(SlowAPIMiddleware)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
