"""An app for tests/test_dashboard_browser.py: a user limit, a route whose template is HTML,
and the live dashboard at /dash (token from DASHBOARD_TOKEN)."""

import os

from fastapi import FastAPI

from fastapi_ratelimit import RateLimiter, RateLimitMiddleware
from fastapi_ratelimit.dashboard import dashboard_app
from fastapi_ratelimit.middleware import DEFAULT_EXEMPT
from fastapi_ratelimit.stats import LiveStats

limiter = RateLimiter(
    ip_limit="1000/minute",
    user_limit="5/minute",
    user_resolver=lambda request: request.headers.get("x-user"),
)
stats = LiveStats(limiter)

app = FastAPI()
app.add_middleware(RateLimitMiddleware, limiter=limiter, exempt=(*DEFAULT_EXEMPT, "/dash"))
app.mount("/dash", dashboard_app(stats, token=os.environ["DASHBOARD_TOKEN"]))


@app.get("/items/{item_id}")
async def item(item_id: str) -> dict[str, str]:
    return {"id": item_id}


@app.get("/x/<script>window.__xss=1</script>")
async def html_route() -> dict[str, str]:
    return {"ok": "yes"}
