"""Live statistics for the dashboard: per-second buckets, alerts, top limited clients.

The request path only increments the shared :class:`~fastapi_ratelimit.recorder.Recorder`'s
counters. Once a second a background task turns what changed into a bucket, keeps an hour of
them in memory, and writes this instance's summary to the backend (one write a second per
instance, none per request), so that any instance can show the sum over all of them.

Clients are only ever shown masked: an IP as its network (``203.0.113.0/24``, IPv6 ``/48``),
an API key as ``key#`` and 4 hex digits of its SHA-256, a user as its first 4 characters.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import time
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from operator import itemgetter
from typing import Any

from loguru import logger

from .control import ControlStore, every, stop
from .errors import BackendError, ConfigurationError
from .limiter import RateLimiter
from .masking import mask_identity
from .recorder import Recorder

__all__ = ["AlertThresholds", "LiveStats", "backend_summary"]

_NAMESPACE = "stats"
_STALE = 10.0  # seconds: an instance that wrote nothing for this long is gone
# Limited clients are what a flood multiplies, so each layer keeps a bounded share: the
# recorder at most 10,000 between two ticks, each second's bucket its most limited few, the
# window's tally a bounded number (pruned to its top half when full), and the summary an
# instance writes every second only its top entries (enough for the merged top list).
_LIMITED_PER_SECOND = 20
_LIMITED_KEPT = 10_000
_LIMITED_FLUSHED = 100


@dataclass(frozen=True, slots=True)
class AlertThresholds:
    """The seed's alerts over the stats window (an hour by default): a block rate over
    ``critical_block_rate`` % is critical, over ``warning_block_rate`` % a warning, and more
    than ``requests_per_window`` requests is info."""

    critical_block_rate: float = 50.0
    warning_block_rate: float = 30.0
    requests_per_window: int = 100_000

    def __post_init__(self) -> None:
        for name in ("critical_block_rate", "warning_block_rate"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value <= 100
            ):
                raise ConfigurationError(name, value, "must be a percentage in [0, 100]")
        if self.warning_block_rate > self.critical_block_rate:
            raise ConfigurationError(
                "warning_block_rate", self.warning_block_rate, "must not exceed the critical one"
            )
        volume = self.requests_per_window
        if isinstance(volume, bool) or not isinstance(volume, int) or volume < 1:
            raise ConfigurationError("requests_per_window", volume, "must be a whole number >= 1")


@dataclass(slots=True)
class _Bucket:
    at: float
    total: int = 0
    blocked: int = 0
    scopes: dict[str, list[int]] = field(default_factory=dict)  # scope -> [checked, denied]
    tiers: dict[str, list[int]] = field(default_factory=dict)  # tier -> [total, blocked]
    endpoints: dict[str, list[int]] = field(default_factory=dict)
    limited: dict[str, int] = field(default_factory=dict)  # masked identity -> denials
    errors: int = 0


class LiveStats:
    """Per-second stats for ``limiters`` (sharing one recorder with the metrics, if any).

    Args:
        limiters: the :class:`RateLimiter` (s) to watch.
        window: seconds of history kept and summed for the totals and alerts (default 1 h).
        thresholds: :class:`AlertThresholds`.
        top: how many top limited clients to show.
        flush: write this instance's summary to the first limiter's backend every second.
    """

    def __init__(
        self,
        *limiters: RateLimiter,
        window: int = 3600,
        thresholds: AlertThresholds | None = None,
        top: int = 10,
        flush: bool = True,
    ) -> None:
        if not limiters or not all(isinstance(x, RateLimiter) for x in limiters):
            raise ConfigurationError("limiters", limiters, "give one or more RateLimiters")
        if isinstance(window, bool) or not isinstance(window, int) or not 10 <= window <= 86400:
            raise ConfigurationError("window", window, "must be whole seconds in [10, 86400]")
        if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= 100:
            raise ConfigurationError("top", top, "must be in [1, 100]")
        self.limiters = limiters
        self.thresholds = thresholds or AlertThresholds()
        self.top = top
        self.instance = uuid.uuid4().hex[:12]
        existing = [x.recorder for x in limiters if x.recorder is not None]
        self.recorder: Recorder = existing[0] if existing else Recorder()
        for limiter in limiters:
            limiter.recorder = self.recorder
        self.recorder.limited = {}
        self.recorder.on_first_request = self.ensure_started
        backend = limiters[0].backend
        self._store = backend if flush and isinstance(backend, ControlStore) else None
        self._buckets: deque[_Bucket] = deque(maxlen=window)
        #: Denials per masked client over the buckets in the window (see _LIMITED_KEPT).
        self._limited: dict[str, int] = {}
        self._previous: dict[tuple[str, str, str, str], int] = {}
        self._previous_scopes: dict[tuple[str, bool], int] = {}
        self._previous_errors = 0
        self._task: asyncio.Task[None] | None = None
        #: Set after every tick: the dashboard's live feed waits on it.
        self.changed = asyncio.Event()

    # -- the background task -----------------------------------------------------------------

    def ensure_started(self) -> None:
        """Start the once-a-second task (the first request or dashboard visit does)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(
                every(1.0, self.tick_and_flush, "rate-limit stats")
            )

    async def tick_and_flush(self) -> None:
        self.tick()
        if self._store is not None:
            try:
                await self._store.control_put(
                    _NAMESPACE, self.instance, json.dumps(self.local_summary())
                )
            except BackendError as exc:
                logger.debug("rate-limit stats not written: {}", exc)

    def tick(self, now: float | None = None) -> None:
        """Close a bucket: what the recorder counted since the last tick."""
        recorder = self.recorder
        bucket = _Bucket(time.time() if now is None else now)
        current = dict(recorder.requests)
        for key, n in current.items():
            delta = n - self._previous.get(key, 0)
            if not delta:
                continue
            template, method, tier, reason = key
            blocked = delta if reason else 0
            bucket.total += delta
            bucket.blocked += blocked
            _add2(bucket.tiers, tier, delta, blocked)
            _add2(bucket.endpoints, f"{method} {template}", delta, blocked)
        self._previous = current
        scopes = dict(recorder.scopes)
        for (scope, allowed), n in scopes.items():
            delta = n - self._previous_scopes.get((scope, allowed), 0)
            if delta:
                _add2(bucket.scopes, scope, delta, 0 if allowed else delta)
        self._previous_scopes = scopes
        errors = sum(recorder.backend_errors.values())
        bucket.errors, self._previous_errors = errors - self._previous_errors, errors
        if recorder.limited:
            limited, recorder.limited = recorder.limited, {}
            seen: dict[str, int] = {}
            for (kind, identity), n in limited.items():
                masked = mask_identity(kind, identity)
                seen[masked] = seen.get(masked, 0) + n
            bucket.limited = dict(
                heapq.nlargest(_LIMITED_PER_SECOND, seen.items(), key=itemgetter(1))
            )
        self._tally(bucket)
        self._buckets.append(bucket)
        self.changed.set()
        self.changed = asyncio.Event()

    def _tally(self, bucket: _Bucket) -> None:
        """Keep the window's tally of limited clients: the bucket about to leave the window
        is taken out, the new one added."""
        tally = self._limited
        buckets = self._buckets
        if buckets.maxlen is not None and len(buckets) == buckets.maxlen:
            for name, n in buckets[0].limited.items():
                left = tally.get(name, 0) - n
                if left > 0:
                    tally[name] = left
                else:
                    tally.pop(name, None)
        for name, n in bucket.limited.items():
            tally[name] = tally.get(name, 0) + n
        if len(tally) > _LIMITED_KEPT:
            kept = heapq.nlargest(_LIMITED_KEPT // 2, tally.items(), key=itemgetter(1))
            self._limited = dict(kept)

    async def aclose(self) -> None:
        await stop(self._task)
        self._task = None

    # -- summaries -----------------------------------------------------------------------

    def local_summary(self) -> dict[str, Any]:
        """This instance's numbers: window totals, breakdowns, the last two minutes."""
        total = blocked = errors = 0
        scopes: dict[str, list[int]] = {}
        tiers: dict[str, list[int]] = {}
        endpoints: dict[str, list[int]] = {}
        for b in self._buckets:
            total, blocked, errors = total + b.total, blocked + b.blocked, errors + b.errors
            for source, target in ((b.scopes, scopes), (b.tiers, tiers), (b.endpoints, endpoints)):
                for name, (n, d) in source.items():
                    _add2(target, name, n, d)
        limited = dict(heapq.nlargest(_LIMITED_FLUSHED, self._limited.items(), key=itemgetter(1)))
        recent = list(self._buckets)[-120:]
        return {
            "at": time.time(),
            "instances": 1,
            "total": total,
            "blocked": blocked,
            "backend_errors": errors,
            "scopes": scopes,
            "tiers": tiers,
            "endpoints": endpoints,
            "limited": limited,
            "series": [[b.at, b.total, b.blocked] for b in recent],
            "breakers": self._breakers(),
        }

    async def summary(self) -> dict[str, Any]:
        """Every live instance's numbers added up (this one's alone when the backend can't
        say), with the block rate, the alerts and the top limited clients."""
        summaries = [self.local_summary()]
        if self._store is not None:
            summaries += await _instances(self._store, skip=self.instance)
        return _finish(_merge(summaries), self.thresholds, self.top, self._buckets.maxlen)

    def alerts(self, total: int, block_rate: float) -> list[dict[str, Any]]:
        """The seed's three alerts for these numbers."""
        return _alerts(self.thresholds, total, block_rate)

    def _breakers(self) -> dict[str, int]:
        states: dict[str, int] = {}
        for limiter in self.limiters:
            state = limiter.breaker.state if limiter.breaker is not None else "none"
            states[state] = states.get(state, 0) + 1
        return states


async def backend_summary(store: ControlStore, top: int = 10) -> dict[str, Any]:
    """The sum of what every live instance last wrote to ``store`` (for the CLI), with the
    default alert thresholds."""
    return _finish(_merge(await _instances(store)), AlertThresholds(), top, None)


async def _instances(store: ControlStore, skip: str = "") -> list[dict[str, Any]]:
    """The summaries written by the instances heard from lately; stale ones are deleted."""
    try:
        _, entries = await store.control_load(_NAMESPACE)
    except BackendError:
        return []
    now, found, gone = time.time(), [], []
    for instance, text in entries.items():
        if instance == skip:
            continue
        other = _parse(text)
        try:
            fresh = other is not None and now - float(other.get("at", 0)) <= _STALE
        except (TypeError, ValueError):
            fresh = False
        if other is not None and fresh:
            found.append(other)
        else:
            gone.append(instance)
    if gone:
        with contextlib.suppress(BackendError):
            await store.control_delete(_NAMESPACE, gone)
    return found


def _finish(
    merged: dict[str, Any], thresholds: AlertThresholds, top: int, window: int | None
) -> dict[str, Any]:
    total, blocked = merged["total"], merged["blocked"]
    merged["block_rate"] = round(100.0 * blocked / total, 2) if total else 0.0
    merged["alerts"] = _alerts(thresholds, total, merged["block_rate"])
    ranked = sorted(merged.pop("limited").items(), key=lambda item: -item[1])
    merged["top_limited"] = [[name, n] for name, n in ranked[:top]]
    merged["window"] = window
    merged["thresholds"] = asdict(thresholds)
    return merged


def _alerts(t: AlertThresholds, total: int, block_rate: float) -> list[dict[str, Any]]:
    found = []
    if block_rate > t.critical_block_rate:
        title, limit = "High rate limit block rate", t.critical_block_rate
        found.append(_alert("critical", title, block_rate, limit))
    elif block_rate > t.warning_block_rate:
        title, limit = "Elevated rate limit block rate", t.warning_block_rate
        found.append(_alert("warning", title, block_rate, limit))
    if total > t.requests_per_window:
        found.append(_alert("info", "High request volume", total, t.requests_per_window))
    return found


def _add2(target: dict[str, list[int]], name: str, n: int, denied: int) -> None:
    pair = target.get(name)
    if pair is None:
        target[name] = [n, denied]
    else:
        pair[0] += n
        pair[1] += denied


def _alert(severity: str, title: str, value: float, threshold: float) -> dict[str, Any]:
    return {"severity": severity, "title": title, "value": value, "threshold": threshold}


def _parse(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _merge(summaries: Iterable[dict[str, Any]]) -> dict[str, Any]:
    merged: dict[str, Any] = {
        "instances": 0,
        "total": 0,
        "blocked": 0,
        "backend_errors": 0,
        "scopes": {},
        "tiers": {},
        "endpoints": {},
        "limited": {},
        "series": {},
        "breakers": {},
    }
    for s in summaries:
        try:
            for name in ("instances", "total", "blocked", "backend_errors"):
                merged[name] += int(s.get(name, 0))
            for name in ("scopes", "tiers", "endpoints"):
                for key, (n, d) in s.get(name, {}).items():
                    _add2(merged[name], str(key), int(n), int(d))
            for name in ("limited", "breakers"):
                for key, n in s.get(name, {}).items():
                    merged[name][str(key)] = merged[name].get(str(key), 0) + int(n)
            for at, n, d in s.get("series", ()):
                second = int(float(at))
                point = merged["series"].setdefault(second, [0, 0])
                point[0] += int(n)
                point[1] += int(d)
        except (TypeError, ValueError, AttributeError):
            continue  # another instance's malformed entry: skipped, never a 500
    merged["series"] = [[at, n, d] for at, (n, d) in sorted(merged["series"].items())][-120:]
    return merged
