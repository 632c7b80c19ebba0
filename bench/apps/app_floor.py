"""``floor``: the cheapest middleware that does what a rate limiter must on an admitted
request: a pure-ASGI ``send`` wrapper adding two constant headers. No limiting at all; it
shows the part of any limiter's overhead that is not the limiter's."""

from typing import Any

from fastapi import FastAPI

HEADERS = [
    (b"ratelimit-policy", b'"global";q=1000000000;w=60, "ip";q=1000000000;w=60'),
    (b"ratelimit", b'"ip";r=999999999;t=60'),
]


class Floor:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


app = FastAPI()
app.add_middleware(Floor)


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
