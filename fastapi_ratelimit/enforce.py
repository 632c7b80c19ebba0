"""Step 5 of a request: decide its checks. Limits changed at run time and dynamic scaling
apply first; the penalty box may refuse at once; shadow levels are charged apart and never
enforced; the enforced ones go to the backend in one call (through :mod:`.failure`); a denied
request may wait its turn (``delay``); the decisions are recorded in the request's context."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from operator import attrgetter, gt
from typing import Any

from .backends.base import Check
from .backends.memory import MemoryBackend
from .context import RequestContext
from .control import PollPolicy
from .decision import Decision, Verdict
from .denials import DenialLog
from .errors import BackendError, ConfigurationError
from .failure import FailureHandling
from .logs import log_limited
from .masking import mask_identity

__all__ = ["Enforcer"]

_CLIENT_SCOPES = frozenset({"ip", "user", "api_key"})
_COST = attrgetter("cost")
_LIMIT = attrgetter("policy.limit")


class Enforcer:
    """Decides checks for one limiter (shared by all its requests; per-request state stays in
    the context).

    Args:
        limiter: the limiter; its ``backend``, ``recorder``, ``dynamic`` and
            ``limit_overrides`` are read at each call.
        failure: the backend call with its breaker and failure policy.
        polling: the breaker and health log of calls besides the check (shadow levels).
        shadow, shadow_headers, delay, max_waiting: as for
            :class:`~fastapi_ratelimit.RateLimiter`.
    """

    def __init__(
        self,
        limiter: Any,
        failure: FailureHandling,
        polling: PollPolicy,
        *,
        shadow: bool | Iterable[str],
        shadow_headers: bool,
        delay: Mapping[str, float] | None,
        max_waiting: int,
    ) -> None:
        self._limiter = limiter
        self.failure = failure
        self._polling = polling
        if isinstance(shadow, bool):
            self._shadow_all, self._shadow = shadow, frozenset[str]()
        elif isinstance(shadow, str) or not isinstance(shadow, Iterable):
            raise ConfigurationError("shadow", shadow, "must be True/False or a set of scopes")
        else:
            self._shadow_all, self._shadow = False, frozenset(shadow)
        if not isinstance(shadow_headers, bool):
            raise ConfigurationError("shadow_headers", shadow_headers, "must be True or False")
        self._shadow_headers = shadow_headers
        self._delays: dict[str, float] = {}
        for scope, max_delay in (delay or {}).items():
            if (
                isinstance(max_delay, bool)
                or not isinstance(max_delay, (int, float))
                or not (0 < max_delay <= 60)
            ):
                raise ConfigurationError(f"delay[{scope!r}]", max_delay, "must be in (0, 60] s")
            self._delays[scope] = float(max_delay)
        if isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0:
            raise ConfigurationError("max_waiting", max_waiting, "must be a whole number >= 0")
        self._max_waiting = max_waiting
        self._waiting = 0
        #: Denials, logged as one line per second however many there are.
        self._denials = DenialLog()
        #: Whether nothing but the backend call is configured (see :attr:`runs_now`); whether
        #: the backend is the memory one is read per request.
        self.simple = not self._shadow_all and not self._shadow and not self._delays

    async def run(self, checks: Sequence[Check], context: RequestContext) -> Verdict | None:
        """Decide ``checks`` (one backend call for the enforced ones) and record the decisions
        in ``context``. Returns ``None`` when the backend failed and the policy is to allow;
        raises :class:`BackendError` when it failed and the policy is to deny."""
        limiter = self._limiter
        if limiter.limit_overrides is not None:
            checks = await limiter.limit_overrides.apply(checks)
        given = checks
        dynamic = limiter.dynamic
        if dynamic is not None:
            checks = await self.scaled_checks(checks, context)
            denial = await self._penalty(context)
            if denial is not None:
                context.decisions = (*context.decisions, denial)
                return Verdict((denial,))
        enforced: Sequence[Check] = checks
        if self._shadow_all or self._shadow:
            enforced = [c for c in checks if not self._is_shadow(c.scope)]
            shadow = [c for c in checks if self._is_shadow(c.scope)]
            if shadow:
                await self._run_shadow(shadow, context)
        if not enforced:
            return Verdict(())
        verdict = await self.failure.hit(enforced)
        if verdict is not None and not verdict.allowed:
            # Measured against the quotas as configured: a scaled-down one comes back.
            if self._shadow_all or self._shadow:
                given = [c for c in given if not self._is_shadow(c.scope)]
            never = self._never(given)
            if never is not None:
                verdict = never
            elif self._delays:
                verdict = await self._wait_and_retry(enforced, verdict)
            if context.reduced and verdict is not None and not verdict.allowed:
                context.reduced = await self._refused_by_reduction(given, verdict, context.reduced)
        if verdict is None:
            return None
        self._record(verdict, enforced, context)
        if dynamic is not None and dynamic.behaviour is not None:
            for record in _records(context):
                await dynamic.behaviour.record(record, verdict.allowed)
        return verdict

    def run_now(
        self, checks: Sequence[Check], context: RequestContext, *, refused: bool = False
    ) -> Verdict:
        """:meth:`run` without a coroutine, for limiters that ``runs_now`` (the memory
        backend, which never waits or fails, and no dynamic limits, shadow levels or
        delays): the same decisions, recorded the same way. ``refused``: the caller knows
        the backend's fast attempt refuses (:meth:`MemoryBackend.hit_slow`)."""
        backend = self._limiter.backend
        assert isinstance(backend, MemoryBackend)
        verdict = backend.hit_slow(checks) if refused else backend.hit_now(checks)
        if not verdict.allowed:
            verdict = self._never(checks) or verdict
        self._record(verdict, checks, context)
        return verdict

    @staticmethod
    def _never(checks: Sequence[Check]) -> Verdict | None:
        """The verdict for checks one of which costs more than its level ever admits (a cost
        function, a tier multiplier): refused for good, with ``retry_after`` infinite, since
        any finite wait would be a promise never kept. Looked at on denials only."""
        # Looked at by C code alone first (map, attrgetter, gt): under a flood of denials
        # this runs for each, and finds nothing.
        if not any(map(gt, map(_COST, checks), map(_LIMIT, checks))):
            return None
        decisions = tuple(
            Decision(
                False, c.policy.limit, 0, 0.0, math.inf, c.policy.name, c.scope, c.policy.window
            )
            for c in checks
            if c.cost > c.policy.limit
        )
        return Verdict(decisions) if decisions else None

    def _record(self, verdict: Verdict, enforced: Sequence[Check], context: RequestContext) -> None:
        # Replaced, not extended (see RequestContext): usually the first and only time.
        context.decisions = (
            (*context.decisions, *verdict.decisions) if context.decisions else verdict.decisions
        )
        if verdict.allowed:
            # Those at the request's cost are picked out after the response, if ever needed.
            context.charged = (*context.charged, *enforced) if context.charged else enforced
        else:
            # A list, not verdict.denied and a generator: two frames less per denial.
            policies = ",".join([d.policy for d in verdict.decisions if not d.allowed])
            self._denials.record(context.endpoint, policies)

    def _is_shadow(self, scope: str) -> bool:
        return self._shadow_all or scope in self._shadow

    async def _run_shadow(self, checks: list[Check], context: RequestContext) -> None:
        # Each shadow level is charged on its own: a shadow denial must not stop the others
        # from counting, and must never block.
        # Through the breaker, like the enforced levels: a dead backend is not waited on.
        backend, recorder = self._limiter.backend, self._limiter.recorder
        results = await asyncio.gather(
            *(self._polling.write("a shadow level", [c], backend.hit) for c in checks)
        )
        for check, (result,) in zip(checks, results, strict=True):
            if result is not None and recorder is not None:
                recorder.shadow_decision(check.scope, result.allowed)
            if result is not None and self._shadow_headers:
                context.shadow = (*context.shadow, *result.decisions)
            if result is not None and not result.allowed:
                # One line a second at most: a flood would deny on every request.
                client = _masked_client(check)
                log_limited(
                    "INFO",
                    "shadow",
                    "shadow rate limit would deny: {} {} ({}) for {}",
                    context.endpoint,
                    check.policy.name,
                    check.scope,
                    client,
                    endpoint=context.endpoint,
                    policy=check.policy.name,
                    scope=check.scope,
                    client=client,
                )

    async def _wait_and_retry(self, checks: Sequence[Check], verdict: Verdict) -> Verdict | None:
        """Throttle instead of reject: wait up to the denied levels' ``max_delay``."""
        budget = min((self._delays.get(d.scope, 0.0) for d in verdict.denied), default=0.0)
        deadline = time.monotonic() + budget
        if budget <= 0 or self._waiting >= self._max_waiting:
            return verdict
        self._waiting += 1
        started = time.monotonic()
        waited = False
        try:
            while not verdict.allowed:
                wait = verdict.retry_after
                if time.monotonic() + wait > deadline:
                    break
                await asyncio.sleep(wait)
                waited = True
                retried = await self.failure.hit(checks)
                if retried is None:
                    return None
                verdict = retried
            recorder = self._limiter.recorder
            if waited and recorder is not None:
                recorder.delayed(time.monotonic() - started, verdict.allowed)
            return verdict
        finally:
            self._waiting -= 1

    async def scaled_checks(self, checks: Sequence[Check], context: RequestContext) -> list[Check]:
        """``checks`` under dynamic limits: the load (or operator's) factor, and the
        client's behaviour factor on its own levels."""
        dynamic = self._limiter.dynamic
        assert dynamic is not None
        factor = await dynamic.global_factor()
        client_factor = 1.0
        if dynamic.behaviour is not None:
            # The worst record the request matches: a fresh identity never sheds a bad one.
            client_factor = min(dynamic.behaviour.factor(r) for r in _records(context))
        if factor == 1.0 and client_factor == 1.0:
            return list(checks)
        scaled = []
        reduced: set[str] = set()
        for check in checks:
            # A client's own levels: ip, user, api_key, and the composites and route limits
            # over several parts ("user+ip", "api_key+endpoint"), each holding a client part.
            own = check.scope in _CLIENT_SCOPES or "+" in check.scope
            f = factor * (client_factor if own else 1.0)
            policy = dynamic.scaled(check.policy, f)
            by_load = policy if f == factor else dynamic.scaled(check.policy, factor)
            if factor < 1.0 and by_load.limit < check.policy.limit:
                # Shrunk by load or the operator (not by the client's own behaviour).
                reduced.add(check.scope)
            scaled.append(check if policy is check.policy else check._replace(policy=policy))
        if reduced:
            context.reduced = reduced
        return scaled

    async def _refused_by_reduction(
        self, given: Sequence[Check], verdict: Verdict, reduced: set[str]
    ) -> set[str] | None:
        """``reduced`` when only the shrinking refused the request, else ``None``: the 503 of
        reduced capacity is for a request the quotas as configured admit (a look, nothing
        consumed); a client over those gets the 429 of its own quota."""
        denied = {d.scope for d in verdict.decisions if not d.allowed}
        if not denied <= reduced:
            return None
        backend = self._limiter.backend
        look = getattr(backend, "look", backend.peek)  # through the denial cache, if any
        try:
            configured = await look([c for c in given if c.scope in denied])
        except BackendError:
            return reduced  # the shrinking is in force, and no look says otherwise
        return reduced if configured.allowed else None

    async def _penalty(self, context: RequestContext) -> Decision | None:
        behaviour = self._limiter.dynamic.behaviour
        if behaviour is None:
            return None
        until = None
        for record in _records(context):
            found = await behaviour.penalty_until(record)
            if found is not None:
                until = max(until or 0.0, found)
        if until is None:
            return None
        wait = max(until - time.time(), 0.001)
        return Decision(
            False, 1, 0, wait, wait, "penalty-box", "client", behaviour.penalty_duration
        )


def _masked_client(check: Check) -> str:
    """Who a level counts, as logs may show it."""
    kind = check.scope.partition("+")[0]
    identity = check.identity
    if not isinstance(identity, str) or not identity or kind not in ("ip", "user", "api_key"):
        return check.scope  # a shared level (global, endpoint) or a composite identity
    return mask_identity(kind, identity)


def _records(context: RequestContext) -> tuple[str, ...]:
    # Behaviour and penalties follow what the client cannot make up: its IP (as the trusted
    # proxies give it) and its authenticated user. Never the API key: the limiter cannot tell
    # a valid key from a random one, and a random one would be a fresh, clean record.
    if context.user is not None:
        return (f"ip:{context.ip}", f"user:{context.user}")
    return (f"ip:{context.ip}",)
