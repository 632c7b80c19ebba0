"""The error responses the limiter sends: RFC 9457 problem details with ``Retry-After``.

* :func:`quota_exceeded_response` -- 429 with the ``quota-exceeded`` problem type of
  draft-ietf-httpapi-ratelimit-headers, naming the violated policies;
* :func:`backend_unavailable_response` -- 503 when the storage cannot answer and the limiter
  fails closed;
* :func:`reduced_capacity_response` -- 503 with the draft's ``temporary-reduced-capacity`` type,
  for load shedding;
* :func:`cost_exceeds_limit_response` -- 403 for a request costing more than a level ever
  admits: no ``Retry-After``, since no wait would let it pass.

Bodies carry only what the client may know anyway: policy names and scopes (already in the
headers) and whole seconds. Never storage keys, client identities, hashes or exception text,
which would help an attacker map the limiter or its infrastructure.

Header formats live in :mod:`fastapi_ratelimit.headers`; here they are only attached.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import lru_cache
from operator import itemgetter, methodcaller
from typing import Any

from starlette.responses import Response

from .decision import Decision, binding_of
from .headers import binding_retry_after

__all__ = [
    "PROBLEM_JSON",
    "backend_unavailable_response",
    "bad_request_response",
    "blocked_response",
    "cost_exceeds_limit_response",
    "endpoint_unavailable_response",
    "quota_exceeded_parts",
    "quota_exceeded_response",
    "reduced_capacity_response",
]

PROBLEM_JSON = "application/problem+json"

QUOTA_EXCEEDED_TYPE = "https://iana.org/assignments/http-problem-types#quota-exceeded"
QUOTA_EXCEEDED_TITLE = "Request cannot be satisfied as assigned quota has been exceeded"
REDUCED_CAPACITY_TYPE = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
REDUCED_CAPACITY_TITLE = "Temporary reduced capacity"
COST_EXCEEDS_LIMIT_TYPE = "tag:fastapi-ratelimit,2026:cost-exceeds-limit"

# Extra headers may not override these: the body, and so its length and type, is ours.
_OWN_HEADERS = frozenset({b"content-length", b"content-type"})
# Extra headers none of which is named so are appended as they are (the rate-limit headers).
_FILTERED = _OWN_HEADERS | {b"retry-after"}
_CONTENT_TYPE = (b"content-type", PROBLEM_JSON.encode("latin-1"))
_NAME = itemgetter(0)
_LOWER = methodcaller("lower")
# One encoder for every body: json.dumps with any non-default argument builds a new
# JSONEncoder per call, a measurable share of each 429 under a flood.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def _json(body: dict[str, Any]) -> bytes:
    """A problem body, compact; ASCII since the encoder escapes everything else."""
    return _ENCODE(body).encode("ascii")


def quota_exceeded_response(
    decisions: Sequence[Decision], *, headers: Sequence[tuple[bytes, bytes]] = ()
) -> Response:
    """429 for a request that at least one level denied.

    ``headers`` are the rate-limit headers already built by :mod:`~fastapi_ratelimit.headers`
    (raw ASGI pairs); they are appended as they are. ``Retry-After`` is added unless they hold
    one already.

    Raises:
        ValueError: when no decision is a denial (a 429 would then be a lie).
    """
    content, retry_after = _quota_exceeded_body(decisions)
    response = Response(content, status_code=429, media_type=PROBLEM_JSON)
    response.raw_headers += _after_framing(retry_after, headers)
    return response


def quota_exceeded_parts(
    decisions: Sequence[Decision], headers: Sequence[tuple[bytes, bytes]]
) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The headers and body of :func:`quota_exceeded_response`, byte for byte, without the
    ``Response`` object: for the middleware, which sends its 429s as two ASGI messages.

    Raises:
        ValueError: when no decision is a denial.
    """
    content, retry_after = _quota_exceeded_body(decisions)
    # As Starlette's Response would frame it: length, then type.
    framing = [(b"content-length", b"%d" % len(content)), _CONTENT_TYPE]
    return framing + _after_framing(retry_after, headers), content


def _quota_exceeded_body(decisions: Sequence[Decision]) -> tuple[bytes, int]:
    """The 429's problem body and its ``retry_after``. Under a flood of denials this runs for
    every request, so everything but the number comes from a cache."""
    denied = [d for d in decisions if not d.allowed]
    if not denied:
        raise ValueError("quota_exceeded_response needs at least one denied decision")
    binding = binding_of(decisions)  # a denied one: the longest wait
    retry_after = binding_retry_after(binding)
    head = _quota_exceeded_head(binding.scope, tuple([d.policy for d in denied]))
    return b"%b%d}" % (head, retry_after), retry_after


@lru_cache(maxsize=1024)
def _quota_exceeded_head(binding_scope: str, policies: tuple[str, ...]) -> bytes:
    """The 429 body up to its ``retry_after`` value. Scopes and policy names come from the
    configuration, so the combinations are few and the cache stays small."""
    scope = str(binding_scope)
    body = {
        "type": QUOTA_EXCEEDED_TYPE,
        "title": QUOTA_EXCEEDED_TITLE,
        "status": 429,
        "detail": f"Rate limit exceeded at the {scope} level.",
        # dict.fromkeys: de-duplicated, first occurrence's order kept.
        "violated-policies": list(dict.fromkeys(str(policy) for policy in policies)),
        "scope": scope,
    }
    # retry_after comes last: its member is appended per response.
    return _json(body)[:-1] + b',"retry_after":'


def backend_unavailable_response(retry_after: int = 1) -> Response:
    """503 when the rate-limit storage failed and the limiter fails closed.

    Deliberately generic: the cause (exception, host, port, socket path) is for the logs only.
    """
    return _unavailable("Rate limiting is temporarily unavailable.", retry_after)


def endpoint_unavailable_response(retry_after: int) -> Response:
    """503 while an endpoint's circuit breaker is open (it keeps failing)."""
    return _unavailable("This endpoint is temporarily unavailable.", retry_after)


def _unavailable(detail: str, retry_after: int) -> Response:
    _check_retry_after(retry_after)
    body = {"type": "about:blank", "title": "Service Unavailable", "status": 503, "detail": detail}
    return _problem(503, body, retry_after, ())


def blocked_response() -> Response:
    """403 for a client on the block-list. It says nothing about why (that is in the audit
    log) and carries no Retry-After: waiting does not help."""
    body = {
        "type": "about:blank",
        "title": "Forbidden",
        "status": 403,
        "detail": "Access denied.",
    }
    content = _json(body)
    return Response(content, status_code=403, media_type=PROBLEM_JSON)


def bad_request_response(detail: str) -> Response:
    """400 for a request the limiter cannot read safely (see ``identity.QueryTooLong``)."""
    body = {"type": "about:blank", "title": "Bad Request", "status": 400, "detail": detail}
    content = _json(body)
    return Response(content, status_code=400, media_type=PROBLEM_JSON)


def cost_exceeds_limit_response(decisions: Sequence[Decision], cost: int) -> Response:
    """403 for a request whose ``cost`` is more than the denied levels admit in a whole window.

    Waiting never helps, so there is no ``Retry-After`` (nor a ``RateLimit`` header, whose
    ``t`` would promise the same): a 429 with one would send the client back for ever. A
    smaller request, or a tier with more room, can pass.
    """
    denied = [d for d in decisions if not d.allowed]
    if not denied:
        raise ValueError("cost_exceeds_limit_response needs at least one denied decision")
    first = denied[0]
    body = {
        "type": COST_EXCEEDS_LIMIT_TYPE,
        "title": "Request cost exceeds the limit",
        "status": 403,
        "detail": (
            f"This request costs {cost} units; policy {first.policy!r} admits at most "
            f"{first.limit} at once, so it can never pass."
        ),
        "violated-policies": list(dict.fromkeys(str(d.policy) for d in denied)),
        "cost": cost,
    }
    content = _json(body)
    return Response(content, status_code=403, media_type=PROBLEM_JSON)


def reduced_capacity_response(
    retry_after: int, *, headers: Sequence[tuple[bytes, bytes]] = ()
) -> Response:
    """503 with the draft's ``temporary-reduced-capacity`` problem type, for load shedding.

    ``headers`` (e.g. a ``RateLimit-Policy`` announcing the lowered quota, as the draft
    suggests) are appended as they are; ``Retry-After`` is added unless they hold one.
    """
    _check_retry_after(retry_after)
    body = {
        "type": REDUCED_CAPACITY_TYPE,
        "title": REDUCED_CAPACITY_TITLE,
        "status": 503,
        "detail": "The service is temporarily operating at reduced capacity.",
    }
    return _problem(503, body, retry_after, headers)


def _check_retry_after(retry_after: int) -> None:
    # bool is an int, and Retry-After: True would be nonsense.
    if isinstance(retry_after, bool) or not isinstance(retry_after, int) or retry_after < 1:
        raise ValueError(f"retry_after must be an integer >= 1, got {retry_after!r}")


def _problem(
    status: int,
    body: dict[str, Any],
    retry_after: int,
    extra: Sequence[tuple[bytes, bytes]],
) -> Response:
    content = _json(body)
    response = Response(content, status_code=status, media_type=PROBLEM_JSON)
    response.raw_headers += _after_framing(retry_after, extra)
    return response


def _after_framing(
    retry_after: int, extra: Sequence[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """``Retry-After`` (unless ``extra`` holds one), then ``extra`` less any framing header."""
    # The rate-limit headers (the usual extra) name none of them: checked by C code alone.
    if _FILTERED.isdisjoint(map(_LOWER, map(_NAME, extra))):
        return [(b"retry-after", b"%d" % retry_after), *extra]
    extra_headers = [(name, value) for name, value in extra if name.lower() not in _OWN_HEADERS]
    if not any(name.lower() == b"retry-after" for name, _ in extra_headers):
        extra_headers.insert(0, (b"retry-after", b"%d" % retry_after))
    return extra_headers


#: ``(decisions, headers) -> Response``: what ``RateLimiter(response_builder=...)`` takes.
ResponseBuilder = Callable[[Sequence[Decision], Sequence[tuple[bytes, bytes]]], Response]


def default_response(
    decisions: Sequence[Decision], headers: Sequence[tuple[bytes, bytes]]
) -> Response:
    """The 429 as problem+json (``response_builder`` replaces it)."""
    return quota_exceeded_response(decisions, headers=headers)
