"""Dynamic limits: a factor applied to quotas, from load, client behaviour and operators.

- **Load** (:class:`LoadMonitor`): CPU and memory (psutil), the app's own 5xx rate and
  latency, and the number of requests in flight, sampled in the background (never per
  request). The seed's thresholds are the defaults: CPU over 80% gives x0.5, over 60% x0.75;
  memory over 80% x0.7; error rate over 10% x0.5; more than 1000 in flight x0.6 (the factors
  multiply).
- **Behaviour** (:class:`BehaviourTracker`): per client over the last hour, a good citizen
  (moderate use, under 5% rejected) earns x1.2; an abusive one (over 50% rejected, or far over
  its volume) gets x0.3, and after repeated violations an optional penalty box: refused for a
  set time, on every instance (the box lives in the backend).
- **Override**: an operator's factor for every limit, with an expiry ("halve every limit for
  10 minutes"), stored in the backend so every instance applies it.

Scaled quotas keep the policy's bucket, so a change never resets counters; the headers show
the reduced quota.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger

from .control import ControlStore, Mirror, PollPolicy, every, live, stop
from .errors import ConfigurationError, check_ttl
from .keys import KeyBuilder
from .policy import MIN_GCRA_INTERVAL_US, Algorithm, Policy
from .rate import Rate

__all__ = ["BehaviourTracker", "DynamicLimits", "LoadMonitor", "LoadThresholds", "scale_policy"]

#: Fewest responses in a load sample for its error rate and latency to count.
_MIN_RESPONSES = 10
#: Seconds between prunings of the penalty box (and between its log lines).
_PRUNE_EVERY = 10.0
#: Most entries in the shared penalty box: every instance reloads it whole when it changes
#: (at most once per refresh_interval), so its size is CPU on every instance.
MAX_SHARED_PENALTIES = 10_000


@dataclass(frozen=True, slots=True)
class LoadThresholds:
    """The seed's thresholds and factors (percentages for CPU and memory)."""

    cpu_high: float = 80.0
    cpu_high_factor: float = 0.5
    cpu_medium: float = 60.0
    cpu_medium_factor: float = 0.75
    memory_high: float = 80.0
    memory_high_factor: float = 0.7
    error_rate: float = 0.10
    error_rate_factor: float = 0.5
    in_flight: int = 1000
    in_flight_factor: float = 0.6
    #: Mean latency (seconds) above which limits shrink; None disables it.
    latency: float | None = None
    latency_factor: float = 0.7

    def __post_init__(self) -> None:
        for name in ("cpu_high", "cpu_medium", "memory_high", "error_rate", "in_flight"):
            _check_number(f"load.thresholds.{name}", getattr(self, name), above=0)
        if self.latency is not None:
            _check_number("load.thresholds.latency", self.latency, above=0)
        for name in (
            "cpu_high_factor",
            "cpu_medium_factor",
            "memory_high_factor",
            "error_rate_factor",
            "in_flight_factor",
            "latency_factor",
        ):
            _check_number(f"load.thresholds.{name}", getattr(self, name), above=0, at_most=1)


def _check_number(field: str, value: object, *, above: float, at_most: float | None = None) -> None:
    """A number > ``above`` (and <= ``at_most``), never a bool: or a ConfigurationError."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > above
        or (at_most is not None and value > at_most)
        or value != value  # NaN
    ):
        bound = f" and at most {at_most}" if at_most is not None else ""
        raise ConfigurationError(field, value, f"must be a number above {above}{bound}")


@dataclass(frozen=True, slots=True)
class LoadSample:
    cpu: float = 0.0
    memory: float = 0.0
    error_rate: float = 0.0
    latency: float = 0.0
    in_flight: int = 0


def load_factor(sample: LoadSample, t: LoadThresholds) -> tuple[float, list[str]]:
    """The factor for one sample, and the reasons (for logs)."""
    factor, reasons = 1.0, []
    if sample.cpu > t.cpu_high:
        factor *= t.cpu_high_factor
        reasons.append(f"cpu {sample.cpu:.0f}%")
    elif sample.cpu > t.cpu_medium:
        factor *= t.cpu_medium_factor
        reasons.append(f"cpu {sample.cpu:.0f}%")
    if sample.memory > t.memory_high:
        factor *= t.memory_high_factor
        reasons.append(f"memory {sample.memory:.0f}%")
    if sample.error_rate > t.error_rate:
        factor *= t.error_rate_factor
        reasons.append(f"5xx {sample.error_rate:.0%}")
    if sample.in_flight > t.in_flight:
        factor *= t.in_flight_factor
        reasons.append(f"{sample.in_flight} in flight")
    if t.latency is not None and sample.latency > t.latency:
        factor *= t.latency_factor
        reasons.append(f"latency {sample.latency * 1000:.0f} ms")
    return factor, reasons


def _system_sampler() -> Callable[[], tuple[float, float]]:
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is in the dynamic extra
        logger.warning("psutil is not installed: CPU and memory do not scale limits")
        return lambda: (0.0, 0.0)
    psutil.cpu_percent(None)  # the first call primes the counter

    def sample() -> tuple[float, float]:
        return float(psutil.cpu_percent(None)), float(psutil.virtual_memory().percent)

    return sample


class LoadMonitor:
    """Samples load in the background every ``interval`` seconds.

    The middleware reports each response (:meth:`record`) and the in-flight count; ``sampler``
    (tests inject one) returns (CPU %, memory %).
    """

    def __init__(
        self,
        *,
        thresholds: LoadThresholds | None = None,
        interval: float = 1.0,
        sampler: Callable[[], tuple[float, float]] | None = None,
    ) -> None:
        if not (isinstance(interval, (int, float)) and interval > 0):
            raise ConfigurationError("load.interval", interval, "must be > 0 seconds")
        if thresholds is not None and not isinstance(thresholds, LoadThresholds):
            raise ConfigurationError("load.thresholds", thresholds, "must be a LoadThresholds")
        self.thresholds = thresholds or LoadThresholds()
        self._interval = interval
        self._sampler = sampler
        self.factor = 1.0
        self.reasons: list[str] = []
        self.in_flight = 0
        self._responses = 0
        self._errors = 0
        self._latency_sum = 0.0
        self._task: asyncio.Task[None] | None = None

    def record(self, status: int, latency: float) -> None:
        self._responses += 1
        self._errors += status >= 500
        self._latency_sum += latency

    def ensure_started(self) -> None:
        if self._task is None or self._task.done():
            if self._sampler is None:
                self._sampler = _system_sampler()
            self._task = asyncio.create_task(
                every(self._interval, self.sample_now, "load sampling")
            )

    def sample_now(self) -> float:
        """Take one sample and update the factor (the loop calls this; so can tests)."""
        sampler = self._sampler or _system_sampler()
        self._sampler = sampler
        cpu, memory = sampler()
        responses = self._responses
        # The error rate and the mean latency speak from _MIN_RESPONSES responses a sample:
        # one 500 in a quiet second must not halve every quota.
        enough = responses >= _MIN_RESPONSES
        sample = LoadSample(
            cpu=cpu,
            memory=memory,
            error_rate=self._errors / responses if enough else 0.0,
            latency=self._latency_sum / responses if enough else 0.0,
            in_flight=self.in_flight,
        )
        self._responses, self._errors, self._latency_sum = 0, 0, 0.0
        factor, reasons = load_factor(sample, self.thresholds)
        if factor != self.factor:
            logger.info(
                "load factor {:.2f} -> {:.2f} ({})",
                self.factor,
                factor,
                ", ".join(reasons) or "normal",
            )
        self.factor, self.reasons = factor, reasons
        return factor

    async def aclose(self) -> None:
        task, self._task = self._task, None
        await stop(task)


class BehaviourTracker:
    """Per-client requests and rejections over the last hour (per instance, bounded), the
    resulting factor, and the penalty box (shared through the backend).

    A client is a record name such as ``"ip:203.0.113.7"`` or ``"user:42"``; the limiter
    passes the records a request matches (its IP, and its user when authenticated, never an
    API key it cannot validate) and applies the worst of them. Records are kept as fixed-size
    digests, never as what the client sent: at most ``max_clients`` of them per instance
    (about 300 bytes each), whatever the clients send.

    The penalty box holds digests too (keyed like the storage keys, so raw API keys and IPs
    never reach the backend), each with its expiry: expired entries are pruned by the next
    penalty written (at most every 10 s) and by ``RateLimiter.cleanup()``. It holds at most
    about :data:`MAX_SHARED_PENALTIES` entries; beyond that a penalty applies on the instance
    that set it only. A new penalty applies at once on the instance that set it, without
    re-reading the box, and on the others within ``refresh_interval``. Writing it goes through
    the circuit breaker and never fails a request.
    """

    def __init__(
        self,
        *,
        good_factor: float = 1.2,
        abusive_factor: float = 0.3,
        good_max_requests: int = 1000,
        abusive_requests: int = 10_000,
        penalty_violations: int | None = None,
        penalty_window: float = 60.0,
        penalty_duration: float = 300.0,
        max_clients: int = 100_000,
    ) -> None:
        _check_number("behaviour.good_factor", good_factor, above=0, at_most=10)
        _check_number("behaviour.abusive_factor", abusive_factor, above=0, at_most=1)
        for name, count in (
            ("good_max_requests", good_max_requests),
            ("abusive_requests", abusive_requests),
            ("max_clients", max_clients),
        ):
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigurationError(f"behaviour.{name}", count, "must be a whole number >= 1")
        if penalty_violations is not None and (
            isinstance(penalty_violations, bool)
            or not isinstance(penalty_violations, int)
            or penalty_violations < 1
        ):
            raise ConfigurationError(
                "behaviour.penalty_violations", penalty_violations, "must be None or >= 1"
            )
        _check_number("behaviour.penalty_window", penalty_window, above=0)
        _check_number("behaviour.penalty_duration", penalty_duration, above=0)
        self.good_factor = good_factor
        self.abusive_factor = abusive_factor
        self.good_max_requests = good_max_requests
        self.abusive_requests = abusive_requests
        self.penalty_violations = penalty_violations
        self.penalty_window = penalty_window
        self.penalty_duration = penalty_duration
        self._max = max_clients
        # All three keyed on the record's digest. client -> [hour, requests, rejected, and
        # the hour before's requests and rejected]: "the last hour" is estimated as the
        # sliding window counter does, so a record does not vanish at the top of the hour.
        self._stats: OrderedDict[str, list[float]] = OrderedDict()
        self._violations: OrderedDict[str, list[float]] = OrderedDict()
        #: Penalties this instance set: digest -> until (the box's mirror catches up later).
        self._penalised: dict[str, float] = {}
        self._keys = KeyBuilder()
        self._store: ControlStore | None = None
        self._polling = PollPolicy()
        self._box: Mirror | None = None
        self._pruned_at = 0.0
        self._logged_at = 0.0
        self._unlogged = 0
        self._generation_seen = -1
        self._written = 0
        self._warned_full = False

    def bind(
        self,
        store: ControlStore | None,
        refresh_interval: float,
        polling: PollPolicy | None = None,
    ) -> None:
        self._store = store
        keys = getattr(store, "key_builder", None)
        if isinstance(keys, KeyBuilder):
            self._keys = keys  # the storage keys' hash, key_secret included
        if polling is not None:
            self._polling = polling
        if store is not None and self.penalty_violations is not None:
            self._box = Mirror(store, "penalty", refresh_interval, polling)

    def factor(self, client: str) -> float:
        stats = self._stats.get(self._keys.digest(client))
        if stats is None:
            return 1.0
        hour, weight = _hour_and_weight()
        if stats[0] == hour:
            requests = stats[3] * weight + stats[1]
            rejected = stats[4] * weight + stats[2]
        elif stats[0] == hour - 1:
            requests, rejected = stats[1] * weight, stats[2] * weight
        else:
            return 1.0
        if requests <= 0:
            return 1.0
        rate = rejected / requests
        if rate > 0.5 or requests > self.abusive_requests:
            return self.abusive_factor
        if 10 < requests < self.good_max_requests and rate < 0.05:
            return self.good_factor
        return 1.0

    async def record(self, client: str, allowed: bool) -> None:
        key = self._keys.digest(client)
        hour = _hour()
        stats = self._stats.get(key)
        if stats is not None and stats[0] == hour - 1:
            stats = [hour, 0, 0, stats[1], stats[2]]  # the last hour becomes the one before
        elif stats is None or stats[0] != hour:
            stats = [hour, 0, 0, 0, 0]
            if key not in self._stats and len(self._stats) >= self._max:
                self._stats.popitem(last=False)
        self._stats[key] = stats
        self._stats.move_to_end(key)
        stats[1] += 1
        if not allowed:
            stats[2] += 1
            await self._violation(key)

    async def _violation(self, key: str) -> None:
        store = self._store
        if self.penalty_violations is None or store is None:
            return
        now = time.time()
        times = self._violations.get(key, [])
        times = [t for t in times if t > now - self.penalty_window] + [now]
        if key not in self._violations and len(self._violations) >= self._max:
            self._violations.popitem(last=False)
        self._violations[key] = times
        if len(times) < self.penalty_violations:
            return
        self._violations.pop(key, None)
        until = now + self.penalty_duration
        if key not in self._penalised and len(self._penalised) >= self._max:
            del self._penalised[next(iter(self._penalised))]
        self._penalised[key] = until  # applies here at once, without re-reading the box
        self._log_penalty(now)
        entry = json.dumps({"expires_at": until, "violations": len(times)})
        stale = [name for name in self._expired(now) if name != key]
        if not self._room_to_share(key, len(stale)):
            return  # the shared box is full: this instance alone refuses the client

        async def share() -> None:
            await store.control_put("penalty", key, entry)
            if stale:
                await store.control_delete("penalty", stale)

        await self._polling.call("sharing a penalty", share)

    def _room_to_share(self, key: str, freed: int) -> bool:
        # The box every instance reloads when it changes stays under MAX_SHARED_PENALTIES
        # (give or take what other instances add within one refresh): its size is what the
        # mirror holds plus what this instance wrote since the mirror last changed.
        box = self._box
        if box is None:
            return True
        if box.generation != self._generation_seen:
            self._generation_seen, self._written = box.generation, 0
        if key in box.entries or len(box.entries) + self._written - freed < MAX_SHARED_PENALTIES:
            self._written += 1
            return True
        if not self._warned_full:
            self._warned_full = True
            logger.warning(
                "penalty box: {} entries shared, new penalties apply on this instance only",
                MAX_SHARED_PENALTIES,
            )
        return False

    def _expired(self, now: float) -> list[str]:
        # Pruning scans the whole box: at most once per 10 s (or penalty_duration), so a flood
        # of penalties costs one scan per 10 s, not one per penalty.
        if self._box is None or now - self._pruned_at < min(_PRUNE_EVERY, self.penalty_duration):
            return []
        self._pruned_at = now
        for key, until in list(self._penalised.items()):
            if until <= now:
                del self._penalised[key]
        return [key for key, entry in self._box.entries.items() if not live(entry, now)][:1000]

    def _log_penalty(self, now: float) -> None:
        # One line per 10 s however many clients are boxed: clients must not flood the logs.
        self._unlogged += 1
        if now - self._logged_at >= _PRUNE_EVERY:
            logger.warning(
                "penalty box: {} client(s) refused for {}s", self._unlogged, self.penalty_duration
            )
            self._logged_at, self._unlogged = now, 0

    async def penalty_until(self, client: str) -> float | None:
        if self._box is None:
            return None
        key = self._keys.digest(client)
        now = time.time()
        until = self._penalised.get(key)
        await self._box.ensure_loaded()
        entry = self._box.entries.get(key)
        if entry is not None and live(entry, now):
            shared = entry.get("expires_at")
            if isinstance(shared, (int, float)) and math.isfinite(shared):
                until = max(until or 0.0, float(shared))
        return until if until is not None and until > now else None

    async def cleanup(self) -> int:
        """Delete expired penalty-box entries from the backend; returns how many."""
        return await self._box.cleanup() if self._box is not None else 0

    async def aclose(self) -> None:
        if self._box is not None:
            await self._box.aclose()


class DynamicLimits:
    """Everything that scales quotas. Pass one to ``RateLimiter(dynamic=...)``.

    Args:
        load: a :class:`LoadMonitor` (``None``: load does not scale limits).
        behaviour: a :class:`BehaviourTracker` (``None``: behaviour does not).
        reduced_capacity_status: answer a denial made while load or an override reduces the
            quotas with 503 ``temporary-reduced-capacity`` (True) or a plain 429 (False).
    """

    def __init__(
        self,
        *,
        load: LoadMonitor | None = None,
        behaviour: BehaviourTracker | None = None,
        reduced_capacity_status: bool = True,
    ) -> None:
        if load is not None and not isinstance(load, LoadMonitor):
            raise ConfigurationError("dynamic.load", load, "must be a LoadMonitor")
        if behaviour is not None and not isinstance(behaviour, BehaviourTracker):
            raise ConfigurationError("dynamic.behaviour", behaviour, "must be a BehaviourTracker")
        if not isinstance(reduced_capacity_status, bool):
            raise ConfigurationError(
                "dynamic.reduced_capacity_status", reduced_capacity_status, "must be True or False"
            )
        self.load = load
        self.behaviour = behaviour
        self.reduced_capacity_status = reduced_capacity_status
        self._override: Mirror | None = None
        self._store: ControlStore | None = None
        self._scaled: dict[tuple[int, float], tuple[Policy, Policy]] = {}

    def bind(
        self,
        store: ControlStore | None,
        refresh_interval: float,
        polling: PollPolicy | None = None,
    ) -> None:
        self._store = store
        if store is not None:
            self._override = Mirror(store, "override", refresh_interval, polling)
        if self.behaviour is not None:
            self.behaviour.bind(store, refresh_interval, polling)

    async def global_factor(self) -> float:
        """Load times the operator's override, rounded to the cache step."""
        if self.load is not None:
            self.load.ensure_started()
        factor = self.load.factor if self.load is not None else 1.0
        return factor * await self.override_factor()

    async def override_factor(self) -> float:
        if self._override is None:
            return 1.0
        await self._override.ensure_loaded()
        return self.override_now()

    def override_now(self) -> float:
        """The operator's factor as last mirrored, without waiting (for metrics)."""
        if self._override is None:
            return 1.0
        entry = self._override.entries.get("all")
        if entry is None or not live(entry, time.time()):
            return 1.0
        value = entry.get("factor")
        return float(value) if isinstance(value, (int, float)) and value > 0 else 1.0

    async def set_override(self, factor: float, *, ttl: float | None = None, by: str = "") -> None:
        if self._store is None or self._override is None:
            raise ConfigurationError("backend", None, "does not store operator state")
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 10:
            raise ConfigurationError("factor", factor, "must be a number in (0, 10]")
        ttl = check_ttl(ttl)
        now = time.time()
        entry = {"factor": factor, "set_by": by, "expires_at": None if ttl is None else now + ttl}
        await self._store.control_put("override", "all", json.dumps(entry))
        await self._override.refresh()
        logger.info("ratelimit audit: override x{} for {}s by {!r}", factor, ttl, by)

    async def clear_override(self, *, by: str = "") -> bool:
        if self._store is None or self._override is None:
            raise ConfigurationError("backend", None, "does not store operator state")
        removed = await self._store.control_delete("override", ["all"])
        await self._override.refresh()
        logger.info("ratelimit audit: override cleared by {!r}", by)
        return bool(removed)

    def scaled(self, policy: Policy, factor: float) -> Policy:
        """``policy`` with its quota times ``factor``, same bucket (counters carry over)."""
        # Three significant digits: a bounded number of cached policies, and a small factor
        # kept (steps of 0.05 made an override of 0.02 a quota of 1).
        factor = float(f"{factor:.3g}")
        if abs(factor - 1.0) < 1e-9:
            return policy
        key = (id(policy), factor)
        cached = self._scaled.get(key)
        if cached is not None and cached[0] is policy:
            return cached[1]
        if len(self._scaled) >= 4096:
            self._scaled.clear()
        scaled = scale_policy(policy, factor)
        # Holding the original keeps its id from being reused by another policy.
        self._scaled[key] = (policy, scaled)
        return scaled

    async def aclose(self) -> None:
        for part in (self.load, self.behaviour, self._override):
            if part is not None:
                await part.aclose()


def scale_policy(policy: Policy, factor: float) -> Policy:
    rate = policy.rate
    burst = None if rate.burst is None else max(1, math.floor(rate.burst * factor))
    limit = max(1, math.floor(rate.limit * factor))
    if policy.algorithm is Algorithm.GCRA:
        # Scaled up, a GCRA rate stays within what GCRA keeps exactly (see policy.py).
        limit = min(limit, max(rate.limit, rate.period_us // MIN_GCRA_INTERVAL_US))
    scaled = Rate(limit, rate.period, burst)
    return Policy(policy.name, scaled, policy.algorithm, bucket=policy.bucket)


def _hour() -> int:
    return int(time.time() // 3600)


def _hour_and_weight() -> tuple[int, float]:
    """This clock hour, and how much of the hour before still lies within the last hour."""
    now = time.time()
    hour = int(now // 3600)
    return hour, 1.0 - (now - hour * 3600) / 3600
