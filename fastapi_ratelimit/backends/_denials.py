"""Denials a shared backend gave, kept until their ``retry_after``.

A client over its limit tends to keep asking, often as fast as it can. Each of those requests
would cost a Redis round trip only to hear "no" again. A denial says more than "no": the level
cannot admit this cost (or more) for ``retry_after`` seconds, whatever else happens, because
denied requests consume nothing and other traffic only ever uses quota up. So the answer is
kept, per storage key, and a later request whose checks include that key, with the same policy
and at least that cost, is denied here, with the wait that is left.

Exactness: an entry expires at ``sent + retry_after``, where ``sent`` is the local time just
before the call went out, which is no later than the moment Redis decided: a cached denial
never outlives the wait Redis gave. What can give quota back early is handled too: a refund or
a reset of a key forgets its entry, and an entry only answers for the very policy object it
was given for (a changed limit is a new policy). Another instance's reset of the same key is
not seen here: there, a denial can outlast the reset by at most its own ``retry_after``.

What a cached 429 says: a request that repeats a denied one (the same levels, keys, policies,
at least the same costs) gets the whole verdict again, every level's decision, with the times
moved on, so its headers are those Redis would give. A request that shares only a refused
level with a denied one (a client over its IP limit rotating API keys or user names) is
refused by that level alone, and its ``RateLimit-Policy`` names only the refusing level(s):
the others were not asked.

Bounded: at most ``size`` entries of each kind; when full, expired entries are dropped, and if
that frees nothing, everything (a flood of distinct identities costs round trips, never
memory). Keys are the backend's hashed storage keys, of fixed length: no raw identity is held.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence

from ..decision import Decision, Verdict, new_decision
from ..policy import Policy
from .base import Check

__all__ = ["DenialCache"]


class DenialCache:
    """Denials by storage key: ``key -> (policy, cost, expires at, decision)``."""

    __slots__ = ("_clock", "_entries", "_size", "_verdicts")

    def __init__(self, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._size = size
        self._clock = clock
        self._entries: dict[str, tuple[Policy, int, float, Decision]] = {}
        #: Whole denied verdicts by their keys: ``keys -> (checks, asked at, verdict)``.
        self._verdicts: dict[tuple[str, ...], tuple[Sequence[Check], float, Verdict]] = {}

    def __len__(self) -> int:
        # Also its truth: callers skip building keys while it is empty.
        return len(self._entries)

    def now(self) -> float:
        return self._clock()

    def lookup(self, checks: Sequence[Check], keys: Sequence[str]) -> Verdict | None:
        """The denial for these checks if any of them is known to refuse them, else ``None``.

        The verdict holds the decisions of the refusing levels only, with the time that is
        left: the other levels were not asked.
        """
        entries = self._entries
        now = self._clock()
        whole = self._verdicts.get(tuple(keys))
        if whole is not None:
            denied, sent, verdict = whole
            # Whole only while every refusing level still refuses: until the shortest wait.
            if now - sent >= min(d.retry_after for d in verdict.decisions if not d.allowed):
                del self._verdicts[tuple(keys)]
            elif all(
                (c.policy is d.policy or c.policy == d.policy) and c.cost >= d.cost
                for c, d in zip(checks, denied, strict=True)
            ):
                return Verdict(tuple(_moved_on(d, now - sent) for d in verdict.decisions), False)
        found: list[Decision] = []
        # The entries looked up by C code (map): during a flood, every request passes here.
        for check, key, entry in zip(checks, keys, map(entries.get, keys), strict=True):
            if entry is None:
                continue
            policy, cost, until, decision = entry
            left = until - now
            if left <= 0:
                del entries[key]
                continue
            if (check.policy is policy or check.policy == policy) and check.cost >= cost:
                found.append(_moved_on(decision, decision.retry_after - left))
        return Verdict(tuple(found), False) if found else None

    def store(
        self, checks: Sequence[Check], keys: Sequence[str], verdict: Verdict, sent: float
    ) -> None:
        """Keep the refusing levels of a denied ``verdict`` (asked at local time ``sent``)."""
        if len(self._verdicts) >= self._size:
            self._verdicts.clear()  # bounded; the per-key entries still answer
        self._verdicts[tuple(keys)] = (tuple(checks), sent, verdict)
        entries = self._entries
        for check, key, decision in zip(checks, keys, verdict.decisions, strict=True):
            if decision.allowed or not decision.retry_after > 0:
                continue
            if key not in entries and len(entries) >= self._size:
                self._make_room()
            entries[key] = (check.policy, check.cost, sent + decision.retry_after, decision)

    def forget(self, keys: Iterable[str]) -> None:
        """Quota came back for these keys (a refund, a reset): drop what was known."""
        if self._entries:
            keys = set(keys)
            for key in keys:
                self._entries.pop(key, None)
            for cached in [k for k in self._verdicts if not keys.isdisjoint(k)]:
                del self._verdicts[cached]

    def _make_room(self) -> None:
        now = self._clock()
        entries = self._entries
        for key in [k for k, entry in entries.items() if entry[2] <= now]:
            del entries[key]
        if len(entries) >= self._size:
            entries.clear()


def _moved_on(decision: Decision, waited: float) -> Decision:
    """``decision`` as it reads ``waited`` seconds after it was made."""
    # Built as a tuple (one C call), not with _replace (two Python-level calls): one of these
    # is made for every request a cached denial answers.
    allowed, limit, remaining, reset_after, retry_after, policy, scope, window = decision
    if allowed:
        reset_after = max(reset_after - waited, 0.0)
    else:
        retry_after = retry_after - waited
        reset_after = max(reset_after - waited, retry_after)
    return new_decision(
        (allowed, limit, remaining, reset_after, retry_after, policy, scope, window)
    )
