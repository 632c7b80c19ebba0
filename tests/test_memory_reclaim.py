"""The memory backend under pressure and at rest (issue 14, defects 2 and 3): eviction never
favours a client being denied, and idle memory is given back."""

from __future__ import annotations

import asyncio

from http_helpers import client_for, work_app

from fastapi_ratelimit import Check, FakeClock, MemoryBackend, Policy, RateLimiter
from fastapi_ratelimit.policy import Algorithm


async def test_a_denied_client_is_not_evicted_into_a_fresh_quota() -> None:
    # The reproduction: a full store, one exhausted client retrying every 20 new
    # identities while 500 others churn through. Before the fix it was admitted 13 times.
    backend = MemoryBackend(max_keys=100, clock=FakeClock())
    policy = Policy("ip", "5/minute")
    victim = Check(policy, "ip", "198.51.100.1")
    for _ in range(5):
        assert (await backend.hit([victim])).allowed
    admitted = 0
    for i in range(500):
        await backend.hit([Check(policy, "ip", f"10.0.{i // 256}.{i % 256}")])
        if i % 20 == 0:
            admitted += (await backend.hit([victim])).allowed
    assert admitted == 0
    assert len(backend) == 100


async def test_every_algorithm_keeps_a_denied_key_recent() -> None:
    for algorithm in Algorithm:
        backend = MemoryBackend(max_keys=3, clock=FakeClock())
        policy = Policy("ip", "1/minute", algorithm)
        victim = Check(policy, "ip", "victim")
        assert (await backend.hit([victim])).allowed
        for i in range(10):
            await backend.hit([Check(policy, "ip", f"other-{i}")])
            assert not (await backend.hit([victim])).allowed, algorithm


async def test_the_middleware_keeps_denying_under_identity_churn() -> None:
    limiter = RateLimiter(backend=MemoryBackend(max_keys=50), ip_limit="3/minute")
    app = work_app(limiter)
    async with client_for(app, ip="198.51.100.9") as victim:
        assert [(await victim.get("/work")).status_code for _ in range(4)] == [
            200,
            200,
            200,
            429,
        ]
        for batch in range(10):
            for i in range(20):
                async with client_for(app, ip=f"10.1.{batch}.{i}") as other:
                    await other.get("/work")
            assert (await victim.get("/work")).status_code == 429


async def test_idle_memory_is_given_back() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    policy = Policy("ip", "10/minute")
    for i in range(5_000):
        await backend.hit([Check(policy, "ip", f"client-{i}")])
    assert len(backend) == 5_000
    # Silence past every window (the sliding counter weighs two), with no request at all:
    # only the backend's own timer can reclaim.
    clock.advance(3 * 60 + 2)
    for _ in range(600):  # the timer ticks every second: a generous 30 s to see it
        if not len(backend):
            break
        await asyncio.sleep(0.05)
    assert len(backend) == 0
    await backend.aclose()


async def test_live_keys_survive_the_idle_sweep() -> None:
    clock = FakeClock()
    backend = MemoryBackend(clock=clock)
    short, long = Policy("short", "10/second"), Policy("long", "10/hour")
    for i in range(100):
        await backend.hit([Check(short, "ip", f"s-{i}")])
    await backend.hit([Check(long, "ip", "kept")])
    clock.advance(5)
    assert backend.sweep() == 100
    assert len(backend) == 1
    assert (await backend.peek([Check(long, "ip", "kept")])).decisions[0].remaining == 9
