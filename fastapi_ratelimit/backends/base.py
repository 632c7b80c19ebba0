"""The backend protocol and the :class:`Check` it is given.

A backend answers for *all* levels of one request at once: :meth:`Backend.hit` admits the
request only if every check passes, and then consumes at every level; otherwise it consumes
nothing anywhere. Backends are plain objects you build and pass in: no registry, no URLs.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from functools import partial
from typing import NamedTuple, Protocol, runtime_checkable

from ..decision import Decision, Verdict, new_decision
from ..keys import Identity
from ..policy import Policy

__all__ = ["WARM_UP_TIMEOUT", "Backend", "Check", "WarmsUp"]

#: Seconds a start-up warm-up (:class:`WarmsUp`) may take by default: a connection, its
#: handshake and a script load, with room for a loaded machine or a full garbage collection,
#: yet short enough that a Redis that does not answer delays start-up only this long.
WARM_UP_TIMEOUT = 5.0


class _CheckFields(NamedTuple):
    policy: Policy
    scope: str
    identity: Identity = ""
    cost: int = 1


class Check(_CheckFields):
    """One level of one request: which policy, at which scope, for which identity, at what cost.

    ``identity`` is hashed into the storage key (see :mod:`fastapi_ratelimit.keys`); the global
    level uses the empty identity. ``cost`` is the number of units to consume (or, for
    :meth:`Backend.refund`, to give back).

    An immutable NamedTuple rather than a frozen dataclass: several are built per request,
    and a frozen dataclass costs three times as much to build.
    """

    __slots__ = ()

    def __new__(cls, policy: Policy, scope: str, identity: Identity = "", cost: int = 1) -> Check:
        if type(cost) is not int or cost < 1:  # bool is rejected too: type(True) is bool
            raise ValueError(f"Check.cost must be a whole number >= 1, got {cost!r}")
        return super().__new__(cls, policy, scope, identity, cost)


#: ``new_check((policy, scope, identity, cost))``: a :class:`Check` without the validation
#: in its ``__new__`` (one C call). Only for callers whose cost is already validated, such as
#: the limiter with costs from its checked cost table.
new_check = partial(tuple.__new__, Check)


@runtime_checkable
class Backend(Protocol):
    """Where rate-limit state lives. Implementations: ``MemoryBackend``, ``RedisBackend``."""

    async def hit(self, checks: Sequence[Check]) -> Verdict:
        """Check every level and consume at all of them, or at none (all-or-nothing)."""
        ...

    async def peek(self, checks: Sequence[Check]) -> Verdict:
        """What :meth:`hit` would answer, without consuming anything. ``remaining`` is the
        current count."""
        ...

    async def refund(self, checks: Sequence[Check]) -> None:
        """Give back ``check.cost`` units at each level (never above the full quota)."""
        ...

    async def reset(self, checks: Sequence[Check]) -> None:
        """Forget all state of these levels for these identities."""
        ...

    async def aclose(self) -> None:
        """Release connections. The backend must not be used afterwards."""
        ...


@runtime_checkable
class WarmsUp(Protocol):
    """A backend with set-up worth doing before the first request (connections, scripts), so
    that no request's own timeout has to cover it. Optional: :class:`Backend` does not ask for
    it, and :meth:`RateLimiter.warm_up <fastapi_ratelimit.RateLimiter.warm_up>` skips a backend
    without it (the memory backend has nothing to set up)."""

    async def warm_up(self, timeout: float = WARM_UP_TIMEOUT) -> None:  # noqa: ASYNC109
        """Do the set-up now, within ``timeout`` seconds in all; raise
        :class:`~fastapi_ratelimit.errors.BackendError` when that is not possible."""
        ...


def make_decision(
    check: Check, allowed: bool, remaining: int, reset_us: int, retry_us: int
) -> Decision:
    """Shared by the backends, so both turn microseconds into a Decision identically."""
    policy = check.policy
    return new_decision(
        (
            allowed,
            policy.limit,
            remaining if remaining > 0 else 0,
            reset_us / 1_000_000,
            retry_us / 1_000_000,
            policy.name,
            check.scope,
            policy.window,
        )
    )


def storage_key(check: Check) -> tuple[object, ...]:
    """What the backends key a check's state by: two checks with the same one are one limit
    (and may not appear twice in one call, see :func:`ensure_distinct`)."""
    policy = check.policy
    return (check.scope, policy.bucket, policy.code, check.identity)


def ensure_distinct(keys: Sequence[Hashable]) -> None:
    # Two checks on one key would both read the same state and the second write would
    # overwrite the first: refuse rather than undercount.
    if len(set(keys)) != len(keys):
        raise ValueError("the same policy, scope and identity appear twice in one check")
