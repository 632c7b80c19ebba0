"""Fuzz the example app (middleware on) in-process: no input may produce a 5xx.

Schemathesis generates requests from the app's own OpenAPI document and sends them through its
ASGI transport; 429s from the limiter are expected and fine. Then a few hand-made hostile
requests (huge, control-character and non-ASCII header values) go through ``httpx``.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error

from examples.app import app, current_user, limiter
from fastapi_ratelimit import MemoryBackend, RateLimiter, RateLimitMiddleware

schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@pytest.fixture(autouse=True)
def fresh_backend(monkeypatch: pytest.MonkeyPatch) -> MemoryBackend:
    """Each test (each operation) starts with empty counters; the original backend is put back."""
    backend = MemoryBackend()
    monkeypatch.setattr(limiter, "backend", backend)
    return backend


class Resets:
    """Every few examples the counters start again, so that handlers run as well as the 429
    path (an operation whose cost is 50 exhausts the IP level in six requests)."""

    every = 4

    def __init__(self) -> None:
        self.calls = 0

    def tick(self) -> None:
        self.calls += 1
        if self.calls % self.every == 0:
            limiter.backend = MemoryBackend()


def check(case: schemathesis.Case[Any], resets: Resets) -> None:
    resets.tick()
    case.call_and_validate(checks=[not_a_server_error])


FUZZ_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
    database=None,
)


@pytest.fixture
def resets() -> Resets:
    return Resets()


@schema.parametrize()
@FUZZ_SETTINGS
def test_no_server_error(case: schemathesis.Case[Any], resets: Resets) -> None:
    check(case, resets)


def as_header_value(raw: bytes) -> str:
    """Any bytes as a header value ``requests`` lets through (latin-1 text: the ASGI client
    encodes it back to the same bytes): no CR/LF, no leading whitespace. Control characters,
    NUL and bytes >= 0x80 stay."""
    return raw.decode("latin-1").replace("\r", "").replace("\n", "").lstrip()


header_values = st.binary(max_size=300).map(as_header_value)
tokens = st.one_of(
    header_values,
    st.lists(st.sampled_from(["*", ":", "{", "}", "pro", "enterprise", "\xe9", "\x00"])).map(
        "".join
    ),
)
addresses = st.ip_addresses().map(str)


@schema.given(
    token=tokens,
    api_key=st.one_of(st.none(), header_values),
    forwarded_for=st.one_of(st.none(), header_values, addresses),
)
@schema.parametrize()
@FUZZ_SETTINGS
def test_no_server_error_with_identities(
    case: schemathesis.Case[Any],
    resets: Resets,
    token: str,
    api_key: str | None,
    forwarded_for: str | None,
) -> None:
    """The same, with the headers the limiter reads (not in the schema) generated too."""
    case.headers["Authorization"] = f"Bearer {token}"
    if api_key:
        case.headers["X-API-Key"] = api_key
    if forwarded_for:
        case.headers["X-Forwarded-For"] = forwarded_for
    check(case, resets)


HUGE = "A" * 65536

HOSTILE_HEADERS: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("huge authorization", [(b"authorization", b"Bearer " + HUGE.encode())]),
    ("huge bearer user and tier", [(b"authorization", f"Bearer {HUGE}:{HUGE}".encode())]),
    ("huge api key", [(b"x-api-key", HUGE.encode())]),
    ("huge forwarded-for", [(b"x-forwarded-for", HUGE.encode())]),
    ("many forwarded-for", [(b"x-forwarded-for", b", ".join([b"10.0.0.1"] * 8000))]),
    ("control characters", [(b"authorization", b"Bearer a\x00b\x01c\x1f\x7f:pro\x00")]),
    ("control api key", [(b"x-api-key", b"\x00\x01\x02\r\x1b[31m")]),
    ("braces in bearer", [(b"authorization", b"Bearer {user}:{tier}")]),
    ("star and colons", [(b"authorization", b"Bearer *:*:*::")]),
    ("only colons", [(b"authorization", b"Bearer :::")]),
    ("empty user", [(b"authorization", b"Bearer :enterprise")]),
    ("unknown tier", [(b"authorization", b"Bearer bob:root")]),
    ("non-ascii bearer", [(b"authorization", "Bearer jos\xe9:\xfcber".encode("latin-1"))]),
    ("utf-8 bearer", [(b"authorization", "Bearer 用户:专业".encode())]),
    ("invalid utf-8", [(b"authorization", b"Bearer \xff\xfe\xc3(:\x80")]),
    ("non-ascii api key", [(b"x-api-key", b"\xe9\xff\x80key")]),
    ("non-ascii forwarded-for", [(b"x-forwarded-for", b"\xff\xfe, 1.2.3.4, \xc3\xa9")]),
    ("bogus forwarded-for", [(b"x-forwarded-for", b"not-an-ip, ::ffff:999.1.1.1, [::1]:80, ,")]),
    ("repeated headers", [(b"authorization", b"Bearer a"), (b"authorization", b"Bearer b")]),
    (
        "everything at once",
        [
            (b"authorization", b"Bearer \x00{" + HUGE.encode() + b"}:*"),
            (b"x-api-key", b"\xff" * 65536),
            (b"x-forwarded-for", b"\x7f" * 65536),
        ],
    ),
]

TARGETS = [
    ("GET", "/users/me"),
    ("GET", "/users/42"),
    ("POST", "/ocr/process"),
    ("POST", "/ocr/batch"),
    ("POST", "/auth/login"),
    ("GET", "/nowhere"),
]


def proxied_app() -> FastAPI:
    """The hostile forwarding headers matter most when the peer is a trusted proxy and they
    are actually parsed: a small app whose limiter trusts the test client's network."""
    proxied = FastAPI()
    proxied_limiter = RateLimiter(
        headers="both",
        ip_limit="1000/minute",
        api_key_limit="1000/minute",
        user_limit="1000/minute",
        trusted_proxies=["198.51.100.0/24"],
        forwarded_headers=("forwarded", "x-forwarded-for", "x-real-ip"),
        user_resolver=current_user,
    )

    @proxied.get("/users/me")
    async def me() -> dict[str, str]:
        return {"ok": "yes"}

    proxied.add_middleware(RateLimitMiddleware, limiter=proxied_limiter)
    return proxied


async def send_raw(
    client: httpx.AsyncClient, method: str, path: str, headers: list[tuple[bytes, bytes]]
) -> httpx.Response:
    body = b'{"documents": ["a"]}' if path == "/ocr/batch" else b"{}"
    # Raw byte pairs: httpx passes bytes values through as they are.
    request = client.build_request(method, path, content=body, headers=headers)
    return await client.send(request)


@pytest.mark.parametrize(("label", "headers"), HOSTILE_HEADERS, ids=[h[0] for h in HOSTILE_HEADERS])
async def test_hostile_headers_never_5xx(label: str, headers: list[tuple[bytes, bytes]]) -> None:
    for target in (app, proxied_app()):
        transport = httpx.ASGITransport(app=target, client=("198.51.100.9", 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            for method, path in TARGETS:
                response = await send_raw(client, method, path, headers)
                assert response.status_code < 500, (label, method, path, response.text[:200])


FORWARDED_JUNK = [
    b"for=" + b"\xff" * 9000,
    b'for="[' + b":" * 5000 + b']"',
    b"for=unknown;proto=http;by=_x, for=_hidden, for=\x00",
    b'for="\x00\x01", for=1.2.3.4:99999',
    b"for=" + "é".encode() + b";" * 3000,
    b", ".join([b"for=10.0.0.1"] * 5000),
]


@pytest.mark.parametrize("value", FORWARDED_JUNK, ids=range(len(FORWARDED_JUNK)))
async def test_hostile_forwarded_from_trusted_proxy_never_5xx(value: bytes) -> None:
    transport = httpx.ASGITransport(app=proxied_app(), client=("198.51.100.9", 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for name in (b"forwarded", b"x-forwarded-for", b"x-real-ip"):
            response = await send_raw(client, "GET", "/users/me", [(name, value)])
            assert response.status_code == 200, (name, response.text[:200])
            assert "x-ratelimit-limit" in response.headers


async def test_hostile_requests_are_still_limited() -> None:
    """Junk identities don't dodge the IP level: the 301st request from one address is 429."""
    transport = httpx.ASGITransport(app=app, client=("198.51.100.10", 50000))
    statuses: list[int] = []
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        for i in range(301):
            headers = [
                (b"authorization", b"Bearer \x00" + str(i).encode() + b":\xff"),
                (b"x-api-key", b"\xfe" + str(i).encode()),
                (b"x-forwarded-for", str(i).encode()),
            ]
            statuses.append((await send_raw(client, "GET", "/users/me", headers)).status_code)
    assert all(s == 200 for s in statuses[:300]), sorted(set(statuses))
    assert statuses[-1] == 429
