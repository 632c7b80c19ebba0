"""The embedded default backend: all state in one bounded dict in this process.

Atomicity comes from never awaiting inside a read-modify-write: every public coroutine runs
to completion in one step of the event loop, so no per-key locks are needed. Memory is
bounded by ``max_keys``: when full, expired keys are swept first (a full pass, amortised over
at least ``max_keys // 8`` insertions), then the least recently used key is evicted. Every
hit, admitted *or denied*, makes its keys the most recently used: eviction must never hand a
client who is being refused a fresh quota.

Idle memory is given back by a timer (a plain ``call_later`` callback, no task) that drops up
to ``_SWEEP_BUDGET`` expired keys from the least-recently-used end each second while the
store holds anything, and stops when it is empty.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from ..algorithms import fixed_window as fw
from ..algorithms import gcra as gc
from ..algorithms import sliding_window_counter as sc
from ..algorithms import sliding_window_log as sl
from ..algorithms import token_bucket as tb
from ..algorithms._base import Evaluation
from ..clock import Clock, SystemClock
from ..decision import Decision, Verdict, new_decision, new_verdict
from ..errors import ConfigurationError
from ..keys import Identity, KeyBuilder
from ..policy import Algorithm, Policy
from .base import Check, ensure_distinct, make_decision

__all__ = ["Level", "MemoryBackend"]

_FW, _SL, _SC, _TB, _GC = (
    Algorithm.FIXED_WINDOW,
    Algorithm.SLIDING_WINDOW_LOG,
    Algorithm.SLIDING_WINDOW_COUNTER,
    Algorithm.TOKEN_BUCKET,
    Algorithm.GCRA,
)
#: Scopes whose short identities are kept as they are in store keys (see store_key).
_RAW_SCOPES = frozenset({"global", "ip", "endpoint", "user"})
_RAW_MAX = 64
#: A key of the store: a tuple for a short IP, user or endpoint identity, else the hashed key.
_StoreKey = tuple[str, str, str, str] | str
#: A level as :meth:`MemoryBackend.admit_levels` takes it (see :meth:`MemoryBackend.level`):
#: policy, scope, identity slot, store key, then the policy's figures the arithmetic reads.
Level = tuple[Policy, str, int, "_StoreKey | None", str, str, int, int, str, float]

#: Expired keys dropped from the LRU end on each insert: keeps memory trending down without a
#: background task.
_OPPORTUNISTIC_EXPIRY = 2
#: The idle sweep: at most this many keys looked at per tick (about a millisecond of the
#: event loop), one tick a second.
_SWEEP_BUDGET = 10_000
_SWEEP_INTERVAL = 1.0


class MemoryBackend:
    """In-process rate-limit state. Fast, exact, and shared by nothing outside this process.

    Args:
        max_keys: most keys kept at once (default 100,000; about 200-400 bytes each).
        clock: time source; tests pass a :class:`~fastapi_ratelimit.clock.FakeClock`.
        prefix: key prefix (keys are hashed, see :mod:`fastapi_ratelimit.keys`).
        key_secret: optional secret for the key hash.
        ttl_margin: seconds kept past the point where a key stops mattering.
    """

    def __init__(
        self,
        *,
        max_keys: int = 100_000,
        clock: Clock | None = None,
        prefix: str = "rl",
        key_secret: bytes | None = None,
        ttl_margin: float = 1.0,
    ) -> None:
        if isinstance(max_keys, bool) or not isinstance(max_keys, int) or max_keys < 1:
            raise ConfigurationError("max_keys", max_keys, "must be a whole number >= 1")
        if not (isinstance(ttl_margin, (int, float)) and 0 <= ttl_margin <= 60):
            raise ConfigurationError("ttl_margin", ttl_margin, "must be between 0 and 60 seconds")
        self._max_keys = max_keys
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._keys = KeyBuilder(prefix, secret=key_secret)
        self._margin_us = round(ttl_margin * 1_000_000)
        # key -> (expires_at_us, state); insertion order is recency order (LRU first).
        # Entries are tuples, replaced on write: a tuple of ints is untracked by the garbage
        # collector after its first collection, so thousands of clients' counters add no
        # work to every full collection (lists would: each one a GC pause, see bench/).
        self._data: OrderedDict[_StoreKey, tuple[int, Any]] = OrderedDict()
        self._sweep_credit = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._sweeper_loop: asyncio.AbstractEventLoop | None = None
        # Operator state (allow/block lists, stored tiers): small, never evicted.
        self._control: dict[str, tuple[int, dict[str, str]]] = {}

    def __len__(self) -> int:
        return len(self._data)

    @property
    def key_builder(self) -> KeyBuilder:
        return self._keys

    @property
    def max_keys(self) -> int:
        return self._max_keys

    async def hit(self, checks: Sequence[Check]) -> Verdict:
        return self.hit_now(checks)

    def hit_now(self, checks: Sequence[Check]) -> Verdict:
        """:meth:`hit` without a coroutine: this backend never waits, so callers on a hot
        path (the limiter) may call it directly."""
        verdict = self._admit_all(checks)
        return verdict if verdict is not None else self._check(checks, commit=True)

    def hit_slow(self, checks: Sequence[Check]) -> Verdict:
        """:meth:`hit_now` without its fast attempt, for a caller that knows it fails (the
        express path, after :meth:`admit_levels` refused)."""
        return self._check(checks, commit=True)

    async def peek(self, checks: Sequence[Check]) -> Verdict:
        return self._check(checks, commit=False)

    async def refund(self, checks: Sequence[Check]) -> None:
        if len(checks) > 1:
            # As hit and peek, and as the Redis backend refuses: one level once per call.
            ensure_distinct([self._key(c) for c in checks])
        now = self._clock.now_us()
        for check in checks:
            key = self._key(check)
            state = self._get(key, now)
            if state is None:
                continue
            policy = check.policy
            rate = policy.rate
            algorithm = policy.algorithm
            if algorithm is _SL:
                sl.trim(state, now, rate.period_us)
                sl.refund(state, check.cost)
                if not state:
                    del self._data[key]
                continue
            if algorithm is _FW:
                state = fw.refund(state, now, rate.period_us, check.cost)
            elif algorithm is _SC:
                state = sc.refund(state, now, rate.period_us, check.cost)
            elif algorithm is _TB:
                state = tb.refund(state, now, rate.limit, rate.period_us, rate.capacity, check.cost)
            else:
                state = gc.refund(state, now, rate.limit, rate.period_us, check.cost)
            # Refunds keep the key's expiry: the state now needs less time, never more.
            self._data[key] = (self._data[key][0], state)

    async def reset(self, checks: Sequence[Check]) -> None:
        for check in checks:
            self._data.pop(self._key(check), None)

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = self._sweeper_loop = None
        self._data.clear()

    def sweep(self, budget: int = _SWEEP_BUDGET) -> int:
        """Drop expired keys from the least-recently-used end, looking at most at ``budget``
        keys; returns how many were dropped. The idle timer calls it every second; the LRU
        end holds the keys written longest ago, the first to expire."""
        data = self._data
        now = self._clock.now_us()
        dropped = 0
        while data and dropped < budget:
            oldest_key = next(iter(data))
            if data[oldest_key][0] > now:
                break
            del data[oldest_key]
            dropped += 1
        return dropped

    def _tick(self) -> None:
        self.sweep()
        self._sweeper = None
        if self._data and self._sweeper_loop is not None:
            self._sweeper = self._sweeper_loop.call_later(_SWEEP_INTERVAL, self._tick)

    def _ensure_sweeper(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # used outside an event loop: inserts and the full sweep still reclaim
        # A timer left on another (closed) loop never fires: start one on this loop.
        if self._sweeper is None or self._sweeper_loop is not loop:
            self._sweeper_loop = loop
            self._sweeper = loop.call_later(_SWEEP_INTERVAL, self._tick)

    # -- operator state (see fastapi_ratelimit.control) ---------------------------------------

    async def control_load(self, namespace: str) -> tuple[int, dict[str, str]]:
        version, entries = self._control.get(namespace, (0, {}))
        return version, dict(entries)

    async def control_version(self, namespace: str) -> int:
        return self._control.get(namespace, (0, {}))[0]

    async def control_put(self, namespace: str, key: str, value: str) -> None:
        version, entries = self._control.get(namespace, (0, {}))
        entries[key] = value
        self._control[namespace] = (version + 1, entries)

    async def control_delete(self, namespace: str, keys: list[str]) -> int:
        version, entries = self._control.get(namespace, (0, {}))
        removed = sum(entries.pop(key, None) is not None for key in keys)
        if removed:
            self._control[namespace] = (version + 1, entries)
        return removed

    # -- internals ---------------------------------------------------------------------------

    def _key(self, check: Check) -> _StoreKey:
        policy = check.policy
        return self.store_key(check.scope, policy.bucket, policy.code, check.identity)

    def store_key(self, scope: str, bucket: str, code: str, identity: Identity) -> _StoreKey:
        """The key of a level's state in this process's store.

        A short IP, user or endpoint identity is kept as it is, in a tuple: these never leave
        the process, and hashing them (blake2b and formatting, for every new client) was a
        measurable share of a request. API keys, every other scope and anything long are
        kept only as the hashed storage key (:class:`KeyBuilder`), a ``str``: a ``str`` never
        equals a tuple, so the two kinds cannot collide, and no raw secret or oversized
        client value is ever held.
        """
        if scope in _RAW_SCOPES and type(identity) is str and len(identity) <= _RAW_MAX:
            return (scope, bucket, code, identity)
        return self._hashed_key(scope, bucket, code, identity)

    def _hashed_key(self, scope: str, bucket: str, code: str, identity: Identity) -> str:
        keys = self._keys
        key = keys.cached.get((scope, bucket, code, identity))
        return key if key is not None else keys.key(scope, bucket, code, identity)

    def _get(self, key: _StoreKey, now: int) -> Any:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry[0] <= now:
            del self._data[key]
            return None
        return entry[1]

    def _admit_all(self, checks: Sequence[Check]) -> Verdict | None:
        """The common case, fast: every level a sliding window counter (the default) and
        every level admitting. Anything else (another algorithm, a level that refuses, the
        same key twice) returns ``None`` before anything is changed, and :meth:`_check`
        decides instead.

        The arithmetic is :func:`sliding_window_counter.evaluate`'s on its admitting path,
        operation for operation, and the decision :func:`make_decision`'s (the parity tests
        hold both backends to the Lua twin), without an Evaluation, a dispatch and a helper
        call per level.
        """
        now = self._clock.now_us()
        data = self._data
        hashed_key = self._hashed_key
        floor = math.floor
        rows = []
        seen: list[_StoreKey] = []
        window = start = elapsed = 0
        for check in checks:
            policy, scope, identity, cost = check  # one unpacking: cheaper than 4 lookups
            if policy.algorithm is not _SC:
                return None
            # store_key, inline: this runs per level of every request.
            if scope in _RAW_SCOPES and type(identity) is str and len(identity) <= _RAW_MAX:
                key: _StoreKey = (scope, policy.bucket, policy.code, identity)
            else:
                key = hashed_key(scope, policy.bucket, policy.code, identity)
            rate = policy.rate
            if rate.period_us != window:  # levels mostly share a window: its math once
                window = rate.period_us
                start = floor(now / window) * window
                elapsed = now - start
            entry = data.get(key)
            cur = prev = 0
            if entry is not None and entry[0] > now:
                state = entry[1]
                if state[0] == start:
                    cur, prev = state[1], state[2]
                elif state[0] == start - window:
                    prev = state[1]
            available = rate.limit - (prev * (window - elapsed) / window + cur)
            if not cost <= available:
                return None
            seen.append(key)
            rows.append(
                (
                    policy,
                    scope,
                    cost,
                    key,
                    entry,
                    (start, cur + cost, prev),
                    2 * window - elapsed,
                    available,
                )
            )
        if len(seen) > 1 and len(set(seen)) != len(seen):
            return None
        margin = self._margin_us
        decisions = []
        fresh: list[tuple[_StoreKey, tuple[int, Any]]] = []
        for policy, scope, cost, key, entry, state, reset_us, available in rows:
            if entry is not None:
                # Live or expired, the entry is this key's: replace it and move it to the
                # recent end, as a new one would be.
                data[key] = (now + reset_us + margin, state)
                data.move_to_end(key)
            else:
                fresh.append((key, (now + reset_us + margin, state)))
            remaining = floor(available - cost)
            decisions.append(
                new_decision(
                    (
                        True,
                        policy.limit,
                        remaining if remaining > 0 else 0,
                        reset_us / 1_000_000,
                        0.0,
                        policy.name,
                        scope,
                        policy.window,
                    )
                )
            )
        if fresh:
            self._store_new(fresh, now)
        return new_verdict((tuple(decisions), True))

    def admit_levels(
        self, levels: Sequence[Level], identities: Sequence[str | None], cost: int
    ) -> tuple[tuple[Decision, ...], int] | None:
        """The express path's decision (see ``express.py``): :meth:`_admit_all` for levels
        worked out once per endpoint (:func:`level`), with the binding decision picked on
        the way.

        A shared level brings its store key; a per-client one (key ``None``) is keyed on
        ``identities[slot]`` and left out when that is ``None``. Every policy is a sliding
        window counter and no two levels share a scope (the caller vouches for both), so no
        two share a key. Returns the decisions and the index of the binding one
        (:func:`~..decision.binding_of`'s rule), or ``None``, with nothing changed, when a
        level refuses: :meth:`hit_now` then decides.
        """
        now = self._clock.now_us()
        data = self._data
        floor = math.floor
        decisions: list[Decision] = []
        writes: list[tuple[_StoreKey, tuple[int, Any] | None, tuple[int, Any]]] = []
        margin = self._margin_us
        # Every share left is below 1 (an admitted level leaves less than its limit), so
        # the first level always takes the lead.
        best = best_remaining = 0
        best_share = 2.0
        window = start = elapsed = 0
        for _, scope, slot, key, bucket, code, limit, period, name, seconds in levels:
            if key is None:
                identity = identities[slot]
                if identity is None:
                    continue
                if scope in _RAW_SCOPES and len(identity) <= _RAW_MAX:
                    key = (scope, bucket, code, identity)
                else:
                    key = self._hashed_key(scope, bucket, code, identity)
            if period != window:  # levels mostly share a window: its math once
                window = period
                # As sliding_window_counter.evaluate has it (float division, then floor):
                # the same start to the bit.
                start = floor(now / window) * window
                elapsed = now - start
            entry = data.get(key)
            cur = prev = 0
            if entry is not None and entry[0] > now:
                state = entry[1]
                if state[0] == start:
                    cur, prev = state[1], state[2]
                elif state[0] == start - window:
                    prev = state[1]
            available = limit - (prev * (window - elapsed) / window + cur)
            if not cost <= available:
                return None
            reset_us = 2 * window - elapsed
            writes.append((key, entry, (now + reset_us + margin, (start, cur + cost, prev))))
            # floor(available - cost), which is not negative here.
            remaining = int(available - cost)
            share = remaining / limit
            if share < best_share or (share == best_share and remaining < best_remaining):
                best, best_share, best_remaining = len(decisions), share, remaining
            decisions.append(
                new_decision(
                    (True, limit, remaining, reset_us / 1_000_000, 0.0, name, scope, seconds)
                )
            )
        fresh = []
        for key, entry, value in writes:
            if entry is not None:
                data[key] = value
                data.move_to_end(key)
            else:
                fresh.append((key, value))
        if fresh:
            self._store_new(fresh, now)
        return tuple(decisions), best

    def level(self, policy: Policy, scope: str, slot: int, identity: str | None) -> Level:
        """A level for :meth:`admit_levels`: a sliding window counter ``policy`` at
        ``scope``, shared (keyed on ``identity``) or, with ``identity`` ``None``, per client
        (keyed on the ``slot`` of the request's identities)."""
        if policy.algorithm is not _SC:
            raise ValueError(f"not a sliding window counter: {policy!r}")
        key = (
            None
            if identity is None
            else self.store_key(scope, policy.bucket, policy.code, identity)
        )
        rate = policy.rate
        # The decision's limit is the policy's; the arithmetic's the rate's (one number for
        # this algorithm, which has no burst).
        assert policy.limit == rate.limit
        return (
            policy,
            scope,
            slot,
            key,
            policy.bucket,
            policy.code,
            rate.limit,
            rate.period_us,
            policy.name,
            policy.window,
        )

    def _check(self, checks: Sequence[Check], *, commit: bool) -> Verdict:
        # The general path (every algorithm, denials, peeks): one pass to evaluate, one to
        # commit and answer, with lookups and stores inline.
        now = self._clock.now_us()
        data = self._data
        key_of = self.store_key
        rows: list[tuple[Check, _StoreKey, tuple[int, Any] | None, Any, Evaluation]] = []
        all_allowed = True
        for check in checks:
            policy = check.policy
            key = key_of(check.scope, policy.bucket, policy.code, check.identity)
            entry = data.get(key)
            if entry is not None and entry[0] <= now:
                del data[key]
                entry = None
            state = entry[1] if entry is not None else None
            if policy.algorithm is _SL:
                state = state if state is not None else deque()
            evaluation = _evaluate(check, state, now)
            if not evaluation.allowed:
                all_allowed = False
            rows.append((check, key, entry, state, evaluation))
        if len(rows) > 1 and len({row[1] for row in rows}) != len(rows):
            ensure_distinct([row[1] for row in rows])
        consume = commit and all_allowed
        decisions: list[Decision] = []
        fresh: list[tuple[_StoreKey, tuple[int, Any]]] = []
        for check, key, entry, state, ev in rows:
            if consume:
                if check.policy.algorithm is _SL:
                    state.extend([now] * check.cost)
                else:
                    state = ev.new_state
                expires = now + ev.ttl_us + self._margin_us
                if entry is not None:
                    data[key] = (expires, state)
                    data.move_to_end(key)
                else:
                    fresh.append((key, (expires, state)))
                remaining = math.floor(ev.available - check.cost)
                reset_us = ev.reset_commit_us
            else:
                if commit and entry is not None:
                    # A denied hit is still a use: the refused client's counters must be the
                    # last to be evicted, not the first (an evicted key is a fresh quota).
                    data.move_to_end(key)
                remaining = math.floor(ev.available)
                reset_us = ev.reset_keep_us
            decisions.append(make_decision(check, ev.allowed, remaining, reset_us, ev.retry_us))
        if fresh:
            self._store_new(fresh, now)
        return new_verdict((tuple(decisions), all_allowed))

    def _store_new(self, fresh: list[tuple[_StoreKey, tuple[int, Any]]], now: int) -> None:
        # Called after the request's existing entries were updated (so they are recent and
        # unexpired): making room for the new keys never evicts an entry the caller holds.
        for key, entry in fresh:
            self._make_room(now)
            self._data[key] = entry
        self._ensure_sweeper()

    def _make_room(self, now: int) -> None:
        data = self._data
        # Cheap, incremental expiry: the least recently written keys are the likeliest to be
        # expired.
        for _ in range(_OPPORTUNISTIC_EXPIRY):
            if not data:
                break
            oldest_key = next(iter(data))
            if data[oldest_key][0] > now:
                break
            del data[oldest_key]
        if len(data) < self._max_keys:
            return
        if self._sweep_credit <= 0:
            expired = [k for k, entry in data.items() if entry[0] <= now]
            for k in expired:
                del data[k]
            # The next full sweep waits for at least max_keys/8 evictions: amortised O(1).
            self._sweep_credit = max(len(expired), self._max_keys // 8, 1)
            if len(data) < self._max_keys:
                return
        data.popitem(last=False)
        self._sweep_credit -= 1


def _evaluate(check: Check, state: Any, now: int) -> Evaluation:
    """One level's evaluation; the sliding log's ``state`` is a deque (trimmed in place)."""
    policy = check.policy
    rate = policy.rate
    algorithm = policy.algorithm
    if algorithm is _SC:
        return sc.evaluate(state, now, rate.limit, rate.period_us, check.cost)
    if algorithm is _GC:
        return gc.evaluate(state, now, rate.limit, rate.period_us, rate.capacity, check.cost)
    if algorithm is _TB:
        return tb.evaluate(state, now, rate.limit, rate.period_us, rate.capacity, check.cost)
    if algorithm is _FW:
        return fw.evaluate(state, now, rate.limit, rate.period_us, check.cost)
    sl.trim(state, now, rate.period_us)
    return sl.evaluate(state, now, rate.limit, rate.period_us, check.cost)
