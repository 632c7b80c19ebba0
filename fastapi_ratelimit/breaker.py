"""Circuit breakers.

:class:`CircuitBreaker` guards the rate-limit backend: after ``failure_threshold`` failures in
a row, or a failure rate of ``failure_rate`` over ``window`` seconds (with at least
``min_calls`` calls), it opens and calls skip the backend entirely (no added latency) until
``cooldown`` has passed; then a single probe goes through: success closes it, failure opens it
again. A warning when it opens and a line when it closes again; the probes in between (half
open, then open again while the backend is still down) are logged at DEBUG only, so a long
outage adds no line per cooldown.

:class:`EndpointBreaker` guards the *protected API* (the seed's circuit-breaker integration):
per endpoint, when the share of 5xx responses over ``window`` reaches ``threshold`` (with at
least ``min_requests``), the endpoint answers 503 for ``open_for`` seconds, then lets traffic
probe it again. The open state is shared by every instance through the backend.
"""

from __future__ import annotations

import json
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from loguru import logger

from .control import ControlStore, Mirror, PollPolicy, live
from .errors import ConfigurationError

__all__ = ["CircuitBreaker", "EndpointBreaker"]

State = Literal["closed", "open", "half_open"]

#: Most endpoints an :class:`EndpointBreaker` keeps a window for (or holds open) per process.
#: Endpoints are route templates and a fixed set of methods (see ``costs.endpoint_key``), so
#: a real app stays far below; a window is at most about 4 KB.
MAX_ENDPOINTS = 4096


def _positive(field: str, value: object, *, integer: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value > 0:
        raise ConfigurationError(field, value, "must be a number > 0")


class _Window:
    """Calls and failures per second over the last ``seconds``: O(1) memory per second."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._buckets: deque[list[int]] = deque()  # [second, calls, failures]
        #: Failures in the window (as of the last add or trim): kept, not summed per call.
        self.failures = 0

    def add(self, now: float, failed: bool) -> None:
        second = int(now)
        if self._buckets and self._buckets[-1][0] == second:
            bucket = self._buckets[-1]
        else:
            bucket = [second, 0, 0]
            self._buckets.append(bucket)
        bucket[1] += 1
        bucket[2] += failed
        self.failures += failed
        self._trim(now)

    def totals(self, now: float) -> tuple[int, int]:
        self._trim(now)
        return sum(b[1] for b in self._buckets), sum(b[2] for b in self._buckets)

    def clear(self) -> None:
        self._buckets.clear()
        self.failures = 0

    def _trim(self, now: float) -> None:
        oldest = now - self._seconds
        while self._buckets and self._buckets[0][0] < oldest:
            self.failures -= self._buckets.popleft()[2]


class CircuitBreaker:
    """Closed -> open -> half-open -> closed, around the rate-limit backend."""

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        failure_rate: float = 0.5,
        min_calls: int = 20,
        window: float = 10.0,
        cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _positive("breaker.failure_threshold", failure_threshold, integer=True)
        _positive("breaker.min_calls", min_calls, integer=True)
        _positive("breaker.window", window)
        _positive("breaker.cooldown", cooldown)
        if not (isinstance(failure_rate, (int, float)) and 0 < failure_rate <= 1):
            raise ConfigurationError("breaker.failure_rate", failure_rate, "must be in (0, 1]")
        self._settings = (failure_threshold, failure_rate, min_calls, window, cooldown)
        self._threshold = failure_threshold
        self._rate = failure_rate
        self._min_calls = min_calls
        self._cooldown = cooldown
        self._clock = clock
        self._window = _Window(window)
        self._window_seconds = window
        #: When calls began to be counted (the first failure of a quiet spell): successes
        #: are not counted while nothing fails (``idle``), so the failure rate only speaks
        #: once a whole window of calls has been counted.
        self._counting_since = 0.0
        self._consecutive = 0
        self._state: State = "closed"
        self._opened_at = 0.0
        self._probing = False
        #: Closed, with no failure in the window nor in a row: a success changes nothing, so
        #: callers skip :meth:`record_success` (and :meth:`allow_call` is surely true).
        self.idle = True
        self.listeners: list[Callable[[State], None]] = []
        #: What its log lines name: empty for the whole backend, a node's address for one of
        #: the per-node breakers of a Redis Cluster (see :meth:`for_node`).
        self.node = ""

    def for_node(self, node: str) -> CircuitBreaker:
        """A closed breaker with these settings for one node of a Redis Cluster. It shares
        the listeners (and the clock) of this one."""
        threshold, rate, min_calls, window, cooldown = self._settings
        twin = CircuitBreaker(
            failure_threshold=threshold,
            failure_rate=rate,
            min_calls=min_calls,
            window=window,
            cooldown=cooldown,
            clock=self._clock,
        )
        twin.listeners = self.listeners
        twin.node = node
        return twin

    @property
    def state(self) -> State:
        return self._state

    def shown_state(self) -> State:
        """The state as metrics show it: an open breaker whose cooldown is over lets the next
        call probe, so it shows as half-open (an idle instance would otherwise report "open"
        for ever after the backend came back, and keep the alert firing)."""
        if self._state == "open" and self._clock() - self._opened_at >= self._cooldown:
            return "half_open"
        return self._state

    def retry_after(self) -> int:
        """Seconds until the next probe (for Retry-After on a fail-closed 503)."""
        if self._state != "open":
            return 1
        return max(1, math.ceil(self._opened_at + self._cooldown - self._clock()))

    def allow_call(self) -> bool:
        """May a call go to the backend now? (While half-open: only the single probe.)"""
        if self._state == "closed":
            return True
        if self._state == "open":
            if self._clock() - self._opened_at < self._cooldown:
                return False
            self._change("half_open")
        if self._probing:
            return False
        self._probing = True
        return True

    def record_success(self) -> None:
        self._consecutive = 0
        if self._state == "closed":
            # Successes only matter to the failure rate once something failed lately: while
            # the window holds no failure, skip the bookkeeping.
            if self._window.failures:
                self._window.add(self._clock(), False)
            self.idle = not self._window.failures
            return
        if self._state == "open":
            # A call sent before the breaker opened: the cooldown and its probe decide.
            return
        self._probing = False
        self._window.clear()
        self._change("closed")

    def abandon_probe(self) -> None:
        """The probe ended without telling success from failure (cancelled): the next call
        probes instead."""
        if self._state == "half_open":
            self._probing = False

    def record_failure(self) -> None:
        now = self._clock()
        self._consecutive += 1
        self.idle = False
        if self._state == "half_open":
            self._probing = False
            self._open(now)
            return
        if self._state == "open":
            return
        if not self._window.totals(now)[1]:
            # The first failure of a quiet spell: from now on successes are counted too.
            self._window.clear()
            self._counting_since = now
        self._window.add(now, True)
        calls, failures = self._window.totals(now)
        if self._consecutive >= self._threshold or (
            now - self._counting_since >= self._window_seconds
            and calls >= self._min_calls
            and failures / calls >= self._rate
        ):
            self._open(now)

    def _open(self, now: float) -> None:
        self._opened_at = now
        self._change("open")

    def _change(self, state: State) -> None:
        if state == self._state:
            return
        previous, self._state = self._state, state
        self.idle = False  # the next success (closed) works out whether it is idle again
        if state == "open" and previous == "closed":
            log = logger.warning
        elif state == "closed":
            log = logger.info
        else:  # a probe's comings and goings while the backend is down
            log = logger.debug
        where = f" (node {self.node})" if self.node else ""
        log("rate-limit backend circuit breaker{}: {} -> {}", where, previous, state)
        for listener in self.listeners:
            listener(state)


class EndpointBreaker:
    """Opens an endpoint that keeps failing (5xx), for every instance.

    Args:
        threshold: share of 5xx responses that opens it, reached or passed (default 0.5:
            half or more; 1: every response).
        min_requests: fewest responses in the window before it may open (default 10).
        window: seconds of history per endpoint (default 30).
        open_for: seconds it stays open before traffic probes it again (default 30).
    """

    def __init__(
        self,
        *,
        threshold: float = 0.5,
        min_requests: int = 10,
        window: float = 30.0,
        open_for: float = 30.0,
    ) -> None:
        if not (isinstance(threshold, (int, float)) and 0 < threshold <= 1):
            raise ConfigurationError("endpoint_breaker.threshold", threshold, "must be in (0, 1]")
        _positive("endpoint_breaker.min_requests", min_requests, integer=True)
        _positive("endpoint_breaker.window", window)
        _positive("endpoint_breaker.open_for", open_for)
        self.threshold = threshold
        self.min_requests = min_requests
        self.window = window
        self.open_for = open_for
        self._windows: dict[str, _Window] = {}
        self._store: ControlStore | None = None
        self._mirror: Mirror | None = None
        self._polling = PollPolicy()
        self._local_open: dict[str, float] = {}

    def bind(
        self,
        store: ControlStore | None,
        refresh_interval: float,
        polling: PollPolicy | None = None,
    ) -> None:
        self._store = store
        if polling is not None:
            self._polling = polling
        if store is not None:
            self._mirror = Mirror(store, "breakers", refresh_interval, polling)

    async def open_until(self, endpoint: str) -> float | None:
        """When the endpoint is open: the wall-clock time it closes; else ``None``."""
        now = time.time()
        until = self._local_open.get(endpoint)
        if self._mirror is not None:
            await self._mirror.ensure_loaded()
            entry = self._mirror.entries.get(endpoint)
            if entry is not None and live(entry, now):
                shared = entry.get("expires_at")
                if isinstance(shared, (int, float)):
                    until = max(until or 0.0, float(shared))
        return until if until is not None and until > now else None

    async def record(self, endpoint: str, status: int) -> None:
        """Count one response; open the endpoint when it fails too often."""
        window = self._windows.get(endpoint)
        if window is None:
            if len(self._windows) >= MAX_ENDPOINTS:  # endpoints are route templates: few
                self._windows.clear()
            window = self._windows[endpoint] = _Window(self.window)
        now = time.time()
        window.add(now, status >= 500)
        calls, failures = window.totals(now)
        if calls >= self.min_requests and failures / calls >= self.threshold:
            window.clear()
            until = now + self.open_for
            # Opening is rare (it takes min_requests responses): a scan here is cheap.
            for name, closes in list(self._local_open.items()):
                if closes <= now:
                    del self._local_open[name]
            if len(self._local_open) >= MAX_ENDPOINTS:
                del self._local_open[next(iter(self._local_open))]
            self._local_open[endpoint] = until
            logger.warning(
                "endpoint circuit breaker open: {} ({} of {} failed) for {}s",
                endpoint,
                failures,
                calls,
                self.open_for,
            )
            store = self._store
            if store is not None:
                entry = json.dumps({"expires_at": until, "failures": failures, "calls": calls})
                entries = self._mirror.entries if self._mirror is not None else {}
                stale = [n for n, e in entries.items() if n != endpoint and not live(e, now)]

                async def share() -> None:
                    await store.control_put("breakers", endpoint, entry)
                    if stale:  # breakers that closed since: the shared namespace stays small
                        await store.control_delete("breakers", stale)

                # Through the limiter's breaker; on failure the local breaker still holds.
                await self._polling.call("sharing an open endpoint breaker", share)

    async def cleanup(self) -> int:
        """Delete closed (expired) shared breakers from the backend; returns how many."""
        return await self._mirror.cleanup() if self._mirror is not None else 0

    async def aclose(self) -> None:
        if self._mirror is not None:
            await self._mirror.aclose()
