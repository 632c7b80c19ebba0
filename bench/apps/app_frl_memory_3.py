"""``frl-memory-3``: fastapi_ratelimit, memory backend, global + IP + endpoint levels."""

from fastapi import FastAPI

from fastapi_ratelimit import MemoryBackend, RateLimiter, RateLimitMiddleware

HIGH = "1000000000/minute"

limiter = RateLimiter(
    backend=MemoryBackend(),
    global_limit=HIGH,
    ip_limit=HIGH,
    endpoint_limits={"GET /hello": HIGH},
)

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
