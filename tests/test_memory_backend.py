"""What only the memory backend has to show: bounded size, expiry, LRU eviction."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastapi_ratelimit import Algorithm, Check, ConfigurationError, FakeClock, MemoryBackend, Policy


async def test_stays_within_max_keys_after_a_million_identities() -> None:
    backend = MemoryBackend(max_keys=10_000, clock=FakeClock())
    policy = Policy("ip", "5/minute", Algorithm.FIXED_WINDOW)
    high_water = 0
    for i in range(1_000_000):
        await backend.hit([Check(policy, "ip", f"id-{i}")])
        if i % 997 == 0:
            high_water = max(high_water, len(backend))
    assert len(backend) <= 10_000
    assert high_water <= 10_000
    assert len(backend) >= 9_000  # it evicts one at a time, it does not throw state away


async def test_expired_keys_are_evicted_before_live_ones() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=10, clock=clock, ttl_margin=0)
    short = Policy("short", "1/second", Algorithm.FIXED_WINDOW)
    long = Policy("long", "1/hour", Algorithm.FIXED_WINDOW)
    for i in range(5):
        await backend.hit([Check(long, "user", f"keep{i}")])
    for i in range(5):
        await backend.hit([Check(short, "user", f"gone{i}")])
    clock.advance(2)
    for i in range(5):
        await backend.hit([Check(short, "user", f"new{i}")])
    assert len(backend) == 10
    # The long-lived users are still limited: their state survived the evictions.
    for i in range(5):
        assert not (await backend.hit([Check(long, "user", f"keep{i}")])).allowed


async def test_least_recently_used_is_evicted_when_nothing_expired() -> None:
    backend = MemoryBackend(max_keys=3, clock=FakeClock())
    policy = Policy("p", "2/hour", Algorithm.GCRA)
    for name in ("a", "b", "c"):
        await backend.hit([Check(policy, "ip", name)])
    await backend.hit([Check(policy, "ip", "a")])  # a is now the most recently used
    await backend.hit([Check(policy, "ip", "d")])  # evicts b
    assert (await backend.peek([Check(policy, "ip", "a")])).decisions[0].remaining == 0
    assert (await backend.peek([Check(policy, "ip", "c")])).decisions[0].remaining == 1
    assert (await backend.peek([Check(policy, "ip", "b")])).decisions[0].remaining == 2


async def test_making_room_never_loses_an_update_of_the_same_request() -> None:
    # Full at 2 keys; a request that touches the least recently used key AND a new one must
    # keep its update of the old key (the new key evicts the other, older one).
    backend = MemoryBackend(max_keys=2, clock=FakeClock())
    policy = Policy("p", "5/hour")
    a, b, c = (Check(policy, "ip", name) for name in "abc")
    await backend.hit([a])
    await backend.hit([b])
    await backend.hit([c, a])  # the new key first: making room for it must not take a
    assert (await backend.peek([a])).decisions[0].remaining == 3
    assert (await backend.peek([b])).decisions[0].remaining == 5  # evicted


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 2),  # which identity
            st.integers(1, 4),  # cost
            st.integers(0, 40_000),  # ms to wait first
        ),
        min_size=1,
        max_size=40,
    )
)
def test_fast_path_decides_exactly_as_the_general_one(steps: list[tuple[int, int, int]]) -> None:
    """hit_now() takes the all-admitted sliding-window shortcut; _check() never does. Same
    answers and the same stored state, admitted or not."""
    policies = [Policy("a", "7/10s"), Policy("b", "12/30s")]
    clocks = (FakeClock(), FakeClock())
    fast, general = (MemoryBackend(clock=clock) for clock in clocks)
    for who, cost, wait in steps:
        for clock in clocks:
            clock.advance(wait / 1000)
        checks = [Check(p, "ip", f"id{who}", cost) for p in policies]
        checks.append(Check(policies[0], "global", "", cost))
        assert fast.hit_now(checks) == general._check(checks, commit=True)
    # The same live state (expired keys may be swept at different moments: both ignore them).
    now = clocks[0].now_us()
    assert {k: v for k, v in fast._data.items() if v[0] > now} == {
        k: v for k, v in general._data.items() if v[0] > now
    }


async def test_expired_state_is_dropped() -> None:
    clock = FakeClock()
    backend = MemoryBackend(max_keys=100, clock=clock)
    policy = Policy("p", "1/second", Algorithm.SLIDING_WINDOW_LOG)
    for i in range(100):
        await backend.hit([Check(policy, "ip", f"{i}")])
    assert len(backend) == 100
    clock.advance(10)
    # No background task: each insert drops expired keys from the least recently used end,
    # and a full insert sweeps them all.
    for i in range(50):
        await backend.hit([Check(policy, "ip", f"fresh{i}")])
    assert len(backend) == 50
    # A read of an expired key drops it too.
    before = len(backend)
    await backend.hit([Check(policy, "ip", "x")])
    clock.advance(10)
    await backend.peek([Check(policy, "ip", "x")])
    assert len(backend) == before


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_keys": 0}, "max_keys"),
        ({"max_keys": -5}, "max_keys"),
        ({"max_keys": 1.5}, "max_keys"),
        ({"ttl_margin": -1}, "ttl_margin"),
        ({"prefix": ""}, "prefix"),
    ],
)
def test_bad_configuration_names_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        MemoryBackend(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


@pytest.mark.parametrize("cost", [0, -1, 1.5, True])
def test_bad_cost_is_refused(cost: object) -> None:
    with pytest.raises(ValueError, match="cost"):
        Check(Policy("p", "1/second"), "ip", "a", cost)  # type: ignore[arg-type]


# -- what the store holds -----------------------------------------------------------------------


async def test_store_holds_no_raw_api_key_and_nothing_oversized() -> None:
    """Short IP and user identities stay as they are (they never leave the process); API
    keys, every other scope and anything over 64 characters are held only as the hashed
    storage key."""
    backend = MemoryBackend()
    policy = Policy("p", "5/minute")
    secret = "sk_live_0123456789abcdef"
    huge_user = "u" * 5000
    await backend.hit(
        [
            Check(policy, "ip", "203.0.113.7"),
            Check(policy, "api_key", secret),
            Check(policy, "user", huge_user),
            Check(policy, "tenant", "acme"),
        ]
    )
    keys = list(backend._data)
    assert ("ip", "p", policy.code, "203.0.113.7") in keys
    assert len(keys) == 4
    text = repr(keys)
    assert secret not in text
    assert "acme" not in text
    assert huge_user[:100] not in text
    assert max(len(repr(k)) for k in keys) < 120


@given(st.text(max_size=80))
@settings(max_examples=200, deadline=None)
def test_a_raw_identity_never_shares_a_key_with_a_hashed_one(identity: str) -> None:
    """A user id chosen to equal another identity's storage key still gets a bucket of its
    own: raw identities live in tuples, hashed ones in strings."""
    backend = MemoryBackend()
    policy = Policy("p", "5/minute")
    hashed = backend._key(Check(policy, "api_key", identity))
    raw = backend._key(Check(policy, "user", hashed if isinstance(hashed, str) else identity))
    assert raw != hashed
    assert backend._key(Check(policy, "user", identity)) != hashed


async def test_entries_are_untracked_by_the_garbage_collector() -> None:
    """Thousands of clients' counters must add no work to each full collection (p99)."""
    import gc

    backend = MemoryBackend()
    policy = Policy("p", "1000/minute")
    for i in range(1000):
        await backend.hit([Check(policy, "ip", f"10.0.{i // 256}.{i % 256}")])
    # A tuple is untracked by the collection after the one that untracked its items: an
    # entry leaves the young generations untracked and never reaches the old one.
    gc.collect()
    gc.collect()
    assert not any(gc.is_tracked(entry) for entry in backend._data.values())
