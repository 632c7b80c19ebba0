"""Operator state shared by every app instance: allow/block lists, stored tiers, open
endpoint breakers, the operator's override and the penalty box.

It lives in the backend (a Redis hash per namespace, or a dict in memory) with a version
counter. Each instance mirrors the namespaces its configuration uses (and no other: a feature
that is not configured never starts a mirror, see README "Propagation") and refreshes the
mirror in the background every ``refresh_interval`` (default 0.5 s, so changes apply
everywhere within 1 s); checking a request against it costs no round trip. A refresh reads
the version alone, and the whole namespace only when the version changed.

Polls go through the limiter's circuit breaker, like requests (:class:`PollPolicy`): while it
is open no poll reaches the backend, and a poll's failure counts towards opening it. Entries
carry their own expiry, checked at match time, so an expired entry stops applying on time
even between refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Any, Protocol, TypeVar, runtime_checkable

from loguru import logger

from .errors import BackendError

__all__ = ["ControlStore", "Mirror", "PollPolicy"]

T = TypeVar("T")
C = TypeVar("C")


@runtime_checkable
class ControlStore(Protocol):
    """What a backend offers for operator state. Values are JSON strings."""

    async def control_load(self, namespace: str) -> tuple[int, dict[str, str]]:
        """The namespace's version and all its entries."""
        ...

    async def control_version(self, namespace: str) -> int: ...

    async def control_put(self, namespace: str, key: str, value: str) -> None:
        """Set one entry and bump the version."""
        ...

    async def control_delete(self, namespace: str, keys: list[str]) -> int:
        """Remove entries, bump the version if any existed; returns how many existed."""
        ...


class Breaker(Protocol):
    """What the polls ask of a :class:`~fastapi_ratelimit.breaker.CircuitBreaker` (a
    protocol: breaker.py builds on this module, not the other way round)."""

    idle: bool

    @property
    def state(self) -> str: ...

    def allow_call(self) -> bool: ...

    def record_success(self) -> None: ...

    def record_failure(self) -> None: ...

    def abandon_probe(self) -> None: ...


class PollPolicy:
    """What the mirrors of one limiter share when they poll the backend.

    - ``breaker``, the request path's :class:`~fastapi_ratelimit.breaker.CircuitBreaker`: a
      poll asks it first, as a request does. While it is open no poll goes out; after each
      cooldown one call probes, and on an idle instance a poll may be that probe. A poll's
      outcome counts like a request's, so polls alone open it when the backend goes away.
    - Their health, logged once per change: one warning when refreshing starts failing, one
      line when every mirror refreshes again; never a line per failed poll.
    """

    def __init__(self, breaker: Breaker | None = None) -> None:
        self.breaker = breaker
        #: The breaker a namespace's polls go through: on a Redis Cluster, the limiter makes
        #: it that of the node holding the namespace (see node_breakers.py).
        self.breaker_for: Callable[[str], Breaker | None] = lambda _: self.breaker
        #: The checks of a write split among the breakers that guard them: one part, the
        #: limiter's breaker, unless the limiter makes it one part per Redis Cluster master.
        self.split: Callable[[Sequence[Any]], Sequence[tuple[Breaker | None, list[Any]]]] = (
            lambda checks: [(self.breaker, list(checks))]
        )
        self._failing: set[str] = set()

    def failed(self, namespace: str, error: Exception) -> None:
        if not self._failing:
            logger.warning(
                "could not refresh operator state ({}) from the backend, keeping the last copy: {}",
                namespace,
                error,
            )
        self._failing.add(namespace)

    def worked(self, namespace: str) -> None:
        if namespace in self._failing:
            self._failing.discard(namespace)
            if not self._failing:
                logger.info("refreshing operator state from the backend works again")

    def forget(self, namespace: str) -> None:
        """A mirror stopped: its failures no longer count."""
        self._failing.discard(namespace)

    async def call(self, what: str, call: Callable[[], Awaitable[T]]) -> T | None:
        """A backend call made on the request path besides the rate-limit check itself (a
        penalty or an open endpoint breaker to share, a refund, a shadow level): through the
        breaker like a request, never raising. Skipped (``None``) while the breaker is open;
        a failure counts towards opening it, is logged at most once per 10 s and gives
        ``None``, so no such call can turn a request into a 5xx or wait on a dead backend
        the breaker already gave up on."""
        return await self._through(self.breaker, what, call)

    async def write(
        self, what: str, checks: Sequence[C], call: Callable[[list[C]], Awaitable[T]]
    ) -> list[T | None]:
        """``call(checks)`` for a write of rate-limit state (a refund, a reported cost, a
        shadow level), as :meth:`call` does, but through the breaker of each part of
        ``checks`` (:attr:`split`): on a Redis Cluster one call per master, each through its
        own breaker, so a master that is down is skipped alone and opens only its own
        breaker, and the other masters' parts still go through. Each part is one call (one
        all-or-nothing ``hit``); results in the order of the parts."""
        parts = self.split(checks)
        if len(parts) == 1:
            breaker, part = parts[0]
            return [await self._through(breaker, what, partial(call, part))]
        return list(
            await asyncio.gather(*(self._through(b, what, partial(call, p)) for b, p in parts))
        )

    async def _through(
        self, breaker: Breaker | None, what: str, call: Callable[[], Awaitable[T]]
    ) -> T | None:
        probe = False
        if breaker is not None and not breaker.idle:
            if not breaker.allow_call():
                return None
            probe = breaker.state == "half_open"
        try:
            result = await call()
        except BackendError as exc:
            if breaker is not None:
                breaker.record_failure()
            self._log_write_failure(what, exc)
            return None
        except BaseException as exc:
            if probe:
                assert breaker is not None
                breaker.abandon_probe()
            if not isinstance(exc, Exception):
                raise  # cancelled: the caller is going away
            self._log_write_failure(what, exc)
            return None
        if breaker is not None and not breaker.idle:
            breaker.record_success()
        return result

    _last_write_failure = 0.0

    def _log_write_failure(self, what: str, error: Exception) -> None:
        now = time.monotonic()
        if now - self._last_write_failure > 10:
            self._last_write_failure = now
            logger.warning("rate limit: {} failed, carrying on without it: {!r}", what, error)


class Mirror:
    """A local copy of one namespace, parsed, refreshed in the background."""

    def __init__(
        self,
        store: ControlStore,
        namespace: str,
        refresh_interval: float,
        policy: PollPolicy | None = None,
    ) -> None:
        self._store = store
        self._namespace = namespace
        self._interval = refresh_interval
        self._policy = policy if policy is not None else PollPolicy()
        self._version = -1
        #: When the store last confirmed the copy (monotonic seconds): an operator call's
        #: refresh may have loaded it long before the first request needs it.
        self._checked_at = 0.0
        #: The local copy, parsed (replaced whole on refresh, never edited in place).
        self.entries: Mapping[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        #: The first load and the start of the loop, shared by the requests that wait for it.
        self._starting: asyncio.Task[None] | None = None
        #: Loaded and refreshing: callers can read :attr:`entries` without awaiting. A plain
        #: attribute (the task's done-callback clears it): it is read on every request.
        self.running = False
        #: Bumped on every change of the local copy, so derived indexes know to rebuild.
        self.generation = 0

    async def cleanup(self) -> int:
        """Delete the namespace's expired entries from the store, then refresh; returns how
        many."""
        removed = await remove_expired(self._store, self._namespace)
        await self.refresh()
        return removed

    async def ensure_loaded(self) -> None:
        """Load the first time (the callers wait for it) and start the background refresh
        loop, which keeps the copy at most ``refresh_interval`` (plus one round trip) behind,
        busy or idle. Concurrent first callers share one load and one loop."""
        if self.running:
            return
        starting = self._starting
        if starting is None:
            self._starting = starting = asyncio.create_task(self._start())
        try:
            # Shielded: a caller that is cancelled must not cancel the others' load.
            await asyncio.shield(starting)
        finally:
            if starting.done() and self._starting is starting:
                self._starting = None

    async def _start(self) -> None:
        # Not loaded, or loaded longer ago than the loop would allow (an operator call made
        # before this instance served anything): look first, so no copy of any age applies.
        if self._version == -1 or time.monotonic() - self._checked_at > self._interval:
            await self.poll()
        if self._task is None or self._task.done():
            self._task = task = asyncio.create_task(
                every(self._interval, self.poll, f"refresh of {self._namespace}")
            )
            task.add_done_callback(self._stopped)
        self.running = True

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if task is self._task:
            self.running = False

    async def aclose(self) -> None:
        """Stop the background refresh (call from the app's shutdown)."""
        starting, self._starting = self._starting, None
        await stop(starting)
        task, self._task = self._task, None
        self.running = False
        await stop(task)
        self._policy.forget(self._namespace)

    async def poll(self) -> None:
        """One refresh through the circuit breaker (the loop's, and the first load): skipped
        while the breaker refuses calls; the version check's outcome counts like a
        request's."""
        breaker = self._policy.breaker_for(self._namespace)
        if breaker is None:
            await self.refresh()
            return
        if not breaker.idle and not breaker.allow_call():
            if self._version == -1:
                self._version = -2  # not loaded; the loop loads it once the breaker allows
            return
        probe = breaker.state == "half_open"  # this poll holds the breaker's one probe
        answered: bool | None = None
        try:
            version = await self._store.control_version(self._namespace)
            answered = True
        except BackendError as exc:
            answered = False
            self._failed(exc)
            return
        except Exception as exc:  # the store answered nonsense: not the backend being down
            self._failed(exc)
            return
        finally:
            if answered is True:
                if not breaker.idle:
                    breaker.record_success()
            elif answered is False or probe:
                # A failure, or a probe that ended without an answer (cancelled, nonsense):
                # give the probe back; the next one comes after another cooldown.
                breaker.record_failure()
        await self._update(version)

    async def refresh(self) -> None:
        """Refresh now if the version changed. Operator calls use it after a change, so this
        instance applies the change at once; it does not ask the breaker."""
        try:
            version = await self._store.control_version(self._namespace)
        except Exception as exc:
            self._failed(exc)
            return
        await self._update(version)

    async def _update(self, version: int) -> None:
        if version != self._version:
            try:
                version, raw = await self._store.control_load(self._namespace)
            except Exception as exc:
                self._failed(exc)
                return
            entries: dict[str, dict[str, Any]] = {}
            for key, value in raw.items():
                try:
                    parsed = json.loads(value)
                except ValueError:
                    continue
                if isinstance(parsed, dict):
                    entries[key] = parsed
            self.entries = entries
            self._version = version
            self.generation += 1
        self._checked_at = time.monotonic()
        self._policy.worked(self._namespace)

    def _failed(self, error: Exception) -> None:
        self._policy.failed(self._namespace, error)
        if self._version == -1:
            self._version = -2  # don't retry synchronously on every request


async def every(interval: float, action: Callable[[], Awaitable[Any] | Any], what: str) -> None:
    """Run ``action`` every ``interval`` seconds until cancelled; a failure is logged, never
    fatal to the loop."""
    while True:
        await asyncio.sleep(interval)
        try:
            result = action()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            logger.warning("{} failed: {!r}", what, exc)


async def stop(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background task and wait for it to finish."""
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def live(entry: Mapping[str, Any], now: float) -> bool:
    expires = entry.get("expires_at")
    return expires is None or (isinstance(expires, (int, float)) and expires > now)


async def remove_expired(store: ControlStore, namespace: str) -> int:
    """Delete a namespace's expired (and unreadable) entries; returns how many."""
    _, raw = await store.control_load(namespace)
    now = time.time()
    stale = [key for key, value in raw.items() if not live_json(value, now)]
    return await store.control_delete(namespace, stale) if stale else 0


def live_json(value: str, now: float) -> bool:
    """Whether a stored entry (JSON) is unexpired; unreadable ones count as expired."""
    try:
        data = json.loads(value)
    except ValueError:
        return False
    return isinstance(data, dict) and live(data, now)
