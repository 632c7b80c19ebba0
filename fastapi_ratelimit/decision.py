"""The result of a rate-limit check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

__all__ = ["Decision", "Verdict", "binding_of", "never"]

_new_tuple = tuple.__new__


class Decision(NamedTuple):
    """One level's answer for one request.

    Attributes:
        allowed: whether this level admits the request.
        limit: the quota of the policy (burst capacity for token bucket and GCRA).
        remaining: units left after this request (never negative). When the request as a whole
            was denied, nothing was consumed and this is the unchanged count.
        reset_after: seconds until the quota is fully restored (0 when nothing is used).
        retry_after: seconds until a request of the same cost could pass; > 0 exactly when denied;
            ``inf`` when the cost is more than the level ever admits (see :func:`never`).
        policy: the policy name.
        scope: the level (``"global"``, ``"ip"``, ``"user"``, ``"user+endpoint"``, ...).
        window: the policy's window in seconds (``w`` in ``RateLimit-Policy``).

    A NamedTuple rather than a frozen dataclass: as immutable, and four times cheaper to
    build, which counts with five of them per request on the hot path.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    policy: str
    scope: str
    window: float


class _VerdictFields(NamedTuple):
    decisions: tuple[Decision, ...]
    allowed: bool


class Verdict(_VerdictFields):
    """The answer for all levels of one request, decided atomically.

    ``allowed`` is true only when every level admits the request; otherwise no level consumed
    anything. ``decisions`` are in the order the checks were given.

    ``Verdict(decisions)`` works out ``allowed``. Immutable like a frozen dataclass, but a
    tuple: one is built per request, and a backend that already knows ``allowed`` builds it
    with :data:`new_verdict` without another Python-level call.
    """

    __slots__ = ()

    def __new__(cls, decisions: tuple[Decision, ...], allowed: bool | None = None) -> Verdict:
        if allowed is None:
            # A plain loop: no generator frame.
            allowed = True
            for decision in decisions:
                if not decision.allowed:
                    allowed = False
                    break
        return _new_tuple(cls, (decisions, allowed))

    @classmethod
    def of(cls, decisions: Sequence[Decision]) -> Verdict:
        return cls(tuple(decisions))

    @property
    def denied(self) -> tuple[Decision, ...]:
        """The levels that refused the request."""
        return tuple(d for d in self.decisions if not d.allowed)

    @property
    def retry_after(self) -> float:
        """Seconds until every denying level would admit the request (0 when allowed)."""
        return max((d.retry_after for d in self.decisions), default=0.0)

    @property
    def binding(self) -> Decision | None:
        """The most restrictive level: the denying one with the longest wait or, when the
        request passed, the one with the smallest share of its quota left."""
        return binding_of(self.decisions) if self.decisions else None


#: ``tuple.__new__`` bound to the class: builds one from a tuple of its fields in one C call,
#: without NamedTuple's Python-level ``__new__``. For the backends' hot paths; the caller
#: vouches for the fields (for a Verdict, that ``allowed`` matches the decisions).
new_decision = partial(_new_tuple, Decision)
new_verdict = partial(_new_tuple, Verdict)


def binding_of(decisions: Sequence[Decision]) -> Decision:
    """The most restrictive of a non-empty sequence of decisions (see :attr:`Verdict.binding`).
    A function of its own so the response headers use the same rule without a Verdict.

    Ties go to the earliest decision. Plain loops, no key functions: this runs per request.
    """
    first = decisions[0]
    if len(decisions) == 1:
        return first
    # One pass for both rules; the share is only compared while nothing was denied.
    denied: Decision | None = None
    best, best_share = first, first.remaining / first.limit
    for decision in decisions:
        if not decision.allowed:
            if denied is None or decision.retry_after > denied.retry_after:
                denied = decision
        elif denied is None:
            share = decision.remaining / decision.limit
            if share < best_share or (share == best_share and decision.remaining < best.remaining):
                best, best_share = decision, share
    return denied if denied is not None else best


def never(decisions: Sequence[Decision]) -> bool:
    """Whether a level refused for good: the request costs more than it ever admits, and no
    ``Retry-After`` would be true."""
    # A plain loop: asked of every denial, and a generator would be a frame per decision.
    for decision in decisions:  # noqa: SIM110
        if decision.retry_after == math.inf:
            return True
    return False
