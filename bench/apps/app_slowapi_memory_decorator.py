"""``slowapi-memory-decorator``: slowapi's ``@limiter.limit`` on the endpoint, memory storage."""

from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")

app = FastAPI()
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


@app.get("/hello")
@limiter.limit("1000000000/minute")
async def hello(request: Request) -> dict[str, str]:
    return {"hello": "world"}
