"""The local mirrors of operator state (``fastapi_ratelimit.control``): none unless a feature
that needs one is configured, and, when one polls, through the circuit breaker, with one log
line per change of health.

Redis commands are counted by the server itself (``INFO stats``, ``total_commands_processed``)
on a server of the test's own, so no other test's traffic is counted. Waits are deadlines on
a condition, or generous windows in which the expected count is zero.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from faultproxy import FaultProxy
from http_helpers import cli, client_for, work_app
from loguru import logger
from servers import RedisServer

from fastapi_ratelimit import (
    DEFAULT_TIERS,
    BackendError,
    ConfigurationError,
    MemoryBackend,
    RateLimiter,
    RedisBackend,
)
from fastapi_ratelimit.breaker import CircuitBreaker, EndpointBreaker
from fastapi_ratelimit.control import Mirror, PollPolicy
from fastapi_ratelimit.dynamic import BehaviourTracker, DynamicLimits

#: A client the lists below name (client_for's default peer).
CLIENT_IP = "203.0.113.7"


async def until(condition: Callable[[], bool], what: str, deadline: float = 10.0) -> float:
    """Wait for ``condition``, checking every 20 ms; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < deadline, f"{what}: not within {deadline} s"
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def commands_processed(server: RedisServer) -> int:
    return int(server.info("stats")["total_commands_processed"])


async def commands_while_idle(server: RedisServer, seconds: float) -> int:
    """Commands the server ran over ``seconds`` (less the first INFO, which counts itself in
    the second one)."""
    before = commands_processed(server)
    await asyncio.sleep(seconds)
    return commands_processed(server) - before - 1


@pytest.fixture
def records() -> Iterator[list[Any]]:
    """Every loguru record (INFO and up) logged during the test."""
    captured: list[Any] = []
    handler = logger.add(lambda message: captured.append(message.record), level="INFO")
    yield captured
    logger.remove(handler)


def control_lines(records: list[Any], level: str, module: str = "control") -> list[str]:
    return [
        r["message"]
        for r in records
        if r["name"] == f"fastapi_ratelimit.{module}" and r["level"].name == level
    ]


# -- which mirrors poll ------------------------------------------------------------------------


class CountingStore(MemoryBackend):
    """A memory backend that counts the operator-state reads per namespace."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: Counter[str] = Counter()

    async def control_version(self, namespace: str) -> int:
        self.reads[namespace] += 1
        return await super().control_version(namespace)

    async def control_load(self, namespace: str) -> tuple[int, dict[str, str]]:
        self.reads[namespace] += 1
        return await super().control_load(namespace)


FEATURES: dict[str, tuple[Callable[[], dict[str, Any]], set[str]]] = {
    "nothing": (dict, set()),
    "lists": (lambda: {"access_lists": True}, {"allow", "block"}),
    "limit overrides": (lambda: {"limit_overrides": True}, {"limits"}),
    "tiers": (lambda: {"tiers": DEFAULT_TIERS}, {"tiers"}),
    "endpoint breaker": (lambda: {"endpoint_breaker": EndpointBreaker()}, {"breakers"}),
    "dynamic": (lambda: {"dynamic": DynamicLimits()}, {"override"}),
    "penalty box": (
        lambda: {"dynamic": DynamicLimits(behaviour=BehaviourTracker(penalty_violations=3))},
        {"override", "penalty"},
    ),
}


@pytest.mark.parametrize("feature", list(FEATURES))
async def test_only_configured_features_mirror_and_poll(feature: str) -> None:
    options, expected = FEATURES[feature]
    store = CountingStore()
    limiter = RateLimiter(
        backend=store,
        ip_limit="1000/minute",
        user_resolver=lambda connection: "alice",
        refresh_interval=0.05,
        **options(),
    )
    try:
        async with client_for(work_app(limiter)) as client:
            for _ in range(3):
                assert (await client.get("/work")).status_code == 200
            # The configured ones keep polling...
            await until(lambda: all(store.reads[n] >= 5 for n in expected), "polls")
            # ...and, over 10 more intervals, nothing else is ever read.
            await asyncio.sleep(0.5)
        assert set(store.reads) == expected
    finally:
        await limiter.aclose()


class SlowStore(CountingStore):
    """Every version read takes a round trip's time, as on Redis."""

    async def control_version(self, namespace: str) -> int:
        await asyncio.sleep(0.01)
        return await super().control_version(namespace)


def refresh_loops() -> int:
    return sum(
        getattr(task.get_coro(), "__qualname__", "") == "every" for task in asyncio.all_tasks()
    )


async def test_concurrent_first_requests_start_one_loop_per_mirror() -> None:
    store = SlowStore()
    limiter = RateLimiter(
        backend=store, ip_limit="1000/minute", access_lists=True, refresh_interval=0.05
    )
    async with client_for(work_app(limiter)) as client:
        statuses = await asyncio.gather(*(client.get("/work") for _ in range(20)))
        assert {response.status_code for response in statuses} == {200}
        assert refresh_loops() == 2  # allow and block, once each
    await limiter.aclose()
    assert refresh_loops() == 0
    reads = sum(store.reads.values())
    await asyncio.sleep(0.3)  # 6 intervals: nothing polls after aclose
    assert sum(store.reads.values()) == reads


@pytest.mark.redis
async def test_nothing_configured_sends_redis_nothing_while_idle() -> None:
    with RedisServer(name="idle") as server:
        limiter = RateLimiter(
            backend=RedisBackend.from_url(server.url, timeout=5.0),
            ip_limit="1000/minute",
            global_limit="100000/minute",
            refresh_interval=0.1,
        )
        try:
            async with client_for(work_app(limiter)) as client:
                for _ in range(5):
                    assert (await client.get("/work")).status_code == 200
                idle = await commands_while_idle(server, 2.0)
            assert idle == 0, server.command("INFO", "commandstats")
        finally:
            await limiter.aclose()


@pytest.mark.redis
async def test_idle_polling_with_lists_reads_only_the_version() -> None:
    with RedisServer(name="idle-lists") as server:
        limiter = RateLimiter(
            backend=RedisBackend.from_url(server.url, timeout=5.0),
            ip_limit="1000/minute",
            access_lists=True,
            refresh_interval=0.1,
        )
        try:
            async with client_for(work_app(limiter)) as client:
                assert (await client.get("/work")).status_code == 200
                server.command("CONFIG", "RESETSTAT")
                idle = await commands_while_idle(server, 1.0)
            stats = server.info("commandstats")
            # Two lists, every 0.1 s: one HMGET of the version each, never the whole hash (and
            # a HELLO if the two polls needed a second connection).
            assert 2 <= idle <= 2 * 10 + 4, stats
            ours = {"cmdstat_info", "cmdstat_config|resetstat", "cmdstat_hello"}
            assert set(stats) - ours == {"cmdstat_hmget"}, stats  # version and epoch
        finally:
            await limiter.aclose()


# -- the lists, configured: a block from anywhere applies everywhere ----------------------------


@pytest.mark.redis
async def test_cli_block_reaches_every_instance_with_lists(redis_url: str) -> None:
    limiters = [
        RateLimiter(
            backend=RedisBackend.from_url(redis_url, timeout=5.0),
            ip_limit="1000/minute",
            access_lists=True,
        )
        for _ in range(2)
    ]
    # An instance without the lists: the documented rule is that it never applies them.
    unlisted = RateLimiter(backend=RedisBackend.from_url(redis_url, timeout=5.0))
    try:
        async with (
            client_for(work_app(limiters[0])) as first,
            client_for(work_app(limiters[1])) as second,
            client_for(work_app(unlisted)) as third,
        ):
            for client in (first, second, third):
                assert (await client.get("/work")).status_code == 200
            done = await asyncio.to_thread(
                cli, redis_url, "block", "add", "ip", CLIENT_IP, "--reason", "abuse"
            )
            assert done.returncode == 0, done.stderr
            statuses: dict[int, int] = {}

            async def blocked() -> None:
                # Every instance polls on its own: wait for both, with a generous deadline
                # (the promise is about 1 s at the default refresh_interval of 0.5 s).
                started = time.monotonic()
                while True:
                    for index, client in enumerate((first, second)):
                        if index not in statuses:
                            status = (await client.get("/work")).status_code
                            if status == 403:
                                statuses[index] = status
                    if len(statuses) == 2:
                        return
                    assert time.monotonic() - started < 5.0, f"blocked only on {statuses}"
                    await asyncio.sleep(0.02)

            await blocked()
            assert (await third.get("/work")).status_code == 200
        with pytest.raises(ConfigurationError, match=r"^access_lists: "):
            await unlisted.operator.block("ip", CLIENT_IP)
    finally:
        for limiter in (*limiters, unlisted):
            await limiter.aclose()


def test_lists_need_a_store() -> None:
    class Plain:
        """A Backend without operator state."""

        async def hit(self, checks: Any) -> Any: ...
        async def peek(self, checks: Any) -> Any: ...
        async def refund(self, checks: Any) -> None: ...
        async def reset(self, checks: Any) -> None: ...
        async def aclose(self) -> None: ...

    assert RateLimiter(backend=Plain()).lists is None  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"^access_lists: "):
        RateLimiter(backend=Plain(), access_lists=True)  # type: ignore[arg-type]


# -- polling while Redis is down -----------------------------------------------------------------


class FailingStore:
    """Operator state that cannot be reached (or can, when ``up``)."""

    def __init__(self) -> None:
        self.up = False
        self.calls = 0

    async def control_version(self, namespace: str) -> int:
        self.calls += 1
        if not self.up:
            raise BackendError("Redis control failed: ConnectionError (test)")
        return 0

    async def control_load(self, namespace: str) -> tuple[int, dict[str, str]]:
        self.calls += 1
        if not self.up:
            raise BackendError("Redis control failed: ConnectionError (test)")
        return 0, {}

    async def control_put(self, namespace: str, key: str, value: str) -> None: ...

    async def control_delete(self, namespace: str, keys: list[str]) -> int:
        return 0


async def test_polls_pause_while_the_breaker_is_open(records: list[Any]) -> None:
    now = [1000.0]
    breaker = CircuitBreaker(failure_threshold=3, cooldown=5.0, clock=lambda: now[0])
    store = FailingStore()
    policy = PollPolicy(breaker)
    mirrors = [Mirror(store, name, 0.02, policy) for name in ("allow", "block")]
    try:
        for mirror in mirrors:
            await mirror.ensure_loaded()
        # The polls' failures count: the breaker opens without a single request.
        await until(lambda: breaker.state == "open", "breaker open")
        calls = store.calls
        await asyncio.sleep(0.4)  # 20 intervals
        assert store.calls == calls
        assert len(control_lines(records, "WARNING")) == 1
        # After the cooldown one poll probes; Redis is still down: open again, nothing logged.
        now[0] += 5.0
        await until(lambda: store.calls == calls + 1, "one probe")
        await asyncio.sleep(0.2)
        assert store.calls == calls + 1
        assert breaker.state == "open"
        store.up = True
        now[0] += 5.0
        await until(lambda: breaker.state == "closed", "closed by a poll")
        await until(lambda: bool(control_lines(records, "INFO")), "works again")
        await asyncio.sleep(0.2)
        assert len(control_lines(records, "WARNING")) == 1
        assert len(control_lines(records, "INFO")) == 1
        assert all(mirror.running for mirror in mirrors)
        # The breaker too: opened once, closed once; the failed probe between is not a line.
        assert len(control_lines(records, "WARNING", "breaker")) == 1
        assert len(control_lines(records, "INFO", "breaker")) == 1
    finally:
        for mirror in mirrors:
            await mirror.aclose()


async def test_a_cancelled_probe_gives_the_probe_back() -> None:
    now = [1000.0]
    breaker = CircuitBreaker(failure_threshold=1, cooldown=5.0, clock=lambda: now[0])
    breaker.record_failure()
    now[0] += 5.0
    entered = asyncio.Event()

    class Hanging(FailingStore):
        async def control_version(self, namespace: str) -> int:
            entered.set()
            await asyncio.sleep(3600)
            return 0

    mirror = Mirror(Hanging(), "allow", 0.02, PollPolicy(breaker))
    task = asyncio.create_task(mirror.poll())
    await entered.wait()
    assert breaker.state == "half_open"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Not stuck half-open with a probe nobody will finish: open, and probed again later.
    assert breaker.state == "open"
    now[0] += 5.0
    assert breaker.allow_call()


@pytest.mark.redis
async def test_redis_down_polls_through_the_breaker(records: list[Any]) -> None:
    now = [1000.0]
    breaker = CircuitBreaker(failure_threshold=3, cooldown=5.0, clock=lambda: now[0])
    with RedisServer(name="mirrors-down") as server:
        async with FaultProxy("127.0.0.1", server.port) as proxy:
            limiter = RateLimiter(
                backend=RedisBackend.from_url(proxy.url, timeout=0.25),
                ip_limit="1000/minute",
                access_lists=True,
                refresh_interval=0.1,
                breaker=breaker,
            )

            async def settled() -> int:
                """The connection attempts once none is under way: a poll that was in flight
                when the breaker opened may retry until its timeout (0.25 s)."""
                started = time.monotonic()
                while True:
                    seen = proxy.stats.connections_accepted
                    await asyncio.sleep(0.6)
                    if proxy.stats.connections_accepted == seen:
                        return seen
                    assert time.monotonic() - started < 10.0, "connection attempts go on"

            try:
                async with client_for(work_app(limiter)) as client:
                    assert (await client.get("/work")).status_code == 200
                    server.stop()
                    # No requests from here on: the polls alone see Redis is gone.
                    await until(lambda: breaker.state == "open", "breaker open")
                    attempts = await settled()
                    await asyncio.sleep(2.0)  # 20 more intervals, two lists
                    assert proxy.stats.connections_accepted == attempts
                    assert len(control_lines(records, "WARNING")) == 1
                    server.start()
                    now[0] += 5.0  # the cooldown is over: a poll probes, and closes it
                    await until(lambda: breaker.state == "closed", "breaker closed")
                    await until(lambda: bool(control_lines(records, "INFO")), "works again")
                    # Polling resumed: a block added now (by another instance) applies.
                    other = RedisBackend.from_url(server.url, timeout=5.0)
                    try:
                        entry = json.dumps({"kind": "ip", "value": f"{CLIENT_IP}/32"})
                        await other.control_put("block", f"ip:{CLIENT_IP}/32", entry)
                    finally:
                        await other.aclose()
                    started = time.monotonic()
                    while (await client.get("/work")).status_code != 403:
                        assert time.monotonic() - started < 5.0, "the block never applied"
                        await asyncio.sleep(0.02)
                assert len(control_lines(records, "WARNING")) == 1
                assert len(control_lines(records, "INFO")) == 1
            finally:
                await limiter.aclose()


@pytest.mark.redis
async def test_a_mirror_follows_redis_after_it_lost_its_keyspace(redis_url: str) -> None:
    """Found in the session-25 audit: after FLUSHALL (or a restart without persistence) the
    version count starts again, and one write brought it back to the number the instance had
    seen: it kept the lost block list for good. Versions now carry a random epoch."""
    import redis as sync_redis

    from fastapi_ratelimit import RedisBackend

    limiter = RateLimiter(
        backend=RedisBackend.from_url(redis_url, timeout=0.5),
        ip_limit="1000/minute",
        access_lists=True,
        refresh_interval=0.1,
    )
    app = work_app(limiter)

    async def status(ip: str) -> int:
        async with client_for(app, ip=ip) as client:
            return (await client.get("/work")).status_code

    old, new = "198.51.100.1", "198.51.100.2"
    await limiter.operator.block("ip", old)  # version 1
    assert (await status(old), await status(new)) == (403, 200)
    with sync_redis.Redis.from_url(redis_url) as client:
        client.flushall()
    await limiter.operator.block("ip", new)  # version 1 again, of a new epoch
    await asyncio.sleep(0.5)  # several refreshes
    try:
        assert (await status(old), await status(new)) == (200, 403)
    finally:
        await limiter.aclose()


@pytest.mark.redis
async def test_a_copy_loaded_by_an_operator_call_is_looked_at_again_on_first_use(
    redis_url: str,
) -> None:
    """Found in the session-25 audit: an operator call made on an instance before it served
    anything loaded the copy; the first request then used that copy, however old, until the
    loop's first poll."""
    from fastapi_ratelimit import RedisBackend

    def instance() -> RateLimiter:
        return RateLimiter(
            backend=RedisBackend.from_url(redis_url, timeout=0.5),
            ip_limit="1000/minute",
            access_lists=True,
            refresh_interval=0.2,
        )

    first, second = instance(), instance()
    try:
        await first.operator.block("ip", "203.0.113.7")  # before it serves anything
        await second.operator.unblock("ip", "203.0.113.7")
        await asyncio.sleep(0.5)  # longer than first's refresh interval, with no request
        async with client_for(work_app(first)) as client:
            assert (await client.get("/work")).status_code == 200
    finally:
        await first.aclose()
        await second.aclose()
