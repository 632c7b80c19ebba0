"""Operator state shared by every app instance: allow/block lists and stored tiers.

It lives in the backend (a Redis hash per namespace, or a dict in memory) with a version
counter. Each instance mirrors it locally and refreshes the mirror in the background every
``refresh_interval`` (default 0.5 s, so changes apply everywhere within 1 s); checking a
request against it costs no round trip. Entries carry their own expiry, checked at match
time, so an expired entry stops applying on time even between refreshes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

from loguru import logger

from .errors import BackendError

__all__ = ["ControlStore", "Mirror"]


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


class Mirror:
    """A local copy of one namespace, parsed, refreshed in the background."""

    def __init__(self, store: ControlStore, namespace: str, refresh_interval: float) -> None:
        self._store = store
        self._namespace = namespace
        self._interval = refresh_interval
        self._version = -1
        #: The local copy, parsed (replaced whole on refresh, never edited in place).
        self.entries: Mapping[str, dict[str, Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        #: Loaded and refreshing: callers can read :attr:`entries` without awaiting. A plain
        #: attribute (the task's done-callback clears it): it is read on every request.
        self.running = False
        #: Bumped on every change of the local copy, so derived indexes know to rebuild.
        self.generation = 0

    async def ensure_loaded(self) -> None:
        """Load synchronously the first time and start the background refresh loop, which
        keeps the copy at most ``refresh_interval`` (plus one round trip) behind, busy or idle.
        """
        if self._task is None or self._task.done():
            if self._version == -1:
                await self.refresh()
            self._task = task = asyncio.create_task(
                every(self._interval, self.refresh, f"refresh of {self._namespace}")
            )
            self.running = True
            task.add_done_callback(self._stopped)

    def _stopped(self, task: asyncio.Task[None]) -> None:
        if task is self._task:
            self.running = False

    async def aclose(self) -> None:
        """Stop the background refresh (call from the app's shutdown)."""
        task, self._task = self._task, None
        self.running = False
        await stop(task)

    async def refresh(self) -> None:
        try:
            version = await self._store.control_version(self._namespace)
            if version == self._version:
                return
            version, raw = await self._store.control_load(self._namespace)
        except BackendError as exc:
            if not self._failing:
                self._failing = True
                logger.warning("could not refresh {} from the backend: {}", self._namespace, exc)
            if self._version < 0:
                self._version = -2  # don't retry synchronously on every request
            return
        if self._failing:
            self._failing = False
            logger.info("refreshing {} from the backend works again", self._namespace)
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
