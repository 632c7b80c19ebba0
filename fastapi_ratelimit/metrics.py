"""Prometheus metrics (the ``[prometheus]`` extra).

Requests are counted in process by a :class:`~fastapi_ratelimit.recorder.Recorder` (plain
ints, no locks) and turned into Prometheus metrics only when someone reads them:

- one process: a custom collector builds the metric families at scrape time;
- several workers (``PROMETHEUS_MULTIPROC_DIR`` set before the app starts): a background
  thread adds what changed to prometheus_client's per-process files once a second (and at
  exit), and :meth:`RateLimitMetrics.endpoint` serves the sum over all workers.

Usage::

    metrics = RateLimitMetrics(limiter)
    app.add_route("/metrics", metrics.endpoint)   # "/metrics" is exempt by default

With several workers, also call ``metrics.close()`` in the lifespan's shutdown, so that each
worker writes its last second of counts before it stops.

Labels are bounded: ``endpoint`` is the route template, ``method`` one of the standard methods
(or ``OTHER``), ``scope``, ``tier`` and ``reason`` come from the configuration. Nothing is ever
labelled by client: per-client numbers (the seed's ``tokens_remaining``) would be a series per
IP or key, so the top limited clients are shown, masked, by the live dashboard instead.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterator
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    REGISTRY,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from .errors import ConfigurationError
from .limiter import RateLimiter
from .recorder import Histogram as Counts
from .recorder import Recorder

__all__ = ["METRICS", "RateLimitMetrics"]

_BREAKER_STATES = ("closed", "open", "half_open")

#: Every metric: name -> (type, help, label names). The README's table lists the same.
METRICS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "rate_limit_requests_total": ("counter", "Requests checked", ("endpoint", "method")),
    "rate_limit_requests_allowed_total": ("counter", "Requests admitted", ("endpoint", "method")),
    "rate_limit_requests_blocked_total": (
        "counter",
        "Requests refused, by the scope that refused them or blocklist, endpoint_breaker, "
        "backend_unavailable",
        ("endpoint", "method", "reason"),
    ),
    "rate_limit_requests_by_scope_total": ("counter", "Level checks by scope", ("scope",)),
    "rate_limit_blocked_by_scope_total": ("counter", "Level denials by scope", ("scope",)),
    "rate_limit_requests_by_tier_total": ("counter", "Requests by user tier", ("tier",)),
    "rate_limit_blocked_by_tier_total": ("counter", "Refused requests by user tier", ("tier",)),
    "rate_limit_shadow_requests_total": ("counter", "Shadow-mode level checks", ("scope",)),
    "rate_limit_shadow_blocked_total": (
        "counter",
        "Shadow-mode checks that would have refused",
        ("scope",),
    ),
    "rate_limit_backend_errors_total": (
        "counter",
        "Backend failures: timeout, connection, error, circuit_open",
        ("kind",),
    ),
    "rate_limit_throttled_total": (
        "counter",
        "Requests delayed instead of refused, by outcome (allowed, denied)",
        ("outcome",),
    ),
    "rate_limit_check_duration_seconds": (
        "histogram",
        "Time to decide a request (a throttled one's wait included)",
        (),
    ),
    "rate_limit_throttle_delay_seconds": ("histogram", "Time a throttled request waited", ()),
    "rate_limit_active_limiters": ("gauge", "Rate limiters observed", ()),
    "rate_limit_breaker_state": (
        "gauge",
        "Limiters whose backend circuit breaker is in each state",
        ("state",),
    ),
    "rate_limit_dynamic_factor": (
        "gauge",
        "Smallest quota factor in force, by source (load, override)",
        ("source",),
    ),
}
# How each gauge adds up over workers in multiprocess mode.
_GAUGE_MODES: dict[str, Literal["livesum", "livemin"]] = {
    "rate_limit_active_limiters": "livesum",
    "rate_limit_breaker_state": "livesum",
    "rate_limit_dynamic_factor": "livemin",
}

Samples = dict[tuple[str, ...], float]


class RateLimitMetrics:
    """Prometheus metrics for ``limiters`` (they share one in-process recorder).

    Args:
        limiters: the :class:`RateLimiter` (s) to observe.
        registry: where to register the collector (default: prometheus_client's global
            ``REGISTRY``; ``None``: only :meth:`endpoint` serves them). Ignored in
            multiprocess mode, where the per-process files are the registry.
        multiprocess: ``None`` (default): on when ``PROMETHEUS_MULTIPROC_DIR`` is set.
        flush_interval: multiprocess mode: seconds between writes to the files (at most 1).
    """

    def __init__(
        self,
        *limiters: RateLimiter,
        registry: CollectorRegistry | None = REGISTRY,
        multiprocess: bool | None = None,
        flush_interval: float = 1.0,
    ) -> None:
        if not limiters:
            raise ConfigurationError("limiters", limiters, "give at least one RateLimiter")
        for limiter in limiters:
            if not isinstance(limiter, RateLimiter):
                raise ConfigurationError("limiters", limiter, "must be RateLimiters")
        if isinstance(flush_interval, bool) or not (
            isinstance(flush_interval, (int, float)) and 0 < flush_interval <= 1
        ):
            raise ConfigurationError("flush_interval", flush_interval, "must be in (0, 1] s")
        if multiprocess is None:
            multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        if multiprocess and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            raise ConfigurationError(
                "multiprocess", multiprocess, "needs PROMETHEUS_MULTIPROC_DIR in the environment"
            )
        self.limiters = limiters
        # Shared with the dashboard when it came first: one count per request, whatever reads it.
        existing = [limiter.recorder for limiter in limiters if limiter.recorder is not None]
        self.recorder: Recorder = existing[0] if existing else Recorder()
        for limiter in limiters:
            limiter.recorder = self.recorder
        self.multiprocess = multiprocess
        self._registry: CollectorRegistry
        if multiprocess:
            self._files = _Files(self)
            self._stop = threading.Event()
            self._thread = threading.Thread(
                target=self._flush_loop,
                args=(flush_interval,),
                name="ratelimit-metrics",
                daemon=True,
            )
            self._thread.start()
            # What was counted since the last write is written at exit, too. uvicorn's
            # workers end by re-raising the signal that stopped them, which skips atexit:
            # call close() from the app's lifespan shutdown (see the module docstring).
            atexit.register(self.close)
        else:
            self._registry = registry if registry is not None else CollectorRegistry()
            self._registry.register(self)

    # -- the Collector protocol (one process) ------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        """The metric families, built from the recorder's counts (at scrape time)."""
        counters, histograms, gauges = self.snapshot()
        for name, samples in counters.items():
            _, help_text, labels = METRICS[name]
            family = CounterMetricFamily(name, help_text, labels=labels)
            for values, value in samples.items():
                family.add_metric(values, value)
            yield family
        for name, counts in histograms.items():
            _, help_text, _ = METRICS[name]
            buckets, running = [], 0
            for bound, count in zip((*counts.bounds, float("inf")), counts.counts, strict=True):
                running += count
                label = floatToGoString(bound)  # type: ignore[no-untyped-call]
                buckets.append((label, float(running)))
            yield HistogramMetricFamily(name, help_text, buckets=buckets, sum_value=counts.total)
        for name, samples in gauges.items():
            _, help_text, labels = METRICS[name]
            gauge = GaugeMetricFamily(name, help_text, labels=labels)
            for values, value in samples.items():
                gauge.add_metric(values, value)
            yield gauge

    def snapshot(self) -> tuple[dict[str, Samples], dict[str, Counts], dict[str, Samples]]:
        """Counters, histograms and gauges as of now: ``{name: {label values: value}}``."""
        recorder = self.recorder
        # dict() and list() copy in one C call each: safe against the event loop's increments
        # when a scrape or the flusher runs in another thread.
        requests = dict(recorder.requests)
        counters: dict[str, Samples] = {
            name: {} for name, m in METRICS.items() if m[0] == "counter"
        }
        for (template, method, tier, reason), n in requests.items():
            _add(counters["rate_limit_requests_total"], (template, method), n)
            _add(counters["rate_limit_requests_by_tier_total"], (tier,), n)
            if reason:
                _add(counters["rate_limit_requests_blocked_total"], (template, method, reason), n)
                _add(counters["rate_limit_blocked_by_tier_total"], (tier,), n)
            else:
                _add(counters["rate_limit_requests_allowed_total"], (template, method), n)
        for (scope, allowed), n in dict(recorder.scopes).items():
            _add(counters["rate_limit_requests_by_scope_total"], (scope,), n)
            if not allowed:
                _add(counters["rate_limit_blocked_by_scope_total"], (scope,), n)
        for (scope, allowed), n in dict(recorder.shadow).items():
            _add(counters["rate_limit_shadow_requests_total"], (scope,), n)
            if not allowed:
                _add(counters["rate_limit_shadow_blocked_total"], (scope,), n)
        for kind, n in dict(recorder.backend_errors).items():
            _add(counters["rate_limit_backend_errors_total"], (kind,), n)
        for allowed, n in dict(recorder.throttled).items():
            _add(counters["rate_limit_throttled_total"], ("allowed" if allowed else "denied",), n)
        histograms = {
            "rate_limit_check_duration_seconds": _copy(recorder.check_seconds),
            "rate_limit_throttle_delay_seconds": _copy(recorder.delay_seconds),
        }
        states = dict.fromkeys(_BREAKER_STATES, 0.0)
        loads: list[float] = []
        overrides: list[float] = []
        for limiter in self.limiters:
            if limiter.breaker is not None:
                states[limiter.breaker.shown_state()] += 1
            dynamic = limiter.dynamic
            if dynamic is not None:
                if dynamic.load is not None:
                    loads.append(dynamic.load.factor)
                overrides.append(dynamic.override_now())
        # The smallest in force (an override may raise quotas too: up to 10); 1 without any.
        load = min(loads, default=1.0)
        override = min(overrides, default=1.0)
        gauges: dict[str, Samples] = {
            "rate_limit_active_limiters": {(): float(len(self.limiters))},
            "rate_limit_breaker_state": {(state,): n for state, n in states.items()},
            "rate_limit_dynamic_factor": {("load",): load, ("override",): override},
        }
        return counters, histograms, gauges

    # -- serving -----------------------------------------------------------------------------

    async def endpoint(self, request: Request) -> Response:
        """A Starlette endpoint for ``/metrics``: ``app.add_route("/metrics", m.endpoint)``.

        In multiprocess mode it writes this worker's counts first, then serves every worker's.
        """
        data = await run_in_threadpool(self.exposition)
        return Response(data, media_type=CONTENT_TYPE_LATEST)

    def exposition(self) -> bytes:
        """The text format, as :meth:`endpoint` serves it."""
        if not self.multiprocess:
            return generate_latest(self._registry)
        self.flush()
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)

    # -- multiprocess mode -------------------------------------------------------------------

    def flush(self) -> None:
        """Multiprocess mode: add what changed since the last flush to this worker's files."""
        if self.multiprocess:
            self._files.flush()

    def close(self) -> None:
        """Stop the flusher after one last flush (also run at interpreter exit)."""
        if self.multiprocess and not self._stop.is_set():
            self._stop.set()
            self.flush()

    def _flush_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.flush()


class _Files:
    """prometheus_client's own metric objects, unregistered, fed with deltas: their values
    live in ``PROMETHEUS_MULTIPROC_DIR`` (one file per process and type), where
    :class:`MultiProcessCollector` adds them up over the workers."""

    def __init__(self, owner: RateLimitMetrics) -> None:
        self._owner = owner
        self._lock = threading.Lock()
        self._metrics: dict[str, Any] = {}
        for name, (kind, help_text, labels) in METRICS.items():
            if kind == "counter":
                self._metrics[name] = Counter(name, help_text, labels, registry=None)
            elif kind == "histogram":
                bounds = self._counts(name).bounds
                self._metrics[name] = Histogram(name, help_text, buckets=bounds, registry=None)
            else:
                mode = _GAUGE_MODES[name]
                self._metrics[name] = Gauge(
                    name, help_text, labels, registry=None, multiprocess_mode=mode
                )
        self._sent: dict[tuple[str, tuple[str, ...]], float] = {}
        self._sent_histograms: dict[str, Counts] = {}

    def _counts(self, name: str) -> Counts:
        recorder = self._owner.recorder
        if name == "rate_limit_check_duration_seconds":
            return recorder.check_seconds
        return recorder.delay_seconds

    def flush(self) -> None:
        with self._lock:  # the flusher thread and a scrape may both flush
            counters, histograms, gauges = self._owner.snapshot()
            for name, samples in counters.items():
                for values, value in samples.items():
                    delta = value - self._sent.get((name, values), 0.0)
                    if delta:
                        metric = self._metrics[name]
                        (metric.labels(*values) if values else metric).inc(delta)
                        self._sent[(name, values)] = value
            for name, counts in histograms.items():
                sent = self._sent_histograms.get(name)
                histogram = self._metrics[name]
                # prometheus_client has no public way to add n observations to a bucket; its
                # per-bucket values (not cumulative, as the files store them) are these.
                for i, count in enumerate(counts.counts):
                    delta = count - (sent.counts[i] if sent is not None else 0)
                    if delta:
                        histogram._buckets[i].inc(delta)
                total = counts.total - (sent.total if sent is not None else 0.0)
                if total:
                    histogram._sum.inc(total)
                self._sent_histograms[name] = counts
            for name, samples in gauges.items():
                metric = self._metrics[name]
                for values, value in samples.items():
                    (metric.labels(*values) if values else metric).set(value)


def _add(samples: Samples, labels: tuple[str, ...], n: float) -> None:
    samples[labels] = samples.get(labels, 0.0) + n


def _copy(counts: Counts) -> Counts:
    copy = Counts(counts.bounds)
    copy.counts = list(counts.counts)
    copy.total = counts.total
    return copy
