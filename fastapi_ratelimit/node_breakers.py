"""One circuit breaker per master of a Redis Cluster.

With a single breaker, one master of three going down fails a third or more of all checks,
which opens the breaker for everyone: every client skips Redis, so under ``allow`` nobody is
limited any more and under ``deny`` everybody gets 503. Here each master has a breaker of its
own (same settings, made on first sight of the node): only the checks whose keys live on a
master that is down follow the failure policy, while the levels on healthy masters are still
decided, all-or-nothing among themselves (a denial refunds the levels that were admitted).
The mirrors of operator state poll through the breaker of the node that holds their namespace,
and the request path's other writes (refunds, a reported cost, shadow levels) go to each
master through its own breaker (:meth:`NodeBreakers.split`, see ``control.PollPolicy.write``).

Standalone Redis and Sentinel keep the limiter's one breaker: there is one master to break.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol, cast

from loguru import logger

from .backends.base import Backend, Check
from .breaker import CircuitBreaker
from .decision import Decision, Verdict
from .errors import BackendError

__all__ = ["NodeBreakers"]


class _NodeMapped(Backend, Protocol):
    def node_of(self, check: Check) -> str: ...

    def control_node(self, namespace: str) -> str: ...


class NodeBreakers:
    """The per-node breakers of one limiter. ``by_node[""]`` is the limiter's own breaker: it
    guards the calls made before the client knows the slot map."""

    def __init__(self, breaker: CircuitBreaker, backend: _NodeMapped) -> None:
        self._template = breaker
        self._backend = backend
        #: node address -> its breaker; one per master the client has routed to.
        self.by_node: dict[str, CircuitBreaker] = {"": breaker}

    def breaker(self, node: str) -> CircuitBreaker:
        found = self.by_node.get(node)
        if found is None:
            found = self.by_node[node] = self._template.for_node(node)
        return found

    def for_namespace(self, namespace: str) -> CircuitBreaker:
        """The breaker of the node holding an operator-state namespace (for the mirrors'
        polls, see control.PollPolicy)."""
        return self.breaker(self._backend.control_node(namespace))

    def split(self, checks: Sequence[Check]) -> list[tuple[CircuitBreaker, list[Check]]]:
        """``checks`` by the master holding their keys, each part with that master's breaker
        (for :meth:`PollPolicy.write <fastapi_ratelimit.control.PollPolicy.write>`)."""
        parts: dict[str, list[Check]] = {}
        for check in checks:
            parts.setdefault(self._backend.node_of(check), []).append(check)
        return [(self.breaker(node), part) for node, part in parts.items()]

    def retry_after(self) -> int:
        """Seconds until every open breaker has probed again (1 when none is open): the 503
        does not say which node refused, so the longest wait, never one that is too short.
        (A breaker of a node no longer routed to stays open, but its wait is over: 1.)"""
        return max((b.retry_after() for b in self.by_node.values() if b.state == "open"), default=1)

    async def hit(
        self,
        checks: Sequence[Check],
        refuses: Callable[[Sequence[Check]], bool],
        fallback: Backend | None,
    ) -> Verdict | None:
        """Decide ``checks`` node by node. The checks of nodes that are down are refused
        (``BackendError``) when ``refuses(them)``, else checked against ``fallback`` or
        skipped. ``None`` when no level could be decided at all (fail open)."""
        groups: dict[str, list[int]] = {}
        for index, check in enumerate(checks):
            groups.setdefault(self._backend.node_of(check), []).append(index)
        calls: list[tuple[CircuitBreaker, list[int], bool]] = []
        down: list[int] = []
        for node, indices in groups.items():
            breaker = self.breaker(node)
            # An idle breaker (closed, nothing failed lately) needs no bookkeeping.
            if breaker.idle or breaker.allow_call():
                calls.append((breaker, indices, breaker.state == "half_open"))
            else:
                down.extend(indices)
        if down and refuses([checks[i] for i in down]):
            raise BackendError("rate-limit backend circuit open for a cluster node")
        try:
            results = await asyncio.gather(
                *(self._backend.hit([checks[i] for i in group]) for _, group, _ in calls),
                return_exceptions=True,
            )
        except BaseException:
            _abandon(calls)  # cancelled: no answer about any node
            raise
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, BackendError):
                _abandon(calls)  # a bug, or cancelled: no answer about the backend
                raise result
        failure: BackendError | None = None
        backend: Backend = self._backend
        # (indices, verdict, the backend that gave it)
        answered: list[tuple[list[int], Verdict, Backend]] = []
        for (breaker, group, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                breaker.record_failure()
                down.extend(group)
                failure = cast(BackendError, result)
            else:
                if not breaker.idle:
                    breaker.record_success()
                answered.append((group, result, backend))
        if failure is not None and refuses([checks[i] for i in down]):
            await _refund(checks, answered)
            raise failure
        if down and fallback is not None:
            # Per-process limits for the levels that are down: an outage is not a free pass.
            down.sort()
            verdict = await fallback.hit([checks[i] for i in down])
            answered.append((down, verdict, fallback))
        if not answered:
            return None
        decisions: list[Decision | None] = [None] * len(checks)
        for group, verdict, _ in answered:
            for index, decision in zip(group, verdict.decisions, strict=True):
                decisions[index] = decision
        if any(not verdict.allowed for _, verdict, _ in answered):
            # All-or-nothing among the levels decided: give back what the others consumed.
            for index in await _refund(checks, answered):
                refunded = decisions[index]
                assert refunded is not None
                decisions[index] = refunded._replace(
                    remaining=refunded.remaining + checks[index].cost
                )
        return Verdict(tuple(d for d in decisions if d is not None))


def _abandon(calls: list[tuple[CircuitBreaker, list[int], bool]]) -> None:
    for breaker, _, probe in calls:
        if probe:
            breaker.abandon_probe()


async def _refund(
    checks: Sequence[Check], answered: list[tuple[list[int], Verdict, Backend]]
) -> list[int]:
    """Refund the groups that were admitted; returns their indices. A refund that fails is
    left be: the request is refused either way, and those levels stay charged until their
    window passes (as after a cluster slot's failed refund in the Redis backend)."""
    refunded: list[int] = []
    for group, verdict, backend in answered:
        if verdict.allowed:
            refunded.extend(group)
            try:
                await backend.refund([checks[i] for i in group])
            except BackendError as exc:
                logger.warning("could not refund a cluster node after a denial: {}", exc)
    return refunded
