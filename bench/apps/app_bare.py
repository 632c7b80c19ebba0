"""``bare``: the hello-world app with no rate limiting (the baseline)."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/hello")
async def hello() -> dict[str, str]:
    return {"hello": "world"}
