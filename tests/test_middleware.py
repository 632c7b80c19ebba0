"""RateLimitMiddleware on real FastAPI and Starlette apps, driven through httpx."""

from __future__ import annotations

import asyncio
import inspect
import json
from typing import Any

import httpx
import pytest
import uvicorn
from conftest import BACKEND_KINDS
from fastapi import APIRouter, BackgroundTasks, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from http_helpers import RATE_HEADERS, client_for, header_counts, policies, ratelimit, remaining
from starlette.applications import Starlette
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from fastapi_ratelimit import (
    Algorithm,
    BackendError,
    Check,
    CompositeLimit,
    ConfigurationError,
    FakeClock,
    MemoryBackend,
    Policy,
    RateLimiter,
    RateLimitMiddleware,
    Verdict,
    report_cost,
)
from fastapi_ratelimit.responses import default_response


def make_app(limiter: RateLimiter, **middleware: Any) -> FastAPI:
    app = FastAPI()
    app.state.calls = 0
    app.state.background = 0

    @app.get("/hello")
    async def hello() -> dict[str, str]:
        app.state.calls += 1
        return {"hello": "world"}

    @app.get("/users/{user_id}")
    async def user(user_id: int) -> dict[str, int]:
        return {"id": user_id}

    @app.post("/ocr/process")
    async def ocr() -> dict[str, str]:
        return {"text": "x"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"ok": "yes"}

    @app.post("/work")
    async def work(tasks: BackgroundTasks) -> dict[str, str]:
        def task() -> None:
            app.state.background += 1

        tasks.add_task(task)
        return {"queued": "yes"}

    app.add_middleware(RateLimitMiddleware, limiter=limiter, **middleware)
    return app


async def test_headers_on_allowed_and_problem_json_on_denied() -> None:
    limiter = RateLimiter(ip_limit="2/minute", global_limit="100/minute", headers="both")
    app = make_app(limiter)
    async with client_for(app) as client:
        first = await client.get("/hello")
        assert first.status_code == 200
        assert policies(first) == {"global": {"q": 100, "w": 60}, "ip": {"q": 2, "w": 60}}
        assert ratelimit(first)[0] == "ip"
        assert ratelimit(first)[1]["r"] == 1
        assert first.headers["x-ratelimit-limit"] == "2"
        assert remaining(first) == "1"
        assert first.headers["x-ratelimit-used"] == "1"
        assert first.headers["x-ratelimit-scope"] == "ip"
        assert "retry-after" not in first.headers
        await client.get("/hello")
        denied = await client.get("/hello")
    assert denied.status_code == 429
    assert denied.headers["content-type"] == "application/problem+json"
    body = denied.json()
    assert body["type"] == "https://iana.org/assignments/http-problem-types#quota-exceeded"
    assert body["violated-policies"] == ["ip"]
    assert body["scope"] == "ip"
    assert body["status"] == 429
    retry_after = int(denied.headers["retry-after"])
    assert retry_after >= 1
    assert body["retry_after"] == retry_after
    assert retry_after >= ratelimit(denied)[1]["t"]
    assert ratelimit(denied)[1]["r"] == 0
    # The app never ran for the denied request.
    assert app.state.calls == 2
    for response in (first, denied):
        counts = header_counts(response)
        assert all(counts.get(name, 0) == 1 for name in RATE_HEADERS)
    # Nothing internal leaks into the body.
    assert "203.0.113.7" not in denied.text
    assert "rl:" not in denied.text


async def test_denied_request_runs_no_background_task() -> None:
    app = make_app(RateLimiter(ip_limit="1/minute"))
    async with client_for(app) as client:
        assert (await client.post("/work")).status_code == 200
        assert (await client.post("/work")).status_code == 429
    assert app.state.background == 1


@pytest.mark.parametrize(
    ("style", "present", "absent"),
    [
        ("ietf", {"ratelimit", "ratelimit-policy"}, {"x-ratelimit-limit", "ratelimit-limit"}),
        ("x-ratelimit", {"x-ratelimit-limit", "x-ratelimit-reset"}, {"ratelimit"}),
        ("both", {"ratelimit", "x-ratelimit-remaining"}, {"ratelimit-limit"}),
        ("legacy", {"ratelimit-limit", "ratelimit-reset"}, {"ratelimit", "x-ratelimit-limit"}),
        ("none", set(), {"ratelimit", "x-ratelimit-limit", "ratelimit-limit"}),
    ],
)
async def test_header_styles(style: str, present: set[str], absent: set[str]) -> None:
    app = make_app(RateLimiter(ip_limit="5/minute", headers=style))
    async with client_for(app) as client:
        response = await client.get("/hello")
    assert present <= set(response.headers)
    assert not absent & set(response.headers)


async def test_endpoint_is_the_route_template_and_costs_apply() -> None:
    limiter = RateLimiter(
        endpoint_limits={"GET /users/{user_id}": "3/minute", "POST /ocr/process": "20/minute"},
        costs={"POST /ocr/process": 10},
    )
    app = make_app(limiter)
    async with client_for(app) as client:
        # Three different raw paths, one endpoint: the third path still counts against it.
        for i in range(3):
            assert (await client.get(f"/users/{i}")).status_code == 200
        assert (await client.get("/users/99")).status_code == 429
        first = await client.post("/ocr/process")
        assert remaining(first) == "10"
        assert (await client.post("/ocr/process")).status_code == 200
        assert (await client.post("/ocr/process")).status_code == 429


async def test_endpoint_level_is_shared_by_all_clients() -> None:
    app = make_app(RateLimiter(endpoint_limits={"GET /hello": "2/minute"}))
    async with client_for(app, ip="198.51.100.1") as a, client_for(app, ip="198.51.100.2") as b:
        assert (await a.get("/hello")).status_code == 200
        assert (await b.get("/hello")).status_code == 200
        assert (await a.get("/hello")).status_code == 429


async def test_a_star_endpoint_limit_applies_to_every_method_apart() -> None:
    app = make_app(RateLimiter(endpoint_limits={"* /users/{user_id}": "1/minute"}))
    app.add_api_route("/users/{user_id}", lambda user_id: {"gone": user_id}, methods=["DELETE"])
    async with client_for(app) as client:
        assert (await client.get("/users/1")).status_code == 200
        assert (await client.get("/users/2")).status_code == 429
        # DELETE is another endpoint under the same limit: a bucket of its own.
        assert (await client.delete("/users/1")).status_code == 200
        assert (await client.delete("/users/1")).status_code == 429


async def test_unmatched_paths_share_one_bucket_and_never_mint_keys() -> None:
    backend = MemoryBackend()
    app = make_app(RateLimiter(backend=backend, endpoint_limits={"GET <unmatched>": "2/minute"}))
    async with client_for(app) as client:
        assert (await client.get("/nope/1")).status_code == 404
        assert (await client.get("/nope/2")).status_code == 404
        assert (await client.get("/other")).status_code == 429
    assert len(backend) == 1


async def test_head_counts_like_get_and_options_preflight_is_free() -> None:
    app = make_app(RateLimiter(ip_limit="2/minute"))
    app = _with_cors(app)
    async with client_for(app) as client:
        # CORSMiddleware, outside, answers preflights: they never reach the limiter (the
        # limiter's own preflight rule is test_a_preflight_reaching_the_limiter_is_not_counted).
        preflight = {"origin": "https://a.example", "access-control-request-method": "GET"}
        for _ in range(5):
            assert (await client.options("/hello", headers=preflight)).status_code == 200
        # FastAPI answers HEAD on a GET route with 405, but it is counted like a GET.
        assert (await client.head("/hello")).status_code == 405
        assert (await client.get("/hello")).status_code == 200
        denied = await client.get("/hello", headers={"origin": "https://a.example"})
    assert denied.status_code == 429
    # The 429 went back through CORSMiddleware (added after, so outside) with CORS headers.
    assert denied.headers["access-control-allow-origin"] == "*"


def _with_cors(app: FastAPI) -> FastAPI:
    # Added after RateLimitMiddleware, so it runs outside it.
    app.add_middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"])
    return app


async def test_exempt_paths_are_neither_limited_nor_counted() -> None:
    backend = MemoryBackend()
    app = make_app(RateLimiter(backend=backend, ip_limit="1/minute"))
    async with client_for(app) as client:
        for _ in range(5):
            response = await client.get("/health")
            assert response.status_code == 200
            assert "ratelimit" not in response.headers
        assert (await client.get("/openapi.json")).status_code == 200
    assert len(backend) == 0
    custom = make_app(RateLimiter(ip_limit="1/minute"), exempt=["/hello"], default_exempt=False)
    async with client_for(custom) as client:
        for _ in range(3):
            assert (await client.get("/hello")).status_code == 200
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/health")).status_code == 429


async def test_include_router_and_mounts_resolve_templates() -> None:
    limiter = RateLimiter(
        endpoint_limits={
            "GET /api/v1/items/{item_id}": "1/minute",
            "GET /sub/things/{name}": "1/minute",
            "GET /plain/{x}": "1/minute",
        }
    )
    router = APIRouter(prefix="/v1")

    @router.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    outer = APIRouter(prefix="/api")
    outer.include_router(router)
    sub = FastAPI()

    @sub.get("/things/{name}")
    async def thing(name: str) -> dict[str, str]:
        return {"name": name}

    async def plain(request: Any) -> PlainTextResponse:
        return PlainTextResponse("plain")

    app = FastAPI()
    app.include_router(outer)
    app.mount("/sub", sub)
    app.mount("/", Starlette(routes=[Route("/plain/{x}", plain)]))
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        assert (await client.get("/api/v1/items/1")).status_code == 200
        assert (await client.get("/api/v1/items/2")).status_code == 429
        assert (await client.get("/sub/things/a")).status_code == 200
        assert (await client.get("/sub/things/b")).status_code == 429
        assert (await client.get("/plain/a")).status_code == 200
        assert (await client.get("/plain/b")).status_code == 429


async def test_spoofed_forwarding_headers_from_untrusted_peers_get_no_fresh_quota() -> None:
    app = make_app(RateLimiter(ip_limit="2/minute", trusted_proxies=["10.0.0.0/8"]))
    async with client_for(app, ip="203.0.113.50") as client:
        for i in range(2):
            spoof = {"x-forwarded-for": f"198.51.100.{i}", "x-real-ip": f"192.0.2.{i}"}
            assert (await client.get("/hello", headers=spoof)).status_code == 200
        spoof = {"x-forwarded-for": "198.51.100.77", "forwarded": "for=192.0.2.200"}
        assert (await client.get("/hello", headers=spoof)).status_code == 429
    # Behind a trusted proxy, the forwarded client is the identity.
    async with client_for(app, ip="10.0.0.5") as proxy:
        for i in range(3):
            headers = {"x-forwarded-for": f"198.51.100.{i}, 10.0.0.9"}
            assert (await proxy.get("/hello", headers=headers)).status_code == 200


@pytest.mark.parametrize(
    "padding",
    [
        [("x-forwarded-for", "1.1.1.1, " * 1200)],
        [("x-forwarded-for", "x" * 5000), ("x-forwarded-for", "y" * 5000)],
    ],
)
async def test_a_padded_forwarding_header_stays_in_the_clients_bucket(
    padding: list[tuple[str, str]],
) -> None:
    # The client pads its part of X-Forwarded-For; the trusted proxy appends the real address.
    app = make_app(RateLimiter(ip_limit="2/minute", trusted_proxies=["10.0.0.0/8"]))
    appended = [("x-forwarded-for", "203.0.113.9")]
    statuses = []
    async with client_for(app, ip="10.0.0.5") as proxy:
        for headers in (padding + appended, appended, padding + appended):
            statuses.append((await proxy.get("/hello", headers=headers)).status_code)
        # Another client behind the same proxy has its own bucket.
        other = [("x-forwarded-for", "198.51.100.1")]
        assert (await proxy.get("/hello", headers=other)).status_code == 200
    assert statuses == [200, 200, 429]


@pytest.mark.parametrize("trust", [True, False])
async def test_trust_unix_socket_gives_each_forwarded_client_its_own_bucket(trust: bool) -> None:
    # uvicorn --uds: scope["client"] is None, and the proxy on the socket sets X-Forwarded-For.
    app = make_app(RateLimiter(ip_limit="2/minute", trust_unix_socket=trust))
    transport = httpx.ASGITransport(app=app, client=None)  # type: ignore[arg-type]
    statuses = []
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as proxy:
        for client in ("203.0.113.9", "203.0.113.9", "198.51.100.1", "203.0.113.9"):
            headers = {"x-forwarded-for": client}
            statuses.append((await proxy.get("/hello", headers=headers)).status_code)
    # Without the option, every client shares the "unknown" bucket.
    assert statuses == ([200, 200, 200, 429] if trust else [200, 200, 429, 429])


@pytest.mark.parametrize(
    ("headers", "second"),
    [
        # An API key, however odd or long, is a key: the key level (1/minute) denies.
        ({"x-api-key": "k" * 65536}, 429),
        ({"x-api-key": "{user}*:\x01\x7f"}, 429),
        ({"x-api-key": "a\tb"}, 429),
        # No key: only the IP level (100/minute) applies.
        ({"x-forwarded-for": "1.2.3.4, " * 5000}, 200),
        ({"x-user": b"\xff\xfe" * 10}, 200),
    ],
)
async def test_hostile_headers_never_cause_5xx(headers: dict[str, Any], second: int) -> None:
    limiter = RateLimiter(
        ip_limit="100/minute",
        api_key_limit="1/minute",
        trusted_proxies=["203.0.113.0/24"],
        user_resolver=lambda connection: connection.headers.get("x-user"),
    )
    app = make_app(limiter)
    async with client_for(app) as client:
        first = await client.get("/hello", headers=headers)
        again = await client.get("/hello", headers=headers)
    assert (first.status_code, again.status_code) == (200, second)


async def test_hostile_api_keys_do_not_collide() -> None:
    app = make_app(RateLimiter(api_key_limit="1/minute"))
    keys = ["{a}", "{a}:", "a", "a:", "*", "**", "k" * 10000, "k" * 10001]
    async with client_for(app) as client:
        for key in keys:
            assert (await client.get("/hello", headers={"x-api-key": key})).status_code == 200
        for key in keys:
            assert (await client.get("/hello", headers={"x-api-key": key})).status_code == 429


async def test_composite_limits() -> None:
    limiter = RateLimiter(
        composite_limits=[
            CompositeLimit(("user", "endpoint"), "2/minute"),
            CompositeLimit(("user", "ip"), "3/minute"),
        ],
        user_resolver=lambda connection: connection.headers.get("x-user"),
    )
    app = make_app(limiter)
    async with client_for(app, ip="198.51.100.1") as a, client_for(app, ip="198.51.100.2") as b:
        alice = {"x-user": "alice"}
        assert (await a.get("/hello", headers=alice)).status_code == 200
        assert (await a.get("/hello", headers=alice)).status_code == 200
        # user+endpoint: a third /hello is denied wherever it comes from.
        denied = await b.get("/hello", headers=alice)
        assert denied.status_code == 429
        assert denied.json()["violated-policies"] == ["user-endpoint"]
        # Another endpoint is a fresh user+endpoint quota; user+ip counts on.
        assert (await a.get("/users/1", headers=alice)).status_code == 200
        denied = await a.get("/users/2", headers=alice)
        assert denied.json()["violated-policies"] == ["user-ip"]
        # Anonymous requests have no user part: composite levels don't apply.
        for _ in range(5):
            assert (await a.get("/hello")).status_code == 200


async def test_shadow_mode_counts_but_never_blocks() -> None:
    backend = MemoryBackend()
    limiter = RateLimiter(
        backend=backend, ip_limit="1/minute", global_limit="3/minute", shadow={"ip"}
    )
    app = make_app(limiter)
    async with client_for(app) as client:
        statuses = [(await client.get("/hello")).status_code for _ in range(4)]
    # ip (shadow) would have denied from the second; global (enforced) denies the fourth.
    assert statuses == [200, 200, 200, 429]
    everything = make_app(RateLimiter(ip_limit="1/minute", shadow=True))
    async with client_for(everything) as client:
        statuses = [(await client.get("/hello")).status_code for _ in range(5)]
    assert statuses == [200] * 5


async def test_refund_when_counts_only_failures() -> None:
    limiter = RateLimiter(ip_limit="2/minute", refund_when=lambda status: status < 400)
    app = FastAPI()

    @app.post("/login")
    async def login(ok: bool) -> dict[str, bool]:
        if not ok:
            raise HTTPException(401)
        return {"ok": True}

    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        for _ in range(5):  # successful logins are refunded
            assert (await client.post("/login?ok=true")).status_code == 200
        assert (await client.post("/login?ok=false")).status_code == 401
        assert (await client.post("/login?ok=false")).status_code == 401
        assert (await client.post("/login?ok=true")).status_code == 429


async def test_reported_cost_adjusts_after_the_response() -> None:
    app = FastAPI()

    @app.post("/report")
    async def report(size: int, request: Request) -> dict[str, int]:
        report_cost(request, size)
        return {"size": size}

    app.add_middleware(RateLimitMiddleware, limiter=RateLimiter(ip_limit="10/minute"))
    async with client_for(app) as client:
        assert remaining(await client.post("/report?size=0")) == "9"
        # The unit charged for size=0 was refunded: 9 again; then 3 more for size=4.
        assert remaining(await client.post("/report?size=4")) == "9"
        assert remaining(await client.post("/report?size=1")) == "5"


class FailingBackend(MemoryBackend):
    async def hit(self, checks: Any) -> Verdict:
        raise BackendError("Redis script failed: ConnectionError (redis://***@db:6379/0)")


@pytest.mark.parametrize(("policy", "status"), [("allow", 200), ("deny", 503)])
async def test_backend_failure_policy(policy: Any, status: int) -> None:
    app = make_app(
        RateLimiter(backend=FailingBackend(), ip_limit="1/minute", on_backend_error=policy)
    )
    async with client_for(app) as client:
        responses = [await client.get("/hello") for _ in range(3)]
    assert [r.status_code for r in responses] == [status] * 3
    if status == 503:
        body = responses[0].json()
        assert responses[0].headers["content-type"] == "application/problem+json"
        assert int(responses[0].headers["retry-after"]) >= 1
        assert "redis" not in responses[0].text.lower()
        assert body["status"] == 503
    else:
        assert "ratelimit" not in responses[0].headers


async def test_streaming_files_and_errors_are_untouched(tmp_path: Any) -> None:
    path = tmp_path / "f.txt"
    path.write_bytes(b"file-content" * 1000)
    app = FastAPI()

    async def chunks() -> Any:
        for i in range(5):
            yield f"chunk{i};".encode()
            await asyncio.sleep(0)

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/file")
    async def file() -> FileResponse:
        return FileResponse(path)

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    app.add_middleware(RateLimitMiddleware, limiter=RateLimiter(ip_limit="100/minute"))
    async with client_for(app) as client:
        streamed = await client.get("/stream")
        assert streamed.text == "chunk0;chunk1;chunk2;chunk3;chunk4;"
        assert remaining(streamed) == "99"
        served = await client.get("/file")
        assert served.content == b"file-content" * 1000
        assert served.headers["content-length"] == "12000"
        assert "ratelimit" in served.headers
    # An exception in an endpoint propagates exactly as without the middleware.
    transport_app = app
    with pytest.raises(RuntimeError, match="boom"):
        async with client_for(transport_app) as client:
            await client.get("/boom")


async def test_starlette_app_works_too() -> None:
    async def home(request: Any) -> JSONResponse:
        return JSONResponse({"home": True})

    app = Starlette(routes=[Mount("/", routes=[Route("/items/{i}", home)])])
    app.add_middleware(
        RateLimitMiddleware,
        limiter=RateLimiter(endpoint_limits={"GET /items/{i}": "1/minute"}),
    )
    async with client_for(app) as client:
        assert (await client.get("/items/1")).status_code == 200
        assert (await client.get("/items/2")).status_code == 429


async def test_an_apps_own_rate_limit_headers_are_replaced_and_others_kept() -> None:
    app = FastAPI()

    @app.get("/own-headers")
    async def own_headers() -> PlainTextResponse:
        # An app that sets headers of ours itself (in another case): ours replace them.
        return PlainTextResponse("x", headers={"RateLimit-Policy": "mine", "X-Other": "kept"})

    limiter = RateLimiter(global_limit="100/minute", ip_limit="5/minute", headers="both")
    app.add_middleware(RateLimitMiddleware, limiter=limiter)
    async with client_for(app) as client:
        answers = [await client.get("/own-headers") for _ in range(2)]
    for response in answers:
        counts = header_counts(response)
        assert counts["ratelimit-policy"] == 1
        assert counts["x-ratelimit-limit"] == 1
        assert response.headers["x-other"] == "kept"
        assert set(policies(response)) == {"global", "ip"}
    assert answers[1].headers["x-ratelimit-remaining"] == "3"


async def test_a_preflight_reaching_the_limiter_is_not_counted() -> None:
    """Without CORSMiddleware in front, a preflight reaches the limiter: it lets it through
    (the app answers 405) without counting it."""
    app = make_app(RateLimiter(ip_limit="2/minute"))
    preflight = {"Origin": "http://a.example", "Access-Control-Request-Method": "GET"}
    async with client_for(app) as client:
        assert (await client.get("/hello")).status_code == 200
        for _ in range(5):
            response = await client.options("/hello", headers=preflight)
            assert response.status_code == 405
            assert "ratelimit" not in response.headers
        last = await client.get("/hello")
        # A plain OPTIONS (no Access-Control-Request-Method) is counted like any request.
        denied = await client.options("/hello", headers={"Origin": "http://a.example"})
    assert last.status_code == 200
    assert remaining(last) == "0"
    assert denied.status_code == 429


async def test_an_options_without_origin_is_no_preflight_and_is_counted() -> None:
    """Found in the session-25 audit: Access-Control-Request-Method alone made any OPTIONS
    free, so an app's own OPTIONS handler could be called without limit (CORSMiddleware in
    front passes an Origin-less request through too)."""
    calls = 0
    app = make_app(RateLimiter(ip_limit="3/minute"))

    @app.options("/search")
    async def search_options() -> dict[str, str]:
        nonlocal calls
        calls += 1
        return {}

    app = _with_cors(app)
    fake = {"access-control-request-method": "GET"}  # no Origin
    async with client_for(app) as client:
        answers = [(await client.options("/search", headers=fake)).status_code for _ in range(5)]
        after = await client.get("/hello")
    assert answers == [200, 200, 200, 429, 429]
    assert calls == 3
    assert after.status_code == 429


async def test_an_api_key_without_a_level_of_its_own_is_in_the_context() -> None:
    """Route guards may key on it: stripped of blanks, Latin-1, a blank one is none."""
    app = FastAPI()

    @app.get("/who")
    async def who(request: Request) -> dict[str, Any]:
        context = request.scope["fastapi_ratelimit"]
        return {"key": context.api_key, "user": context.user, "ip": context.ip}

    app.add_middleware(RateLimitMiddleware, limiter=RateLimiter(ip_limit="5/minute"))
    async with client_for(app) as client:
        answers = [
            await client.get("/who", headers={"X-API-Key": "k-1"}),
            await client.get("/who", headers={"X-API-Key": "\tk-2 "}),
            await client.get("/who", headers={"X-API-Key": "  "}),
            await client.get("/who", headers={"X-API-Key": "caf\xe9".encode("latin-1")}),
            await client.get("/who"),
        ]
    assert [r.json()["key"] for r in answers] == ["k-1", "k-2", None, "caf\xe9", None]
    assert {(r.json()["user"], r.json()["ip"]) for r in answers} == {(None, "203.0.113.7")}
    # No level of its own: the IP level counted all five.
    assert [remaining(r) for r in answers] == ["4", "3", "2", "1", "0"]


async def test_odd_scope_values_never_cause_errors() -> None:
    app = make_app(RateLimiter(ip_limit="100/minute"))
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    base = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "path": "/hello", "raw_path": b"/hello", "query_string": b"",
        "root_path": "", "headers": [(b"host", b"x")], "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }  # fmt: skip
    for odd in (
        {},
        {"client": (["127.0.0.1"], 5000)},
        {"client": None},
        {"headers": [("x-api-key", "text, not bytes")]},
        {"state": {"user": "bob"}},
    ):
        await app({**base, **odd}, receive, send)
    statuses = [m["status"] for m in sent if m["type"] == "http.response.start"]
    assert statuses == [200] * 5


def test_servers_see_an_asgi3_app() -> None:
    """Servers and asgiref tell ASGI 3 by ``inspect.iscoroutinefunction(app.__call__)``."""
    middleware = RateLimitMiddleware(make_app(RateLimiter()), limiter=RateLimiter())
    assert inspect.iscoroutinefunction(middleware.__call__)
    config = uvicorn.Config(middleware, log_config=None)
    config.load()
    assert config.interface == "asgi3"


async def test_a_replaced_backend_is_used_at_once() -> None:
    limiter = RateLimiter(backend=MemoryBackend(clock=FakeClock()), ip_limit="5/minute")
    app = make_app(limiter)
    async with client_for(app) as client:
        for _ in range(3):
            await client.get("/hello")
        limiter.backend = MemoryBackend(clock=FakeClock())
        response = await client.get("/hello")
    assert remaining(response) == "4"  # a fresh store


async def test_routes_added_later_are_resolved_afresh() -> None:
    app = make_app(RateLimiter(ip_limit="100/minute"))
    async with client_for(app) as client:
        assert (await client.get("/late")).status_code == 404
        assert (await client.get("/late")).status_code == 404

        @app.get("/late")
        async def late() -> dict[str, str]:
            return {"late": "yes"}

        response = await client.get("/late")
    assert response.status_code == 200
    assert response.json() == {"late": "yes"}


async def test_lifespan_and_other_scopes_pass_through() -> None:
    # The app's lifespan messages reach it, and its answers reach the server, unchanged and
    # in order; with the memory backend the start-up warm-up has nothing to do.
    received: list[str] = []
    sent: list[dict[str, str]] = []

    async def inner(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "lifespan"
        while True:
            message = await receive()
            received.append(message["type"])
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return

    middleware = RateLimitMiddleware(inner, limiter=RateLimiter(ip_limit="1/minute"))
    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])

    async def receive() -> dict[str, str]:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message)

    await middleware({"type": "lifespan"}, receive, send)
    assert received == ["lifespan.startup", "lifespan.shutdown"]
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]

    failed = {"type": "lifespan.startup.failed", "message": "boom"}

    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send(failed)

    sent.clear()
    messages = iter([{"type": "lifespan.startup"}])
    await RateLimitMiddleware(failing, limiter=RateLimiter())({"type": "lifespan"}, receive, send)
    assert sent == [failed]


async def test_per_level_memory_state_uses_fake_clock() -> None:
    clock = FakeClock()
    limiter = RateLimiter(backend=MemoryBackend(clock=clock), ip_limit="1/second")
    app = make_app(limiter)
    async with client_for(app) as client:
        assert (await client.get("/hello")).status_code == 200
        denied = await client.get("/hello")
        assert denied.status_code == 429
        clock.advance(float(denied.headers["retry-after"]))
        assert (await client.get("/hello")).status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ip_limit": "0/minute"}, "ip_limit.limit"),
        ({"ip_limit": "5/minute;burst=9"}, "ip_limit: policy 'ip': rate.burst"),
        ({"endpoint_limits": {"/no-method": "1/minute"}}, "endpoint_limits"),
        ({"costs": {"POST /x": 0}}, "costs['POST /x']"),
        ({"headers": "fancy"}, "headers"),
        ({"on_backend_error": "maybe"}, "on_backend_error"),
        ({"tiers": {}}, "tiers"),
        ({"user_limit": "1/second", "tiers": {"free": "1/second"}}, "user_limit"),
        ({"trusted_proxies": ["10.0.0.1/8"]}, "trusted_proxies"),
        ({"ipv6_prefix": 0}, "ipv6_prefix"),
        ({"trust_unix_socket": "yes"}, "trust_unix_socket"),
        ({"composite_limits": [CompositeLimit(("user",), "1/second")]}, "composite_limits.parts"),
        ({"shadow": "ip"}, "shadow"),
        ({"backend": object()}, "backend"),
        ({"user_resolver": 5}, "user_resolver"),
        # Found in the session-25 audit: each raised another exception, or was taken and
        # then never used.
        ({"api_key_header": "X-Ключ"}, "api_key_header"),
        ({"api_key_header": "X API Key"}, "api_key_header"),
        ({"api_key_query": ["api_key"]}, "api_key_query"),
        ({"api_key_limit": "5/minute", "api_key_header": None}, "api_key_limit"),
        ({"endpoint_limits": [("GET /x", "5/minute")]}, "endpoint_limits"),
        (
            {"composite_limits": CompositeLimit(("user", "ip"), "5/minute")},
            "composite_limits",
        ),
        (
            {"composite_limits": [CompositeLimit(("user", "ip"), "5/minute", algorithm="x")]},
            "composite_limits['user+ip'].algorithm",
        ),
        (
            {
                "composite_limits": [
                    CompositeLimit(("api_key", "endpoint"), "2/minute"),
                    CompositeLimit(("api_key", "endpoint"), "3/hour"),
                ]
            },
            "composite_limits",
        ),
        ({"tiers": {"free": "1/second"}, "user_tiers": {"alice": ["free"]}}, "user_tiers['alice']"),
        ({"tiers": {"free": "1/second"}, "default_tier": ["free"]}, "default_tier"),
        ({"user_limit": "5/minute", "tier_resolver": lambda request: "pro"}, "tier_resolver"),
        ({"forwarded_headers": None}, "forwarded_headers"),
        ({"refresh_interval": True}, "refresh_interval"),
        ({"fallback": "yes"}, "fallback"),
        ({"allow_any_network": "yes"}, "allow_any_network"),
    ],
)
def test_bad_configuration_fails_at_construction(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        RateLimiter(**kwargs)
    assert info.value.field == field


async def test_two_composite_limits_on_the_same_parts_with_names_of_their_own() -> None:
    limiter = RateLimiter(
        composite_limits=[
            CompositeLimit(("api_key", "endpoint"), "2/minute", name="key-minute"),
            CompositeLimit(("api_key", "endpoint"), "3/hour", name="key-hour"),
        ]
    )
    app = make_app(limiter)
    async with client_for(app) as client:
        answers = [await client.get("/hello", headers={"X-API-Key": "k1"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert set(policies(answers[0])) == {"key-minute", "key-hour"}


def test_bad_middleware_configuration() -> None:
    with pytest.raises(ConfigurationError, match=r"^limiter: "):
        RateLimitMiddleware(FastAPI(), limiter=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^exempt: "):
        RateLimitMiddleware(FastAPI(), limiter=RateLimiter(), exempt="/health")


@pytest.mark.parametrize("make_backend", BACKEND_KINDS[:2], indirect=True)
async def test_memory_and_redis_backends_behave_alike(make_backend: Any) -> None:
    backend = make_backend()
    limiter = RateLimiter(
        backend=backend,
        global_limit="100/minute",
        ip_limit="30/minute",
        endpoint_limits={"POST /ocr/process": "100/minute"},
        api_key_limit="50/minute",
        costs={"POST /ocr/process": 10},
        algorithm=Algorithm.GCRA,
    )
    app = make_app(limiter)
    async with client_for(app) as client:
        key = {"x-api-key": "k1"}
        results = [(await client.post("/ocr/process", headers=key)).status_code for _ in range(4)]
    assert results == [200, 200, 200, 429]
    ip_policy = Policy("ip", "30/minute", Algorithm.GCRA)
    verdict = await backend.peek([Check(ip_policy, "ip", "203.0.113.7")])
    assert verdict.decisions[0].remaining == 0


def _denying_limiter(headers: str, builder: Any = None) -> RateLimiter:
    return RateLimiter(
        backend=MemoryBackend(clock=FakeClock()),
        global_limit="100/minute",
        ip_limit="2/minute",
        user_limit="1/minute",
        user_resolver=lambda connection: connection.headers.get("x-user"),
        headers=headers,
        response_builder=builder,
    )


async def _answers(limiter: RateLimiter) -> list[tuple[int, list[tuple[bytes, bytes]], bytes]]:
    """Status, raw headers in order (x-ratelimit-reset's value blanked: it reads the wall
    clock) and body of five requests: allowed, user denied, allowed, IP and user denied, IP
    denied."""
    answers = []
    async with client_for(make_app(limiter)) as client:
        for user in ("alice", "alice", "bob", "bob", "carol"):
            response = await client.get("/hello", headers={"x-user": user})
            raw = [
                (name, b"" if name == b"x-ratelimit-reset" else value)
                for name, value in response.headers.raw
            ]
            answers.append((response.status_code, raw, response.content))
    return answers


@pytest.mark.parametrize("style", ["ietf", "x-ratelimit", "both", "legacy", "none"])
async def test_the_429_is_the_problem_response_byte_for_byte(style: str) -> None:
    # The middleware sends its usual 429 as two ASGI messages without building a Response
    # (the denial flood's path). It must be exactly the response a response_builder gets
    # from default_response: same headers in the same order, same body.
    def through_a_response(decisions: Any, headers: Any) -> Any:
        return default_response(decisions, headers)

    fast = await _answers(_denying_limiter(style))
    built = await _answers(_denying_limiter(style, through_a_response))
    assert [status for status, _, _ in fast] == [200, 429, 200, 429, 429]
    assert fast == built
    assert [json.loads(body)["violated-policies"] for _, _, body in fast[3:]] == [
        ["ip", "user"],
        ["ip"],
    ]


async def test_an_async_user_resolver_is_awaited() -> None:
    async def resolver(connection: Any) -> Any:
        await asyncio.sleep(0)
        return {"id": connection.headers.get("x-user")}

    limiter = RateLimiter(ip_limit="100/minute", user_limit="1/minute", user_resolver=resolver)
    async with client_for(make_app(limiter)) as client:
        statuses = [
            (await client.get("/hello", headers={"x-user": user})).status_code
            for user in ("alice", "alice", "bob")
        ]
    assert statuses == [200, 429, 200]


async def test_endpoint_limits_apply_when_the_middleware_wraps_the_app_itself() -> None:
    """Found in the session-25 audit: RateLimitMiddleware(app, ...) (outermost, or given to
    Mount) resolved no routes, since Starlette sets scope["app"] only inside the app: every
    request was <unmatched> and endpoint limits were silently off."""

    def limiter() -> RateLimiter:
        return RateLimiter(endpoint_limits={"GET /x": "1/minute"})

    def sub_app() -> FastAPI:
        sub = FastAPI()

        @sub.get("/x")
        async def x() -> dict[str, str]:
            return {}

        return sub

    outermost = RateLimitMiddleware(sub_app(), limiter=limiter())
    parent = FastAPI()
    parent.mount("/internal", RateLimitMiddleware(sub_app(), limiter=limiter()))
    for app, path in ((outermost, "/x"), (parent, "/internal/x")):
        async with client_for(app) as client:
            answers = [await client.get(path) for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 429]
        assert set(policies(answers[0])) == {"endpoint"}


@pytest.mark.parametrize(
    ("root_path", "path", "skipped"),
    [
        ("/", "/health", True),  # was "health": limited (found in the session-25 audit)
        ("/api", "/api/health", True),
        ("/api", "/api", False),
        ("/api", "/apihealth", False),  # no "/" boundary: not under the root at all
        ("", "/health/live", True),
    ],
)
def test_exempt_paths_strip_the_root_path_as_starlette_routes_do(
    root_path: str, path: str, skipped: bool
) -> None:
    middleware = RateLimitMiddleware(FastAPI(), limiter=RateLimiter())
    scope = {"type": "http", "method": "GET", "path": path, "root_path": root_path, "headers": []}
    assert middleware._skip(scope) is skipped
