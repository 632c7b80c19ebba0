"""The backend call of step 5, and what happens when it fails: the circuit breaker (one per
Cluster master, see :mod:`.node_breakers`), the failure policy (``on_backend_error``, allow
or deny per level) and the per-process fallback backend."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, cast

from loguru import logger

from .backends.base import Backend, Check
from .backends.memory import MemoryBackend
from .breaker import CircuitBreaker
from .decision import Verdict
from .errors import BackendError, ConfigurationError
from .node_breakers import NodeBreakers
from .recorder import error_kind

__all__ = ["FailureHandling", "OnBackendError"]

OnBackendError = Literal["allow", "deny"]


class FailureHandling:
    """One backend call through the breaker and the failure policy.

    Args:
        limiter: the limiter (its ``backend`` and ``recorder`` are read at each call: both
            may be replaced after construction).
        on_backend_error, fallback, breaker: as for :class:`~fastapi_ratelimit.RateLimiter`.
    """

    def __init__(
        self,
        limiter: Any,
        *,
        on_backend_error: OnBackendError | Mapping[str, OnBackendError],
        fallback: bool,
        breaker: CircuitBreaker | Literal["default"] | None,
    ) -> None:
        self._limiter = limiter
        self._on_error_default, self._on_error = _failure_policies(on_backend_error)
        self._fallback = MemoryBackend() if fallback else None
        if breaker == "default":
            breaker = CircuitBreaker()
        if breaker is not None and not isinstance(breaker, CircuitBreaker):
            raise ConfigurationError("breaker", breaker, "must be a CircuitBreaker or None")
        self.breaker = breaker
        #: A Redis Cluster's breakers, one per master (see node_breakers.py): a node that is
        #: down fails open or closed alone, and the others keep limiting.
        self.node_breakers: NodeBreakers | None = None
        backend: Backend = limiter.backend
        if breaker is not None and getattr(backend, "cluster", False) is True:
            self.node_breakers = NodeBreakers(breaker, cast(Any, backend))
        self._last_failure_log = 0.0

    async def hit(self, checks: Sequence[Check]) -> Verdict | None:
        """Charge ``checks`` in one backend call. ``None``: the backend failed and the policy
        allows; raises :class:`BackendError` when it failed and the policy denies."""
        limiter = self._limiter
        backend = limiter.backend
        # A client known to be over a limit: answered here, as neither a success nor a
        # failure of the backend (the breaker hears nothing).
        known = _cached_denial(backend, checks)
        if known is not None:
            return known
        if self.node_breakers is not None:
            return await self.node_breakers.hit(checks, self.refuses, self._fallback)
        breaker = self.breaker
        probe = False
        # An idle breaker (closed, nothing failed lately) needs no call either way.
        if breaker is not None and not breaker.idle:
            if not breaker.allow_call():
                if limiter.recorder is not None:
                    limiter.recorder.backend_error("circuit_open")
                return await self._backend_down(checks, None)
            probe = breaker.state == "half_open"  # half-open lets only its one probe through
        try:
            verdict: Verdict = await backend.hit(checks)
        except BackendError as exc:
            if breaker is not None:
                breaker.record_failure()
            if limiter.recorder is not None:
                limiter.recorder.backend_error(error_kind(exc))
            return await self._backend_down(checks, exc)
        except BaseException:
            # Cancelled (the client went away) or a bug: no answer about the backend. A probe
            # that ends so must hand its turn on, or the breaker stays half-open for good and
            # no call ever reaches the backend again.
            if probe:
                assert breaker is not None
                breaker.abandon_probe()
            raise
        if breaker is not None and not breaker.idle:
            breaker.record_success()
        return verdict

    async def _backend_down(
        self, checks: Sequence[Check], error: BackendError | None
    ) -> Verdict | None:
        if error is not None and self.breaker is None:
            # Without a breaker, at most one line per 10 s: an outage must not flood the logs.
            now = time.monotonic()
            if now - self._last_failure_log > 10:
                self._last_failure_log = now
                logger.warning("rate-limit backend failed: {}", error)
        if self.refuses(checks):
            raise error or BackendError("rate-limit backend circuit open")
        if self._fallback is not None:
            # Per-process limits at the same policies: an outage is not a free-for-all.
            return await self._fallback.hit(checks)
        return None

    def refuses(self, checks: Sequence[Check]) -> bool:
        """Whether the failure policy refuses a request whose ``checks`` can't be decided."""
        default, per_scope = self._on_error_default, self._on_error
        return any(per_scope.get(c.scope, default) == "deny" for c in checks)

    def retry_after(self) -> int:
        """Seconds until the backend is worth trying again (for a 503's Retry-After)."""
        if self.node_breakers is not None:
            return self.node_breakers.retry_after()
        return self.breaker.retry_after() if self.breaker is not None else 1


def _failure_policies(value: Any) -> tuple[str, dict[str, str]]:
    if isinstance(value, str):
        if value not in ("allow", "deny"):
            raise ConfigurationError("on_backend_error", value, "must be 'allow' or 'deny'")
        return value, {}
    if not isinstance(value, Mapping):
        raise ConfigurationError("on_backend_error", value, "must be 'allow', 'deny' or a mapping")
    per_scope: dict[str, str] = {}
    for scope, policy in value.items():
        if policy not in ("allow", "deny"):
            raise ConfigurationError(
                f"on_backend_error[{scope!r}]", policy, "must be 'allow' or 'deny'"
            )
        per_scope[str(scope)] = policy
    return per_scope.pop("default", "allow"), per_scope


def _cached_denial(backend: Backend, checks: Sequence[Check]) -> Verdict | None:
    """The backend's cached denial of ``checks``, if it keeps such a cache (Redis does).

    A function of its own so that the bound method dies with it: one object fewer held by
    every request waiting for the backend (see docs/contributing.md, "Tail latency")."""
    cached_denial = getattr(backend, "cached_denial", None)
    return None if cached_denial is None else cast("Verdict | None", cached_denial(checks))
