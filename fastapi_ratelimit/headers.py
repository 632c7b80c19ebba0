"""Rate-limit response headers: the only module that knows their formats.

Four families are in use in the wild, and clients differ in which they read:

* ``ietf`` -- the current draft-ietf-httpapi-ratelimit-headers syntax, two Structured Fields
  (RFC 9651)::

      RateLimit-Policy: "ip";q=300;w=60, "user-pro";q=2000;w=60
      RateLimit: "user-pro";r=12;t=41

* ``x-ratelimit`` -- the de-facto ``X-RateLimit-Limit/-Remaining/-Reset/-Used/-Scope`` set,
  with ``Reset`` as a Unix epoch;
* ``both`` -- the two above together;
* ``legacy`` -- the older drafts' ``RateLimit-Limit/-Remaining/-Reset``, ``Reset`` in delta
  seconds;
* ``none`` -- no header at all.

Every number sent is an integer of seconds rounded *up*: a client that waits what we announce
must never arrive early. ``Retry-After`` (:func:`retry_after_value`) is never shorter than the
``t`` announced in ``RateLimit`` for the same decisions, as the draft requires.

Header names are lower-case bytes and values latin-1 bytes, ready for an ASGI ``http.response
.start`` message, so the middleware adds them without any conversion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from functools import lru_cache
from operator import itemgetter

from .decision import Decision, binding_of
from .errors import ConfigurationError

__all__ = [
    "HEADER_NAMES",
    "HeaderStyle",
    "binding_retry_after",
    "ietf_admitted",
    "parse_header_style",
    "policy_header",
    "rate_limit_headers",
    "retry_after_value",
]


class HeaderStyle(StrEnum):
    """Which rate-limit headers responses carry."""

    IETF = "ietf"
    X_RATELIMIT = "x-ratelimit"
    BOTH = "both"
    LEGACY = "legacy"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


def parse_header_style(value: str | HeaderStyle) -> HeaderStyle:
    """The :class:`HeaderStyle` named by ``value`` (case-insensitive; ``_`` may stand for ``-``).

    Raises:
        ConfigurationError: (field ``"headers"``) for anything else.
    """
    if isinstance(value, HeaderStyle):
        return value
    if isinstance(value, str):
        # Environment variables and settings files often spell it X_RATELIMIT or " IETF".
        try:
            return HeaderStyle(value.strip().lower().replace("_", "-"))
        except ValueError:
            pass
    choices = ", ".join(repr(s.value) for s in HeaderStyle)
    raise ConfigurationError("headers", value, f"must be one of {choices}")


# Module constants: looking a member up on an Enum class runs Python code (about 150 ns in
# 3.11), and the styles are compared on every response.
_IETF, _X, _BOTH, _LEGACY, _NONE = (
    HeaderStyle.IETF,
    HeaderStyle.X_RATELIMIT,
    HeaderStyle.BOTH,
    HeaderStyle.LEGACY,
    HeaderStyle.NONE,
)

#: The header names each style writes (the middleware drops an app's own copies of them).
HEADER_NAMES: dict[HeaderStyle, frozenset[bytes]] = {
    HeaderStyle.IETF: frozenset({b"ratelimit-policy", b"ratelimit"}),
    HeaderStyle.X_RATELIMIT: frozenset(
        {
            b"x-ratelimit-limit",
            b"x-ratelimit-remaining",
            b"x-ratelimit-reset",
            b"x-ratelimit-used",
            b"x-ratelimit-scope",
        }
    ),
    HeaderStyle.LEGACY: frozenset({b"ratelimit-limit", b"ratelimit-remaining", b"ratelimit-reset"}),
    HeaderStyle.NONE: frozenset(),
}
HEADER_NAMES[HeaderStyle.BOTH] = (
    HEADER_NAMES[HeaderStyle.IETF] | HEADER_NAMES[HeaderStyle.X_RATELIMIT]
)


def rate_limit_headers(
    decisions: Sequence[Decision], style: HeaderStyle, *, now: float
) -> list[tuple[bytes, bytes]]:
    """The rate-limit headers for one request's ``decisions``, in ``style``.

    ``now`` is the current Unix time in seconds; only ``X-RateLimit-Reset`` uses it. The
    figures other than ``RateLimit-Policy`` describe the most restrictive decision (the one
    :attr:`Verdict.binding` picks). No decision, no header.
    """
    if not decisions or style == _NONE:
        return []
    binding = binding_of(decisions)
    t = _reset_seconds(binding)
    remaining = max(binding.remaining, 0)
    # == rather than `is`: a plain "ietf" string compares equal to the member too.
    if style == _IETF:
        return _ietf(decisions, binding, remaining, t)
    if style == _X:
        return _x_ratelimit(binding, remaining, t, now)
    if style == _BOTH:
        return _ietf(decisions, binding, remaining, t) + _x_ratelimit(binding, remaining, t, now)
    if style == _LEGACY:
        return [
            (b"ratelimit-limit", b"%d" % binding.limit),
            (b"ratelimit-remaining", b"%d" % remaining),
            (b"ratelimit-reset", b"%d" % t),
        ]
    # Settings go through parse_header_style; anything else here is a programming error.
    raise ValueError(f"unknown header style {style!r}")


def retry_after_value(decisions: Sequence[Decision]) -> int:
    """Whole seconds for ``Retry-After``: at least 1, and never less than the ``t`` of the
    ``RateLimit`` header built from the same decisions.

    A client honouring ``Retry-After: 0`` would retry at once and be refused again, and one
    told to come back before ``t`` would see the two headers disagree; hence both floors.
    """
    if not decisions:
        return 1
    return binding_retry_after(binding_of(decisions))


def binding_retry_after(binding: Decision) -> int:
    """:func:`retry_after_value` of decisions whose binding one (:func:`~.decision.binding_of`)
    is ``binding``, for callers that have it already."""
    # One number covers both floors: with a denial, the binding decision is the one with the
    # longest wait, and t is that wait rounded up (at least 1); without one, t is all there is.
    return max(_reset_seconds(binding), 1)


def _reset_seconds(decision: Decision) -> int:
    """``t``: seconds until the quota is available again."""
    if decision.allowed:
        reset = decision.reset_after
        return math.ceil(reset) if reset > 0 else 0
    # A denied client must wait at least a second: t=0 would invite an immediate retry.
    retry = decision.retry_after
    return math.ceil(retry) if retry > 1 else 1


def _ietf(
    decisions: Sequence[Decision], binding: Decision, remaining: int, t: int
) -> list[tuple[bytes, bytes]]:
    status = b'"%s";r=%d;t=%d' % (_name_bytes(binding.policy), remaining, t)
    return [(b"ratelimit-policy", policy_header(decisions)), (b"ratelimit", status)]


def policy_header(decisions: Sequence[Decision]) -> bytes:
    """The ``RateLimit-Policy`` value of ``decisions`` (built once per combination)."""
    # The cache key is built by C code alone (itemgetter and map): no Python frame per level.
    return _policy_header(tuple(map(_POLICY_FIELDS, decisions)))


def ietf_admitted(policies: bytes, binding: Decision) -> list[tuple[bytes, bytes]]:
    """The ``ietf`` headers of an admitted request, its ``RateLimit-Policy`` value given
    (:func:`policy_header`): :func:`rate_limit_headers` for a caller that knows the binding
    decision already and keeps the policy header (the express path)."""
    reset = binding.reset_after
    status = b'"%s";r=%d;t=%d' % (
        _name_bytes(binding.policy),
        binding.remaining,
        math.ceil(reset) if reset > 0 else 0,
    )
    return [(b"ratelimit-policy", policies), (b"ratelimit", status)]


#: A decision's (policy, limit, window): what its ``RateLimit-Policy`` member is made of.
_POLICY_FIELDS = itemgetter(*map(Decision._fields.index, ("policy", "limit", "window")))


@lru_cache(maxsize=1024)
def _name_bytes(name: str) -> bytes:
    # The sf-string without its quotes, checked once per policy name.
    return _sf_string(name)[1:-1].encode("ascii")


@lru_cache(maxsize=1024)
def _policy_header(policies: tuple[tuple[str, int, float], ...]) -> bytes:
    # The same few combinations of policies repeat request after request: build each once.
    members: list[str] = []
    seen: set[str] = set()
    for name, limit, window in policies:
        # Two checks may share a policy (e.g. the same policy at two scopes); a list with the
        # same name twice would leave clients guessing which one a RateLimit member refers to.
        if name not in seen:
            seen.add(name)
            members.append(_policy_member(name, limit, window))
    return ", ".join(members).encode("ascii")


def _x_ratelimit(
    binding: Decision, remaining: int, t: int, now: float
) -> list[tuple[bytes, bytes]]:
    return [
        (b"x-ratelimit-limit", b"%d" % binding.limit),
        (b"x-ratelimit-remaining", b"%d" % remaining),
        (b"x-ratelimit-reset", b"%d" % math.ceil(now + t)),
        (b"x-ratelimit-used", b"%d" % max(binding.limit - remaining, 0)),
        (b"x-ratelimit-scope", str(binding.scope).encode("latin-1")),
    ]


@lru_cache(maxsize=1024)
def _policy_member(name: str, limit: int, window: float) -> str:
    # Policies are few and fixed, so each member is formatted (and its name checked) once.
    # The draft's w is a non-zero integer of seconds: sub-second windows round up to 1.
    w = max(math.ceil(window), 1)
    return f"{_sf_string(name)};q={max(limit, 0)};w={w}"


@lru_cache(maxsize=1024)
def _sf_string(value: str) -> str:
    """``value`` as a Structured Field String (RFC 9651, section 3.3.3)."""
    # Policy names are validated to [A-Za-z0-9_.-]; this guards the format, not the input.
    if not value.isascii() or not value.isprintable():
        raise ValueError(f"not representable as a structured-field string: {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
