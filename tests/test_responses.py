"""Problem-details responses: exact bodies, headers, and nothing internal in them."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fastapi_ratelimit import Decision
from fastapi_ratelimit.headers import HeaderStyle, rate_limit_headers
from fastapi_ratelimit.responses import (
    PROBLEM_JSON,
    backend_unavailable_response,
    quota_exceeded_response,
    reduced_capacity_response,
)

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"


def problem(response: Response) -> Any:
    return json.loads(bytes(response.body))


def header_values(response: Response, name: bytes) -> list[bytes]:
    return [value for key, value in response.raw_headers if key == name]


def header(response: Response, name: bytes) -> bytes:
    [value] = header_values(response, name)
    return value


# -- 429 -----------------------------------------------------------------------------------


def test_quota_exceeded_exact_body_and_headers() -> None:
    decisions = [
        Decision(True, 10_000, 9000, 1.0, 0.0, "global", "global", 1.0),
        Decision(False, 300, 0, 60.0, 12.3, "ip", "ip", 60.0),
        Decision(False, 20, 0, 60.0, 4.0, "user-free", "user", 60.0),
    ]
    response = quota_exceeded_response(decisions)
    assert response.status_code == 429
    assert header(response, b"content-type") == b"application/problem+json"
    assert response.media_type == PROBLEM_JSON
    assert response.body == (
        b'{"type":"https://iana.org/assignments/http-problem-types#quota-exceeded",'
        b'"title":"Request cannot be satisfied as assigned quota has been exceeded",'
        b'"status":429,"detail":"Rate limit exceeded at the ip level.",'
        b'"violated-policies":["ip","user-free"],"scope":"ip","retry_after":13}'
    )
    assert list(problem(response)) == [
        "type",
        "title",
        "status",
        "detail",
        "violated-policies",
        "scope",
        "retry_after",
    ]
    assert header(response, b"retry-after") == b"13"
    assert header(response, b"content-length") == str(len(response.body)).encode()


def test_scope_is_the_binding_denied_level() -> None:
    decisions = [
        Decision(False, 300, 0, 60.0, 1.0, "ip", "ip", 60.0),
        Decision(False, 20, 0, 3600.0, 900.5, "user-hourly", "user+endpoint", 3600.0),
    ]
    body = problem(quota_exceeded_response(decisions))
    assert body["scope"] == "user+endpoint"
    assert body["detail"] == "Rate limit exceeded at the user+endpoint level."
    assert body["violated-policies"] == ["ip", "user-hourly"]
    assert body["retry_after"] == 901


def test_violated_policies_are_deduplicated_in_order() -> None:
    decisions = [
        Decision(False, 5, 0, 1.0, 0.5, "burst", "user", 1.0),
        Decision(False, 300, 0, 60.0, 2.0, "ip", "ip", 60.0),
        Decision(False, 5, 0, 1.0, 0.5, "burst", "api_key", 1.0),
        Decision(True, 100, 50, 60.0, 0.0, "allowed-one", "global", 60.0),
    ]
    body = problem(quota_exceeded_response(decisions))
    assert body["violated-policies"] == ["burst", "ip"]


@pytest.mark.parametrize(("retry_after", "expected"), [(0.000001, 1), (0.2, 1), (1.0, 1), (1.2, 2)])
def test_quota_exceeded_retry_after_is_whole_and_at_least_one(
    retry_after: float, expected: int
) -> None:
    decisions = [Decision(False, 10, 0, 60.0, retry_after, "ip", "ip", 60.0)]
    response = quota_exceeded_response(decisions)
    assert header(response, b"retry-after") == str(expected).encode()
    assert problem(response)["retry_after"] == expected


def test_quota_exceeded_appends_rate_limit_headers_once() -> None:
    decisions = [Decision(False, 10, 0, 60.0, 2.5, "ip", "ip", 60.0)]
    extra = [
        (b"ratelimit-policy", b'"ip";q=10;w=60'),
        (b"ratelimit", b'"ip";r=0;t=3'),
        (b"x-ratelimit-limit", b"10"),
        (b"x-ratelimit-remaining", b"0"),
        (b"x-ratelimit-reset", b"1003"),
        (b"x-ratelimit-used", b"10"),
        (b"x-ratelimit-scope", b"ip"),
    ]
    response = quota_exceeded_response(decisions, headers=extra)
    body = str(len(response.body)).encode()
    assert sorted(response.raw_headers) == sorted(
        [
            *extra,
            (b"retry-after", b"3"),
            (b"content-length", body),
            (b"content-type", b"application/problem+json"),
        ]
    )


def test_given_retry_after_is_not_duplicated() -> None:
    decisions = [Decision(False, 10, 0, 60.0, 2.5, "ip", "ip", 60.0)]
    response = quota_exceeded_response(decisions, headers=[(b"retry-after", b"7")])
    assert header_values(response, b"retry-after") == [b"7"]


def test_extra_headers_cannot_break_the_framing() -> None:
    decisions = [Decision(False, 10, 0, 60.0, 2.5, "ip", "ip", 60.0)]
    response = quota_exceeded_response(
        decisions, headers=[(b"content-length", b"1"), (b"content-type", b"text/html")]
    )
    assert header_values(response, b"content-length") == [str(len(response.body)).encode()]
    assert header_values(response, b"content-type") == [b"application/problem+json"]


@pytest.mark.parametrize(
    "decisions",
    [[], [Decision(True, 100, 99, 60.0, 0.0, "ip", "ip", 60.0)]],
)
def test_quota_exceeded_needs_a_denial(decisions: list[Decision]) -> None:
    with pytest.raises(ValueError, match="denied"):
        quota_exceeded_response(decisions)


def test_quota_exceeded_body_holds_nothing_internal() -> None:
    # Only the policy name, the scope and the rounded wait come from the decisions: counts,
    # limits and exact timings (which help probe the algorithm) stay out of the body.
    decisions = [Decision(False, 7777, 0, 4242.5, 3.25, "ip", "ip", 6161.0)]
    body = problem(quota_exceeded_response(decisions))
    assert set(body) == {
        "type",
        "title",
        "status",
        "detail",
        "violated-policies",
        "scope",
        "retry_after",
    }
    text = json.dumps(body)
    for leak in ("7777", "4242", "6161", "3.25", "rl:", "Traceback", "Error"):
        assert leak not in text


# -- 503 -----------------------------------------------------------------------------------


def test_backend_unavailable_exact() -> None:
    response = backend_unavailable_response()
    assert response.status_code == 503
    assert header(response, b"content-type") == b"application/problem+json"
    assert response.body == (
        b'{"type":"about:blank","title":"Service Unavailable","status":503,'
        b'"detail":"Rate limiting is temporarily unavailable."}'
    )
    assert header(response, b"retry-after") == b"1"


def test_backend_unavailable_retry_after() -> None:
    response = backend_unavailable_response(30)
    assert header(response, b"retry-after") == b"30"
    assert problem(response)["status"] == 503


def test_backend_unavailable_says_nothing_about_the_backend() -> None:
    text = bytes(backend_unavailable_response(5).body).decode().lower()
    for leak in ("redis", "6379", "127.0.0.1", "localhost", ".sock", "error", "timeout"):
        assert leak not in text


def test_reduced_capacity_exact() -> None:
    extra = [(b"ratelimit-policy", b'"shed";q=10;w=60')]
    response = reduced_capacity_response(12, headers=extra)
    assert response.status_code == 503
    assert header(response, b"content-type") == b"application/problem+json"
    assert problem(response) == {
        "type": REDUCED_CAPACITY,
        "title": "Temporary reduced capacity",
        "status": 503,
        "detail": "The service is temporarily operating at reduced capacity.",
    }
    assert header(response, b"retry-after") == b"12"
    assert header(response, b"ratelimit-policy") == b'"shed";q=10;w=60'


def test_reduced_capacity_keeps_a_given_retry_after() -> None:
    response = reduced_capacity_response(12, headers=[(b"retry-after", b"20")])
    assert header_values(response, b"retry-after") == [b"20"]


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, "3", None, True, False])
def test_bad_retry_after_is_rejected(bad: object) -> None:
    with pytest.raises(ValueError, match="retry_after"):
        backend_unavailable_response(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_after"):
        reduced_capacity_response(bad)  # type: ignore[arg-type]


# -- over the wire -------------------------------------------------------------------------


async def test_responses_survive_a_real_asgi_round_trip() -> None:
    decisions = [Decision(False, 10, 0, 60.0, 0.2, "ip", "ip", 60.0)]

    async def limited(request: Request) -> Response:
        extra = rate_limit_headers(decisions, HeaderStyle.IETF, now=0.0)
        return quota_exceeded_response(decisions, headers=extra)

    async def down(request: Request) -> Response:
        return backend_unavailable_response(2)

    app = Starlette(routes=[Route("/limited", limited), Route("/down", down)])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        first = await client.get("/limited")
        assert first.status_code == 429
        assert first.headers["content-type"] == PROBLEM_JSON
        assert first.headers.get_list("retry-after") == ["1"]
        assert first.headers["ratelimit"] == '"ip";r=0;t=1'
        assert first.json()["type"] == QUOTA_EXCEEDED
        second = await client.get("/down")
        assert second.status_code == 503
        assert second.headers["retry-after"] == "2"
        assert second.json()["detail"] == "Rate limiting is temporarily unavailable."
