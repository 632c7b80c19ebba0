"""In-process counts of what the limiter decided, for metrics and the dashboard.

Recording runs on every request, so it is plain Python: a few dict increments on ints, no
locks, no I/O, no Redis round trip. Everything that reads the counts (the Prometheus
collector at scrape time, the multiprocess flusher) does so elsewhere and later.

Every label is bounded: endpoints are route templates (``"GET /users/{id}"``), methods outside
the standard set become ``OTHER``, and scopes and tiers come from the configuration. No count is
ever keyed by an identity (IP, API key, user or a hash of one): a client must not be able to
mint series.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from typing import TYPE_CHECKING

from .routing import OTHER_METHOD, STANDARD_METHODS

if TYPE_CHECKING:
    from .context import RequestContext
    from .decision import Verdict

__all__ = ["CHECK_BUCKETS", "DELAY_BUCKETS", "Histogram", "Recorder", "error_kind"]

#: Check durations: the memory backend answers in microseconds, Redis in about a millisecond.
CHECK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
#: Throttling delays are at most 60 s (``RateLimiter(delay=...)``).
DELAY_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Far more scopes than any configuration has; beyond it counts are folded into one "other"
# series rather than growing without end.
_MAX_SERIES = 2048
_OTHER = "other"
# Distinct limited identities kept between two stats ticks (emptied at each).
_MAX_LIMITED = 10_000


class Histogram:
    """Counts per bucket (not cumulative; the last one is +Inf) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bucket (Prometheus' "le").
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class Recorder:
    """The counts for one or more limiters in this process.

    The keys of :attr:`requests` are ``(template, method, tier, reason)`` with ``reason`` empty
    for an admitted request; :attr:`scopes` are keyed by ``(scope, allowed)``.
    """

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.scopes: dict[tuple[str, bool], int] = {}
        self.check_seconds = Histogram(CHECK_BUCKETS)
        self.shadow: dict[tuple[str, bool], int] = {}
        self.backend_errors: dict[str, int] = {}
        self.throttled: dict[bool, int] = {}
        self.delay_seconds = Histogram(DELAY_BUCKETS)
        #: ``(scope, identity) -> denials``, raw identities, only while the live stats track
        #: them (``None``: not tracked). They never leave the process unmasked (stats.py).
        self.limited: dict[tuple[str, str], int] | None = None
        #: Called once, by the first request after it is set, from the event loop: how the
        #: live stats start their background task without a lifespan of their own.
        self.on_first_request: Callable[[], None] | None = None
        # endpoint key -> (template, method), worked out once per endpoint.
        self._labels: dict[str, tuple[str, str]] = {}

    # -- the hot path ----------------------------------------------------------------------

    def request(self, context: RequestContext, verdict: Verdict | None, seconds: float) -> None:
        """One request the limiter decided (``verdict`` None: nothing to check, or the backend
        failed and the policy let it through)."""
        if self.on_first_request is not None:
            self._first_request()
        labels = self._labels.get(context.endpoint) or self._endpoint_labels(context.endpoint)
        tier = context.tier
        reason = ""
        if verdict is not None:
            scopes = self.scopes
            for decision in verdict.decisions:
                key = (decision.scope, decision.allowed)
                count = scopes.get(key)
                if count is None:
                    self._new_scope(key)
                else:
                    scopes[key] = count + 1
            if not verdict.allowed:
                reason = _denied_scope(verdict)
                if self.limited is not None:
                    self._limited(context, reason)
        key4 = (labels[0], labels[1], tier.name if tier is not None else "none", reason)
        requests = self.requests
        requests[key4] = requests.get(key4, 0) + 1
        self.check_seconds.observe(seconds)

    def refused(self, context: RequestContext, reason: str, seconds: float) -> None:
        """A request refused before any limit was checked: ``"blocklist"``,
        ``"endpoint_breaker"`` or ``"backend_unavailable"``."""
        labels = self._labels.get(context.endpoint) or self._endpoint_labels(context.endpoint)
        tier = context.tier
        key = (labels[0], labels[1], tier.name if tier is not None else "none", reason)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.check_seconds.observe(seconds)

    def shadow_decision(self, scope: str, allowed: bool) -> None:
        """A shadow level's answer (counted, never enforced)."""
        key = (scope if len(self.shadow) < _MAX_SERIES else _OTHER, allowed)
        self.shadow[key] = self.shadow.get(key, 0) + 1

    def backend_error(self, kind: str) -> None:
        """The backend failed (``error_kind``) or its circuit breaker refused the call."""
        self.backend_errors[kind] = self.backend_errors.get(kind, 0) + 1

    def delayed(self, seconds: float, allowed: bool) -> None:
        """A throttled request waited ``seconds``, then passed or was refused after all."""
        self.throttled[allowed] = self.throttled.get(allowed, 0) + 1
        self.delay_seconds.observe(seconds)

    # -- the cold path ---------------------------------------------------------------------

    def _endpoint_labels(self, endpoint: str) -> tuple[str, str]:
        method, _, template = endpoint.partition(" ")
        if method not in STANDARD_METHODS:
            # A method a route declares keeps its name in the endpoint key; as a label it
            # becomes one series with every other.
            method = OTHER_METHOD
        labels = (template, method)
        # Templates come from the app's routes, so the labels are bounded; the cache's keys
        # (raw methods) are not: emptied when full, so random methods cost time, never memory.
        if len(self._labels) >= _MAX_SERIES:
            self._labels.clear()
        self._labels[endpoint] = labels
        return labels

    def _first_request(self) -> None:
        start, self.on_first_request = self.on_first_request, None
        if start is not None:
            start()

    def _limited(self, context: RequestContext, scope: str) -> None:
        limited = self.limited
        assert limited is not None
        kind = scope.partition("+")[0]  # a composite level is keyed first on its first part
        identity = {"ip": context.ip, "user": context.user, "api_key": context.api_key}.get(kind)
        if identity is None:
            return  # a shared level (global, endpoint): nobody in particular
        key = (kind, identity)
        if key not in limited and len(limited) >= _MAX_LIMITED:
            return  # a flood of distinct clients: the ones already counted stay the top
        limited[key] = limited.get(key, 0) + 1

    def _new_scope(self, key: tuple[str, bool]) -> None:
        if len(self.scopes) >= _MAX_SERIES:
            key = (_OTHER, key[1])
        self.scopes[key] = self.scopes.get(key, 0) + 1


def _denied_scope(verdict: Verdict) -> str:
    """The reason label of a denial: the scope of the level that refused (the first)."""
    for decision in verdict.decisions:
        if not decision.allowed:
            return decision.scope
    return "unknown"  # pragma: no cover - a denied verdict has a denying decision


def error_kind(error: BaseException | None) -> str:
    """A bounded label for a backend failure: ``circuit_open`` (the breaker refused the call),
    ``timeout``, ``connection`` or ``error``. Never the message (it may name a host)."""
    if error is None:
        return "circuit_open"
    cause = error.__cause__ or error
    names = " ".join(kind.__name__ for kind in type(cause).__mro__)
    if isinstance(cause, TimeoutError) or "Timeout" in names:
        return "timeout"
    if isinstance(cause, ConnectionError) or "Connection" in names:
        return "connection"
    return "error"
